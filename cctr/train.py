"""The one training loop (DESIGN §4). Every Table-1 row is a set of switches on it, never a copy.

A run: data + split → (registration maps if the method needs them) → two nets trained jointly →
validation every N iterations (3D metrics, pseudo-label quality) → best/last checkpoints →
test evaluation of both. Everything is logged to one MLflow run that always ends in a final state.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cctr.checkpoint import load_checkpoint, save_checkpoint
from cctr.config import RunConfig, flatten, from_dict, to_dict
from cctr.errors import CctrError

CKPT_FORMAT = "cctr-segmentation"


@dataclass(frozen=True)
class Method:
    """What a Table-1 row switches on."""

    unlabeled: bool = False  # unlabeled slices in the batch
    ct: bool = False  # cross-teaching
    con: bool = False  # pixel contrastive
    rsl: bool = False  # registration supervision
    reps: bool = False  # registration-enhanced positives (memory bank)
    all_labeled: bool = False  # `full`: every training label (upper bound)
    train: bool = True  # `reg-only` trains nothing

    @property
    def needs_registration(self) -> bool:
        return self.rsl or self.reps or not self.train


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
    for k in ("w_ct", "w_rsl", "w_con", "lr", "weight_decay", "tau", "reps_radius_mm", "grad_clip"):
        if getattr(t, k) < 0:
            raise CctrError(f"train.{k} must be >= 0, got {getattr(t, k)}")
    if t.tau == 0:
        raise CctrError("train.tau must be > 0")
    for k in ("iters", "batch_labeled", "val_every", "memory_size", "anchors_per_class"):
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


def device_for() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    split = make_split(ds, cfg.data.labeled, cfg.data.seed)
    labeled = list(split.train) if method.all_labeled else list(split.labeled)
    train_ids = list(split.train) if method.unlabeled else labeled
    reg = None
    if method.needs_registration:
        from cctr.registration.apply import registration_maps

        reg = registration_maps(cfg.data.dataset, cfg.registration, split)
    lab = set(labeled)
    cases = [ds.case(c) for c in train_ids]
    maps: dict[str, list[np.ndarray | None]] = {
        # unlabeled cases' labels never enter training (DESIGN §3)
        "label": [c.label if c.case_id in lab else None for c in cases],
    }
    kinds = {"label": "label"}
    if reg is not None and method.train:
        maps["y_reg"] = [reg.y_reg(c) for c in train_ids]
        maps["c_reg"] = [reg.c_reg(c) for c in train_ids]
        maps["coords"] = [reg.coords(c) for c in train_ids]
        kinds.update(y_reg="label", c_reg="linear", coords="linear")
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


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    return base * (1 - it / total) ** power


def loss_terms(cfg: RunConfig, method: Method, nets, batch: dict, bank, it: int, gen: torch.Generator,
               device: torch.device) -> dict[str, torch.Tensor]:
    """All loss terms of one batch; the caller weights and sums them."""
    from cctr import losses as L

    t = cfg.train
    b_l = t.batch_labeled
    img = batch["image"].to(device, non_blocking=True)
    outs = [net(img) for net in nets]
    logits = [o["logits"] for o in outs]
    C = logits[0].shape[1]  # the nets know their class count; no dataset lookup on the hot path
    y = batch["label"].to(device).long()
    terms: dict[str, torch.Tensor] = {}
    terms["sup"] = sum(L.dice_ce(lg[:b_l], y[:b_l], C) for lg in logits)
    if not method.unlabeled:
        return terms
    la, lb = logits[0][b_l:], logits[1][b_l:]
    zero = img.new_zeros(())
    terms["ct"] = L.cross_teaching(la, lb, C) if method.ct else zero
    if method.rsl:
        yr = batch["y_reg"].to(device).long()[b_l:]
        cr = batch["c_reg"].to(device).float()[b_l:].reshape(yr.shape)
        cr = cr * batch["valid"].to(device)[b_l:]  # pixels rotated in from outside the slice carry no label
        terms["rsl"] = sum(L.rsl_loss(lg, yr, cr, t.conf_threshold, C) for lg in (la, lb))
    if method.con:
        terms["con"] = contrastive_term(cfg, method, outs, logits, y, batch, bank, gen, device)
    return terms


def contrastive_term(cfg, method, outs, logits, y, batch, bank, gen, device) -> torch.Tensor:
    """Pixel contrast over anchors of both nets; labels: GT on labeled, the other net's argmax on unlabeled."""
    import torch.nn.functional as F

    from cctr import losses as L

    t = cfg.train
    b_l = t.batch_labeled
    feats, classes, coords, cases = [], [], [], []
    for k, o in enumerate(outs):
        emb = o["embed"]
        h, w = emb.shape[-2:]
        other = logits[1 - k].detach().argmax(1)
        lab = torch.cat([y[:b_l], other[b_l:]], 0)
        lab = L.resize_nearest(lab, (h, w))
        f, c, pos = L.sample_anchors(emb, lab, t.anchors_per_class, gen)
        feats.append(f)
        classes.append(c)
        if method.reps:
            co = batch["coords"].to(device).float()
            co = F.interpolate(co, size=(h, w), mode="bilinear", align_corners=False)
            bi, yy, xx = pos
            coords.append(co[bi, :, yy, xx])
            cases.append(batch["case_index"].to(device)[bi])
    f = torch.cat(feats)
    c = torch.cat(classes)
    if not method.reps:
        return L.supcon_loss(f, c, t.tau)
    co, ca = torch.cat(coords), torch.cat(cases)
    extra = L.reps_positive_mask(co, ca, bank, t.reps_radius_mm, t.reps_k)
    loss = L.supcon_loss(f, c, t.tau, extra_pos_mask=extra, bank_feats=bank.feats, bank_classes=bank.cls,
                         bank_valid=bank.valid)
    bank.push(f.detach(), ca, c, co)
    return loss


