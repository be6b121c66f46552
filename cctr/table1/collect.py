"""Table 1, stage 3 (collect): one record per cell, read from the tracking store alone.

A cell is done when the store holds a FINISHED cell run with the same config hash: this table's, else
another table's of the same dataset (the same configuration trains the same weights, so a full grid
reuses the cells of a smaller table that ran first); its metrics come from the run, its per-case CSV
from the run folder when it is on this machine, else from the run's artifacts (through the server),
so any machine can write the table.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from cctr.table1.plan import Table1Spec, cell_hashes, cells, table_dataset


def _table_runs(dataset: str, name: str | None, status: str | None = None, role: str = "cell",
                config_hash: str | None = None) -> list:
    """Runs of table `name` (every table's when None) in the dataset's experiment; of one config hash
    when given."""
    from cctr import tracking

    flt = f"tags.role = '{role}'" + (f" and tags.table1 = '{name}'" if name is not None else "")
    if config_hash:
        flt += f" and tags.config_hash = '{config_hash}'"
    if status:
        flt += f" and attributes.status = '{status}'"
    runs, token = [], None
    c = tracking.client()
    exp = c.get_experiment_by_name(dataset)
    if exp is None:
        return []
    while True:
        page = c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _finished_by_hash(dataset: str, name: str, config_hash: str | None = None) -> dict[str, Any]:
    """config hash -> the first FINISHED cell run of it, this table's before any other table's (a later
    duplicate never changes the table); `config_hash`: that one hash only (one small query)."""
    out: dict[str, Any] = {}
    runs = _table_runs(dataset, None, "FINISHED", config_hash=config_hash)
    for r in sorted(runs, key=lambda r: (r.data.tags.get("table1") != name, r.info.start_time, r.info.run_id)):
        out.setdefault(r.data.tags.get("config_hash", ""), r)
    return out


def collect_records(spec: Table1Spec, dataset: str | None = None,
                    outcome: dict[tuple, tuple[str, str | None]] | None = None) -> list[dict]:
    """One record per cell, read back from MLflow (so a resumed table equals an uninterrupted one)."""
    all_cells = cells(spec)
    hashes = cell_hashes(spec)
    dataset = dataset or table_dataset(spec)
    finished = _finished_by_hash(dataset, spec.name)
    records = []
    for c in all_cells:
        m, lab, s = c
        run = finished.get(hashes[c])
        rec: dict[str, Any] = {"method": m, "labeled": lab, "seed": s}
        if run is None:
            status, err = (outcome or {}).get(c, ("MISSING", None))
            rec.update(status=status if status != "FINISHED" else "MISSING", error=err, run_id=None, run_dir=None,
                       labeled_cases="")
        else:
            rec.update(status="FINISHED", error=None, run_id=run.info.run_id,
                       run_dir=run.data.tags.get("checkpoint_dir"), labeled_cases=run.data.tags.get("labeled_cases", ""),
                       **{k: float(v) for k, v in run.data.metrics.items()})
        records.append(rec)
    return records


def disk_usage(records: list[dict]) -> dict[str, int]:
    """Bytes of every file under the table's run folders (and of the checkpoints among them)."""
    total = ckpt = n = 0
    for d in sorted({r["run_dir"] for r in records if r.get("run_dir")}):
        p = Path(d)
        if not p.is_dir():
            continue
        n += 1
        for f in p.rglob("*"):
            if f.is_file() and not f.is_symlink():
                size = f.stat().st_size
                total += size
                ckpt += size if f.suffix == ".pt" else 0
    return {"run_dirs": n, "bytes": total, "checkpoint_bytes": ckpt}


def metric(rec: dict, ckpt: str, name: str, cls: str | None = None) -> float:
    """A test metric of a record: `name` in dice/hd95/asd for checkpoint best|last, per class if
    `cls`; accepts the names with and without the `_mm` unit. `reg-only` has one evaluation, used
    for both checkpoints."""
    prefixes = ["test"] if ckpt == "best" else ["test_last"] + (["test"] if rec.get("method") == "reg-only" else [])
    names = [name] if name == "dice" else [f"{name}_mm", name]
    for p in prefixes:
        for n in names:
            k = f"{p}_{n}" + (f"_{cls}" if cls else "")
            if k in rec and rec[k] is not None:
                return float(rec[k])
    return float("nan")


def per_case_dice(rec: dict, ckpt: str) -> dict[str, float]:
    """case -> mean foreground Dice over classes, from the run's per-case CSV (run folder, else the
    MLflow artifact)."""
    path = _per_case_csv(rec, ckpt)
    if path is None:
        return {}
    acc: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                v = float(row["dice"])
            except (KeyError, ValueError):
                continue
            acc.setdefault(row["case"], []).append(v)
    return {c: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for c, v in acc.items()}


def _per_case_csv(rec: dict, ckpt: str) -> Path | None:
    names = [f"test_per_case_{ckpt}.csv"]
    if rec.get("method") == "reg-only":
        names += ["test_per_case_best.csv", "test_per_case.csv"]
    if rec.get("run_dir"):
        for n in names:
            if (Path(rec["run_dir"]) / n).is_file():
                return Path(rec["run_dir"]) / n
    if rec.get("run_id"):
        import tempfile

        from cctr import tracking

        dst = Path(tempfile.mkdtemp(prefix="cctr-table1-"))
        for n in names:
            try:
                return Path(tracking.client().download_artifacts(rec["run_id"], n, str(dst)))
            except Exception:  # noqa: BLE001 — not logged under that name
                continue
    return None
