"""Evaluation below training: loading a checkpoint, predicting cases, 3D metrics and per-case rows.

Training's validation and final report, Table 1, the sweep and `cctr evaluate` all read this one
place; training calls evaluation, never the reverse. Metric names carry their unit: `hd95_mm` /
`asd_mm` under the `strict` convention, `hd95_vox` / `asd_vox` under the voxel-unit peer conventions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from cctr.errors import CctrError

CONVENTIONS = ("strict", "ssl4mis", "transunet")
CKPT_FORMAT = "cctr-segmentation"


def unit(convention: str) -> str:
    """Distance unit of a convention's HD95/ASD: millimetres (strict) or voxels (the peers')."""
    return "mm" if convention == "strict" else "vox"


def device_for() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_nets(path: str | Path, device=None):
    """(cfg, nets, checkpoint dict) from a segmentation checkpoint: the checkpoint alone is enough."""
    from cctr.checkpoint import load_checkpoint
    from cctr.config import RunConfig, from_dict
    from cctr.data.datasets import get_spec
    from cctr.models import build_nets

    ck = load_checkpoint(path, CKPT_FORMAT)
    cfg = from_dict(RunConfig, ck["config"])
    nets = build_nets(cfg.model, get_spec(cfg.data.dataset).num_classes)
    nets[0].load_state_dict(ck["state_a"])
    nets[1].load_state_dict(ck["state_b"])
    dev = device or device_for()
    return cfg, [n.to(dev).eval() for n in nets], ck


def prediction_key(ck: dict) -> str:
    """Which labels a checkpoint's method is evaluated by: "ens" (both nets) or "a" (a method that trains
    net A alone; its net B is untrained). Checkpoints written before the key existed are two-net methods."""
    return ck.get("predict", "ens")


def predicting_nets(nets: list, ck: dict) -> list:
    """The nets whose (mean) softmax is a checkpoint's prediction (`prediction_key`)."""
    return list(nets) if prediction_key(ck) == "ens" else list(nets)[:1]


def predict_cases(nets, ds, ids: list[str], size: int, device, keys: tuple[str, ...] = ("ens",)
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per case, uint8 labels at native resolution: any of net A alone ("a"), net B alone ("b") and the
    ensemble ("ens"). Each case is predicted in slabs (never C x Z x H x W probabilities) and only the
    asked-for labels are kept, so a CT-sized split fits in memory."""
    from cctr.inference import predict_case_labels

    return {cid: predict_case_labels(nets, ds.case(cid).image, size, device=device, keys=keys) for cid in ids}


def evaluate_predictions(preds: dict[str, np.ndarray], ds, convention: str = "strict") -> tuple[list[dict], dict]:
    """Per-case rows (one per case x class) and the summary (mean over classes, then cases).

    Keys: `dice`, `hd95_<unit>`, `asd_<unit>`, per class `dice_<class>`, `hd95_<unit>_<class>`.
    """
    from cctr.metrics import case_metrics, summarize

    spec, u = ds.spec, unit(convention)
    rows, per_case = [], []
    for cid, pred in preds.items():
        case = ds.case(cid)
        m = case_metrics(pred, case.label, case.spacing, spec.num_classes, convention=convention)
        per_case.append(m)
        for k in range(1, spec.num_classes):
            rows.append({"case": cid, "class": spec.class_names[k], "dice": float(m["dice"][k - 1]),
                         f"hd95_{u}": float(m["hd95"][k - 1]), f"asd_{u}": float(m["asd"][k - 1])})
    raw = summarize(per_case)
    summ: dict = {"dice": raw["dice"], f"hd95_{u}": raw["hd95"], f"asd_{u}": raw["asd"], "n_cases": raw["n_cases"]}
    for metric, key in (("dice", "dice"), ("hd95", f"hd95_{u}")):  # per-class means: logged, and Table 1's CSV
        for k, name in enumerate(spec.class_names[1:]):
            summ[f"{key}_{name}"] = float(raw[f"{metric}_per_class"][k])
    return rows, summ


def dice_summary(preds: dict[str, np.ndarray], ds) -> dict[str, float]:
    """Mean foreground Dice (and per class) only: validation's model selection needs no surface distances."""
    from cctr.metrics import dice_per_class, summarize

    C = ds.spec.num_classes
    raw = summarize([{"dice": dice_per_class(p, ds.case(c).label, C)} for c, p in preds.items()], ("dice",))
    return {"dice": raw["dice"], **{f"dice_{n}": float(raw["dice_per_class"][k])
                                    for k, n in enumerate(ds.spec.class_names[1:])}}


def write_rows(path: Path, rows: list[dict]) -> None:
    from cctr.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)