def cfg_num_classes(cfg: RunConfig) -> int:
    from cctr.data.datasets import get_spec

    return get_spec(cfg.data.dataset).num_classes


# ----------------------------------------------------------------------------- validation


def predict_cases(nets, ds, ids: list[str], size: int, device) -> dict[str, dict[str, np.ndarray]]:
    """Per case: net A, net B and ensemble labels at native resolution."""
    from cctr.inference import predict_volume

    out = {}
    for cid in ids:
        img = ds.case(cid).image
        pa = predict_volume([nets[0]], img, size, device=device, return_probs=True)
        pb = predict_volume([nets[1]], img, size, device=device, return_probs=True)
        out[cid] = {"a": pa.argmax(0).astype(np.uint8), "b": pb.argmax(0).astype(np.uint8),
                    "ens": ((pa + pb) / 2).argmax(0).astype(np.uint8)}
    return out


def evaluate_predictions(preds: dict[str, np.ndarray], ds, convention: str = "strict") -> tuple[list[dict], dict]:
    """Per-case rows (one per case x class) and the summary (mean over classes, then cases)."""
    from cctr.metrics import case_metrics, summarize

    spec = ds.spec
    rows, per_case = [], []
    for cid, pred in preds.items():
        case = ds.case(cid)
        m = case_metrics(pred, case.label, case.spacing, spec.num_classes, convention=convention)
        per_case.append(m)
        for k in range(1, spec.num_classes):
            rows.append({"case": cid, "class": spec.class_names[k], "dice": float(m["dice"][k - 1]),
                         "hd95": float(m["hd95"][k - 1]), "asd": float(m["asd"][k - 1])})
    summ = summarize(per_case)
    for metric in ("dice", "hd95"):  # per-class means as plain floats: logged, and Table 1's CSV
        for k, name in enumerate(spec.class_names[1:]):
            summ[f"{metric}_{name}"] = float(summ[f"{metric}_per_class"][k])
    return rows, summ


