"""How good is the registration? Multi-atlas Dice on the validation cases (where registration settings
are chosen: the held-back labels of unlabeled training cases are for monitoring only), against no
registration and against scikit-image's TV-L1 optical flow on the same pairs at the same grid, plus
folding (non-positive Jacobian), speed, and whether the confidence `c_reg` is calibrated (Dice of
y_reg above vs below the training threshold).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cctr.config import RegistrationConfig, TrainConfig
from cctr.console import progress_bar
from cctr.data.datasets import load_dataset, make_split
from cctr.errors import CctrError
from cctr.metrics import dice_per_class
from cctr.registration.apply import (
    Registrar,
    applied_config,
    atlas_fits,
    atlas_weights,
    confidence_calibration,
    registration_maps,
    transfer_labels,
)
from cctr.registration.grid import apply_affine, grid_label, identity, sample
from cctr.registration.net import jacobian_det
from cctr.registration.train import APPLY_ONLY, find_checkpoint, load_model


def tvl1_phi(reg: Registrar, moving: str, fixed: str) -> torch.Tensor:
    """The TV-L1 baseline's map: same pre-alignment as ours, optical flow instead of the net."""
    from skimage.registration import optical_flow_tvl1

    mov, fix = reg.image(moving)[None], reg.image(fixed)[None]
    ident = identity(tuple(fix.shape[2:]))[None]
    a = reg.affine(moving, fixed)
    aligned = mov if a is None else sample(mov, apply_affine(a[None], ident))
    flow = torch.from_numpy(optical_flow_tvl1(fix[0, 0].numpy(), aligned[0, 0].numpy())).float()[None]
    pos = ident + flow
    return (pos if a is None else apply_affine(a[None], pos))[0]


def _mean_dice(per_case: list[np.ndarray]) -> tuple[float, list[float]]:
    """Per-class mean over cases (classes absent from both masks skipped), then mean over classes."""
    arr = np.stack(per_case)
    with np.errstate(all="ignore"):
        per_class = [float(np.nanmean(arr[:, k])) if np.isfinite(arr[:, k]).any() else float("nan")
                     for k in range(arr.shape[1])]
    valid = [d for d in per_class if d == d]
    return (float(np.mean(valid)) if valid else float("nan")), per_class


def registration_report(dataset: str, cfg: RegistrationConfig, n_labeled: int, seed: int = 0,
                        checkpoint: Path | None = None, progress: bool = True, log: bool = True,
                        threshold: float | None = None, labeled_seed: int | None = None) -> dict:
    """The headline figures on the validation cases (+ per-class Dice and the confidence calibration
    at `threshold`, default `train.conf_threshold`); logs an MLflow run with them and the figure."""
    ds = load_dataset(dataset)
    split = make_split(ds, n_labeled, seed, labeled_seed)
    val = [c for c in split.val if ds.case(c).label is not None]
    if not val:
        raise CctrError(f"dataset '{dataset}' has no labeled validation cases to measure registration on")
    threshold = TrainConfig().conf_threshold if threshold is None else float(threshold)
    ckpt = Path(checkpoint) if checkpoint is not None else find_checkpoint(dataset, cfg, split)
    maps = registration_maps(dataset, cfg, split, ckpt, progress)
    model, ck = load_model(ckpt, dataset, cfg.grid)
    reg = Registrar(ds, model, applied_config(ck, cfg))
    for cid in split.labeled + val:
        reg.image(cid)
    atlases = {lid: reg.atlas(lid) for lid in split.labeled}
    reg.phi(split.labeled[0], val[0])  # warm-up: one-off allocator/oneDNN set-up is not per-pair cost

    C = ds.spec.num_classes
    dice = {"reg": [], "identity": [], "tvl1": []}
    t_ours = t_tv = 0.0
    neg = total = 0
    first = None
    with progress_bar(progress) as bar:
        task = bar.add_task(f"report {dataset} (TV-L1 is slow)", total=len(val)) if bar else None
        for vid in val:
            target = ds.case(vid)
            ours, tv = {}, {}
            for lid in split.labeled:
                t0 = time.perf_counter()
                ours[lid] = reg.phi(lid, vid)
                t_ours += time.perf_counter() - t0
                t0 = time.perf_counter()
                tv[lid] = tvl1_phi(reg, lid, vid)
                t_tv += time.perf_counter() - t0
                jac = jacobian_det(ours[lid][None])
                neg += int((jac <= 0).sum())
                total += jac.numel()
                first = first or (lid, vid, ours[lid])
            ident = {lid: identity(tuple(cfg.grid)) for lid in split.labeled}
            fov = reg.cfg.fov_mm
            dice["reg"].append(dice_per_class(maps.y_reg(vid), target.label, C))
            for key, phis in (("identity", ident), ("tvl1", tv)):  # fused as the model's maps are
                w = atlas_weights(atlas_fits(phis, reg.image(vid), atlases))
                dice[key].append(dice_per_class(transfer_labels(phis, target, atlases, C, fov, w), target.label, C))
            if bar:
                bar.advance(task)
    n_pairs = len(val) * len(split.labeled)
    res: dict = {"dataset": dataset, "labeled": n_labeled, "seed": seed, "labeled_seed": labeled_seed,
                 "atlases": list(split.labeled), "targets": "val", "pairs": n_pairs,
                 **{k: getattr(reg.cfg, k) for k in APPLY_ONLY}}
    for k, v in dice.items():
        res[f"dice_{k}"], per_class = _mean_dice(v)
        res[f"dice_{k}_per_class"] = dict(zip(ds.spec.class_names[1:], per_class))
    res["neg_jacobian_frac"] = neg / max(total, 1)
    res["pair_s"] = t_ours / n_pairs
    res["pair_s_tvl1"] = t_tv / n_pairs
    res.update(confidence_calibration(maps, ds, val, threshold))
    unl = [dice_per_class(maps.y_reg(c), lab, C) for c in split.unlabeled if (lab := ds.case(c).label) is not None]
    res["dice_reg_unlabeled"] = _mean_dice(unl)[0] if unl else float("nan")  # monitoring only, never for choosing
    res["checkpoint"] = str(ckpt)
    if log:
        _log(dataset, res, figure(reg, ds, *first), n_labeled, seed, ck)
    return res


