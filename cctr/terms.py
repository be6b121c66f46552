"""Loss terms and methods: a method (a row of Table 1) is a list of named loss terms.

A `Term` is one piece of the training loss: how it is computed from a step's `StepContext` (the batch,
the nets' outputs, pseudo-labels, registration maps, per-term state such as memory banks), its weight
and schedule, the config keys it reads and how they are checked, and what data it needs. The loop in
`cctr.train` weights, logs and validates terms generically, so a new method is one `register_method`
call (a new loss, one `register_term`), and `train.py` does not change.

The contrast is one loss: the class part ("con") and the REPS part ("reps") share the similarities and
one softmax denominator per anchor, so w_con·L_con + w_reps·L_reps is a single supervised contrast
whose positives carry weights (class positives w_con/|P_i|, registration partners w_reps/|R_i|, each
averaged over the anchors that have them): a partner is a positive of that one loss, never a negative
of the class part. A test checks the identity (values and gradients) on a hand-built batch.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from cctr import losses as L
from cctr.config import RunConfig, TrainConfig
from cctr.errors import CctrError

# ----------------------------------------------------------------------------- the per-step context


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


@dataclass
class StepContext:
    """What a step's terms read. The nets' outputs and pseudo-labels are computed once, on first use, so
    terms share them and the order of work is the order of the method's terms."""

    cfg: RunConfig
    method: Method
    nets: list
    batch: dict
    device: torch.device
    gen: torch.Generator  # anchor sampling (reseeded per iteration by the loop)
    amp: torch.dtype | None = None
    state: dict[str, Any] = field(default_factory=dict)  # per-term state (`Term.setup`), by term name
    monitor: bool = True  # held-back-label monitors run on this step (the loop's logging steps)
    stats: dict[str, float] = field(default_factory=dict)  # monitor counts, pooled by the loop
    shared: dict[str, Any] = field(default_factory=dict)  # results one term computes for another
    it: int = 0  # the training iteration (0-based) of this step

    @property
    def b_l(self) -> int:
        return self.cfg.train.batch_labeled

    @cached_property
    def outs(self) -> list[dict[str, torch.Tensor]]:
        img = self.batch["image"].to(self.device, non_blocking=True)
        # no projection head unless a term contrasts embeddings
        return forward_nets(self.nets, img, self.method.needs("embed"), self.amp, norm_split(self.cfg.train))

    @cached_property
    def logits(self) -> list[torch.Tensor]:
        return [o["logits"] for o in self.outs]

    @property
    def num_classes(self) -> int:
        return self.logits[0].shape[1]  # the nets know their class count; no dataset lookup on the hot path

    @cached_property
    def y(self) -> torch.Tensor:
        return self.batch["label"].to(self.device).long()

    @cached_property
    def pseudo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each net's hard labels on the unlabeled slices, for the other net."""
        return L.hard_labels(self.logits[0][self.b_l:]), L.hard_labels(self.logits[1][self.b_l:])


# ----------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class Term:
    """One named loss term. `weight(cfg)` gives (w, schedule) (`losses.scheduled_weight`); None means the
    term is added as it is (the supervised base). `needs`: "unlabeled" (unlabeled slices in the batch),
    "registration" (y_reg, c_reg, coordinates), "embed" (projection heads), "monitor" (held-back labels,
    read by monitors only). Config checks: `nonneg`, `positive`, `at_least_one` name `train.*` keys,
    `choices` maps a key to its allowed values. `setup(cfg, data, device)` builds state the term keeps
    across steps (it must have `state_dict`/`load_state_dict`: it goes into last.pt).
    `after_step(state, nets, iteration)` runs after each optimizer step (`nets`: the nets the method
    trains), e.g. an EMA teacher's update. `check(train_cfg)` raises a CctrError for a bad value of the
    term's own keys (run for every term, like the declarations); `requires(train_cfg)` for a setting the
    term cannot run with (run only when the method has the term, e.g. a batch too small)."""

    name: str
    compute: Callable[[StepContext], torch.Tensor]
    weight: Callable[[TrainConfig], tuple[float, str]] | None = None
    needs: frozenset[str] = frozenset()
    nonneg: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    at_least_one: tuple[str, ...] = ()
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    setup: Callable[[RunConfig, Any, torch.device], Any] | None = None
    after_step: Callable[[Any, list, int], None] | None = None
    check: Callable[[TrainConfig], None] | None = None
    requires: Callable[[TrainConfig], None] | None = None
    doc: str = ""


