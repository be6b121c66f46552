"""Table-1 figures beside the bar chart: a Fig. 3-style qualitative comparison (the same test slices,
ground truth and every method side by side) and a Fig. 4-style plot of pseudo-label Dice over
iterations for `ct`, `cct` and `cctr`, read back from MLflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cctr.atomic import atomic_file  # noqa: E402

PL_METHODS = ("ct", "cct", "cctr")
PL_KEYS = (("pl_dice_a", "net A"), ("pl_dice_b", "net B"), ("pl_dice_reg", "registration labels"))


def _save(fig, path: Path) -> Path:
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def best_checkpoint(rec: dict) -> Path | None:
    """best.pt of a record's run: in its run folder, else the MLflow artifact (checkpoints/best.pt)."""
    if rec.get("run_dir") and (Path(rec["run_dir"]) / "best.pt").is_file():
        return Path(rec["run_dir"]) / "best.pt"
    if rec.get("run_id"):
        from cctr import tracking

        try:
            dst = tempfile.mkdtemp(prefix="cctr-fig-")
            return Path(tracking.client().download_artifacts(rec["run_id"], "checkpoints/best.pt", dst))
        except Exception:  # noqa: BLE001 — not logged, or removed
            return None
    return None


def pick_slices(ds, case_ids: list[str], n: int = 3) -> list[tuple[str, int]]:
    """(case, slice) for the first `n` test cases: the slice with the most ground-truth foreground."""
    out = []
    for cid in case_ids[:n]:
        lab = np.asarray(ds.case(cid).label)
        fg = (lab > 0).reshape(lab.shape[0], -1).sum(1)
        out.append((cid, int(np.argmax(fg)) if fg.any() else lab.shape[0] // 2))
    return out


def method_predictions(spec, records: list[dict], dataset: str, slices: list[tuple[str, int]],
                       labeled: int, seed: int) -> dict[str, dict[str, np.ndarray] | None]:
    """method -> {case: label slice [H,W]} at (labeled, seed) from its best.pt (`reg-only`: the
    registration labels); None where the run or its checkpoint is missing."""
    from cctr.data.datasets import load_dataset
    from cctr.evaluate import load_nets, predicting_nets
    from cctr.inference import predict_volume
    from cctr.table1.plan import cell_config, cell_split

    ds = load_dataset(dataset)
    out: dict[str, dict[str, np.ndarray] | None] = {}
    for m in spec.methods:
        rec = next((r for r in records if r["method"] == m and r["seed"] == seed and r["status"] == "FINISHED"
                    and (r["labeled"] == labeled or m == "full")), None)
        if rec is None:
            out[m] = None
            continue
        if m == "reg-only":
            from cctr.registration import registration_maps

            cfg = cell_config(spec, m, labeled, seed)
            try:
                reg = registration_maps(dataset, cfg.registration, cell_split(cfg))
                out[m] = {cid: np.asarray(reg[cid].y_reg[z]) for cid, z in slices}  # one slice decompressed
            except Exception:  # noqa: BLE001 — registration model gone: show the panel as missing
                out[m] = None
            continue
        ck = best_checkpoint(rec)
        if ck is None:
            out[m] = None
            continue
        cfg, nets, ckd = load_nets(ck)
        nets = predicting_nets(nets, ckd)
        out[m] = {cid: predict_volume(nets, np.asarray(ds.case(cid).image)[z:z + 1], cfg.data.size)[0]
                  for cid, z in slices}
    return out


def qualitative_figure(spec, records: list[dict], dataset: str, path: Path, n_cases: int = 3,
                       labeled: int | None = None, seed: int | None = None) -> Path | None:
    """Fig. 3 style: one row per test slice; image, ground truth, then every method's prediction
    (best-val checkpoint) at the first labeled count and the first seed."""
    from cctr.data.datasets import load_dataset
    from cctr.table1.plan import cell_config, cell_split
    from cctr.viz import add_class_legend, label_overlay

    labeled = spec.labeled[0] if labeled is None else labeled
    seed = spec.seeds[0] if seed is None else seed
    ds = load_dataset(dataset)
    test = cell_split(cell_config(spec, spec.methods[0], labeled, seed)).test
    slices = pick_slices(ds, list(test), n_cases)
    if not slices:
        return None
    preds = method_predictions(spec, records, dataset, slices, labeled, seed)
    C = ds.spec.num_classes
    cols = ["image", "ground truth"] + list(spec.methods)
    fig, axes = plt.subplots(len(slices), len(cols), figsize=(1.7 * len(cols), 1.9 * len(slices)), squeeze=False)
    for r, (cid, z) in enumerate(slices):
        case = ds.case(cid)
        img = np.asarray(case.image)[z]
        aspect = case.spacing[1] / case.spacing[2]
        for c, title in enumerate(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c == 0:
                ax.imshow(img, cmap="gray", aspect=aspect)
                ax.set_title(f"{cid} z={z}", fontsize=7)
                continue
            lab = np.asarray(case.label)[z] if c == 1 else (preds[title] or {}).get(cid)
            if lab is None:
                ax.text(0.5, 0.5, "no run", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(label_overlay(img, lab, C), aspect=aspect)
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"{dataset}: test slices, {labeled} labeled, seed {seed} (best-val checkpoints)", fontsize=9)
    add_class_legend(fig, ds.spec.class_names)
    return _save(fig, path)


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """step -> value of an MLflow metric; a step logged twice (a resumed run) keeps its last value."""
    from cctr import tracking

    hist = sorted(tracking.client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in hist}


def pseudo_label_histories(records: list[dict], labeled: int, methods=PL_METHODS) -> dict[str, dict[str, Any]]:
    """method -> key -> (steps, [per-seed values]) of pl_dice_a/b/reg at `labeled`, from MLflow."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        recs = [r for r in records if r["method"] == m and r["labeled"] == labeled and r["status"] == "FINISHED"]
        for key, _ in PL_KEYS:
            hs = [metric_history(r["run_id"], key) for r in recs]
            hs = [h for h in hs if h]
            if not hs:
                continue
            steps = sorted(set.intersection(*(set(h) for h in hs)))
            out.setdefault(m, {})[key] = (steps, np.array([[h[s] for s in steps] for h in hs], float))
    return out


def pseudo_label_figure(spec, records: list[dict], path: Path, labeled: int | None = None,
                        methods=PL_METHODS) -> Path | None:
    """Fig. 4 style: pseudo-label Dice on the unlabeled training cases over iterations, one panel per
    method (net A, net B, registration labels); mean over seeds, shaded min–max."""
    labeled = spec.labeled[0] if labeled is None else labeled
    hist = pseudo_label_histories(records, labeled, [m for m in methods if m in spec.methods])
    if not hist:
        return None
    ms = [m for m in methods if m in hist]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.6 * len(ms), 3.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], ms):
        for key, label in PL_KEYS:
            if key not in hist[m]:
                continue
            steps, vals = hist[m][key]
            line, = ax.plot(steps, vals.mean(0), marker="o", ms=3, label=label)
            if len(vals) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
        n = max(len(v[1]) for v in hist[m].values())
        ax.set_title(f"{m} ({labeled} labeled, {n} seed{'s' if n > 1 else ''})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("pseudo-label Dice (unlabeled train)")
    return _save(fig, path)
