"""CCT-R losses checked against values computed by hand (plain Python math, not the vectorised code)."""

from __future__ import annotations

import math

import pytest
import torch

from cctr.losses import (
    DICE_EPS,
    MemoryBank,
    ce_loss,
    contrast_masks,
    cross_teaching,
    dice_ce,
    dice_loss,
    hard_labels,
    masked_supcon,
    masked_supcon_terms,
    nearest_index,
    ramp_weight,
    reps_partners,
    rsl_loss,
    sample_anchors,
    scheduled_weight,
)


def supcon_loss(anchors, classes, tau, bank_feats=None, bank_classes=None):
    """The class-based contrast as the trainer builds it (`contrast_masks` without REPS, then
    `masked_supcon`): keys are the anchors, then the bank; one case, pseudo labels."""
    keys = anchors if bank_feats is None else torch.cat([anchors, bank_feats])
    k_cls = classes if bank_classes is None else torch.cat([classes, bank_classes])
    zero = torch.zeros_like(k_cls)
    m = contrast_masks(classes, torch.zeros_like(classes, dtype=torch.bool), torch.zeros_like(classes), k_cls,
                       zero.bool(), zero)
    return masked_supcon(anchors, keys, m["pos"], m["denom"], tau)


LN3 = math.log(3.0)


def _logits_2x2() -> torch.Tensor:
    # pixel probabilities (p0, p1): (.75,.25) (.5,.5) / (.25,.75) (.75,.25)
    l0 = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    l1 = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    return torch.stack([l0, l1])[None]


def test_dice_ce_by_hand() -> None:
    logits = _logits_2x2()
    target = torch.tensor([[[0, 1], [1, 0]]])
    p1 = [0.25, 0.5, 0.75, 0.25]  # row-major
    y1 = [0, 1, 1, 0]
    p = [[1 - q for q in p1], p1]
    y = [[1 - t for t in y1], y1]
    ce = sum(-math.log(p[t][i]) for i, t in enumerate(y1)) / 4
    dices = []
    for c in range(2):
        inter = sum(p[c][i] * y[c][i] for i in range(4))
        den = sum(v * v for v in p[c]) + sum(v * v for v in y[c])
        dices.append(1 - (2 * inter + DICE_EPS) / (den + DICE_EPS))
    dice = sum(dices) / 2
    assert ce_loss(logits, target).item() == pytest.approx(ce, rel=1e-5)
    assert dice_loss(logits, target, 2).item() == pytest.approx(dice, rel=1e-5)
    assert dice_ce(logits, target, 2).item() == pytest.approx(0.5 * (ce + dice), rel=1e-5)
    probs = torch.softmax(logits, 1)
    assert dice_loss(probs, target, 2, from_logits=False).item() == pytest.approx(dice, rel=1e-5)


def test_dice_zero_for_perfect_prediction() -> None:
    target = torch.randint(0, 4, (2, 8, 8))
    logits = 50.0 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert dice_loss(logits, target, 4).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-logits, target, 4).item() > 0.9


def test_ignore_mask_excludes_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    ignore = torch.rand(2, 6, 6, generator=g) < 0.4
    base = dice_ce(logits, target, 3, ignore)
    t2, l2 = target.clone(), logits.clone()
    t2[ignore] = 255  # out-of-range values are fine where ignored
    l2[:, 0][ignore] += 10.0
    assert dice_ce(l2, t2, 3, ignore).item() == pytest.approx(base.item(), rel=1e-6)
    t3 = target.clone()
    t3[~ignore] = (t3[~ignore] + 1) % 3
    assert abs(dice_ce(logits, t3, 3, ignore).item() - base.item()) > 1e-3


def test_cross_teaching_gradients_and_agreement() -> None:
    g = torch.Generator().manual_seed(1)
    la = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    lb = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    cross_teaching(la, lb, 3).backward()
    assert la.grad is not None and la.grad.abs().sum() > 0
    assert lb.grad is not None and lb.grad.abs().sum() > 0
    # net A's gradient comes only from Dice(p_A, argmax p_B): the pseudo-label branch is detached
    la2 = la.detach().clone().requires_grad_(True)
    dice_loss(la2, lb.detach().argmax(1), 3).backward()
    assert torch.allclose(la.grad, la2.grad, atol=1e-7)
    agreed = torch.randint(0, 3, (2, 4, 4), generator=g)
    same = 40.0 * torch.nn.functional.one_hot(agreed, 3).permute(0, 3, 1, 2).float()
    assert cross_teaching(same, same.clone(), 3).item() == pytest.approx(0.0, abs=1e-6)