def _sup(ctx: StepContext) -> torch.Tensor:
    b_l, y, C = ctx.b_l, ctx.y, ctx.num_classes
    return sum(L.dice_ce(lg[:b_l], y[:b_l], C) for lg in ctx.logits)


def _ct(ctx: StepContext) -> torch.Tensor:
    la, lb = (lg[ctx.b_l:] for lg in ctx.logits)
    return L.cross_teaching(la, lb, ctx.num_classes, ctx.pseudo)


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


def _rsl(ctx: StepContext, yield_conf: float | None, soft: bool = False) -> torch.Tensor:
    """½(CE + Dice) of each net against y_reg on the unlabeled slices, on pixels that came from inside the
    slice: those where c_reg passes the threshold, or (`soft`) every one weighted by c_reg; `yield_conf`
    (None: never) lets the nets override y_reg."""
    t, b_l, dev = ctx.cfg.train, ctx.b_l, ctx.device
    la, lb = (lg[b_l:] for lg in ctx.logits)
    yr = ctx.batch["y_reg"].to(dev).long()[b_l:]
    cr = ctx.batch["c_reg"].to(dev).float()[b_l:].reshape(yr.shape)
    ignore = ~ctx.batch["valid"].to(dev)[b_l:]  # pixels rotated in from outside the slice carry no label
    if yield_conf is not None:
        yielded = rsl_yield(la, lb, yr, yield_conf) & ~ignore
        if not soft:
            yielded &= cr >= t.conf_threshold
        ctx.stats["rsl_yield"] = float(yielded.float().mean())
        ignore = ignore | yielded
    return sum(L.rsl_loss(lg, yr, cr, t.conf_threshold, ctx.num_classes, ignore, soft) for lg in (la, lb))


@dataclass
class Contrast:
    """The contrast's state across steps: the memory banks (one per net by default: each net's projection
    head has its own embedding space) and REPS's match caps in mm."""

    banks: list[Any] | None
    cap_xy: float = math.inf
    cap_z: float = math.inf

    def state_dict(self) -> list[dict]:
        return [b.state_dict() for b in self.banks or []]

    def load_state_dict(self, sds: list[dict]) -> None:
        for bank, sd in zip(self.banks or [], sds):
            bank.load_state_dict(sd)


def reps_caps(cfg: RunConfig, data) -> tuple[float, float]:
    """(in-plane, through-plane) REPS caps: `reps_cap` registration-grid cells of the reference labeled
    case, whose millimetres the anatomical coordinates are in."""
    ref = data.ds.case(data.split.labeled[0])
    r = cfg.registration
    cell = [(f if f > 0 else n * s) / g for f, n, s, g in zip(r.fov_mm, ref.shape, ref.spacing, r.grid)]
    return cfg.train.reps_cap * max(cell[1], cell[2]), cfg.train.reps_cap * cell[0]


def _contrast_setup(cfg: RunConfig, data, device: torch.device) -> Contrast:
    t = cfg.train
    n_banks = 1 if t.contrast == "joint" else 2
    banks = [L.MemoryBank(t.memory_size, cfg.model.proj_dim).to(device) for _ in range(n_banks)] \
        if t.memory_size else None
    # the caps wherever there are coordinates: `cct+rsl` monitors the pairs REPS would make
    return Contrast(banks, *(reps_caps(cfg, data) if data.reg is not None else (math.inf, math.inf)))


