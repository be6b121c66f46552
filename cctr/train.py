"""The one training loop (DESIGN §4). Every Table-1 row is a set of switches on it, never a copy.

A run: data + split → (registration maps if the method needs them) → two nets trained jointly →
validation (Dice, pseudo-label quality) every N iterations → best/last checkpoints → test evaluation
of both (Dice/HD95/ASD, in `cctr.evaluate`). Everything is logged to one MLflow run that always ends
in a final state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cctr import losses as L
from cctr.checkpoint import load_checkpoint, save_checkpoint
from cctr.config import RunConfig, TrainConfig, flatten, to_dict
from cctr.errors import CctrError
from cctr.evaluate import (
    CKPT_FORMAT,
    device_for,
    dice_summary,
    evaluate_predictions,
    load_nets,
    predict_cases,
    write_rows,
)


@dataclass(frozen=True)
class Method:
    """What a Table-1 row switches on."""

    unlabeled: bool = False  # unlabeled slices in the batch
    ct: bool = False  # cross-teaching
    con: bool = False  # pixel contrastive
    rsl: bool = False  # registration supervision
    reps: bool = False  # registration-enhanced positive sampling
    all_labeled: bool = False  # `full`: every training label (upper bound)
    train: bool = True  # `reg-only` trains nothing

    @property
    def needs_registration(self) -> bool:
        return self.rsl or self.reps or not self.train


# training curves are logged every LOG_EVERY iterations; the pair monitor counts on those steps only
LOG_EVERY = 10

METHODS: dict[str, Method] = {
    "sup": Method(),
    "ct": Method(unlabeled=True, ct=True),
    "cct": Method(unlabeled=True, ct=True, con=True),
    "cct+rsl": Method(unlabeled=True, ct=True, con=True, rsl=True),
    "cct+reps": Method(unlabeled=True, ct=True, con=True, reps=True),
    "cctr": Method(unlabeled=True, ct=True, con=True, rsl=True, reps=True),
    "full": Method(all_labeled=True),
    "reg-only": Method(train=False),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CctrError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    return METHODS[name]


def validate_config(cfg: RunConfig) -> Method:
    """Reject bad values before anything is created (no MLflow run, no files)."""
    m = get_method(cfg.train.method)
    t = cfg.train
    for k in ("w_ct", "w_rsl", "w_con", "lr", "weight_decay", "tau", "reps_cap", "reps_weight", "grad_clip",
              "rsl_yield_conf", "memory_size"):
        if getattr(t, k) < 0:
            raise CctrError(f"train.{k} must be >= 0, got {getattr(t, k)}")
    choices = {"rsl_schedule": L.SCHEDULES, "reps_schedule": L.SCHEDULES, "reps_replace": ("all", "paired"),
               "contrast": ("per_net", "joint"), "norm_batches": ("joint", "split")}
    for k, ok in choices.items():
        if getattr(t, k) not in ok:
            allowed = " or ".join(ok) if len(ok) == 2 else f"one of {', '.join(ok)}"
            raise CctrError(f"train.{k} must be {allowed}, got '{getattr(t, k)}'")
    if t.tau == 0 or t.reps_cap == 0:
        raise CctrError("train.tau and train.reps_cap must be > 0")
    for k in ("iters", "batch_labeled", "val_every", "ckpt_every", "anchors_per_class"):
        if getattr(t, k) < 1:
            raise CctrError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    if m.unlabeled and t.batch_unlabeled < 1:
        raise CctrError("train.batch_unlabeled must be >= 1 for a semi-supervised method")
    if cfg.data.size % 32:
        raise CctrError(f"data.size must be a multiple of 32 (smp encoders), got {cfg.data.size}")
    return m


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """Everything the loop reads: the dataset, split, per-case maps and the slice dataset."""

    ds: Any
    split: Any
    labeled: list[str]
    train_ids: list[str]
    reg: Any | None
    slices: Any
    labeled_slices: list[int]
    unlabeled_slices: list[int]


def build_data(cfg: RunConfig, method: Method) -> RunData:
    from cctr.data.datasets import load_dataset, make_split
    from cctr.data.slices import SliceDataset

    ds = load_dataset(cfg.data.dataset)
    split = make_split(ds, cfg.data.labeled, cfg.data.seed, cfg.data.labeled_seed)
    labeled = list(split.train) if method.all_labeled else list(split.labeled)
    train_ids = list(split.train) if method.unlabeled else labeled
    reg = None
    if method.needs_registration:
        from cctr.registration.apply import registration_maps

        reg = registration_maps(cfg.data.dataset, cfg.registration, split)
    lab = set(labeled)
    cases = [ds.case(c) for c in train_ids]  # images and labels memory-mapped, read slice by slice
    maps: dict[str, list] = {
        # unlabeled cases' labels never enter training (DESIGN §3)
        "label": [c.label if c.case_id in lab else None for c in cases],
    }
    kinds = {"label": "label"}
    if method.con:  # held-back labels for the pair-precision monitor only: no loss reads "label_mon"
        maps["label_mon"] = [c.label for c in cases]
        kinds["label_mon"] = "label"
    if reg is not None and method.train:
        stored = [reg[c] for c in train_ids]  # y_reg compressed per slice; c_reg, coords on the grid
        maps["y_reg"] = [m.y_reg for m in stored]
        maps["c_reg"] = [m.c_reg for m in stored]
        maps["coords"] = [m.coords for m in stored]
        kinds.update(y_reg="label", c_reg="field", coords="field")
    slices = SliceDataset([c.image for c in cases], maps, kinds, size=cfg.data.size, augment=True,
                          seed=cfg.train.seed)
    l_idx = [i for i, c in enumerate(train_ids) if c in lab]
    u_idx = [i for i, c in enumerate(train_ids) if c not in lab]
    return RunData(ds, split, labeled, train_ids, reg, slices, slices.slices_of(l_idx), slices.slices_of(u_idx))


# ----------------------------------------------------------------------------- the step


@dataclass
class StepState:
    """Mutable training state that a checkpoint must carry for an exact resume."""

    iteration: int = 0
    best_dice: float = -1.0
    best_iter: int = -1
    history: list[dict] = field(default_factory=list)
    # pair-precision counts pooled over the first quarter of training (the paper's Fig. 2 claim)
    early: dict[str, float] = field(default_factory=dict)


@dataclass
class Contrast:
    """What the contrastive term reads besides the batch: the memory banks (one per net by default:
    each net's projection head has its own embedding space) and REPS's match caps in mm."""

    banks: list[Any] | None
    cap_xy: float = math.inf
    cap_z: float = math.inf


def reps_caps(cfg: RunConfig, data: RunData) -> tuple[float, float]:
    """(in-plane, through-plane) REPS caps: `reps_cap` registration-grid cells of the reference labeled
    case, whose millimetres the anatomical coordinates are in."""
    ref = data.ds.case(data.split.labeled[0])
    r = cfg.registration
    cell = [(f if f > 0 else n * s) / g for f, n, s, g in zip(r.fov_mm, ref.shape, ref.spacing, r.grid)]
    return cfg.train.reps_cap * max(cell[1], cell[2]), cfg.train.reps_cap * cell[0]


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    return base * (1 - it / total) ** power


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The nets' autocast dtype under `train.amp`: fp16 on CUDA (with loss scaling), bf16 on CPUs that
    compute it natively (AVX512-BF16/AMX; elsewhere it is emulated and slower), else None (fp32).

    On a 2-core AVX512-BF16 CPU bf16 made the quick preset's two-net step 1.4x faster and the paper
    preset's 2.5x faster with a third less memory (`cctr bench`, README).
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def make_optimizer(t: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (or AdamW) with fused kernels: the per-tensor update loop cost ~8 % of a CPU step.

    SGD's momentum buffers start at zero rather than at the first gradient (the same update when
    dampening is 0): the fused kernel needs every parameter it updates to have a buffer, or none, and a
    projection head can receive its first gradient after the rest (too few anchors in a step).
    """
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
        if t.momentum:
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    raise CctrError(f"train.optimizer must be sgd or adamw, got '{t.optimizer}'")


def forward_nets(nets, img: torch.Tensor, with_embed: bool, amp: torch.dtype | None, split: int = 0
                 ) -> list[dict[str, torch.Tensor]]:
    """Both nets' outputs; under `amp` only the nets run in low precision and every loss stays fp32: the
    logits are returned in fp32, the decoder features as computed (the contrast reads a few anchors of
    them, so only those are converted). `split` > 0 normalises the first `split` images and the rest each
    by its own batch statistics (`SegNet.forward`)."""
    with torch.autocast(img.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outs = [net(img, with_embed=with_embed, split=split) for net in nets]
    return [{**o, "logits": o["logits"].float()} for o in outs]


def norm_split(t: TrainConfig) -> int:
    """Where `forward_nets` splits a training batch (0: one pass), per `train.norm_batches`."""
    return t.batch_labeled if t.norm_batches == "split" else 0


def loss_terms(cfg: RunConfig, method: Method, nets, batch: dict, con: Contrast | None, gen: torch.Generator,
               device: torch.device, amp: torch.dtype | None = None, monitor: bool = True
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """All loss terms of one batch (the caller weights and sums them) and the step's monitor counts.

    `monitor` False skips the pair monitor (held-back labels; no loss reads it): the loop counts pairs
    on logging steps only, where a sample of steps estimates the same rates at a fraction of the cost.
    """

    t = cfg.train
    b_l = t.batch_labeled
    img = batch["image"].to(device, non_blocking=True)
    outs = forward_nets(nets, img, method.con, amp, norm_split(t))  # no projection head without a contrast
    logits = [o["logits"] for o in outs]
    C = logits[0].shape[1]  # the nets know their class count; no dataset lookup on the hot path
    y = batch["label"].to(device).long()
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {}
    terms["sup"] = sum(L.dice_ce(lg[:b_l], y[:b_l], C) for lg in logits)
    if not method.unlabeled:
        return terms, stats
    la, lb = logits[0][b_l:], logits[1][b_l:]
    pseudo = (L.hard_labels(la), L.hard_labels(lb))  # each net's hard labels, for the other net
    zero = img.new_zeros(())
    terms["ct"] = L.cross_teaching(la, lb, C, pseudo) if method.ct else zero
    if method.rsl:
        yr = batch["y_reg"].to(device).long()[b_l:]
        cr = batch["c_reg"].to(device).float()[b_l:].reshape(yr.shape)
        ignore = ~batch["valid"].to(device)[b_l:]  # pixels rotated in from outside the slice carry no label
        yielded = rsl_yield(la, lb, yr, t.rsl_yield_conf) & ~ignore & (cr >= t.conf_threshold)
        stats["rsl_yield"] = float(yielded.float().mean())
        terms["rsl"] = sum(L.rsl_loss(lg, yr, cr, t.conf_threshold, C, ignore | yielded) for lg in (la, lb))
    if method.con:
        terms.update(contrastive_term(cfg, method, nets, outs, pseudo, y, batch, con, gen, device,
                                      stats if monitor else None))
    return terms, stats


def rsl_yield(la: torch.Tensor, lb: torch.Tensor, y_reg: torch.Tensor, conf: float) -> torch.Tensor:
    """Pixels where RSL gives way: both nets agree on a class other than y_reg, each at least `conf` sure.

    Registration labels help most while the nets are poor; once the nets are better than y_reg (the
    crossover of the pseudo-label-quality curves) they agree confidently where registration is wrong,
    and RSL must not pull them back to the registration's quality.
    """
    with torch.no_grad():
        pa, ya = torch.softmax(la.float(), 1).max(1)
        pb, yb = torch.softmax(lb.float(), 1).max(1)
        return (ya == yb) & (ya != y_reg) & (pa >= conf) & (pb >= conf)


def contrastive_term(cfg: RunConfig, method: Method, nets, outs, pseudo, y, batch, con: Contrast | None, gen,
                     device, stats: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """Pixel contrast of each net's anchors against its own batch anchors and memory bank (DESIGN §4);
    `train.contrast: joint` contrasts both nets' anchors together against one bank instead.
    Returns the class part ("con") and, with REPS, the REPS part ("reps"), which the loop weights on their
    own schedules: REPS positives come from registration, not from the nets.

    Labels: ground truth on labeled slices, the *other* net's argmax on unlabeled ones. Every anchor
    attribute (label, coordinate, validity, confidence, monitor label) is read at the same pixel
    (`nearest_index`). With REPS, coordinates of pixels rotated in from outside the slice or below the
    confidence threshold are NaN, so they match nothing. `stats` None: no pair monitor this step (and,
    without REPS, no partners are searched: only the monitor reads them).
    """

    t = cfg.train
    b_l = t.batch_labeled
    B = y.shape[0]
    case = batch["case_index"].to(device).long()
    is_gt = torch.arange(B, device=device) < b_l
    mon = batch["label_mon"].to(device).long() if "label_mon" in batch else torch.full_like(y, -1)
    coords = None
    if "coords" in batch:  # REPS reads them; without REPS (`cct+rsl`) the pair monitor only (bank entries keep them)
        ok = batch["valid"].to(device) & (batch["c_reg"].to(device).float().reshape(y.shape) >= t.conf_threshold)
        coords = batch["coords"].to(device).float().masked_fill(~ok.unsqueeze(1), float("nan"))
    anchors = []  # per net: (feats, class, case, is-GT, monitor label, coords)
    for k, o in enumerate(outs):
        emb = o["feat"]
        iy, ix = L.nearest_index(tuple(y.shape[-2:]), emb.shape[-2:], device)

        lab = torch.cat([y[:b_l], pseudo[1 - k]], 0)[:, iy[:, None], ix[None, :]]
        f, c, (bi, yy, xx) = L.sample_anchors(emb, lab, t.anchors_per_class, gen)
        f = nets[k].embed(f.float())  # only the anchors are projected, in fp32
        py, px = iy[yy], ix[xx]  # the anchors' pixels at input resolution: every attribute is read there
        co = coords[bi, :, py, px] if coords is not None else f.new_full((f.shape[0], 3), float("nan"))
        anchors.append((f, c, case[bi], is_gt[bi], mon[bi, py, px], co))
    if t.contrast == "joint":  # both nets' embeddings in one space, one bank
        anchors = [tuple(torch.cat(parts) for parts in zip(*anchors))]
    sums: list[torch.Tensor] = []  # per part (class, then REPS), summed over nets
    for k, (f, c, a_case, a_gt, a_mon, a_co) in enumerate(anchors):
        keys, k_cls, k_case, k_gt, k_co, k_mon = f, c, a_case, a_gt, a_co, a_mon
        bank = con.banks[k] if con is not None and con.banks else None
        if bank is not None:
            keys = torch.cat([f, bank.feats.to(f)], 0)
            k_cls = torch.cat([c, bank.cls.masked_fill(~bank.valid, -1)])
            k_case, k_gt = torch.cat([a_case, bank.case_id]), torch.cat([a_gt, bank.gt])
            k_co, k_mon = torch.cat([a_co, bank.coord]), torch.cat([a_mon, bank.mon])
        pair = coords is not None and (method.reps or stats is not None)
        partners = L.reps_partners(a_co, a_case, k_co, k_case, con.cap_xy, con.cap_z) if pair else None
        # without REPS the partners are monitored only: no loss reads them
        m = L.contrast_masks(c, a_gt, a_case, k_cls, k_gt, k_case, partners, replace=method.reps,
                             paired_only=t.reps_replace == "paired")
        # REPS has its own normalisation: a few registration positives are not drowned by class positives
        parts = L.masked_supcon_terms(f, keys, [m["pos"], m["reps"]] if method.reps else [m["pos"]], m["denom"], t.tau)
        sums = [a + b for a, b in zip(sums, parts)] if sums else parts
        if stats is not None:
            _count_pairs(stats, m, a_mon, k_mon, f.detach() @ keys.detach().float().t())
        if bank is not None:
            bank.push(f.detach(), a_case, c, a_co, a_gt, a_mon)
    return dict(zip(("con", "reps"), sums))


def rsl_crossed(history: list[dict]) -> int | None:
    """Where the nets reached registration's quality: the first validation iteration at which their
    validation Dice was at or above y_reg's (the crossover of the pseudo-label-quality curves, measured
    on validation cases like the best-checkpoint choice; training cases' held-back labels are never read
    for it), or None."""
    return next((h["iteration"] for h in history if "val_reg_dice" in h and h["val_dice"] >= h["val_reg_dice"]),
                None)


def _count_pairs(stats: dict[str, float], masks: dict[str, torch.Tensor], a_mon, k_mon, sim: torch.Tensor) -> None:
    """Monitor only (held-back labels): how often REPS pairs and pseudo-label pairs share the true class,
    and how alike their embeddings are (`sim`, cosine, anchors x keys). In `cct+rsl` the REPS pairs are
    found but pull nothing, so their similarity there is what RSL and the class contrast teach alone."""
    a_known = a_mon.unsqueeze(1) >= 0
    known = a_known & (k_mon.unsqueeze(0) >= 0)
    hit = a_known & (a_mon.unsqueeze(1) == k_mon.unsqueeze(0))  # a known class equal to the key's: both known
    pl = masks["pseudo_pairs"]
    add = {"anchors": a_mon.shape[0], "pl_hits": (pl & hit).sum(), "pl_pairs": (pl & known).sum(),
           "pl_n": pl.sum(), "pl_sim": sim[pl].sum()}
    if "reps" in masks:
        r = masks["reps"]
        add.update(reps_pos=r.sum(), reps_anchors=r.any(1).sum(), reps_hits=(r & hit).sum(),
                   reps_pairs=(r & known).sum(), reps_sim=sim[r].sum())
    for key, v in add.items():
        stats[key] = stats.get(key, 0.0) + float(v)


def monitor_metrics(counts: dict[str, float], steps: int) -> dict[str, float]:
    """Per-window rates from pooled counts (NaN-free: a rate without pairs is not logged)."""
    out: dict[str, float] = {}
    if counts.get("reps_pairs"):
        out["reps_pair_precision"] = counts["reps_hits"] / counts["reps_pairs"]
    if counts.get("pl_pairs"):
        out["pl_pair_precision"] = counts["pl_hits"] / counts["pl_pairs"]
    if counts.get("pl_n"):
        out["pl_pair_sim"] = counts["pl_sim"] / counts["pl_n"]
    if counts.get("reps_pos"):
        out["reps_pair_sim"] = counts["reps_sim"] / counts["reps_pos"]
    if counts.get("anchors") and "reps_pos" in counts:
        out["reps_pos_per_anchor"] = counts["reps_pos"] / counts["anchors"]
        out["reps_anchor_frac"] = counts["reps_anchors"] / counts["anchors"]
    if "rsl_yield" in counts and steps:
        out["rsl_yield_frac"] = counts["rsl_yield"] / steps
    return out


# ----------------------------------------------------------------------------- validation


def pseudo_label_quality(nets, data: RunData, size: int, device, reg_dice: dict[str, float],
                         max_cases: int = 4) -> dict[str, float]:
    """DESIGN §5 / Fig. 4: Dice of each net's and of y_reg's labels on unlabeled training cases.

    Held-back labels are read here for monitoring only; they never reach the loss. `reg_dice` caches
    y_reg's Dice, which does not change during a run.
    """
    ids = data.split.unlabeled[:max_cases]
    if not ids:
        return {}
    preds = predict_cases(nets, data.ds, ids, size, device, keys=("a", "b"))
    out = {f"pl_dice_{k}": dice_summary({c: p[k] for c, p in preds.items()}, data.ds)["dice"] for k in ("a", "b")}
    if data.reg is not None:
        if "dice" not in reg_dice:
            reg_dice.update(dice_summary({c: data.reg.y_reg(c) for c in ids}, data.ds))
        out["pl_dice_reg"] = reg_dice["dice"]
    return out


# ----------------------------------------------------------------------------- the loop


class Diverged(CctrError):
    """A NaN/inf loss: the run is FAILED with the reason; a sweep prunes or fails the trial."""


@dataclass
class TrainResult:
    run_id: str | None
    run_dir: Path
    metrics: dict[str, float]


def weights_payload(cfg: RunConfig, nets, state: StepState, run_id: str | None) -> dict:
    """What evaluation and prediction need (the best-val file): weights and config only, half the
    bytes of a resumable checkpoint since SGD momentum is as large as the weights (a third with AdamW's
    two moments)."""
    return {
        "format": CKPT_FORMAT, "config": to_dict(cfg), "iteration": state.iteration,
        "state_a": nets[0].state_dict(), "state_b": nets[1].state_dict(),
        "best_dice": state.best_dice, "best_iter": state.best_iter, "run_id": run_id or "",
    }


def checkpoint_payload(cfg: RunConfig, nets, opt, con: Contrast | None, state: StepState, run_id: str | None,
                       scaler=None) -> dict:
    """A resumable checkpoint (last.pt): the weights plus everything an exact resume restores."""
    banks = con.banks if con is not None and con.banks else []
    return {
        **weights_payload(cfg, nets, state, run_id),
        "optimizer": opt.state_dict(),
        "banks": [b.state_dict() for b in banks],
        "history": state.history, "early": dict(state.early),
        "rng_torch": torch.get_rng_state(), "rng_numpy": _np_state(),
        "scaler": scaler.state_dict() if scaler is not None else {},
    }


def _np_state() -> dict:
    s = np.random.get_state()
    return {"keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2])}


def _set_np_state(d: dict) -> None:
    np.random.set_state(("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], 0, 0.0))


def train(cfg: RunConfig, run_dir: Path, *, resume: Path | None = None, progress: bool = True,
          on_validation: Callable[[int, float], None] | None = None, parent_run_id: str | None = None,
          tags: dict[str, Any] | None = None, stop_after: int | None = None,
          on_start: Callable[[str], None] | None = None, run_name: str | None = None) -> TrainResult:
    """Train (or, for `reg-only`, just evaluate) one configuration; see the module docstring.

    `on_validation(iteration, val_dice)` may raise to stop the run (the sweep's pruning).
    `stop_after` ends the loop early at that iteration with a last checkpoint (tests of resume).
    `on_start(run_id)` is called once the MLflow run exists (the sweep records it on the trial).
    """
    from cctr import tracking

    method = validate_config(cfg)
    seed_everything(cfg.train.seed)
    data = build_data(cfg, method)  # all bad-input errors surface here, before any run exists
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(resume, CKPT_FORMAT) if resume else None
    if ck is not None and "optimizer" not in ck:
        raise CctrError(f"{resume}: holds weights only (a best-val checkpoint); resume from last.pt")
    run_id = (ck or {}).get("run_id") or None
    t = dict(tags or {})
    t.update({"method": cfg.train.method, "labeled": cfg.data.labeled, "seed": cfg.train.seed,
              "dataset": cfg.data.dataset, "stage": "segmentation", "checkpoint_dir": str(run_dir.resolve())})
    name = run_name or f"{cfg.train.method}-l{cfg.data.labeled}-s{cfg.train.seed}"
    with tracking.start_run(cfg.data.dataset, name, tags=t, params=flatten(cfg) if run_id is None else None,
                            parent_run_id=parent_run_id, run_id=run_id) as run:
        if on_start is not None:
            on_start(run.run_id)
        if not method.train:
            metrics = _evaluate_reg_only(data, run, run_dir)
        else:
            metrics = _fit(cfg, method, data, run, run_dir, ck, progress, on_validation, stop_after)
        return TrainResult(run.run_id, run_dir, metrics)


def _evaluate_reg_only(data: RunData, run, run_dir: Path) -> dict[str, float]:
    preds = {cid: data.reg.y_reg(cid) for cid in data.split.test}
    rows, summ = evaluate_predictions(preds, data.ds)
    metrics = {f"test_{k}": v for k, v in summ.items() if isinstance(v, float)}
    write_rows(run_dir / "test_per_case_best.csv", rows)
    run.log_artifact(run_dir / "test_per_case_best.csv")
    run.log_metrics(metrics, 0)
    return metrics


def _fit(cfg: RunConfig, method: Method, data: RunData, run, run_dir: Path, ck: dict | None, progress: bool,
         on_validation, stop_after: int | None) -> dict[str, float]:
    from cctr.data.slices import make_loader
    from cctr.models import build_nets

    t = cfg.train
    device = device_for()
    C = data.ds.spec.num_classes
    nets = [n.to(device) for n in build_nets(cfg.model, C)]
    params = [p for n in nets for p in n.parameters()]
    opt = make_optimizer(t, params)
    amp = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    con = None
    if method.con:
        n_banks = 1 if t.contrast == "joint" else len(nets)
        banks = [L.MemoryBank(t.memory_size, cfg.model.proj_dim).to(device) for _ in range(n_banks)] \
            if t.memory_size else None
        # the caps wherever there are coordinates: `cct+rsl` monitors the pairs REPS would make
        con = Contrast(banks, *(reps_caps(cfg, data) if data.reg is not None else (math.inf, math.inf)))
    state = StepState()
    if ck is not None:
        nets[0].load_state_dict(ck["state_a"])
        nets[1].load_state_dict(ck["state_b"])
        opt.load_state_dict(ck["optimizer"])
        for bank, sd in zip(con.banks if con is not None and con.banks else [], ck["banks"]):
            bank.load_state_dict(sd)
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        state = StepState(ck["iteration"], ck["best_dice"], ck["best_iter"], list(ck["history"]), dict(ck["early"]))
    gen = torch.Generator(device=device)  # anchor sampling; reseeded per iteration so resume is exact
    loader = make_loader(data.slices, data.labeled_slices, data.unlabeled_slices if method.unlabeled else [],
                         t.batch_labeled, t.batch_unlabeled if method.unlabeled else 0, t.iters,
                         cfg.data.num_workers, t.seed, start=state.iteration)
    batches = iter(loader)  # starting a DataLoader draws from the global RNG: restore it afterwards
    if ck is not None:
        torch.set_rng_state(ck["rng_torch"])
        _set_np_state(ck["rng_numpy"])
    end = min(t.iters, stop_after) if stop_after else t.iters
    early_end = t.iters // 4
    weights = {"ct": (t.w_ct, "ramp"), "rsl": (t.w_rsl, t.rsl_schedule), "con": (t.w_con, "ramp"),
               "reps": (t.w_con * t.reps_weight, t.reps_schedule)}
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    prog = TrainProgress(end, state.iteration) if progress else None
    last_val = float("nan")
    window: dict[str, float] = {}
    reg_dice: dict[str, float] = {}
    crossed_at = rsl_crossed(state.history)  # a resumed run continues where it was
    for n in nets:  # once here and after each validation (a walk over every module: not per step)
        n.train()
    try:
        for batch in batches:
            if state.iteration >= end:
                break
            it = state.iteration
            gen.manual_seed(t.seed * 1000003 + it)
            lr = poly_lr(t.lr, it, t.iters, t.poly_power)
            for g in opt.param_groups:
                g["lr"] = lr
            terms, stats = loss_terms(cfg, method, nets, batch, con, gen, device, amp, monitor=it % LOG_EVERY == 0)
            w_now = {k: L.scheduled_weight(*weights[k], it, t.ramp_iters, crossed_at, t.iters)
                     for k in terms if k != "sup"}
            total = terms["sup"] + sum(w_now[k] * v for k, v in terms.items() if k != "sup")
            if not torch.isfinite(total):
                raise Diverged(f"non-finite loss at iteration {it} "
                               f"({', '.join(f'{k}={float(v.detach()):.3g}' for k, v in terms.items())})")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.unscale_(opt)
            else:
                total.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            state.iteration = it + 1
            for key, v in stats.items():
                window[key] = window.get(key, 0.0) + v
                if it < early_end:
                    state.early[key] = state.early.get(key, 0.0) + v
            if it % LOG_EVERY == 0 or state.iteration == end:
                run.log_metrics({"loss": total.item(), "lr": lr, **{f"loss_{k}": v.item() for k, v in terms.items()},
                                 **{f"w_{k}": v for k, v in w_now.items()}, **monitor_metrics(window, LOG_EVERY)}, it)
                window = {}
            if state.iteration % t.val_every == 0 or state.iteration == t.iters:
                last_val = _validate(cfg, nets, data, run, state, device, reg_dice if method.unlabeled else None)
                crossed_at = rsl_crossed(state.history)
                if state.best_iter == state.iteration:
                    save_checkpoint(best_path, weights_payload(cfg, nets, state, run.run_id))
                if on_validation is not None:
                    on_validation(state.iteration, last_val)
            if state.iteration % t.ckpt_every == 0 and state.iteration < t.iters:
                save_checkpoint(last_path, checkpoint_payload(cfg, nets, opt, con, state, run.run_id, scaler))
            if prog:
                prog.update(state.iteration, total.item(), last_val)
        if state.iteration < t.iters:  # stopped early on purpose: keep an exact resume point
            save_checkpoint(last_path, checkpoint_payload(cfg, nets, opt, con, state, run.run_id, scaler))
            return {"iteration": float(state.iteration)}
    finally:
        if prog:
            prog.close()
    if t.keep_last:
        save_checkpoint(last_path, checkpoint_payload(cfg, nets, opt, con, state, run.run_id, scaler))
    out = _final_report(cfg, data, run, run_dir, device, state, nets)
    if not t.keep_last:  # the run is finished and evaluated: the resumable file has no use left
        last_path.unlink(missing_ok=True)
    return out


def _validate(cfg, nets, data: RunData, run, state: StepState, device, reg_dice: dict[str, float] | None) -> float:
    """Dice only (model selection and curves); HD95/ASD are for the final test report.

    Pseudo-label quality (`reg_dice` not None) only where there are pseudo-labels: semi-supervised runs.
    """
    for n in nets:
        n.eval()
    preds = predict_cases(nets, data.ds, data.split.val, cfg.data.size, device)
    summ = dice_summary({c: p["ens"] for c, p in preds.items()}, data.ds)
    metrics = {f"val_{k}": v for k, v in summ.items()}
    if reg_dice is not None:
        metrics.update(pseudo_label_quality(nets, data, cfg.data.size, device, reg_dice))
        if data.reg is not None:  # y_reg's own validation Dice (fixed): where the nets' curve crosses it
            if "val" not in reg_dice:
                reg_dice["val"] = dice_summary({c: data.reg.y_reg(c) for c in data.split.val}, data.ds)["dice"]
            metrics["val_reg_dice"] = reg_dice["val"]
    val = float(summ["dice"])
    if val > state.best_dice:
        state.best_dice, state.best_iter = val, state.iteration
    metrics["val_best_dice"] = state.best_dice
    run.log_metrics(metrics, state.iteration)
    state.history.append({"iteration": state.iteration, **metrics})
    for n in nets:  # back to training: validation is only ever called from the loop
        n.train()
    return val


def _final_report(cfg, data: RunData, run, run_dir: Path, device, state: StepState, last_nets) -> dict[str, float]:
    """Test metrics of the best-val checkpoint and of the last weights, per-case CSVs, figures, checkpoints."""
    from cctr.report import overlay_figure, pseudo_label_figure

    out: dict[str, float] = {"best_iter": float(state.best_iter), "val_best_dice": state.best_dice}
    out.update({f"{k}_early": v for k, v in monitor_metrics(state.early, cfg.train.iters // 4).items()
                if k.endswith(("pair_precision", "pair_sim"))})
    if data.reg is not None:  # is c_reg calibrated? y_reg Dice above/below the threshold, validation cases
        from cctr.registration import confidence_calibration

        out.update(confidence_calibration(data.reg, data.ds, data.split.val, cfg.train.conf_threshold))
    for tag in ("best", "last"):
        if tag == "best" or state.best_iter != state.iteration:  # else the last weights are best.pt's
            nets = load_nets(run_dir / "best.pt", device)[1] if tag == "best" else [n.eval() for n in last_nets]
            preds = predict_cases(nets, data.ds, data.split.test, cfg.data.size, device)
            rows, summ = evaluate_predictions({c: p["ens"] for c, p in preds.items()}, data.ds)
        csv_path = run_dir / f"test_per_case_{tag}.csv"
        write_rows(csv_path, rows)
        run.log_artifact(csv_path)
        prefix = "test" if tag == "best" else "test_last"
        out.update({f"{prefix}_{k}": v for k, v in summ.items() if isinstance(v, float)})
        if tag == "best":
            vp = predict_cases(nets, data.ds, data.split.val[:3], cfg.data.size, device, keys=("a", "b"))
            fig_path = overlay_figure(data.ds, vp, run_dir / "val_overlays.png")
            run.log_artifact(fig_path)
    run.log_metrics(out, state.iteration)
    if state.history:
        run.log_artifact(pseudo_label_figure(state.history, run_dir / "pseudo_label_quality.png"))
    run.log_artifact(run_dir / "best.pt", "checkpoints", link=True)
    if cfg.train.keep_last:
        run.log_artifact(run_dir / "last.pt", "checkpoints", link=True)
    return out


class TrainProgress:
    """The progress bar of a training run, showing the loss and the last validation Dice."""

    def __init__(self, total: int, start: int):
        from cctr.console import progress_bar

        self.p = progress_bar()
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start)

    def update(self, it: int, loss: float, val: float) -> None:
        info = f"loss {loss:.3f}" + ("" if math.isnan(val) else f"  val dice {val:.3f}")
        self.p.update(self.task, completed=it, description=f"train {info}")

    def close(self) -> None:
        self.p.stop()