def pseudo_label_quality(nets, data: RunData, size: int, device, max_cases: int = 4) -> dict[str, float]:
    """DESIGN §5 / Fig. 4: Dice of each net's and of y_reg's labels on unlabeled training cases.

    Held-back labels are read here for monitoring only; they never reach the loss.
    """
    from cctr.metrics import dice_per_class

    ids = data.split.unlabeled[:max_cases]
    if not ids:
        return {}
    preds = predict_cases(nets, data.ds, ids, size, device)
    C = data.ds.spec.num_classes
    acc: dict[str, list[float]] = {"pl_dice_a": [], "pl_dice_b": [], "pl_dice_reg": []}
    for cid in ids:
        gt = data.ds.case(cid).label
        acc["pl_dice_a"].append(np.nanmean(dice_per_class(preds[cid]["a"], gt, C)))
        acc["pl_dice_b"].append(np.nanmean(dice_per_class(preds[cid]["b"], gt, C)))
        if data.reg is not None:
            acc["pl_dice_reg"].append(np.nanmean(dice_per_class(data.reg.y_reg(cid), gt, C)))
    return {k: float(np.mean(v)) for k, v in acc.items() if v}


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
    bytes of a resumable checkpoint since SGD momentum is as large as the weights."""
    return {
        "format": CKPT_FORMAT, "config": to_dict(cfg), "iteration": state.iteration,
        "state_a": nets[0].state_dict(), "state_b": nets[1].state_dict(),
        "best_dice": state.best_dice, "best_iter": state.best_iter, "run_id": run_id or "",
    }


def checkpoint_payload(cfg: RunConfig, nets, opt, bank, state: StepState, run_id: str | None,
                       scaler=None) -> dict:
    """A resumable checkpoint (last.pt): the weights plus everything an exact resume restores."""
    return {
        **weights_payload(cfg, nets, state, run_id),
        "optimizer": opt.state_dict(),
        "bank": bank.state_dict() if bank is not None else {},
        "history": state.history,
        "rng_torch": torch.get_rng_state(), "rng_numpy": _np_state(),
        "scaler": scaler.state_dict() if scaler is not None else {},
    }


def _np_state() -> dict:
    s = np.random.get_state()
    return {"keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2])}


def _set_np_state(d: dict) -> None:
    np.random.set_state(("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], 0, 0.0))


def load_nets(path: str | Path, device=None):
    """(cfg, nets) from a segmentation checkpoint: the checkpoint alone is enough."""
    from cctr.models import build_nets

    ck = load_checkpoint(path, CKPT_FORMAT)
    cfg = from_dict(RunConfig, ck["config"])
    nets = build_nets(cfg.model, cfg_num_classes(cfg))
    nets[0].load_state_dict(ck["state_a"])
    nets[1].load_state_dict(ck["state_b"])
    dev = device or device_for()
    return cfg, [n.to(dev).eval() for n in nets], ck


def train(cfg: RunConfig, run_dir: Path, *, resume: Path | None = None, progress: bool = True,
          on_validation: Callable[[int, float], None] | None = None, parent_run_id: str | None = None,
          tags: dict[str, Any] | None = None, stop_after: int | None = None,
          on_start: Callable[[str], None] | None = None) -> TrainResult:
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
    name = f"{cfg.train.method}-l{cfg.data.labeled}-s{cfg.train.seed}"
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
    write_rows(run_dir / "test_per_case.csv", rows)
    run.log_artifact(run_dir / "test_per_case.csv")
    run.log_metrics(metrics, 0)
    return metrics


def _fit(cfg: RunConfig, method: Method, data: RunData, run, run_dir: Path, ck: dict | None, progress: bool,
         on_validation, stop_after: int | None) -> dict[str, float]:
    from cctr import losses as L
    from cctr.data.slices import make_loader
    from cctr.models import build_nets

    t = cfg.train
    device = device_for()
    C = data.ds.spec.num_classes
    nets = [n.to(device) for n in build_nets(cfg.model, C)]
    params = [p for n in nets for p in n.parameters()]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    elif t.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        raise CctrError(f"train.optimizer must be sgd or adamw, got '{t.optimizer}'")
    use_amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    bank = L.MemoryBank(t.memory_size, cfg.model.proj_dim).to(device) if method.reps else None
    state = StepState()
    if ck is not None:
        nets[0].load_state_dict(ck["state_a"])
        nets[1].load_state_dict(ck["state_b"])
        opt.load_state_dict(ck["optimizer"])
        if bank is not None and ck["bank"]:
            bank.load_state_dict(ck["bank"])
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        state = StepState(ck["iteration"], ck["best_dice"], ck["best_iter"], list(ck["history"]))
    gen = torch.Generator(device=device)  # anchor sampling; reseeded per iteration so resume is exact
    loader = make_loader(data.slices, data.labeled_slices, data.unlabeled_slices if method.unlabeled else [],
                         t.batch_labeled, t.batch_unlabeled if method.unlabeled else 0, t.iters,
                         cfg.data.num_workers, t.seed, start=state.iteration)
    batches = iter(loader)  # starting a DataLoader draws from the global RNG: restore it afterwards
    if ck is not None:
        torch.set_rng_state(ck["rng_torch"])
        _set_np_state(ck["rng_numpy"])
    end = min(t.iters, stop_after) if stop_after else t.iters
    weights = {"ct": t.w_ct, "rsl": t.w_rsl, "con": t.w_con}
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    prog = TrainProgress(end, state.iteration) if progress else None
    last_val = float("nan")
    try:
        for batch in batches:
            if state.iteration >= end:
                break
            it = state.iteration
            gen.manual_seed(t.seed * 1000003 + it)
            lr = poly_lr(t.lr, it, t.iters, t.poly_power)
            for g in opt.param_groups:
                g["lr"] = lr
            for n in nets:
                n.train()
            with torch.autocast(device.type, enabled=use_amp):
                terms = loss_terms(cfg, method, nets, batch, bank, it, gen, device)
            total = terms["sup"] + sum(L.ramp_weight(weights[k], it, t.ramp_iters) * v
                                       for k, v in terms.items() if k != "sup")
            if not torch.isfinite(total):
                raise Diverged(f"non-finite loss at iteration {it} "
                               f"({', '.join(f'{k}={float(v):.3g}' for k, v in terms.items())})")
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
            if it % 10 == 0 or state.iteration == end:
                run.log_metrics({"loss": total.item(), "lr": lr, **{f"loss_{k}": v.item() for k, v in terms.items()}},
                                it)
            if state.iteration % t.val_every == 0 or state.iteration == t.iters:
                last_val = _validate(cfg, nets, data, run, state, device)
                if state.best_iter == state.iteration:
                    save_checkpoint(best_path, weights_payload(cfg, nets, state, run.run_id))
                save_checkpoint(last_path, checkpoint_payload(cfg, nets, opt, bank, state, run.run_id, scaler))
                if on_validation is not None:
                    on_validation(state.iteration, last_val)
            if prog:
                prog.update(state.iteration, total.item(), last_val)
        if state.iteration < t.iters:  # stopped early on purpose: keep an exact resume point
            save_checkpoint(last_path, checkpoint_payload(cfg, nets, opt, bank, state, run.run_id, scaler))
            return {"iteration": float(state.iteration)}
    finally:
        if prog:
            prog.close()
    return _final_report(cfg, data, run, run_dir, device, state)


def _validate(cfg, nets, data: RunData, run, state: StepState, device) -> float:
    for n in nets:
        n.eval()
    preds = predict_cases(nets, data.ds, data.split.val, cfg.data.size, device)
    _, summ = evaluate_predictions({c: p["ens"] for c, p in preds.items()}, data.ds)
    metrics = {f"val_{k}": v for k, v in summ.items() if isinstance(v, float)}
    metrics.update(pseudo_label_quality(nets, data, cfg.data.size, device))
    val = float(summ["dice"])
    if val > state.best_dice:
        state.best_dice, state.best_iter = val, state.iteration
    metrics["val_best_dice"] = state.best_dice
    run.log_metrics(metrics, state.iteration)
    state.history.append({"iteration": state.iteration, **metrics})
    return val


def _final_report(cfg, data: RunData, run, run_dir: Path, device, state: StepState) -> dict[str, float]:
    """Test metrics of both the best-val and the last checkpoint, per-case CSVs, figures, checkpoints."""
    from cctr.report import overlay_figure, pseudo_label_figure

    out: dict[str, float] = {"best_iter": float(state.best_iter), "val_best_dice": state.best_dice}
    for tag, path in (("best", run_dir / "best.pt"), ("last", run_dir / "last.pt")):
        _, nets, _ = load_nets(path, device)
        preds = predict_cases(nets, data.ds, data.split.test, cfg.data.size, device)
        rows, summ = evaluate_predictions({c: p["ens"] for c, p in preds.items()}, data.ds)
        csv_path = run_dir / f"test_per_case_{tag}.csv"
        write_rows(csv_path, rows)
        run.log_artifact(csv_path)
        prefix = "test" if tag == "best" else "test_last"
        out.update({f"{prefix}_{k}": v for k, v in summ.items() if isinstance(v, float)})
        if tag == "best":
            vp = predict_cases(nets, data.ds, data.split.val[:3], cfg.data.size, device)
            fig_path = overlay_figure(data.ds, vp, run_dir / "val_overlays.png")
            run.log_artifact(fig_path)
    run.log_metrics(out, state.iteration)
    if state.history:
        run.log_artifact(pseudo_label_figure(state.history, run_dir / "pseudo_label_quality.png"))
    run.log_artifact(run_dir / "best.pt", "checkpoints", link=True)
    run.log_artifact(run_dir / "last.pt", "checkpoints", link=True)
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    from cctr.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)


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
