"""The one training loop. Every Table-1 row is a list of loss terms (`cctr.terms`) run by it, never a copy.

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
from cctr.terms import (
    TERMS,
    Method,
    StepContext,
    check_method,
    get_method,
    run_after_step,
    step_terms,
    validate_terms,
)

# training curves are logged every LOG_EVERY iterations; the pair monitor counts on those steps only
LOG_EVERY = 10


def validate_config(cfg: RunConfig) -> Method:
    """Reject bad values before anything is created (no MLflow run, no files): the loop's own keys here,
    each loss term's through its declaration (`cctr.terms.validate_terms`)."""
    m = get_method(cfg.train.method)
    t = cfg.train
    for k in ("lr", "weight_decay", "grad_clip"):
        if getattr(t, k) < 0:
            raise CctrError(f"train.{k} must be >= 0, got {getattr(t, k)}")
    if t.norm_batches not in ("joint", "split"):
        raise CctrError(f"train.norm_batches must be joint or split, got '{t.norm_batches}'")
    validate_terms(t)
    check_method(m, t)
    for k in ("iters", "batch_labeled", "val_every", "ckpt_every"):
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
    if method.needs("monitor"):  # held-back labels for the pair-precision monitor only: no loss reads "label_mon"
        maps["label_mon"] = [c.label for c in cases]
        kinds["label_mon"] = "label"
    if reg is not None and method.train:
        stored = [reg[c] for c in train_ids]  # y_reg compressed per slice; c_reg, coords on the grid
        maps["y_reg"] = [m.y_reg for m in stored]
        maps["c_reg"] = [m.c_reg for m in stored]
        maps["coords"] = [m.coords for m in stored]
        kinds.update(y_reg="label", c_reg="field", coords="field")
        if len(split.labeled) > 1:  # the coordinates' own gate (`RegMaps`); with one atlas it is c_reg
            maps["c_coord"] = [m.c_coord for m in stored]
            kinds["c_coord"] = "field"
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


def rsl_crossed(history: list[dict]) -> int | None:
    """Where the nets reached registration's quality: the first validation iteration at which their
    validation Dice was at or above y_reg's (the crossover of the pseudo-label-quality curves, measured
    on validation cases like the best-checkpoint choice; training cases' held-back labels are never read
    for it), or None."""
    return next((h["iteration"] for h in history if "val_reg_dice" in h and h["val_dice"] >= h["val_reg_dice"]),
                None)


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
                         max_cases: int = 4, keys: tuple[str, ...] = ("a", "b")) -> dict[str, float]:
    """DESIGN §5 / Fig. 4: Dice of each net's (`keys`: the nets the method trains) and of y_reg's labels
    on unlabeled training cases.

    Held-back labels are read here for monitoring only; they never reach the loss. `reg_dice` caches
    y_reg's Dice, which does not change during a run.
    """
    ids = data.split.unlabeled[:max_cases]
    if not ids:
        return {}
    preds = predict_cases(nets, data.ds, ids, size, device, keys=keys)
    out = {f"pl_dice_{k}": dice_summary({c: p[k] for c, p in preds.items()}, data.ds)["dice"] for k in keys}
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
        "predict": get_method(cfg.train.method).predict,  # "ens", or "a" where net B is untrained
        "best_dice": state.best_dice, "best_iter": state.best_iter, "run_id": run_id or "",
    }


