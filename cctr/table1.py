"""Table 1: methods x labeled counts x seeds, each cell one tracked run; resumable.

A cell is done when MLflow holds a FINISHED run tagged with this table, the cell and the same
config hash; re-running only trains what is missing, then the table is rebuilt from MLflow.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cctr.atomic import atomic_file
from cctr.checkpoint import config_hash
from cctr.config import RunConfig, apply_overrides, load_config, read_yaml, to_dict
from cctr.errors import CctrError


@dataclass
class Table1Spec:
    name: str
    config: str
    preset: str
    methods: list[str]
    labeled: list[int]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)


def load_table_spec(path: Path, preset: str | None = None, seeds: int | None = None) -> Table1Spec:
    raw = read_yaml(path, "table spec")
    from cctr.train import get_method

    for m in raw.get("methods", []):
        get_method(m)
    preset = preset or raw.get("preset", "quick")
    sets = raw.get("set") or {}  # overrides per preset: the CPU default must not cripple `paper`
    spec = Table1Spec(path.stem, str(raw["config"]), preset, list(raw["methods"]),
                      [int(x) for x in raw["labeled"]], [int(x) for x in raw.get("seeds", [0])],
                      list(sets.get(preset, []) if isinstance(sets, dict) else sets))
    if seeds is not None:
        if seeds < 1:
            raise CctrError(f"SEEDS must be >= 1, got {seeds}")
        spec.seeds = list(range(seeds))
    return spec


def cell_config(spec: Table1Spec, method: str, labeled: int, seed: int) -> RunConfig:
    base = load_config(spec.config, spec.preset, spec.overrides)
    return apply_overrides(base, [f"train.method={method}", f"data.labeled={labeled}", f"train.seed={seed}"])


def cells(spec: Table1Spec) -> list[tuple[str, int, int]]:
    """`full` ignores the labeled count: it is trained once per seed and shown in every column."""
    out = []
    for m in spec.methods:
        for lab in ([spec.labeled[0]] if m == "full" else spec.labeled):
            for s in spec.seeds:
                out.append((m, lab, s))
    return out


def run_table(spec: Table1Spec, log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Train every missing cell under one parent run, then return one record per cell."""
    from cctr import tracking
    from cctr.runs import run_dir_for
    from cctr.train import train

    todo = cells(spec)
    dataset = cell_config(spec, *todo[0]).data.dataset
    parents = tracking.find_runs(dataset, f"tags.table1 = '{spec.name}' and tags.role = 'table'")
    parent_id = parents[0].info.run_id if parents else None
    records = []
    with tracking.start_run(dataset, f"table1-{spec.name}", tags={"table1": spec.name, "role": "table"},
                            run_id=parent_id) as parent:
        for i, (m, lab, s) in enumerate(todo):
            cfg = cell_config(spec, m, lab, s)
            h = config_hash(to_dict(cfg))
            done = tracking.find_runs(dataset, f"tags.table1 = '{spec.name}' and tags.config_hash = '{h}' "
                                               f"and attributes.status = 'FINISHED'")
            if done:
                log(f"[{i + 1}/{len(todo)}] {m} l={lab} seed={s}: done already ({done[0].info.run_id})")
                metrics = done[0].data.metrics
            else:
                log(f"[{i + 1}/{len(todo)}] {m} l={lab} seed={s}: training")
                res = train(cfg, run_dir_for(cfg), progress=progress, parent_run_id=parent.run_id,
                            tags={"table1": spec.name, "config_hash": h})
                metrics = res.metrics
            records.append({"method": m, "labeled": lab, "seed": s, **metrics})
    return records


def write_table(spec: Table1Spec, records: list[dict], dataset: str, class_names: tuple[str, ...],
                out_dir: Path = Path("results")) -> dict[str, Path]:
    """Markdown (mean ± std over seeds), CSV (per class too) and a figure."""
    from cctr.report import table1_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in spec.methods:
        for lab in spec.labeled:
            sel = [r for r in records if r["method"] == m and (r["labeled"] == lab or m == "full")]
            if not sel:
                continue
            row = {"method": m, "labeled": lab, "n_seeds": len(sel)}
            keys = ["test_dice", "test_hd95"] + [f"test_dice_{c}" for c in class_names[1:]]
            for k in keys:
                vals = np.array([r.get(k, np.nan) for r in sel], float)
                row[f"{k}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                row[f"{k}_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
            rows.append(row)
    base = out_dir / f"table1_{dataset.replace('-', '_')}"
    with atomic_file(base.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Table 1 — {dataset} ({spec.preset} preset, {len(spec.seeds)} seed(s))", "",
             "Test set, best-val checkpoint, ensemble of both nets; mean ± std over seeds. "
             "Dice (higher is better) / HD95 in mm (lower is better).", "",
             "| method | " + " | ".join(f"{lab} labeled: Dice | HD95" for lab in spec.labeled) + " |",
             "|---|" + "---|---|" * len(spec.labeled)]
    for m in spec.methods:
        cellsx = []
        for lab in spec.labeled:
            r = next((r for r in rows if r["method"] == m and r["labeled"] == lab), None)
            cellsx.append("- | -" if r is None else
                          f"{r['test_dice_mean']:.3f} ± {r['test_dice_std']:.3f} | "
                          f"{r['test_hd95_mean']:.1f} ± {r['test_hd95_std']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cellsx) + " |")
    with atomic_file(base.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    fig = table1_figure(rows, spec.methods, spec.labeled, base.with_suffix(".png"))
    return {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv"), "png": fig}
