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
from collections.abc import Sequence

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


def _pixel_weight(ignore_mask: torch.Tensor | None, weight: torch.Tensor | None) -> torch.Tensor | None:
    """Each pixel's float weight [B,H,W] (`weight`, 1 without it; 0 in `ignore_mask`), or None when every
    pixel counts fully. An ignore mask is the 0/1 case, so one weighted formula serves masks and confidences."""
    if weight is None and ignore_mask is None:
        return None
    w = torch.ones(ignore_mask.shape, device=ignore_mask.device) if weight is None else weight.float()
    return w if ignore_mask is None else w.masked_fill(ignore_mask, 0.0)


def dice_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_mask: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    from_logits: bool = True,
) -> torch.Tensor:
    """Soft multiclass Dice loss (SSL4MIS form), mean over classes; `from_logits=False` takes probabilities.
    With per-pixel weights w (`weight`, 0 in `ignore_mask`): 1 − (2·Σ w·p·y + ε) / (Σ w·p² + Σ w·y² + ε)."""
    probs = torch.softmax(pred.float(), dim=1) if from_logits else pred.float()
    w = _pixel_weight(ignore_mask, weight)
    y = _one_hot(target, num_classes, None if w is None else w > 0)
    if w is not None:  # p·√w and y·√w: their products and squares carry w once; a 0/1 mask is its own root
        r = w.sqrt().unsqueeze(1)
        probs, y = probs * r, y * r
    dims = (0, 2, 3)
    inter = (probs * y).sum(dims)
    denom = (probs * probs).sum(dims) + (y * y).sum(dims)
    return (1.0 - (2.0 * inter + DICE_EPS) / (denom + DICE_EPS)).mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_mask: torch.Tensor | None = None, *,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy, the mean over pixels weighted by `weight` (1 without it; 0 in `ignore_mask`);
    0 if no pixel has weight."""
    t = target.long()
    w = _pixel_weight(ignore_mask, weight)
    if w is None:
        return F.cross_entropy(logits.float(), t)
    t = torch.where(w > 0, t, torch.zeros_like(t))
    s = w.sum()
    if s == 0:
        return _zero(logits)
    return (F.cross_entropy(logits.float(), t, reduction="none") * w).sum() / s


def dice_ce(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_mask: torch.Tensor | None = None, *,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """½(CE + Dice): the supervised loss of SSL4MIS, used for L_sup and L_rsl; `weight` counts each pixel by
    it (a calibrated confidence: by its chance of being right, RSL's `train.rsl_confidence: weight`)."""
    return 0.5 * (ce_loss(logits, target, ignore_mask, weight=weight)
                  + dice_loss(logits, target, num_classes, ignore_mask, weight=weight))


def hard_labels(logits: torch.Tensor) -> torch.Tensor:
    """Detached argmax over classes (dim 1), the first class on ties. `max(1).indices` gives the same
    labels as `argmax(1)` at a hundredth of its cost on CPU (3 ms vs 25 us for a [4,4,64,64] batch:
    argmax walks the strided class axis), and a training step takes two."""
    return logits.detach().max(1).indices


def cross_teaching(logits_a: torch.Tensor, logits_b: torch.Tensor, num_classes: int,
                   pseudo: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Dice(p_A, argmax p_B) + Dice(p_B, argmax p_A); pseudo-labels are hard and detached (`pseudo`:
    the two argmaxes when the caller has them already)."""
    pseudo_a, pseudo_b = pseudo if pseudo is not None else (hard_labels(logits_a), hard_labels(logits_b))
    return dice_loss(logits_a, pseudo_b, num_classes) + dice_loss(logits_b, pseudo_a, num_classes)


def rsl_loss(
    logits: torch.Tensor, y_reg: torch.Tensor, c_reg: torch.Tensor, threshold: float, num_classes: int,
    ignore_mask: torch.Tensor | None = None, soft: bool = False,
) -> torch.Tensor:
    """Registration supervision: ½(CE + Dice) against `y_reg`, pixels with `c_reg < threshold` (or in
    `ignore_mask`) ignored; `soft`: no threshold, every pixel outside `ignore_mask` weighted by `c_reg`.

    With every pixel ignored both terms are exactly 0 (CE has no pixel to average, each class's Dice
    is ε/ε), so the result is 0 with the graph intact.
    """
    if soft:
        return dice_ce(logits, y_reg, num_classes, ignore_mask, weight=c_reg)
    ignore = c_reg < threshold
    return dice_ce(logits, y_reg, num_classes, ignore if ignore_mask is None else ignore | ignore_mask)


def nearest_index(hw_in: tuple[int, int], hw: tuple[int, int] | torch.Size, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the input pixel whose area holds each output pixel's centre.

    One function for labels, coordinates, confidence and `valid`, so an anchor's attributes are all
    read at the very pixel its label came from.
    """
    (h_in, w_in), h, w = hw_in, int(hw[0]), int(hw[1])
    iy = ((torch.arange(h, device=device) + 0.5) * (h_in / h)).long().clamp_max(h_in - 1)
    ix = ((torch.arange(w, device=device) + 0.5) * (w_in / w)).long().clamp_max(w_in - 1)
    return iy, ix


def sample_anchors(
    embed: torch.Tensor, labels: torch.Tensor, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Class-balanced anchors: up to `per_class` pixels, uniformly without replacement, per present class.

    `labels` [B,h,w] must be at the embedding's resolution; negative labels mean "no label" and are
    never sampled. Returns (feats [N,D] with grad, classes [N], (batch idx, y, x)), grouped by class.
    Each pixel gets a random key; per present class the `per_class` smallest keys win (a top-k per
    class: sorting every pixel twice cost most of the contrastive term at full U-Net resolution).
    """
    b, d, h, w = embed.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels {list(labels.shape)} do not match embed {[b, h, w]}; use nearest_index")
    flat = labels.reshape(-1).long()
    counts = torch.bincount(flat[flat >= 0])
    if per_class <= 0 or int(counts.sum()) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=embed.device)
        return embed.new_zeros(0, d) + _zero(embed), empty, (empty, empty, empty)
    dev = generator.device if generator is not None else flat.device
    keys = torch.rand(flat.numel(), generator=generator, device=dev).to(flat.device)
    never = torch.tensor(2.0, device=flat.device)  # above every key: never among a class's smallest
    chosen = torch.cat([torch.topk(torch.where(flat == c, keys, never), min(per_class, int(n)), largest=False).indices
                        for c, n in enumerate(counts.tolist()) if n])
    bi, pix = chosen // (h * w), chosen % (h * w)
    yi, xi = pix // w, pix % w
    # one advanced index over the flattened pixels: its backward scatters into [B,F,h*w] in place (the
    # [B,h,w,F] permuted gather's backward sorted the indices: 3x slower)
    feats = embed.flatten(2)[bi, :, pix]
    return feats, flat[chosen], (bi, yi, xi)


def key_mask(n: int, key_cls: torch.Tensor) -> torch.Tensor:
    """[N,M] keys an anchor may be contrasted with: filled slots (class >= 0), never itself (key i = anchor i)."""
    m = key_cls.shape[0]
    denom = (key_cls >= 0).unsqueeze(0).expand(n, m).clone()
    idx = torch.arange(n, device=key_cls.device)
    denom[idx, idx] = False
    return denom


def masked_supcon(anchors: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, denom: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """loss_i = -mean_{p∈P(i)} log(exp(s_ip/τ) / Σ_{a∈A(i)} exp(s_ia/τ)), mean over anchors with a positive.

    `pos` [N,M] (P(i)) and `denom` [N,M] (A(i), which must contain P(i)) say, per anchor, which keys are
    positives and which keys take part at all; a key outside `denom` is neither positive nor negative.
    Anchors with no positive are skipped; 0 (graph kept) when none has one.
    """
    return masked_supcon_terms(anchors, keys, [pos], denom, tau)[0]


def masked_supcon_terms(anchors: torch.Tensor, keys: torch.Tensor, positives: Sequence[torch.Tensor],
                        denom: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """`masked_supcon` for each of several positive masks over one key set and one denominator (the
    class and REPS terms of a step), computing the similarities and the log-softmax once."""
    pos = [p & denom for p in positives]
    counts = [p.sum(1) for p in pos]  # positives per anchor (a sum is cheaper than `any` over [N,M] bools)
    rows = torch.stack(counts).gt(0).any(0)
    if anchors.shape[0] == 0 or not bool(rows.any()):
        return [_zero(anchors) for _ in pos]
    # Only anchors with a positive: their denominators are non-empty, so no -inf/NaN reaches autograd.
    # (Rows are selected only when some are left out: copying [N,M] masks is a visible share of a step.)
    a, dn = anchors.float(), denom
    if not bool(rows.all()):
        a, dn, pos, counts = a[rows], dn[rows], [p[rows] for p in pos], [c[rows] for c in counts]
    logits = (a @ keys.float().t()) / tau
    logits = logits.masked_fill(~dn, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    out = []
    for p, n in zip(pos, counts):
        h = n > 0
        if not bool(h.any()):
            out.append(_zero(anchors))
            continue
        lp = log_prob
        if not bool(h.all()):
            p, lp, n = p[h], lp[h], n[h]
        pos_sum = torch.where(p, lp, 0.0).sum(1)
        out.append(-(pos_sum / n).mean())
    return out


class MemoryBank(nn.Module):
    """FIFO ring buffer of detached embeddings with case id, class, anatomical coordinate (mm) and
    whether the class is ground truth (`gt`) — plus, for monitoring only, the held-back true class
    (`mon`, -1 when unknown), which no loss reads.

    Storage is preallocated once and never grows. Empty slots have `valid` False and `cls` -1, so
    they take part in nothing. An `nn.Module` of buffers only (no parameters), so `.to(device)`,
    `state_dict()` and `load_state_dict()` carry it into checkpoints.
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
        self.register_buffer("gt", torch.zeros(size, dtype=torch.bool, device=device))
        self.register_buffer("mon", torch.full((size,), -1, dtype=torch.long, device=device))
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
    def push(self, feats: torch.Tensor, case_ids: torch.Tensor, classes: torch.Tensor, coords: torch.Tensor,
             gt: torch.Tensor | None = None, mon: torch.Tensor | None = None) -> None:
        """Append M entries, overwriting the oldest; with M > K only the last K are kept."""
        m = feats.shape[0]
        if not (case_ids.shape[0] == classes.shape[0] == coords.shape[0] == m):
            raise ValueError("push: feats, case_ids, classes and coords must have the same length")
        if m == 0:
            return
        dev = self.feats.device
        gt = torch.zeros(m, dtype=torch.bool, device=dev) if gt is None else gt
        mon = torch.full((m,), -1, dtype=torch.long, device=dev) if mon is None else mon
        ptr = self.ptr
        skip = max(0, m - self.size)
        slots = (ptr + skip + torch.arange(m - skip, device=dev)) % self.size
        self.feats[slots] = feats[skip:].detach().to(self.feats)
        self.case_id[slots] = case_ids[skip:].to(self.case_id)
        self.cls[slots] = classes[skip:].to(self.cls)
        self.coord[slots] = coords[skip:].detach().to(self.coord)
        self.gt[slots] = gt[skip:].to(self.gt)
        self.mon[slots] = mon[skip:].to(self.mon)
        self.valid[slots] = True
        self._ptr.fill_((ptr + m) % self.size)


def reps_partners(anchor_coords: torch.Tensor, anchor_case: torch.Tensor, key_coords: torch.Tensor,
                  key_case: torch.Tensor, cap_xy_mm: float, cap_z_mm: float) -> torch.Tensor:
    """REPS partners [N,M]: for each anchor and each *other* case among the keys, the one key nearest
    in anatomical coordinates, if it lies within the caps (through-plane |dz| <= cap_z, in-plane
    distance <= cap_xy; registration is coarser through-plane). Coordinates are (z,y,x) mm; NaN
    (outside the slice, or registration not confident there) matches nothing. Distance is measured
    in units of the caps, so the anisotropy of the registration grid is respected.
    """
    n, m = anchor_coords.shape[0], key_coords.shape[0]
    if n == 0 or m == 0:
        return torch.zeros(n, m, dtype=torch.bool, device=anchor_coords.device)
    dev = anchor_coords.device
    scale = torch.tensor([cap_z_mm, cap_xy_mm, cap_xy_mm], device=dev)
    # [3,N], [3,M], contiguous: the broadcasts below read rows (strided columns cost 5x per pass)
    a, k = (anchor_coords.float() / scale).t().contiguous(), (key_coords.float().to(dev) / scale).t().contiguous()
    dz2 = (a[0, :, None] - k[0, None, :]).square()
    dxy2 = (a[1, :, None] - k[1, None, :]).square() + (a[2, :, None] - k[2, None, :]).square()
    # NaN compares False: a NaN coordinate is never within the caps
    key_case = key_case.to(device=dev, dtype=torch.int32)  # case ids are small: narrow compares are cheaper
    ok = (dz2 <= 1) & (dxy2 <= 1) & (anchor_case.to(torch.int32)[:, None] != key_case[None, :])
    d = (dz2 + dxy2).masked_fill(~ok, float("inf"))
    # nearest key per (anchor, case): a min per case via scatter (case ids >= -1, the empty slots' -1
    # included), then the keys equal to their case's min
    idx = (key_case.long() + 1).unsqueeze(0).expand(n, m)
    best = torch.full((n, int(key_case.max()) + 2), float("inf"), device=dev)
    best = best.scatter_reduce(1, idx, d, reduce="amin")
    return ok & (d == best.gather(1, idx))


def contrast_masks(anchor_cls: torch.Tensor, anchor_gt: torch.Tensor, anchor_case: torch.Tensor,
                   key_cls: torch.Tensor, key_gt: torch.Tensor, key_case: torch.Tensor,
                   partners: torch.Tensor | None = None, replace: bool = True, paired_only: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Positive and participation masks [N,M] of the pixel contrast (keys = the anchors first, then the bank).

    Without `partners` (`cct`): positives are keys of the anchor's class, pseudo or true.
    With REPS partners (`cct+reps`, DESIGN §4): for a pair of different volumes in which a
    pseudo-label is involved, the class relation is replaced by registration: the partner is a
    positive, other keys of the same (pseudo-)class are left out (neither positive nor negative), keys
    of another class stay negatives. Same-volume pairs and ground-truth pairs keep their class relation.
    With `paired_only` the replacement is limited to the volumes where the anchor has a partner.
    With `replace` False (`cct+rsl`'s monitor) "reps" says which pairs REPS would make and the class
    masks stay as without partners.
    """
    denom = key_mask(anchor_cls.shape[0], key_cls)
    same = anchor_cls.long().unsqueeze(1) == key_cls.long().unsqueeze(0)
    cross_pseudo = (anchor_case.unsqueeze(1) != key_case.unsqueeze(0)) & ~(anchor_gt.unsqueeze(1) & key_gt.unsqueeze(0))
    pseudo_pairs = same & cross_pseudo & denom  # what REPS replaces (monitored in both variants)
    if partners is None:
        return {"pos": same & denom, "denom": denom, "pseudo_pairs": pseudo_pairs}
    reps = partners & cross_pseudo & denom
    if not replace:
        return {"pos": same & denom, "reps": reps, "denom": denom, "pseudo_pairs": pseudo_pairs}
    replaced = pseudo_pairs & ~reps
    if paired_only:
        replaced = replaced & paired_volumes(reps, key_case)
    denom = denom & ~replaced
    return {"pos": same & denom & ~reps, "reps": reps, "denom": denom, "pseudo_pairs": pseudo_pairs}


def paired_volumes(reps: torch.Tensor, key_case: torch.Tensor) -> torch.Tensor:
    """[N,M]: whether anchor n has a REPS partner in key m's volume. Where the cap or a gate leaves a
    volume without a partner (no entry of it near the anchor's anatomical point, or no confident one),
    registration says nothing about that volume; `paired_only` keeps its pseudo-label positives there."""
    _, vol = torch.unique(key_case, return_inverse=True)
    per_volume = reps.float() @ F.one_hot(vol).float()  # [N, volumes]: partners per volume
    return per_volume[:, vol] > 0


def ramp_weight(w: float, t: int | float, ramp: int | float) -> float:
    """Sigmoid ramp-up w·exp(−5(1 − min(t/T, 1))²) (Laine & Aila); T <= 0 means no ramp."""
    if ramp <= 0:
        return float(w)
    phase = 1.0 - min(max(float(t), 0.0) / float(ramp), 1.0)
    return float(w) * math.exp(-5.0 * phase * phase)


SCHEDULES = ("constant", "ramp", "decay", "crossover", "fade")


def scheduled_weight(w: float, schedule: str, t: int | float, ramp: int | float, crossed_at: int | None = None,
                     end: int = 0) -> float:
    """A term's weight at iteration t: "constant", "ramp" (sigmoid ramp-up over `ramp`), "decay"
    (w minus the ramp-up: full at the start, gone at `ramp`), "crossover" (w until the iteration
    `crossed_at`, then 0) or "fade" (w until `crossed_at`, then linearly down to 0 at iteration `end`).
    The last three are for registration labels, whose value falls as the nets' pseudo-labels overtake
    them; "crossover" and "fade" follow the measured point where they have, "fade" without the jolt of
    removing a full-weight term in one step."""
    if schedule == "ramp":
        return ramp_weight(w, t, ramp)
    if schedule == "decay":
        return float(w) - ramp_weight(w, t, ramp)
    if schedule in ("crossover", "fade") and crossed_at is not None:
        span = end - crossed_at if schedule == "fade" else 0  # "crossover" is a fade over no iterations
        return float(w) * max(0.0, 1.0 - (float(t) - crossed_at) / span) if span > 0 else 0.0
    return float(w)