def figure(reg: Registrar, ds, lid: str, vid: str, phi: torch.Tensor):
    """Fixed, moving, warped, label contours (truth vs warped atlas) and the deformation grid, mid slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tuple(phi.shape[1:])
    fix, mov = reg.image(vid)[0], reg.image(lid)[0]
    warped = sample(mov[None, None], phi[None])[0, 0]
    C, fov = ds.spec.num_classes, reg.cfg.fov_mm
    lab_f = grid_label(ds.case(vid), C, grid, fov).argmax(0)
    lab_w = sample(grid_label(ds.case(lid), C, grid, fov)[None], phi[None])[0].argmax(0)
    z = grid[0] // 2
    fig, ax = plt.subplots(1, 5, figsize=(20, 4.4))
    for a, img, title in zip(ax[:3], (fix, mov, warped), (f"fixed {vid}", f"moving {lid}", "warped moving")):
        a.imshow(img[z].numpy(), cmap="gray", vmin=0, vmax=1)
        a.set_title(title)
    ax[3].imshow(fix[z].numpy(), cmap="gray", vmin=0, vmax=1)
    for k in range(1, C):
        if (lab_f[z] == k).any():
            ax[3].contour((lab_f[z] == k).numpy(), levels=[0.5], colors=["lime"], linewidths=1)
        if (lab_w[z] == k).any():
            ax[3].contour((lab_w[z] == k).numpy(), levels=[0.5], colors=["red"], linewidths=1, linestyles="--")
    ax[3].set_title("labels: truth (green), warped atlas (red)")
    py, px = phi[1, z].numpy(), phi[2, z].numpy()
    step = max(1, grid[1] // 16)
    for i in range(0, grid[1], step):
        ax[4].plot(px[i, :], py[i, :], color="k", lw=0.6)
    for j in range(0, grid[2], step):
        ax[4].plot(px[:, j], py[:, j], color="k", lw=0.6)
    ax[4].invert_yaxis()
    ax[4].set_aspect("equal")
    ax[4].set_title("deformation grid (moving voxels)")
    for a in ax[:4]:
        a.axis("off")
    fig.tight_layout()
    return fig


def _log(dataset: str, res: dict, fig, n_labeled: int, seed: int, ck: dict) -> None:
    import matplotlib.pyplot as plt

    from cctr import tracking

    metrics = {k: v for k, v in res.items() if isinstance(v, float)}
    for k in ("reg", "identity", "tvl1"):
        metrics.update({f"dice_{k}.{c}": v for c, v in res[f"dice_{k}_per_class"].items()})
    params = {"data.dataset": dataset, "data.labeled": n_labeled, "data.seed": seed,
              "registration.key": ck.get("key", ""), "checkpoint": res["checkpoint"]}
    with tracking.start_run(experiment=dataset, run_name=f"registration-report-l{n_labeled}-s{seed}",
                            tags={"stage": "registration-report"}, params=params) as run:
        run.log_metrics(metrics, step=0)
        run.log_figure(fig, "registration.png")
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "registration_report.json"
            p.write_text(json.dumps(res, indent=1, default=float))
            run.log_artifact(p)
    plt.close(fig)
