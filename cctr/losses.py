"""Every CCT-R loss (DESIGN.md §4): supervised, cross-teaching, RSL, pixel contrastive with REPS.

All functions are vectorised (no Python loop over pixels or anchors), return scalar tensors, and
return an exact 0 that keeps the autograd graph when there is nothing to average (no valid pixel,
no anchor with a positive), so the training loop never special-cases empty batches.

Conventions: `logits` [B,C,H,W]; integer labels [B,H,W]; `ignore_mask` [B,H,W] bool, True = pixel
excluded. Dice follows SSL4MIS (the field's reference implementation): per class
1 - (2·Σ p·y + ε) / (Σ p² + Σ y² + ε), pooled over the batch, ε = 1e-5, mean over all classes
including background.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DICE_EPS = 1e-5


def _zero(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to `t`'s graph (so `.backward()` works and gives zero gradients)."""
    return t.sum() * 0.0


def _one_hot(target: torch.Tensor, num_classes: int, keep: torch.Tensor | None) -> torch.Tensor:
    """[B,H,W] labels -> [B,C,H,W] float; ignored pixels (any value, e.g. 255) become all-zero."""
    t = target.long()
    if keep is not None:
        t = torch.where(keep, t, torch.zeros_like(t))
    oh = F.one_hot(t, num_classes).permute(0, 3, 1, 2).float()
    if keep is not None:
        oh = oh * keep.unsqueeze(1)
    return oh


def dice_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_mask: torch.Tensor | None = None,
    *,
    from_logits: bool = True,
) -> torch.Tensor:
    """Soft multiclass Dice loss (SSL4MIS form), mean over classes; `from_logits=False` takes probabilities."""
    probs = torch.softmax(pred.float(), dim=1) if from_logits else pred.float()
    keep = None if ignore_mask is None else ~ignore_mask
    y = _one_hot(target, num_classes, keep)
    if keep is not None:
        probs = probs * keep.unsqueeze(1)
    dims = (0, 2, 3)
    inter = (probs * y).sum(dims)
    denom = (probs * probs).sum(dims) + (y * y).sum(dims)
    return (1.0 - (2.0 * inter + DICE_EPS) / (denom + DICE_EPS)).mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy averaged over non-ignored pixels (0 if none)."""
    t = target.long()
    if ignore_mask is None:
        return F.cross_entropy(logits.float(), t)
    keep = ~ignore_mask
    t = torch.where(keep, t, torch.zeros_like(t))
    per_px = F.cross_entropy(logits.float(), t, reduction="none")
    n = keep.sum()
    if n == 0:
        return _zero(logits)
    return (per_px * keep).sum() / n


def dice_ce(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """½(CE + Dice): the supervised loss of SSL4MIS, used for L_sup and L_rsl."""
    return 0.5 * (ce_loss(logits, target, ignore_mask) + dice_loss(logits, target, num_classes, ignore_mask))


def cross_teaching(logits_a: torch.Tensor, logits_b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice(p_A, argmax p_B) + Dice(p_B, argmax p_A); pseudo-labels are hard and detached."""
    pseudo_a = logits_a.detach().argmax(1)
    pseudo_b = logits_b.detach().argmax(1)
    return dice_loss(logits_a, pseudo_b, num_classes) + dice_loss(logits_b, pseudo_a, num_classes)


def rsl_loss(
    logits: torch.Tensor, y_reg: torch.Tensor, c_reg: torch.Tensor, threshold: float, num_classes: int
) -> torch.Tensor:
    """Registration supervision: ½(CE + Dice) against `y_reg`, pixels with `c_reg < threshold` ignored.

    With every pixel ignored both terms are exactly 0 (CE has no pixel to average, each class's Dice
    is ε/ε), so the result is 0 with the graph intact.
    """
    return dice_ce(logits, y_reg, num_classes, c_reg < threshold)


