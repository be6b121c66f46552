"""CCT-R losses checked against values computed by hand (plain Python math, not the vectorised code)."""

from __future__ import annotations

import math

import pytest
import torch

from cctr.losses import (
    DICE_EPS,
    MemoryBank,
    ce_loss,
    cross_teaching,
    dice_ce,
    dice_loss,
    ramp_weight,
    reps_positive_mask,
    resize_nearest,
    rsl_loss,
    sample_anchors,
    supcon_loss,
)

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
    reps = supcon_loss(a, c, 0.2, torch.tensor(extra), bf, bc)
    assert reps.item() == pytest.approx(_supcon_by_hand(anchors, classes, 0.2, bank, bank_cls, extra), rel=1e-5)
    # anchor 1's REPS entry (bank 0) is already a same-class positive: counted once, so
    # flagging only same-class entries leaves the loss unchanged
    # `bank_valid` False drops a slot exactly like class -1 does
    bc_valid = torch.tensor([0, 1, 1, 0])
    masked = supcon_loss(a, c, 0.2, torch.tensor(extra), bf, bc_valid, torch.tensor([True, True, True, False]))
    assert masked.item() == pytest.approx(reps.item(), rel=1e-6)
    same_only = torch.tensor([[True, False, False, False], [True, False, False, False], [False, True, True, False]])
    assert supcon_loss(a, c, 0.2, same_only, bf, bc).item() == pytest.approx(plain.item(), rel=1e-6)


def test_reps_positive_pulls_anchor_towards_bank_entry() -> None:
    target = torch.tensor([_unit(150.0)])
    bank_cls = torch.tensor([1])

    def cos_after_step(extra: torch.Tensor | None) -> float:
        a = torch.tensor([_unit(0.0), _unit(-20.0)], requires_grad=True)
        supcon_loss(a, torch.tensor([0, 0]), 0.5, extra, target, bank_cls).backward()
        with torch.no_grad():
            moved = torch.nn.functional.normalize(a - 0.1 * a.grad, dim=1)
        return float(moved[0] @ target[0])

    before = math.cos(math.radians(150.0))
    assert cos_after_step(None) < before - 1e-3  # a different-class bank entry is a negative: pushed away
    assert cos_after_step(torch.tensor([[True], [False]])) > before + 1e-2  # REPS positive: pulled closer


def test_supcon_empty_and_no_positive() -> None:
    e = torch.zeros(0, 4, requires_grad=True)
    assert supcon_loss(e, torch.zeros(0, dtype=torch.long), 0.1).item() == 0.0
    a = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    out = supcon_loss(a, torch.tensor([0, 1, 2]), 0.1)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(a.grad == 0)


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


def test_resize_nearest_samples_centres() -> None:
    x = torch.arange(16).reshape(1, 4, 4)
    assert resize_nearest(x, (2, 2)).tolist() == [[[5, 7], [13, 15]]]
    c = torch.arange(32.0).reshape(1, 2, 4, 4)
    assert resize_nearest(c, (2, 2)).shape == (1, 2, 2, 2)
    assert resize_nearest(x, (4, 4)).equal(x)


def _bank() -> MemoryBank:
    bank = MemoryBank(5, 2)
    coords = torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [0.0, 4, 0], [10.0, 0, 0]])
    bank.push(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]), torch.tensor([1, 1, 2, 0]), coords)
    return bank  # slot 4 still empty


def test_reps_radius_excludes_same_case_and_empty_slots() -> None:
    bank = _bank()
    anchor_xyz = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [9.0, 0, 0]])
    anchor_case = torch.tensor([0, 2, 0])
    m = reps_positive_mask(anchor_xyz, anchor_case, bank, radius_mm=5.0)
    assert m.tolist() == [
        [False, True, True, False, False],  # slot 0 is its own case; slot 3 too far
        [True, True, False, False, False],  # slot 2 is its own case
        [False, False, False, True, False],
    ]
    assert not reps_positive_mask(anchor_xyz, anchor_case, bank, radius_mm=0.5)[0].any()
    nan = reps_positive_mask(torch.full((1, 3), float("nan")), torch.tensor([5]), bank, 5.0)
    assert not nan.any()


def test_reps_k_nearest() -> None:
    bank = _bank()
    m = reps_positive_mask(torch.tensor([[0.0, 0, 0]]), torch.tensor([0]), bank, radius_mm=0.0, k=2)
    assert m.tolist() == [[False, True, True, False, False]]  # nearest other-case: 3 mm, 4 mm
    m = reps_positive_mask(torch.tensor([[0.0, 0, 0]]), torch.tensor([0]), bank, radius_mm=0.0, k=10)
    assert m.tolist() == [[False, True, True, True, False]]  # all other-case valid entries, no more


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
    for name in ("feats", "case_id", "cls", "coord", "valid"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    assert restored.to("cpu") is restored and list(restored.parameters()) == []


def test_ramp_weight() -> None:
    assert ramp_weight(2.0, 0, 0) == 2.0
    assert ramp_weight(2.0, 0, 100) == pytest.approx(2.0 * math.exp(-5.0))
    assert ramp_weight(2.0, 50, 100) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert ramp_weight(2.0, 500, 100) == 2.0