def test_rsl_ignores_low_confidence() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 5, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (1, 5, 5), generator=g)
    c = torch.rand(1, 5, 5, generator=g)
    low = c < 0.5
    base = rsl_loss(logits, y, c, 0.5, 3)
    y2 = y.clone()
    y2[low] = (y2[low] + 1) % 3
    assert rsl_loss(logits, y2, c, 0.5, 3).item() == pytest.approx(base.item(), rel=1e-6)
    y3 = y.clone()
    y3[~low] = (y3[~low] + 1) % 3
    assert abs(rsl_loss(logits, y3, c, 0.5, 3).item() - base.item()) > 1e-3
    zero = rsl_loss(logits, y, torch.zeros_like(c), 0.5, 3)
    assert zero.item() == 0.0
    zero.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_weighted_dice_ce_by_hand_and_as_a_gate() -> None:
    """Weights (1, .5, 0, .25) on the hand case of `test_dice_ce_by_hand`: CE is the weighted mean, Dice sums
    w·p·y over w·p² + w·y²; a 0/1 weight equals `dice_ce` with the zero-weight pixels ignored."""
    logits = _logits_2x2().requires_grad_(True)
    target = torch.tensor([[[0, 1], [1, 0]]])
    wt = [1.0, 0.5, 0.0, 0.25]
    p1, y1 = [0.25, 0.5, 0.75, 0.25], [0, 1, 1, 0]
    p, y = [[1 - q for q in p1], p1], [[1 - t for t in y1], y1]
    ce = sum(w * -math.log(p[t][i]) for i, (t, w) in enumerate(zip(y1, wt))) / sum(wt)
    dices = []
    for c in range(2):
        inter = sum(wt[i] * p[c][i] * y[c][i] for i in range(4))
        den = sum(wt[i] * (p[c][i] ** 2 + y[c][i] ** 2) for i in range(4))
        dices.append(1 - (2 * inter + DICE_EPS) / (den + DICE_EPS))
    got = dice_ce(logits, target, 2, weight=torch.tensor(wt).view(1, 2, 2))
    assert got.item() == pytest.approx(0.5 * (ce + sum(dices) / 2), rel=1e-5)
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(2, 3, 6, 6, generator=g)
    yy = torch.randint(0, 3, (2, 6, 6), generator=g)
    keep = torch.rand(2, 6, 6, generator=g) > 0.4
    assert dice_ce(lg, yy, 3, weight=keep.float()).item() == pytest.approx(dice_ce(lg, yy, 3, ~keep).item(), rel=1e-6)
    zero = dice_ce(logits, target, 2, weight=torch.zeros(1, 2, 2))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.all(logits.grad == 0)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _supcon_by_hand(anchors, classes, tau, keys=(), key_classes=(), extra=None):
    """Direct transcription of Khosla's L_out with plain loops."""
    allk = list(anchors) + list(keys)
    allc = list(classes) + list(key_classes)
    losses = []
    for i, (a, ca) in enumerate(zip(anchors, classes)):
        sims = {j: (a[0] * k[0] + a[1] * k[1]) / tau for j, k in enumerate(allk) if j != i and allc[j] >= 0}
        den = sum(math.exp(s) for s in sims.values())
        pos = [j for j in sims if allc[j] == ca or (extra and j >= len(anchors) and extra[i][j - len(anchors)])]
        if pos:
            losses.append(-sum(math.log(math.exp(sims[j]) / den) for j in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_by_hand_with_skipped_anchor() -> None:
    angles, classes = [0.0, 30.0, 90.0, 180.0, 250.0], [0, 0, 1, 1, 2]  # class 2 has no positive
    anchors = [_unit(d) for d in angles]
    expected = _supcon_by_hand(anchors, classes, 0.5)
    got = supcon_loss(torch.tensor(anchors), torch.tensor(classes), 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert supcon_loss(torch.tensor(anchors[:4]), torch.tensor(classes[:4]), 0.5).item() != pytest.approx(expected)


def test_supcon_with_bank_and_reps_extra_positives() -> None:
    anchors = [_unit(0.0), _unit(40.0), _unit(100.0)]
    classes = [0, 0, 1]
    bank = [_unit(20.0), _unit(120.0), _unit(200.0), _unit(300.0)]
    bank_cls = [0, 1, 1, -1]  # last slot empty: ignored everywhere
    extra = [[False, True, False, True], [True, False, False, False], [False, False, True, False]]
    a, c = torch.tensor(anchors), torch.tensor(classes)
    bf, bc = torch.tensor(bank), torch.tensor(bank_cls)
    plain = supcon_loss(a, c, 0.2, bank_feats=bf, bank_classes=bc)
    assert plain.item() == pytest.approx(_supcon_by_hand(anchors, classes, 0.2, bank, bank_cls), rel=1e-5)
    # extra positives through the mask form: positives = same class OR flagged (empty slot never)
    keys = torch.cat([a, bf])
    key_cls = torch.cat([c, bc])
    denom = (key_cls >= 0).expand(3, 7).clone()
    denom[range(3), range(3)] = False
    pos = (c[:, None] == key_cls[None]) & denom
    pos[:, 3:] |= torch.tensor(extra)
    reps = masked_supcon(a, keys, pos, denom, 0.2)
    assert reps.item() == pytest.approx(_supcon_by_hand(anchors, classes, 0.2, bank, bank_cls, extra), rel=1e-5)
    # an invalid slot (masked to class -1, as the trainer does) drops out exactly like an empty one
    valid = torch.tensor([True, True, True, False])
    masked = supcon_loss(a, c, 0.2, bf, torch.tensor([0, 1, 1, 0]).masked_fill(~valid, -1))
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6)
    # a key left out of the denominator is neither positive nor negative: the loss changes
    denom2 = denom.clone()
    denom2[0, 4] = False  # anchor 0 no longer sees bank slot 1 (another class)
    assert masked_supcon(a, keys, pos, denom2, 0.2).item() < reps.item()


def test_supcon_terms_share_one_softmax_and_equal_separate_calls() -> None:
    """The class and REPS terms of a step from one similarity matrix: the values and gradients of two
    separate `masked_supcon` calls, including an anchor that has positives in one mask only and a
    mask with no positive at all (0)."""
    g = torch.Generator().manual_seed(3)
    a0 = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    keys_extra = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    denom = torch.rand(5, 8, generator=g) > 0.2
    cls_pos = (torch.rand(5, 8, generator=g) > 0.5) & denom
    cls_pos[4] = False  # anchor 4: REPS positives only
    reps_pos = torch.zeros(5, 8, dtype=torch.bool)
    reps_pos[4, 6], reps_pos[1, 7] = True, True
    denom[4, 6], denom[1, 7] = True, True
    none = torch.zeros(5, 8, dtype=torch.bool)

    def run(joint: bool):
        a = a0.clone().requires_grad_(True)
        keys = torch.cat([a, keys_extra])
        if joint:
            parts = masked_supcon_terms(a, keys, [cls_pos, reps_pos, none], denom, 0.3)
        else:
            parts = [masked_supcon(a, keys, m, denom, 0.3) for m in (cls_pos, reps_pos, none)]
        (parts[0] + 2.0 * parts[1] + parts[2]).backward()
        return [float(x) for x in parts], a.grad

    (v_joint, g_joint), (v_sep, g_sep) = run(True), run(False)
    assert v_joint == pytest.approx(v_sep, rel=1e-6) and v_joint[2] == 0.0 and v_joint[1] > 0
    assert torch.allclose(g_joint, g_sep, atol=1e-6)


def test_reps_positive_pulls_anchor_towards_bank_entry() -> None:
    target = torch.tensor([_unit(150.0)])

    def cos_after_step(reps: bool) -> float:
        a = torch.tensor([_unit(0.0), _unit(-20.0)], requires_grad=True)
        keys = torch.cat([a, target])
        denom = torch.tensor([[False, True, True], [True, False, True]])
        pos = torch.tensor([[False, True, reps], [True, False, False]])
        masked_supcon(a, keys, pos, denom, 0.5).backward()
        with torch.no_grad():
            moved = torch.nn.functional.normalize(a - 0.1 * a.grad, dim=1)
        return float(moved[0] @ target[0])

    before = math.cos(math.radians(150.0))
    assert cos_after_step(False) < before - 1e-3  # a negative: pushed away
    assert cos_after_step(True) > before + 1e-2  # REPS positive: pulled closer


def test_reps_partners_nearest_per_other_case_within_anisotropic_caps() -> None:
    # keys: (case, z, y, x)
    keys = torch.tensor([[0.0, 0, 0], [4.0, 1, 0], [1.0, 3, 0], [0.0, 0, 2], [9.0, 0, 0], [0.0, 7, 0],
                         [float("nan"), 0, 0]])
    key_case = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    anchors = torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]])
    got = reps_partners(anchors, torch.tensor([0, 1]), keys, key_case, cap_xy_mm=5.0, cap_z_mm=6.0)
    # anchor 0 (case 0): own case never; case 1 -> nearest in cap units is key 2 ((1/6)^2+(3/5)^2 < (4/6)^2+(1/5)^2);
    # case 2 -> key 3; case 3 -> key 4 is 9 mm through-plane (> 6), key 5 is 7 mm in-plane (> 5): none;
    # case 4 has only a NaN coordinate: none
    assert got[0].tolist() == [False, False, True, True, False, False, False]
    assert not got[1].any()  # a NaN anchor matches nothing
    assert reps_partners(anchors[:0], torch.tensor([], dtype=torch.long), keys, key_case, 5.0, 6.0).shape == (0, 7)