def resolve_checkpoint(target: str) -> Path:
    """A checkpoint path, an MLflow run id whose best checkpoint we find, or `runs:/ID/path`.

    A run trained on another machine (its `checkpoint_dir` is not here) has its checkpoint
    downloaded from the tracking store (through the server) into <cache>/runs/<run id>/.
    """
    if target.startswith("runs:/"):
        rid, _, art = target[len("runs:/"):].partition("/")
        return _download_checkpoint(rid, art or "checkpoints/best.pt")
    p = Path(target)
    if p.exists():
        return p
    if p.suffix in (".pt", ".pth") or "/" in target or "\\" in target:
        raise CctrError(f"{p}: checkpoint not found")
    from cctr import tracking

    run = tracking.require_run(target)
    d = run.data.tags.get("checkpoint_dir")
    if d and (Path(d) / "best.pt").exists():
        return Path(d) / "best.pt"
    return _download_checkpoint(target, "checkpoints/best.pt", d)


def _download_checkpoint(run_id: str, artifact: str, local_dir: str | None = None) -> Path:
    from cctr import tracking
    from cctr.paths import cache_root

    tracking.require_run(run_id)
    dest = cache_root() / "runs" / run_id
    done = sorted(dest.rglob(Path(artifact).name)) if dest.is_dir() else []
    if done:  # downloaded before (a finished run's checkpoint never changes)
        return done[0]
    try:
        return tracking.download_artifact(run_id, artifact, dest)
    except Exception:  # noqa: BLE001 — not logged (a run still training, or killed)
        where = f" and none on disk (tag checkpoint_dir={local_dir!r})" if local_dir is not None else ""
        raise CctrError(f"run {run_id} has no artifact '{artifact}' in the tracking store{where}") from None


def evaluate(target: str, split: str = "test", convention: str = "strict") -> dict:
    from cctr.data.datasets import load_dataset, make_split

    if convention not in CONVENTIONS:
        raise CctrError(f"unknown convention '{convention}'; known: {', '.join(CONVENTIONS)}")
    if split not in ("test", "val", "train"):
        raise CctrError(f"--split must be test, val or train, got '{split}'")
    ckpt = resolve_checkpoint(target)
    cfg, nets, ck = load_nets(ckpt)
    ds = load_dataset(cfg.data.dataset)
    sp = make_split(ds, cfg.data.labeled, cfg.data.seed, cfg.data.labeled_seed)
    ids = getattr(sp, split)
    key = prediction_key(ck)
    preds = predict_cases(nets, ds, ids, cfg.data.size, next(nets[0].parameters()).device, keys=(key,))
    rows, summ = evaluate_predictions({c: p[key] for c, p in preds.items()}, ds, convention)
    csv_path = ckpt.parent / f"eval_{split}_{convention}_{ckpt.stem}.csv"  # beside the weights it evaluates
    write_rows(csv_path, rows)
    per_class = {}
    for name in ds.spec.class_names[1:]:
        sel = [r for r in rows if r["class"] == name]
        per_class[name] = {k: float(np.nanmean([r[k] for r in sel])) if sel else float("nan")
                           for k in ("dice", f"hd95_{unit(convention)}", f"asd_{unit(convention)}")}
    summary = {k: float(v) for k, v in summ.items() if isinstance(v, (float, int))}
    run_id = ck.get("run_id") or None
    if run_id:
        from cctr import tracking

        r = tracking.Run(run_id)
        r.log_metrics({f"eval_{split}_{convention}_{k}": v for k, v in summary.items()}, int(ck["iteration"]))
        r.log_artifact(csv_path, "evaluation")
    return {"summary": summary, "per_class": per_class, "csv": csv_path, "run_id": run_id}


def predict(checkpoint: Path, input: Path, output: Path) -> list[Path]:
    from cctr.data.case import normalize_ct, normalize_mri
    from cctr.data.datasets import get_spec
    from cctr.inference import predict_volume
    from cctr.nifti import predict_nifti

    cfg, nets, ck = load_nets(checkpoint)
    nets = predicting_nets(nets, ck)
    spec = get_spec(cfg.data.dataset)
    normalise = normalize_ct if spec.modality == "ct" else normalize_mri

    def segment(image: np.ndarray, spacing) -> np.ndarray:
        return predict_volume(nets, image, cfg.data.size)

    return predict_nifti(segment, normalise, Path(input), Path(output))