def _contrast_parts(ctx: StepContext) -> dict[str, torch.Tensor]:
    """The contrast's parts, computed once per step for the "con" and "reps" terms."""
    if "contrast" not in ctx.shared:
        ctx.shared["contrast"] = contrastive_term(
            ctx.cfg, ctx.method, ctx.nets, ctx.outs, ctx.pseudo, ctx.y, ctx.batch, ctx.state.get("con"), ctx.gen,
            ctx.device, ctx.stats if ctx.monitor else None)
    return ctx.shared["contrast"]


def contrastive_term(cfg: RunConfig, method: Method, nets, outs, pseudo, y, batch, con: Contrast | None, gen,
                     device, stats: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """Pixel contrast of each net's anchors against its own batch anchors and memory bank;
    `train.contrast: joint` contrasts both nets' anchors together against one bank instead.
    Returns the class part ("con") and, when the method has the "reps" term, the REPS part ("reps"): the
    two parts of one weighted supervised contrast (module docstring), weighted by the loop.

    Labels: ground truth on labeled slices, the *other* net's argmax on unlabeled ones. Every anchor
    attribute (label, coordinate, validity, confidence, monitor label) is read at the same pixel
    (`nearest_index`). Pixels rotated in from outside the slice are never anchors. With REPS, coordinates
    below their confidence threshold are NaN, so they match nothing. `stats` None: no pair monitor this
    step (and, without REPS, no partners are searched: only the monitor reads them).
    """

    t = cfg.train
    reps = method.has("reps")
    b_l = t.batch_labeled
    B = y.shape[0]
    case = batch["case_index"].to(device).long()
    is_gt = torch.arange(B, device=device) < b_l
    mon = batch["label_mon"].to(device).long() if "label_mon" in batch else torch.full_like(y, -1)
    valid = batch["valid"].to(device)
    coords = None
    if "coords" in batch:  # REPS reads them; without REPS (`cct+rsl`) the pair monitor only (bank entries keep them)
        # gated by the confidence of the atlas they come from (`c_coord`; with one atlas it is c_reg)
        gate = batch["c_coord"] if "c_coord" in batch else batch["c_reg"]
        ok = valid & (gate.to(device).float().reshape(y.shape) >= t.conf_threshold)
        coords = batch["coords"].to(device).float().masked_fill(~ok.unsqueeze(1), float("nan"))
    anchors = []  # per net: (feats, class, case, is-GT, monitor label, coords)
    for k, o in enumerate(outs):
        emb = o["feat"]
        iy, ix = L.nearest_index(tuple(y.shape[-2:]), emb.shape[-2:], device)

        # anchors only where the image is: pixels rotated in from outside the slice have no label (-1)
        lab = torch.cat([y[:b_l], pseudo[1 - k]], 0).masked_fill(~valid, -1)[:, iy[:, None], ix[None, :]]
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
        pair = coords is not None and (reps or stats is not None)
        partners = L.reps_partners(a_co, a_case, k_co, k_case, con.cap_xy, con.cap_z) if pair else None
        # without REPS the partners are monitored only: no loss reads them
        m = L.contrast_masks(c, a_gt, a_case, k_cls, k_gt, k_case, partners, replace=reps,
                             paired_only=t.reps_replace == "paired")
        # REPS has its own normalisation: a few registration positives are not drowned by class positives
        parts = L.masked_supcon_terms(f, keys, [m["pos"], m["reps"]] if reps else [m["pos"]], m["denom"], t.tau)
        sums = [a + b for a, b in zip(sums, parts)] if sums else parts
        if stats is not None:
            _count_pairs(stats, m, a_mon, k_mon, f.detach() @ keys.detach().float().t())
        if bank is not None:
            bank.push(f.detach(), a_case, c, a_co, a_gt, a_mon)
    return dict(zip(("con", "reps"), sums))


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


TERMS: dict[str, Term] = {}


def register_term(term: Term) -> Term:
    """Make a term available to methods (by its name)."""
    TERMS[term.name] = term
    return term


register_term(Term("sup", _sup, doc="½(CE + Dice) of each net on the labeled slices"))
register_term(Term("ct", _ct, lambda t: (t.w_ct, "ramp"), frozenset({"unlabeled"}), nonneg=("w_ct",),
                   doc="cross-teaching: Dice of each net against the other's hard labels on unlabeled slices"))
register_term(Term(
    "rsl", lambda ctx: _rsl(ctx, ctx.cfg.train.rsl_yield_conf, ctx.cfg.train.rsl_confidence == "weight"),
    lambda t: (t.w_rsl, t.rsl_schedule), frozenset({"unlabeled", "registration"}), nonneg=("w_rsl", "rsl_yield_conf"),
    choices={"rsl_schedule": L.SCHEDULES, "rsl_confidence": ("gate", "weight")},
    doc="registration supervision against y_reg where c_reg passes (or weighted by c_reg: `rsl_confidence`); "
        "yields where both nets confidently disagree with it, on `rsl_schedule` (default: fades out after the "
        "validation crossover)"))
register_term(Term(
    "rsl_plain", lambda ctx: _rsl(ctx, None), lambda t: (t.w_rsl, "constant"),
    frozenset({"unlabeled", "registration"}), nonneg=("w_rsl",),
    doc="registration supervision as the paper states it: constant w_rsl, every confident pixel, no yield"))
register_term(Term(
    "con", lambda ctx: _contrast_parts(ctx)["con"], lambda t: (t.w_con, "ramp"),
    frozenset({"unlabeled", "embed", "monitor"}), nonneg=("w_con", "memory_size"), positive=("tau",),
    at_least_one=("anchors_per_class",), choices={"contrast": ("per_net", "joint")}, setup=_contrast_setup,
    doc="pixel supervised contrast, class positives (pseudo-labels on unlabeled slices), memory bank"))
register_term(Term(
    "reps", lambda ctx: _contrast_parts(ctx)["reps"], lambda t: (t.w_con * t.reps_weight, t.reps_schedule),
    frozenset({"unlabeled", "embed", "registration"}), nonneg=("reps_weight",), positive=("reps_cap",),
    choices={"reps_schedule": L.SCHEDULES, "reps_replace": ("all", "paired")},
    doc="REPS: registration partners as positives of the contrast (with \"con\"), on their own normalisation"))


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A Table-1 row: its loss terms (in the order they are computed and summed) and what data it trains
    on. `all_labeled`: every training case's label (`full`); `train` False: nothing is trained
    (`reg-only` predicts test cases by registration). `nets`: the nets it trains and predicts with,
    ("a", "b") (prediction: their ensemble) or ("a",) (net A alone: net B is neither trained nor
    forwarded, and validation, the pseudo-label monitor and the test predict with A)."""

    name: str
    terms: tuple[str, ...] = ("sup",)
    all_labeled: bool = False
    train: bool = True
    doc: str = ""
    nets: tuple[str, ...] = ("a", "b")

    def has(self, term: str) -> bool:
        return term in self.terms

    def needs(self, what: str) -> bool:
        return any(what in TERMS[t].needs for t in self.terms)

    @property
    def unlabeled(self) -> bool:
        """Unlabeled slices in the batch."""
        return self.needs("unlabeled")

    @property
    def needs_registration(self) -> bool:
        return self.needs("registration") or not self.train

    @property
    def predict(self) -> str:
        """Which prediction validation and test read: "ens" (both nets) or "a" (net A alone)."""
        return "ens" if "b" in self.nets else "a"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make a method available to `cctr train --method`, sweeps and Table 1; its terms must exist."""
    unknown = [t for t in method.terms if t not in TERMS]
    if unknown:
        raise CctrError(f"method '{method.name}': unknown loss terms {', '.join(unknown)}; known: {', '.join(TERMS)}")
    if method.nets not in (("a", "b"), ("a",)):
        raise CctrError(f"method '{method.name}': nets must be (\"a\", \"b\") or (\"a\",), got {method.nets}")
    METHODS[method.name] = method
    return method


for _m in (
    Method("sup", doc="labeled slices only"),
    Method("sup-a", nets=("a",), doc="net A alone on the labeled slices: the one-net peers' supervised baseline"),
    Method("ct", ("sup", "ct"), doc="+ cross-teaching between the two nets"),
    Method("cct", ("sup", "ct", "con"), doc="+ pixel contrast with pseudo-label positives"),
    Method("cct+rsl", ("sup", "ct", "rsl", "con"), doc="cct + registration supervision"),
    Method("cct+reps", ("sup", "ct", "con", "reps"), doc="cct + registration-enhanced positives"),
    Method("cctr", ("sup", "ct", "rsl", "con", "reps"), doc="the full method: cct + RSL + REPS"),
    Method("cct+rsl-plain", ("sup", "ct", "rsl_plain", "con"), doc="cct+rsl with the paper's plain RSL"),
    Method("cctr-rsl-plain", ("sup", "ct", "rsl_plain", "con", "reps"), doc="cctr with the paper's plain RSL"),
    Method("full", all_labeled=True, doc="every training label (upper bound)"),
    Method("reg-only", (), train=False, doc="multi-atlas registration labels as the prediction"),
):
    register_method(_m)


_PLUGINS_LOADED: set[str] = set()


def load_plugins() -> None:
    """Import the modules named in CCTR_PLUGINS (comma-separated, importable from PYTHONPATH): a
    researcher's own terms and methods, registered there with `register_term` / `register_method`, become
    methods of every command, and of the worker processes of sweeps and Table 1 (same environment)."""
    for name in (n.strip() for n in os.environ.get("CCTR_PLUGINS", "").split(",")):
        if not name or name in _PLUGINS_LOADED:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure of the user's module is one clear line, not a traceback
            raise CctrError(f"CCTR_PLUGINS: cannot import '{name}' ({type(e).__name__}: {e})") from None
        _PLUGINS_LOADED.add(name)


def get_method(name: str) -> Method:
    load_plugins()
    if name not in METHODS:
        raise CctrError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    return METHODS[name]


def validate_terms(t: TrainConfig) -> None:
    """Every registered term's config keys, whichever method runs (a bad value is an error even where it
    is unused, so a sweep or table never carries one unnoticed)."""
    for term in TERMS.values():
        for k in term.nonneg:
            if getattr(t, k) < 0:
                raise CctrError(f"train.{k} must be >= 0, got {getattr(t, k)}")
        for k in term.positive:
            if getattr(t, k) <= 0:
                raise CctrError(f"train.{k} must be > 0, got {getattr(t, k)}")
        for k in term.at_least_one:
            if getattr(t, k) < 1:
                raise CctrError(f"train.{k} must be >= 1, got {getattr(t, k)}")
        for k, ok in term.choices.items():
            if getattr(t, k) not in ok:
                allowed = " or ".join(ok) if len(ok) == 2 else f"one of {', '.join(ok)}"
                raise CctrError(f"train.{k} must be {allowed}, got '{getattr(t, k)}'")
        if term.check is not None:
            term.check(t)


def check_method(method: Method, t: TrainConfig) -> None:
    """What the method's own terms cannot run with (`Term.requires`)."""
    for name in method.terms:
        if TERMS[name].requires is not None:
            TERMS[name].requires(t)


def run_after_step(method: Method, state: dict[str, Any], nets: list, it: int) -> None:
    """Every term's `after_step` hook, in the method's order, after the optimizer step of iteration `it`."""
    for name in method.terms:
        hook = TERMS[name].after_step
        if hook is not None:
            hook(state.get(name), nets, it)


def step_terms(ctx: StepContext) -> dict[str, torch.Tensor]:
    """Every term of the method on one batch, by name, unweighted (the loop weights and sums them)."""
    return {name: TERMS[name].compute(ctx) for name in ctx.method.terms}


# the peers' rows (BCP, UniMatch) register their terms and methods on import
from cctr import peers as _peers  # noqa: E402, F401