def checkpoint_payload(fit: Fit) -> dict:
    """A resumable checkpoint (last.pt): the weights plus everything an exact resume restores."""
    return {
        **weights_payload(fit.cfg, fit.nets, fit.state, fit.run.run_id),
        "optimizer": fit.opt.state_dict(),
        "terms": {k: v.state_dict() for k, v in fit.term_state.items()},
        "history": fit.state.history, "early": dict(fit.state.early),
        "rng_torch": torch.get_rng_state(), "rng_numpy": _np_state(),
        "scaler": fit.scaler.state_dict() if fit.scaler is not None else {},
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


@dataclass
class Fit:
    """A segmentation run in progress: what `_setup` builds and each step, validation and the final report
    read."""

    cfg: RunConfig
    method: Method
    data: RunData
    run: Any
    run_dir: Path
    device: torch.device
    nets: list
    opt: torch.optim.Optimizer
    amp: torch.dtype | None
    scaler: Any
    term_state: dict[str, Any]  # per-term state (memory banks, ...), by term name
    state: StepState
    gen: torch.Generator  # anchor sampling; reseeded per iteration so resume is exact
    trained: list  # the nets the method trains (`Method.nets`): both, or net A alone
    params: list[torch.nn.Parameter]  # theirs, in the optimizer's order (clipped every step)
    reg_dice: dict[str, float] = field(default_factory=dict)  # y_reg's fixed Dice, computed once
    crossed_at: int | None = None  # the first validation at which the nets reached y_reg's Dice


def _fit(cfg: RunConfig, method: Method, data: RunData, run, run_dir: Path, ck: dict | None, progress: bool,
         on_validation, stop_after: int | None) -> dict[str, float]:
    """setup, then step / validate until the end, then the final report."""
    from cctr.data.slices import make_loader

    fit = _setup(cfg, method, data, run, run_dir, ck)
    t, state = cfg.train, fit.state
    loader = make_loader(data.slices, data.labeled_slices, data.unlabeled_slices if method.unlabeled else [],
                         t.batch_labeled, t.batch_unlabeled if method.unlabeled else 0, t.iters,
                         cfg.data.num_workers, t.seed, start=state.iteration)
    batches = iter(loader)  # starting a DataLoader draws from the global RNG: restore it afterwards
    if ck is not None:
        torch.set_rng_state(ck["rng_torch"])
        _set_np_state(ck["rng_numpy"])
    end = min(t.iters, stop_after) if stop_after else t.iters
    early_end = t.iters // 4
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    prog = TrainProgress(end, state.iteration) if progress else None
    last_val = float("nan")
    window: dict[str, float] = {}
    for n in fit.nets:  # once here and after each validation (a walk over every module: not per step)
        n.train()
    try:
        for batch in batches:
            if state.iteration >= end:
                break
            it = state.iteration
            total, terms, w_now, stats = _step(fit, batch, it)
            state.iteration = it + 1
            for key, v in stats.items():
                window[key] = window.get(key, 0.0) + v
                if it < early_end:
                    state.early[key] = state.early.get(key, 0.0) + v
            if it % LOG_EVERY == 0 or state.iteration == end:
                run.log_metrics({"loss": total.item(), "lr": fit.opt.param_groups[0]["lr"],
                                 **{f"loss_{k}": v.item() for k, v in terms.items()},
                                 **{f"w_{k}": v for k, v in w_now.items()}, **monitor_metrics(window, LOG_EVERY)}, it)
                window = {}
            if state.iteration % t.val_every == 0 or state.iteration == t.iters:
                last_val = _validate(fit)
                if state.best_iter == state.iteration:
                    save_checkpoint(best_path, weights_payload(cfg, fit.nets, state, run.run_id))
                if on_validation is not None:
                    on_validation(state.iteration, last_val)
            if state.iteration % t.ckpt_every == 0 and state.iteration < t.iters:
                save_checkpoint(last_path, checkpoint_payload(fit))
            if prog:
                prog.update(state.iteration, total.item(), last_val)
        if state.iteration < t.iters:  # stopped early on purpose: keep an exact resume point
            save_checkpoint(last_path, checkpoint_payload(fit))
            return {"iteration": float(state.iteration)}
    finally:
        if prog:
            prog.close()
    if t.keep_last:
        save_checkpoint(last_path, checkpoint_payload(fit))
    out = _final_report(fit)
    if not t.keep_last:  # the run is finished and evaluated: the resumable file has no use left
        last_path.unlink(missing_ok=True)
    return out


def _setup(cfg: RunConfig, method: Method, data: RunData, run, run_dir: Path, ck: dict | None) -> Fit:
    """Nets, optimizer, precision, each term's state; restored from `ck` when resuming."""
    from cctr.models import build_nets

    t = cfg.train
    device = device_for()
    nets = [n.to(device) for n in build_nets(cfg.model, data.ds.spec.num_classes)]
    trained = [n for k, n in zip("ab", nets) if k in method.nets]
    params = [p for n in trained for p in n.parameters()]
    opt = make_optimizer(t, params)
    amp = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    term_state = {k: TERMS[k].setup(cfg, data, device) for k in method.terms if TERMS[k].setup is not None}
    state = StepState()
    if ck is not None:
        nets[0].load_state_dict(ck["state_a"])
        nets[1].load_state_dict(ck["state_b"])
        opt.load_state_dict(ck["optimizer"])
        for k, sd in ck["terms"].items():
            term_state[k].load_state_dict(sd)
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        state = StepState(ck["iteration"], ck["best_dice"], ck["best_iter"], list(ck["history"]), dict(ck["early"]))
    fit = Fit(cfg, method, data, run, run_dir, device, nets, opt, amp, scaler, term_state, state,
              torch.Generator(device=device), trained, params)
    fit.crossed_at = rsl_crossed(state.history)  # a resumed run continues where it was
    return fit


def _step(fit: Fit, batch: dict, it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float],
                                                    dict[str, float]]:
    """One optimizer step: every term of the method, weighted on its schedule and summed (unweighted
    terms first: the supervised base). Returns the loss, the terms, their weights and the monitor counts."""
    t = fit.cfg.train
    fit.gen.manual_seed(t.seed * 1000003 + it)
    lr = poly_lr(t.lr, it, t.iters, t.poly_power)
    for g in fit.opt.param_groups:
        g["lr"] = lr
    ctx = StepContext(fit.cfg, fit.method, fit.trained, batch, fit.device, fit.gen, fit.amp, fit.term_state,
                      monitor=it % LOG_EVERY == 0, it=it)
    terms = step_terms(ctx)
    w_now = {k: L.scheduled_weight(*TERMS[k].weight(t), it, t.ramp_iters, fit.crossed_at, t.iters)
             for k in terms if TERMS[k].weight is not None}
    base = [v for k, v in terms.items() if k not in w_now]
    total = sum(base[1:], base[0]) + sum(w_now[k] * v for k, v in terms.items() if k in w_now)
    if not torch.isfinite(total):
        raise Diverged(f"non-finite loss at iteration {it} "
                       f"({', '.join(f'{k}={float(v.detach()):.3g}' for k, v in terms.items())})")
    fit.opt.zero_grad(set_to_none=True)
    if fit.scaler is not None:
        fit.scaler.scale(total).backward()
        fit.scaler.unscale_(fit.opt)
    else:
        total.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(fit.params, t.grad_clip)
    if fit.scaler is not None:
        fit.scaler.step(fit.opt)
        fit.scaler.update()
    else:
        fit.opt.step()
    run_after_step(fit.method, fit.term_state, fit.trained, it)
    return total, terms, w_now, ctx.stats