def resize_nearest(x: torch.Tensor, hw: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest resampling of [B,H,W] or [B,C,H,W] (any dtype) to `hw`, reading each output pixel's centre.

    Used to bring labels / registration coordinates to the embedding resolution; unlike
    `F.interpolate(mode="nearest")` it keeps integer dtypes and samples centres, not top-left corners.
    """
    h_in, w_in = x.shape[-2:]
    h, w = int(hw[0]), int(hw[1])
    iy = ((torch.arange(h, device=x.device) + 0.5) * (h_in / h)).long().clamp_max(h_in - 1)
    ix = ((torch.arange(w, device=x.device) + 0.5) * (w_in / w)).long().clamp_max(w_in - 1)
    return x[..., iy[:, None], ix[None, :]]


def sample_anchors(
    embed: torch.Tensor, labels: torch.Tensor, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Class-balanced anchors: up to `per_class` pixels, uniformly without replacement, per present class.

    `labels` [B,h,w] must be at the embedding's resolution; negative labels mean "no label" and are
    never sampled. Returns (feats [N,D] with grad, classes [N], (batch idx, y, x)), grouped by class.
    Vectorised: each pixel gets a random key, pixels are sorted by (class, key) and the first
    `per_class` of each class are kept.
    """
    b, d, h, w = embed.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels {list(labels.shape)} do not match embed {[b, h, w]}; use resize_nearest")
    flat = labels.reshape(-1).long()
    valid = torch.nonzero(flat >= 0).squeeze(1)
    cls = flat[valid]
    if valid.numel() == 0 or per_class <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=embed.device)
        return embed.new_zeros(0, d) + _zero(embed), empty, (empty, empty, empty)
    dev = generator.device if generator is not None else cls.device
    keys = torch.rand(cls.numel(), generator=generator, device=dev).to(cls.device)
    shuffled = torch.argsort(keys)
    order = shuffled[torch.argsort(cls[shuffled], stable=True)]  # class-major, random within class
    cls_sorted = cls[order]
    counts = torch.bincount(cls_sorted)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(cls_sorted.numel(), device=cls.device) - starts[cls_sorted]
    chosen = valid[order[rank < per_class]]
    bi = chosen // (h * w)
    yi = (chosen % (h * w)) // w
    xi = chosen % w
    feats = embed.permute(0, 2, 3, 1)[bi, yi, xi]
    return feats, flat[chosen], (bi, yi, xi)