def test_contrast_masks_reps_replaces_pseudo_label_positives_only() -> None:
    # anchors (= first keys): 0 labeled case 0 class 1 (GT); 1 unlabeled case 1 class 1; 2 unlabeled case 1 class 2
    a_cls, a_gt, a_case = torch.tensor([1, 1, 2]), torch.tensor([True, False, False]), torch.tensor([0, 1, 1])
    # bank: 3 GT case 5 class 1; 4 pseudo case 2 class 1; 5 pseudo case 2 class 2; 6 pseudo case 1 class 1; 7 empty
    k_cls = torch.cat([a_cls, torch.tensor([1, 1, 2, 1, -1])])
    k_gt = torch.cat([a_gt, torch.tensor([True, False, False, False, False])])
    k_case = torch.cat([a_case, torch.tensor([5, 2, 2, 1, 7])])
    partners = torch.zeros(3, 8, dtype=torch.bool)
    partners[1, 5] = True  # registration pairs anchor 1 with a key of another pseudo-class
    partners[0, 4] = True
    plain = contrast_masks(a_cls, a_gt, a_case, k_cls, k_gt, k_case)
    m = contrast_masks(a_cls, a_gt, a_case, k_cls, k_gt, k_case, partners)
    T, F_ = True, False
    assert plain["pos"].tolist() == [[F_, T, F_, T, T, F_, T, F_], [T, F_, F_, T, T, F_, T, F_],
                                     [F_, F_, F_, F_, F_, T, F_, F_]]
    # anchor 0 (GT): GT key 3 keeps its class relation; pseudo keys of other volumes (1, 4, 6) are left out,
    # except its partner 4. Anchor 1: same-volume key 6 stays a positive, partner 5 is a REPS positive,
    # other-volume same-class keys 0, 3, 4 are left out; other-class key 2 (same volume) stays a negative.
    assert m["pos"].tolist() == [[F_, F_, F_, T, F_, F_, F_, F_], [F_, F_, F_, F_, F_, F_, T, F_],
                                 [F_, F_, F_, F_, F_, F_, F_, F_]]
    assert m["reps"].nonzero().tolist() == [[0, 4], [1, 5]]
    assert m["denom"].tolist() == [[F_, F_, T, T, T, T, F_, F_], [F_, F_, T, F_, F_, T, T, F_],
                                   [T, T, F_, T, T, F_, T, F_]]
    # `paired_only`: replaced only in a volume where registration pairs the anchor (case 2 here). Anchor 0:
    # case 1 has no partner, so its pseudo keys 1 and 6 stay positives. Anchor 1: case 2's same-class key 4
    # is left out, keys 0 (case 0) and 3 (case 5) stay positives. Anchor 2 has no partner: unchanged.
    p = contrast_masks(a_cls, a_gt, a_case, k_cls, k_gt, k_case, partners, paired_only=True)
    assert p["pos"].tolist() == [[F_, T, F_, T, F_, F_, T, F_], [T, F_, F_, T, F_, F_, T, F_],
                                 [F_, F_, F_, F_, F_, T, F_, F_]]
    assert p["reps"].tolist() == m["reps"].tolist()
    assert p["denom"].tolist() == [[F_, T, T, T, T, T, T, F_], [T, F_, T, T, F_, T, T, F_],
                                   [T, T, F_, T, T, T, T, F_]]
    assert m["pseudo_pairs"].tolist() == plain["pseudo_pairs"].tolist()
    # monitor only (`cct+rsl`): the same REPS pairs, the class contrast as without partners
    mon = contrast_masks(a_cls, a_gt, a_case, k_cls, k_gt, k_case, partners, replace=False)
    assert mon["reps"].tolist() == m["reps"].tolist()
    assert all(mon[k].tolist() == plain[k].tolist() for k in ("pos", "denom", "pseudo_pairs"))