def _validate(fit: Fit) -> float:
    """Dice only (model selection and curves); HD95/ASD are for the final test report.

    Pseudo-label quality only where there are pseudo-labels: semi-supervised runs.
    """
    cfg, data, nets, state, device = fit.cfg, fit.data, fit.nets, fit.state, fit.device
    for n in nets:
        n.eval()
    key = fit.method.predict
    preds = predict_cases(nets, data.ds, data.split.val, cfg.data.size, device, keys=(key,))
    summ = dice_summary({c: p[key] for c, p in preds.items()}, data.ds)
    metrics = {f"val_{k}": v for k, v in summ.items()}
    if fit.method.unlabeled:
        reg_dice = fit.reg_dice
        metrics.update(pseudo_label_quality(nets, data, cfg.data.size, device, reg_dice,
                                            keys=tuple(fit.method.nets)))
        if data.reg is not None:  # y_reg's own validation Dice (fixed): where the nets' curve crosses it
            if "val" not in reg_dice:
                reg_dice["val"] = dice_summary({c: data.reg.y_reg(c) for c in data.split.val}, data.ds)["dice"]
            metrics["val_reg_dice"] = reg_dice["val"]
    val = float(summ["dice"])
    if val > state.best_dice:
        state.best_dice, state.best_iter = val, state.iteration
    metrics["val_best_dice"] = state.best_dice
    fit.run.log_metrics(metrics, state.iteration)
    state.history.append({"iteration": state.iteration, **metrics})
    fit.crossed_at = rsl_crossed(state.history)
    for n in nets:  # back to training: validation is only ever called from the loop
        n.train()
    return val


def _final_report(fit: Fit) -> dict[str, float]:
    """Test metrics of the best-val checkpoint and of the last weights, per-case CSVs, figures, checkpoints."""
    from cctr.report import overlay_figure, pseudo_label_figure

    cfg, data, run, run_dir, device, state, last_nets = (fit.cfg, fit.data, fit.run, fit.run_dir, fit.device,
                                                         fit.state, fit.nets)
    out: dict[str, float] = {"best_iter": float(state.best_iter), "val_best_dice": state.best_dice}
    out.update({f"{k}_early": v for k, v in monitor_metrics(state.early, cfg.train.iters // 4).items()
                if k.endswith(("pair_precision", "pair_sim"))})
    if data.reg is not None:  # is c_reg calibrated? y_reg Dice above/below the threshold, validation cases
        from cctr.registration import confidence_calibration

        out.update(confidence_calibration(data.reg, data.ds, data.split.val, cfg.train.conf_threshold))
    for tag in ("best", "last"):
        if tag == "best" or state.best_iter != state.iteration:  # else the last weights are best.pt's
            nets = load_nets(run_dir / "best.pt", device)[1] if tag == "best" else [n.eval() for n in last_nets]
            key = fit.method.predict
            preds = predict_cases(nets, data.ds, data.split.test, cfg.data.size, device, keys=(key,))
            rows, summ = evaluate_predictions({c: p[key] for c, p in preds.items()}, data.ds)
        csv_path = run_dir / f"test_per_case_{tag}.csv"
        write_rows(csv_path, rows)
        run.log_artifact(csv_path)
        prefix = "test" if tag == "best" else "test_last"
        out.update({f"{prefix}_{k}": v for k, v in summ.items() if isinstance(v, float)})
        if tag == "best":
            vp = predict_cases(nets, data.ds, data.split.val[:3], cfg.data.size, device,
                               keys=tuple(fit.method.nets))
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
