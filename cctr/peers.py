"""The peers' rows of Table 1: bidirectional copy-paste (`bcp`; Bai et al., CVPR 2023) and UniMatch
(`unimatch`; Yang et al., CVPR 2023), as loss terms of the one training loop.

Both train net A alone (`Method.nets = ("a",)`): the backbone of the other rows' net A (U-Net/ResNet-18
by default), the same labeled cases per seed, the same iterations and optimiser, so the comparison
with CCT-R is protocol- and backbone-fair. Every random draw of a step (boxes, augmentations, feature
dropout) comes from the step's generator (`StepContext.gen`, reseeded per iteration), so a step is
reproducible and a resumed run is exact. Settings and their sources: cctr/config.py, docs/method.md.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cctr import losses as L
from cctr.config import RunConfig, TrainConfig
from cctr.errors import CctrError
from cctr.terms import Method, StepContext, Term, forward_nets, register_method, register_term


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device)


def _in_unit(t: TrainConfig, keys: tuple[str, ...], top_open: tuple[str, ...] = (), bottom_open: tuple[str, ...] = ()
             ) -> None:
    for k in keys:
        v = getattr(t, k)
        lo_ok = v > 0 if k in bottom_open else v >= 0
        hi_ok = v < 1 if k in top_open else v <= 1
        if not (lo_ok and hi_ok):
            lo, hi = "(0" if k in bottom_open else "[0", "1)" if k in top_open else "1]"
            raise CctrError(f"train.{k} must be in {lo}, {hi}, got {v}")


def _student_logits(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
    """Net A's logits on a batch of mixed images, one BatchNorm batch: every mixed image holds labeled
    and unlabeled pixels, so `train.norm_batches`' labeled/unlabeled split has nothing to separate."""
    return forward_nets(ctx.nets[:1], x, False, ctx.amp)[0]["logits"]


# ----------------------------------------------------------------------------- BCP