def supcon_loss(
    anchors: torch.Tensor,
    classes: torch.Tensor,
    tau: float,
    extra_pos_mask: torch.Tensor | None = None,
    bank_feats: torch.Tensor | None = None,
    bank_classes: torch.Tensor | None = None,
    bank_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-level supervised contrastive loss (Khosla et al. 2020, L_out form).

    For anchor i, keys are the other anchors plus the bank entries; positives P(i) are keys of the
    same class, plus (REPS) the bank entries flagged in `extra_pos_mask` [N,K] whatever their class
    — a REPS entry that is also same-class counts once (the sets are OR-ed). Bank slots with
    class < 0 or `bank_valid` False are empty and take no part.
    loss_i = -mean_{p∈P(i)} log(exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ)); anchors with no positive
    are skipped; the result is the mean over the others (0 if none).
    """
    n = anchors.shape[0]
    if n == 0:
        return _zero(anchors)
    if (bank_feats is None) != (bank_classes is None):
        raise ValueError("bank_feats and bank_classes go together")
    if (extra_pos_mask is not None or bank_valid is not None) and bank_feats is None:
        raise ValueError("extra_pos_mask and bank_valid need a bank")
    a = anchors.float()
    keys, key_cls = a, classes.long()
    if bank_feats is not None:
        keys = torch.cat([a, bank_feats.to(a)], 0)
        bank_cls = bank_classes.long().to(key_cls.device)
        if bank_valid is not None:
            bank_cls = bank_cls.masked_fill(~bank_valid.to(bank_cls.device), -1)
        key_cls = torch.cat([key_cls, bank_cls], 0)
    m = keys.shape[0]
    idx = torch.arange(n, device=a.device)
    not_self = torch.ones(n, m, dtype=torch.bool, device=a.device)
    not_self[idx, idx] = False
    in_denom = not_self & (key_cls >= 0).unsqueeze(0)
    pos = (classes.long().unsqueeze(1) == key_cls.unsqueeze(0)) & in_denom
    if extra_pos_mask is not None:
        pos[:, n:] |= extra_pos_mask.to(pos.device) & in_denom[:, n:]
    has = pos.any(1)
    if not bool(has.any()):
        return _zero(anchors)
    # Only anchors with a positive: their denominators are non-empty, so no -inf/NaN reaches autograd.
    pos, in_denom = pos[has], in_denom[has]
    logits = (a[has] @ keys.t()) / tau
    logits = logits.masked_fill(~in_denom, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_sum = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(pos_sum / pos.sum(1)).mean()


class MemoryBank(nn.Module):
    """FIFO ring buffer of detached embeddings with case id, class and anatomical coordinate (mm).

    Storage is preallocated once (K x D floats plus K ids/classes/coords) and never grows. Empty slots
    have `valid` False and `cls` -1, so `supcon_loss(bank_feats=bank.feats, bank_classes=bank.cls)`
    ignores them and REPS masks stay aligned with the K slots. An `nn.Module` of buffers only (no
    parameters), so `.to(device)`, `state_dict()` and `load_state_dict()` carry it into checkpoints.
    """

    def __init__(self, size: int, dim: int, coord_dim: int = 3, device: torch.device | str | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"memory bank needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.size, self.dim = size, dim
        self.register_buffer("feats", torch.zeros(size, dim, device=device))
        self.register_buffer("case_id", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("cls", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("coord", torch.zeros(size, coord_dim, device=device))
        self.register_buffer("valid", torch.zeros(size, dtype=torch.bool, device=device))
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.long, device=device))

    @property
    def ptr(self) -> int:
        """Next slot to write, i.e. the oldest entry once the bank is full."""
        return int(self._ptr)

    def __len__(self) -> int:
        return int(self.valid.sum())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    @torch.no_grad()
    def push(self, feats: torch.Tensor, case_ids: torch.Tensor, classes: torch.Tensor, coords: torch.Tensor) -> None:
        """Append M entries, overwriting the oldest; with M > K only the last K are kept."""
        m = feats.shape[0]
        if not (case_ids.shape[0] == classes.shape[0] == coords.shape[0] == m):
            raise ValueError("push: feats, case_ids, classes and coords must have the same length")
        if m == 0:
            return
        ptr = self.ptr
        skip = max(0, m - self.size)
        slots = (ptr + skip + torch.arange(m - skip, device=self.feats.device)) % self.size
        self.feats[slots] = feats[skip:].detach().to(self.feats)
        self.case_id[slots] = case_ids[skip:].to(self.case_id)
        self.cls[slots] = classes[skip:].to(self.cls)
        self.coord[slots] = coords[skip:].detach().to(self.coord)
        self.valid[slots] = True
        self._ptr.fill_((ptr + m) % self.size)


def reps_positive_mask(
    anchor_coords: torch.Tensor, anchor_case: torch.Tensor, bank: MemoryBank, radius_mm: float, k: int = 0
) -> torch.Tensor:
    """REPS positives [N,K]: valid bank entries of *other* cases at the same anatomical point.

    "Same point" = coordinate within `radius_mm` of the anchor's (k = 0), or among its k nearest
    other-case entries (k > 0). NaN coordinates (no registration) match nothing.
    """
    other_case = bank.case_id.unsqueeze(0) != anchor_case.long().to(bank.case_id.device).unsqueeze(1)
    eligible = bank.valid.unsqueeze(0) & other_case
    dist = torch.cdist(anchor_coords.float().to(bank.coord.device), bank.coord)
    dist = torch.nan_to_num(dist, nan=float("inf")).masked_fill(~eligible, float("inf"))
    if k > 0:
        near = torch.zeros_like(eligible)
        nn_idx = dist.topk(min(k, bank.size), dim=1, largest=False).indices
        near.scatter_(1, nn_idx, True)
        return near & torch.isfinite(dist)
    return dist <= radius_mm


def ramp_weight(w: float, t: int | float, ramp: int | float) -> float:
    """Sigmoid ramp-up w·exp(−5(1 − min(t/T, 1))²) (Laine & Aila); T <= 0 means no ramp."""
    if ramp <= 0:
        return float(w)
    phase = 1.0 - min(max(float(t), 0.0) / float(ramp), 1.0)
    return float(w) * math.exp(-5.0 * phase * phase)