def test_supcon_empty_and_no_positive() -> None:
    e = torch.zeros(0, 4, requires_grad=True)
    assert supcon_loss(e, torch.zeros(0, dtype=torch.long), 0.1).item() == 0.0
    a = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    out = supcon_loss(a, torch.tensor([0, 1, 2]), 0.1)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(a.grad == 0)


def test_hard_labels_equal_argmax_ties_included() -> None:
    """The fast per-pixel class (`max(1).indices`) is `argmax(1)`: the first class on ties, detached."""
    g = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 3, (2, 4, 5, 6), generator=g).float().requires_grad_()  # many exact ties
    assert torch.equal(hard_labels(tied), tied.detach().argmax(1)) and not hard_labels(tied).requires_grad
    rand = torch.randn(3, 5, 8, 8, generator=g).bfloat16()
    assert torch.equal(hard_labels(rand), rand.argmax(1))


def test_sample_anchors_class_balanced() -> None:
    labels = torch.full((2, 6, 6), 0)
    labels[0, :2, :2] = 1  # 4 pixels of class 1
    labels[1, 5, 5] = 3  # 1 pixel of class 3; class 2 absent
    labels[1, 0, :] = -1  # unlabeled row: never sampled
    embed = torch.nn.functional.normalize(torch.randn(2, 5, 6, 6), dim=1).requires_grad_(True)
    feats, cls, (b, y, x) = sample_anchors(embed, labels, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(cls, minlength=4).tolist() == [3, 3, 0, 1]
    assert torch.equal(labels[b, y, x], cls)
    assert torch.allclose(feats, embed.permute(0, 2, 3, 1)[b, y, x])
    assert len(set(zip(b.tolist(), y.tolist(), x.tolist()))) == len(cls)  # without replacement
    feats.sum().backward()
    assert embed.grad.abs().sum() > 0
    f2, c2, pos2 = sample_anchors(embed, labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(cls, c2) and all(torch.equal(p, q) for p, q in zip((b, y, x), pos2))
    f3, c3, pos3 = sample_anchors(embed, labels, 3, torch.Generator().manual_seed(5))
    assert not all(torch.equal(p, q) for p, q in zip((b, y, x), pos3))
    # uniform within class: every class-0 pixel is eventually picked
    seen = set()
    for s in range(60):
        _, c, (bb, yy, xx) = sample_anchors(embed, labels, 3, torch.Generator().manual_seed(s))
        seen |= {p for p, k in zip(zip(bb.tolist(), yy.tolist(), xx.tolist()), c.tolist()) if k == 0}
    assert len(seen) > 40
    f0, c0, _ = sample_anchors(embed, torch.full_like(labels, -1), 3)
    assert f0.shape == (0, 5) and c0.numel() == 0


def test_nearest_index_samples_centres() -> None:
    x = torch.arange(16).reshape(1, 4, 4)
    iy, ix = nearest_index((4, 4), (2, 2))
    assert x[..., iy[:, None], ix[None, :]].tolist() == [[[5, 7], [13, 15]]]
    iy, ix = nearest_index((4, 4), (4, 4))
    assert iy.tolist() == ix.tolist() == [0, 1, 2, 3]


def test_memory_bank_fifo_and_bounded() -> None:
    bank = MemoryBank(4, 3)
    size = bank.nbytes
    assert len(bank) == 0 and not bank.valid.any() and torch.all(bank.cls == -1)

    def push(ids: list[int]) -> None:
        t = torch.tensor(ids)
        f = t[:, None].float().expand(-1, 3).clone().requires_grad_(True)
        bank.push(f, t, t % 2, t[:, None].float().expand(-1, 3))

    push([0, 1, 2])
    push([3, 4, 5])  # overwrites the two oldest (0, 1)
    assert bank.case_id.tolist() == [4, 5, 2, 3]
    push([6, 7])  # oldest now 2, 3
    assert bank.case_id.tolist() == [4, 5, 6, 7]
    push(list(range(8, 14)))  # larger than K: only the last 4 survive, in FIFO order
    assert sorted(bank.case_id.tolist()) == [10, 11, 12, 13]
    push([14])  # replaces the oldest survivor, 10
    assert sorted(bank.case_id.tolist()) == [11, 12, 13, 14]
    assert torch.equal(bank.feats[:, 0].long(), bank.case_id)
    assert torch.equal(bank.coord[:, 0].long(), bank.case_id)
    assert torch.equal(bank.cls, bank.case_id % 2)
    assert not bank.feats.requires_grad and len(bank) == 4
    assert bank.nbytes == size and bank.feats.shape == (4, 3)


def test_memory_bank_checkpoint_round_trip(tmp_path) -> None:
    bank = MemoryBank(4, 2)
    bank.push(torch.ones(6, 2), torch.arange(6), torch.arange(6) % 3, torch.zeros(6, 3))
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = MemoryBank(4, 2)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert restored.ptr == bank.ptr == 2
    for name in ("feats", "case_id", "cls", "coord", "gt", "mon", "valid"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    assert restored.to("cpu") is restored and list(restored.parameters()) == []


def test_ramp_weight() -> None:
    assert ramp_weight(2.0, 0, 0) == 2.0
    assert ramp_weight(2.0, 0, 100) == pytest.approx(2.0 * math.exp(-5.0))
    assert ramp_weight(2.0, 50, 100) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert ramp_weight(2.0, 500, 100) == 2.0


def test_scheduled_weight() -> None:
    # "decay" is the complement of the ramp-up: the two always sum to the full weight
    for t in (0, 25, 50, 99, 100, 400):
        assert scheduled_weight(2.0, "decay", t, 100) + scheduled_weight(2.0, "ramp", t, 100) == pytest.approx(2.0)
        assert scheduled_weight(2.0, "constant", t, 100) == 2.0
    assert scheduled_weight(2.0, "decay", 0, 100) == pytest.approx(2.0 * (1 - math.exp(-5.0)))
    assert scheduled_weight(2.0, "decay", 50, 100) == pytest.approx(2.0 * (1 - math.exp(-1.25)))
    assert scheduled_weight(2.0, "decay", 100, 100) == 0.0
    # "crossover": the full weight until the nets have reached registration's quality, then nothing
    assert scheduled_weight(2.0, "crossover", 700, 100) == 2.0
    assert scheduled_weight(2.0, "crossover", 0, 100, crossed_at=0) == 0.0
    assert scheduled_weight(2.0, "constant", 700, 100, crossed_at=40) == 2.0
    # "fade": the full weight until the crossover, then a straight line to 0 at the last iteration
    assert scheduled_weight(2.0, "fade", 300, 100, end=400) == 2.0
    assert [scheduled_weight(2.0, "fade", t, 100, 200, 400) for t in (200, 250, 300, 399, 400)] == \
        pytest.approx([2.0, 1.5, 1.0, 0.01, 0.0])
    assert scheduled_weight(2.0, "fade", 400, 100, 400, 400) == 0.0  # crossed at the very end: no division


def _weighted_contrast_by_hand(a, keys, pos, reps, denom, tau, w_con, w_reps):
    """One supervised contrast with per-positive weights, written out pixel by pixel (float64):
    -sum_i sum_k W_ik log(exp(s_ik/tau) / sum_{j in A(i)} exp(s_ij/tau)), where a class positive weighs
    w_con / (|P(i)| N_P) and a partner w_reps / (|R(i)| N_R) (N_*: anchors that have such positives)."""
    n_p = sum(1 for i in range(a.shape[0]) if pos[i].any())
    n_r = sum(1 for i in range(a.shape[0]) if reps[i].any())
    total = a.new_zeros((), dtype=torch.float64)
    for i in range(a.shape[0]):
        s = [(a[i].double() @ keys[j].double()) / tau for j in range(keys.shape[0])]
        log_z = torch.logsumexp(torch.stack([s[j] for j in range(keys.shape[0]) if denom[i, j]]), 0)
        for j in range(keys.shape[0]):
            w = 0.0
            if pos[i, j]:
                w += w_con / (int(pos[i].sum()) * n_p)
            if reps[i, j]:
                w += w_reps / (int(reps[i].sum()) * n_r)
            if w:
                total = total - w * (s[j] - log_z)
    return total


def test_class_and_reps_parts_are_one_weighted_contrast() -> None:
    """w_con·L_con + w_reps·L_reps (the two parts over one denominator) equals a single supervised
    contrast whose positives carry weights (class 1/|P|, partners 1/|R|, times the term weights), in
    value and in the gradients of anchors and keys."""
    g = torch.Generator().manual_seed(5)
    a0 = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    denom = torch.ones(4, 8, dtype=torch.bool)
    denom[torch.arange(4), torch.arange(4)] = False  # never itself
    denom[0, 5] = False  # a key left out of anchor 0's contrast (a replaced pseudo-label positive)
    pos = torch.zeros(4, 8, dtype=torch.bool)
    pos[0, [1, 4]] = pos[1, [0, 6]] = pos[2, 3] = True  # anchor 3: no class positive
    reps = torch.zeros(4, 8, dtype=torch.bool)
    reps[0, 7] = reps[3, [4, 6]] = True
    w_con, w_reps, tau = 0.1, 0.05, 0.2
    grads = []
    for mine in (True, False):
        a, k = a0.clone().requires_grad_(True), bank.clone().requires_grad_(True)
        keys = torch.cat([a, k])
        if mine:
            con, rp = masked_supcon_terms(a, keys, [pos, reps], denom, tau)
            loss = w_con * con + w_reps * rp
        else:
            loss = _weighted_contrast_by_hand(a, keys, pos, reps, denom, tau, w_con, w_reps)
        loss.backward()
        grads.append((float(loss), a.grad.clone(), k.grad.clone()))
    (v1, ga1, gk1), (v2, ga2, gk2) = grads
    assert v1 == pytest.approx(v2, rel=1e-5)
    assert torch.allclose(ga1, ga2.float(), atol=1e-6) and torch.allclose(gk1, gk2.float(), atol=1e-6)


def test_a_partner_is_pulled_like_a_class_positive_of_equal_weight() -> None:
    """One anchor, a class positive and a registration partner at the same similarity and the same weight
    (w_con/|P| = w_reps/|R|), and a negative: the partner's gradient equals the class positive's and is
    opposite in sign to the negative's (a partner is a positive of the one loss, not a negative of the
    class part)."""
    anchor = torch.tensor([[1.0, 0.0]])
    same = torch.nn.functional.normalize(torch.tensor([0.6, 0.8]), dim=0)
    keys = torch.stack([same, same.clone(), torch.tensor([0.0, -1.0])]).requires_grad_(True)
    denom = torch.ones(1, 3, dtype=torch.bool)
    pos, reps = torch.tensor([[True, False, False]]), torch.tensor([[False, True, False]])
    con, rp = masked_supcon_terms(anchor, keys, [pos, reps], denom, 0.1)
    (0.3 * con + 0.3 * rp).backward()
    g_pos, g_partner, g_neg = keys.grad
    assert torch.allclose(g_pos, g_partner, atol=1e-7)
    assert float(g_partner @ anchor[0]) < 0 < float(g_neg @ anchor[0])  # descent pulls the partner, pushes the negative