def bcp_box(size: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    """BCP's `generate_mask`: a square box of side int(size·frac) at a uniform position (its corner in
    [0, size − side)), bool [size,size], True inside. One box per step, shared by the batch, as BCP."""
    side = min(max(int(size * frac), 1), size - 1)
    y0, x0 = torch.randint(0, size - side, (2,), generator=gen, device=gen.device).tolist()
    box = torch.zeros(size, size, dtype=torch.bool)
    box[y0:y0 + side, x0:x0 + side] = True
    return box


def copy_paste(img_out: torch.Tensor, img_in: torch.Tensor, y_out: torch.Tensor, y_in: torch.Tensor,
               box: torch.Tensor, w_out: float, w_in: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`img_in`'s box pasted into `img_out` (images [B,1,S,S], labels [B,S,S], box [S,S]): the mixed
    images, their supervision target (`y_in` in the box, `y_out` around it) and the per-pixel weights
    [B,S,S] (`w_in` in the box, `w_out` around it)."""
    m = box.to(img_out.device)
    x = torch.where(m, img_in, img_out)
    y = torch.where(m, y_in, y_out)
    w = torch.full(y.shape, float(w_out), device=y.device).masked_fill(m, float(w_in))
    return x, y, w


def mix_loss(logits: torch.Tensor, target: torch.Tensor, box: torch.Tensor, weight: torch.Tensor,
             num_classes: int) -> torch.Tensor:
    """BCP's `mix_loss`: ½(CE + Dice) over the box and over the rest of the mixed images separately (each
    pooled over the batch, CE averaged over the region's pixels), each times its region's weight (the
    per-pixel `weight`, constant within a region)."""
    parts = []
    for region in (~box.to(target.device), box.to(target.device)):
        r = region.expand_as(target)
        if bool(r.any()):
            parts.append(weight[r].mean() * L.dice_ce(logits, target, num_classes, ~r))
    return sum(parts[1:], parts[0])


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, for every parameter and floating-point buffer
    (BatchNorm statistics; BCP's `update_model_ema` averages the whole state dict); integer buffers
    (BatchNorm's batch counter) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


class Teacher:
    """BCP's mean teacher: a frozen copy of net A (no gradient ever reaches it), made when the
    labeled-only stage ends (iteration `start`) and updated by EMA after every later optimizer step.
    It predicts in eval mode. Its weights go into last.pt, so a resumed run continues exactly."""

    def __init__(self, decay: float, start: int) -> None:
        self.decay, self.start = decay, start
        self.net: nn.Module | None = None
        self._pending: dict | None = None  # weights from a checkpoint, loaded once the student exists

    def reset(self, student: nn.Module) -> nn.Module:
        net = copy.deepcopy(student)
        for p in net.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.net = net.eval()
        return self.net

    def net_for(self, student: nn.Module) -> nn.Module:
        if self.net is None:
            self.reset(student)
            if self._pending is not None:
                self.net.load_state_dict(self._pending)
                self._pending = None
        return self.net

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict()} if self.net is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        self.net, self._pending = None, sd.get("net")


def _bcp_setup(cfg: RunConfig, data: Any, device: torch.device) -> Teacher:
    t = cfg.train
    return Teacher(t.bcp_ema, int(t.bcp_pretrain * t.iters))


def _bcp_after_step(st: Teacher, nets: list, it: int) -> None:
    if it + 1 == st.start:  # the labeled-only stage ends: the teacher starts from the student
        st.reset(nets[0])
    elif it + 1 > st.start:
        ema_update(st.net_for(nets[0]), nets[0], st.decay)


def _bcp(ctx: StepContext) -> torch.Tensor:
    """Iterations before `Teacher.start`: labeled slices in pairs, each one's box pasted into the other
    (both ways), supervised by ground truth (weight 1). Then both directions: an unlabeled slice around a labeled box
    and a labeled slice around an unlabeled box, supervised by ground truth where the labeled slice is
    (weight 1) and by the teacher's hard labels where the unlabeled one is (`bcp_alpha`)."""
    t, b_l, st = ctx.cfg.train, ctx.b_l, ctx.state["bcp"]
    student = ctx.nets[0]
    C = student.num_classes
    img = ctx.batch["image"].to(ctx.device, non_blocking=True)
    y = ctx.y
    box = bcp_box(img.shape[-1], t.bcp_box, ctx.gen).to(ctx.device)
    if ctx.it < st.start:
        h = b_l // 2
        a, b = slice(0, h), slice(h, 2 * h)
        x, tgt, w = (torch.cat(p) for p in zip(copy_paste(img[a], img[b], y[a], y[b], box, 1.0, 1.0),
                                                copy_paste(img[b], img[a], y[b], y[a], box, 1.0, 1.0)))
        return mix_loss(_student_logits(ctx, x), tgt, box, w, C)
    h = min(b_l, t.batch_unlabeled) // 2
    xl, yl, xu = img[:b_l], y[:b_l], img[b_l:b_l + 2 * h]
    with torch.no_grad():
        pl = L.hard_labels(forward_nets([st.net_for(student)], xu, False, ctx.amp)[0]["logits"])
    x_in, y_in, w_in = copy_paste(xu[:h], xl[:h], pl[:h], yl[:h], box, t.bcp_alpha, 1.0)  # labeled box inward
    x_out, y_out, w_out = copy_paste(xl[h:2 * h], xu[h:], yl[h:2 * h], pl[h:], box, 1.0, t.bcp_alpha)  # outward
    lg = _student_logits(ctx, torch.cat([x_in, x_out]))
    return mix_loss(lg[:h], y_in, box, w_in, C) + mix_loss(lg[h:], y_out, box, w_out, C)


def _bcp_check(t: TrainConfig) -> None:
    _in_unit(t, ("bcp_pretrain", "bcp_box", "bcp_ema"), top_open=("bcp_pretrain", "bcp_box"),
             bottom_open=("bcp_box",))


def _bcp_requires(t: TrainConfig) -> None:
    if t.batch_labeled < 2 or t.batch_unlabeled < 2:
        raise CctrError(f"bcp pairs slices: train.batch_labeled and train.batch_unlabeled must be >= 2, got "
                        f"{t.batch_labeled} and {t.batch_unlabeled}")


# ----------------------------------------------------------------------------- UniMatch


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,1,H,W] (kernel radius ceil(3σ), reflected borders)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def strong_augment(x: torch.Tensor, gen: torch.Generator, jitter_p: float, blur_p: float) -> torch.Tensor:
    """UniMatch's strong view of [B,1,S,S] images in [0,1], each image with its own draws: with probability
    `jitter_p` brightness then contrast, factors uniform in [0.5, 1.5] (torchvision's ColorJitter(0.5,
    0.5, 0.5, 0.25) on a grayscale slice: saturation and hue change nothing), clipped to [0,1]; then with
    probability `blur_p` a Gaussian blur, σ uniform in [0.1, 2.0] pixels."""
    B = x.shape[0]
    r = _rand(gen, B, 5).to(x.device)
    shape = (B, 1, 1, 1)
    xb = (x * (0.5 + r[:, 1]).view(shape)).clamp(0, 1)
    mean = xb.mean((1, 2, 3), keepdim=True)
    xc = (mean + (0.5 + r[:, 2]).view(shape) * (xb - mean)).clamp(0, 1)
    x = torch.where((r[:, 0] < jitter_p).view(shape), xc, x)
    draws = r[:, 3:].tolist()
    return torch.cat([gaussian_blur(x[i:i + 1], 0.1 + 1.9 * s) if u < blur_p else x[i:i + 1]
                      for i, (u, s) in enumerate(draws)])


def cutmix_boxes(n: int, size: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """UniMatch's `obtain_cutmix_box` per image, bool [n,size,size]: with probability `p` a box of area
    uniform in [0.02, 0.4] of the slice and aspect ratio uniform in [0.3, 1/0.3], its position uniform
    among those that fit (UniMatch redraws until one fits); else no box."""
    boxes = torch.zeros(n, size, size, dtype=torch.bool)
    for i, (u, a, q, py, px) in enumerate(_rand(gen, n, 5).tolist()):
        if u >= p:
            continue
        area, ratio = (0.02 + 0.38 * a) * size * size, 0.3 + (1 / 0.3 - 0.3) * q
        w, h = min(int(math.sqrt(area / ratio)), size), min(int(math.sqrt(area * ratio)), size)
        y0, x0 = min(int(py * (size - h + 1)), size - h), min(int(px * (size - w + 1)), size - w)
        boxes[i, y0:y0 + h, x0:x0 + w] = True
    return boxes


def cutmix(x: torch.Tensor, pl: torch.Tensor, conf: torch.Tensor, boxes: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's box filled from the previous image of the batch (cyclically): its strong view, its
    pseudo-label and confidence, as UniMatch fills the box from a second unlabeled image."""
    m = boxes.to(x.device)
    return (torch.where(m.unsqueeze(1), x.roll(1, 0), x), torch.where(m, pl.roll(1, 0), pl),
            torch.where(m, conf.roll(1, 0), conf))


def confident_dice(logits: torch.Tensor, pl: torch.Tensor, conf: torch.Tensor, threshold: float,
                   num_classes: int) -> torch.Tensor:
    """UniMatch's unlabeled loss on medical images: Dice against the weak view's hard labels, pixels
    whose confidence is below `threshold` ignored (they contribute nothing, value or gradient)."""
    return L.dice_loss(logits, pl, num_classes, conf < threshold)


def _unimatch_parts(ctx: StepContext) -> dict[str, torch.Tensor]:
    """The three unlabeled losses, computed once per step for the three terms."""
    if "unimatch" in ctx.shared:
        return ctx.shared["unimatch"]
    t, b_l, net = ctx.cfg.train, ctx.b_l, ctx.nets[0]
    C = net.num_classes
    xu = ctx.batch["image"].to(ctx.device, non_blocking=True)[b_l:]
    with torch.no_grad():  # the weak view: the loader's augmentation, forwarded with the labeled slices
        conf, pl = torch.softmax(ctx.logits[0][b_l:].detach(), 1).max(1)
    views = []
    for _ in range(2):
        s = strong_augment(xu, ctx.gen, t.uni_jitter_p, t.uni_blur_p)
        views.append(cutmix(s, pl, conf, cutmix_boxes(xu.shape[0], xu.shape[-1], t.uni_cutmix_p, ctx.gen)))
    with torch.autocast(xu.device.type, dtype=ctx.amp or torch.float32, enabled=ctx.amp is not None):
        fp = net.forward_fp(xu, t.uni_feat_drop, ctx.gen)
    strong = forward_nets([net], torch.cat([v[0] for v in views]), False, ctx.amp)[0]["logits"]
    n = xu.shape[0]
    ctx.shared["unimatch"] = {
        "uni_fp": confident_dice(fp.float(), pl, conf, t.uni_conf, C),
        **{f"uni_s{k + 1}": confident_dice(strong[k * n:(k + 1) * n], v[1], v[2], t.uni_conf, C)
           for k, v in enumerate(views)}}
    return ctx.shared["unimatch"]


def _unimatch_check(t: TrainConfig) -> None:
    _in_unit(t, ("uni_feat_drop", "uni_jitter_p", "uni_blur_p", "uni_cutmix_p"), top_open=("uni_feat_drop",))


# ----------------------------------------------------------------------------- registration

register_term(Term(
    "bcp", _bcp, None, frozenset({"unlabeled"}), nonneg=("bcp_alpha",), setup=_bcp_setup, after_step=_bcp_after_step,
    check=_bcp_check, requires=_bcp_requires,
    doc="bidirectional copy-paste: ½(CE + Dice) of net A on mixed labeled/unlabeled slices, ground truth and "
        "mean-teacher pseudo-labels (weight bcp_alpha); a labeled-only copy-paste stage first"))
register_term(Term(
    "uni_fp", lambda ctx: _unimatch_parts(ctx)["uni_fp"], lambda t: (t.uni_w_fp, "constant"),
    frozenset({"unlabeled"}), nonneg=("uni_w_fp", "uni_conf"), check=_unimatch_check,
    doc="UniMatch: Dice of the feature-perturbed weak view against the confident weak pseudo-labels"))
for _k in (1, 2):
    register_term(Term(
        f"uni_s{_k}", lambda ctx, _k=_k: _unimatch_parts(ctx)[f"uni_s{_k}"], lambda t: (t.uni_w_s, "constant"),
        frozenset({"unlabeled"}), nonneg=("uni_w_s",),
        doc=f"UniMatch: Dice of strong view {_k} (jitter, blur, CutMix) against the confident weak pseudo-labels"))

register_method(Method("bcp", ("bcp",), nets=("a",),
                       doc="peer: bidirectional copy-paste with a mean teacher (Bai et al., CVPR 2023), net A alone"))
register_method(Method("unimatch", ("sup", "uni_fp", "uni_s1", "uni_s2"), nets=("a",),
                       doc="peer: UniMatch weak-to-strong consistency (Yang et al., CVPR 2023), net A alone"))
