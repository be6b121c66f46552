"""Evaluation of a checkpoint on a split, and prediction of new scans (issue 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cctr.errors import CctrError

CONVENTIONS = ("strict", "ssl4mis", "transunet")


def resolve_checkpoint(target: str) -> Path:
    """A checkpoint path, or an MLflow run id whose best checkpoint we find."""
    p = Path(target)
    if p.exists():
        return p
    from cctr import tracking

    run = tracking.require_run(target)
    d = run.data.tags.get("checkpoint_dir")
    if d and (Path(d) / "best.pt").exists():
        return Path(d) / "best.pt"
    raise CctrError(f"run {target} has no checkpoint on disk (tag checkpoint_dir={d!r})")


def evaluate(target: str, split: str = "test", convention: str = "strict") -> dict:
    from cctr.data.datasets import load_dataset, make_split
    from cctr.runs import run_dir_for
    from cctr.train import evaluate_predictions, load_nets, predict_cases, write_rows

    if convention not in CONVENTIONS:
        raise CctrError(f"unknown convention '{convention}'; known: {', '.join(CONVENTIONS)}")
    if split not in ("test", "val", "train"):
        raise CctrError(f"--split must be test, val or train, got '{split}'")
    ckpt = resolve_checkpoint(target)
    cfg, nets, ck = load_nets(ckpt)
    ds = load_dataset(cfg.data.dataset)
    sp = make_split(ds, cfg.data.labeled, cfg.data.seed)
    ids = getattr(sp, split)
    preds = predict_cases(nets, ds, ids, cfg.data.size, next(nets[0].parameters()).device)
    rows, summ = evaluate_predictions({c: p["ens"] for c, p in preds.items()}, ds, convention)
    csv_path = run_dir_for(cfg) / f"eval_{split}_{convention}_{ckpt.stem}.csv"
    write_rows(csv_path, rows)
    per_class = {}
    for name in ds.spec.class_names[1:]:
        sel = [r for r in rows if r["class"] == name]
        per_class[name] = {k: float(np.nanmean([r[k] for r in sel])) if sel else float("nan")
                           for k in ("dice", "hd95", "asd")}
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
    from cctr.train import load_nets

    cfg, nets, _ = load_nets(checkpoint)
    spec = get_spec(cfg.data.dataset)
    normalise = normalize_ct if spec.modality == "ct" else normalize_mri

    def segment(image: np.ndarray, spacing) -> np.ndarray:
        return predict_volume(nets, image, cfg.data.size)

    return predict_nifti(segment, normalise, Path(input), Path(output))
