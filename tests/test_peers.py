"""The peers' rows (BCP, UniMatch): copy-paste arrays and weights by hand in both directions, the EMA
teacher's update and its lack of gradient, UniMatch's strong views, confidence mask and feature
perturbation, and both methods through `cctr train` and a tiny `cctr table1` grid."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from cctr import peers
from cctr.models import SegNet
from cctr.terms import METHODS, TERMS, StepContext
from tests.helpers import TINY, cli, tiny_cfg, write_yaml

# ----------------------------------------------------------------------------- BCP

S = 4
BOX = torch.tensor([[0, 0, 0, 0],
                    [0, 1, 1, 0],
                    [0, 1, 1, 0],
                    [0, 0, 0, 0]], dtype=torch.bool)


def _img(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, S, S)


L_IMG = _img(np.arange(1, 17))  # labeled slice: 1..16
U_IMG = _img(-np.arange(1, 17))  # unlabeled slice: -1..-16
Y_L = torch.tensor([[[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [0, 0, 0, 0]]])
P_U = torch.tensor([[[0, 0, 3, 3], [0, 0, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]]])  # teacher's labels


def test_copy_paste_mixes_images_targets_and_weights_in_both_directions():
    # the labeled box pasted into the unlabeled slice (inward), weights: labeled 1, unlabeled alpha 0.5
    x, y, w = peers.copy_paste(U_IMG, L_IMG, P_U, Y_L, BOX, 0.5, 1.0)
    np.testing.assert_array_equal(x[0, 0].numpy(), [[-1, -2, -3, -4],
                                                    [-5, 6, 7, -8],
                                                    [-9, 10, 11, -12],
                                                    [-13, -14, -15, -16]])
    np.testing.assert_array_equal(y[0].numpy(), [[0, 0, 3, 3],
                                                 [0, 2, 2, 3],
                                                 [0, 2, 2, 0],
                                                 [0, 0, 0, 0]])
    np.testing.assert_array_equal(w[0].numpy(), [[.5, .5, .5, .5],
                                                 [.5, 1, 1, .5],
                                                 [.5, 1, 1, .5],
                                                 [.5, .5, .5, .5]])
    # the unlabeled box pasted into the labeled slice (outward)
    x, y, w = peers.copy_paste(L_IMG, U_IMG, Y_L, P_U, BOX, 1.0, 0.5)
    np.testing.assert_array_equal(x[0, 0].numpy(), [[1, 2, 3, 4],
                                                    [5, -6, -7, 8],
                                                    [9, -10, -11, 12],
                                                    [13, 14, 15, 16]])
    np.testing.assert_array_equal(y[0].numpy(), [[1, 1, 1, 1],
                                                 [1, 0, 3, 1],
                                                 [1, 0, 0, 1],
                                                 [0, 0, 0, 0]])
    np.testing.assert_array_equal(w[0].numpy(), [[1, 1, 1, 1],
                                                 [1, .5, .5, 1],
                                                 [1, .5, .5, 1],
                                                 [1, 1, 1, 1]])


def test_bcp_box_is_two_thirds_of_the_side_and_seeded():
    g = torch.Generator().manual_seed(3)
    box = peers.bcp_box(96, 2 / 3, g)
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert box.sum() == 64 * 64 and len(rows) == len(cols) == 64
    assert rows[0] < 96 - 64 and cols[0] < 96 - 64
    assert torch.equal(box, peers.bcp_box(96, 2 / 3, torch.Generator().manual_seed(3)))


def test_mix_loss_weighs_each_region_by_its_weight():
    """½(CE + Dice) of the box and of the rest, each over its own pixels, times the region's weight."""
    from cctr import losses as L

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, S, S, generator=g)
    _, y, w = peers.copy_paste(U_IMG, L_IMG, P_U, Y_L, BOX, 0.5, 1.0)
    want = 0.5 * L.dice_ce(logits, y, 4, BOX.expand(1, S, S)) + 1.0 * L.dice_ce(logits, y, 4, ~BOX.expand(1, S, S))
    torch.testing.assert_close(peers.mix_loss(logits, y, BOX, w, 4), want, rtol=0, atol=1e-7)


class Tiny(nn.Module):
    """A net with the SegNet call signature: conv + BatchNorm, three classes."""

    num_classes = 3

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, dtype=dtype)
        self.bn = nn.BatchNorm2d(3, dtype=dtype)

    def forward(self, x, with_embed=None, split=0):
        return {"logits": self.bn(self.conv(x))}


class Sign(nn.Module):
    """A teacher whose hard labels are 1 where the image is above `at`, else 0."""

    num_classes = 2

    def __init__(self, at: float):
        super().__init__()
        self.at = at

    def forward(self, x, with_embed=None, split=0):
        return {"logits": torch.cat([torch.zeros_like(x), x - self.at], 1)}


def _bcp_ctx(it: int, teacher_net: nn.Module | None, student: nn.Module, start: int = 2):
    cfg = tiny_cfg(method="bcp", batch_labeled=2, batch_unlabeled=2)
    batch = {"image": torch.cat([L_IMG, L_IMG + 100, U_IMG, U_IMG - 100]),
             "label": torch.cat([Y_L, Y_L.flip(-1), torch.zeros_like(Y_L), torch.zeros_like(Y_L)])}
    st = peers.Teacher(0.99, start)
    st.net = teacher_net
    return StepContext(cfg, METHODS["bcp"], [student], batch, torch.device("cpu"), torch.Generator(), None,
                       {"bcp": st}, it=it)


def test_bcp_term_builds_both_directions_from_the_batch(monkeypatch):
    """Labeled slice 0's box goes into unlabeled slice 0, unlabeled slice 1's box into labeled slice 1;
    targets: ground truth and the teacher's labels; weights 1 and alpha. Before `start`: labeled pairs."""
    seen: dict = {}

    def student_logits(ctx, x):
        seen["x"] = x
        return torch.zeros(x.shape[0], 4, S, S, requires_grad=True)

    def mix_loss(lg, y, box, w, C):
        seen.setdefault("yw", []).append((y, w))
        return lg.sum()

    monkeypatch.setattr(peers, "bcp_box", lambda size, frac, gen: BOX)
    monkeypatch.setattr(peers, "_student_logits", student_logits)
    monkeypatch.setattr(peers, "mix_loss", mix_loss)
    ctx = _bcp_ctx(it=2, teacher_net=Sign(at=-6.5), student=Tiny())  # teacher labels: 1 on -1..-6
    TERMS["bcp"].compute(ctx)
    m = BOX.numpy()
    x_in = np.where(m, L_IMG[0, 0], U_IMG[0, 0])
    x_out = np.where(m, U_IMG[0, 0] - 100, L_IMG[0, 0] + 100)
    np.testing.assert_array_equal(seen["x"][:, 0].numpy(), np.stack([x_in, x_out]))
    p0 = (U_IMG[0, 0] > -6.5).long().numpy()  # teacher's labels of the unlabeled slices
    p1 = (U_IMG[0, 0] - 100 > -6.5).long().numpy()
    (y_in, w_in), (y_out, w_out) = seen["yw"]
    np.testing.assert_array_equal(y_in[0].numpy(), np.where(m, Y_L[0], p0))
    np.testing.assert_array_equal(y_out[0].numpy(), np.where(m, p1, Y_L[0].flip(-1)))
    np.testing.assert_array_equal(w_in[0].numpy(), np.where(m, 1.0, 0.5))
    np.testing.assert_array_equal(w_out[0].numpy(), np.where(m, 0.5, 1.0))

    seen.clear()  # the labeled-only stage: each labeled slice's box into the other, ground truth, weight 1
    TERMS["bcp"].compute(_bcp_ctx(it=1, teacher_net=None, student=Tiny()))
    a, b = L_IMG[0, 0], L_IMG[0, 0] + 100
    np.testing.assert_array_equal(seen["x"][:, 0].numpy(), np.stack([np.where(m, b, a), np.where(m, a, b)]))
    (y, w), = seen["yw"]
    np.testing.assert_array_equal(y.numpy(), np.stack([np.where(m, Y_L[0].flip(-1), Y_L[0]),
                                                       np.where(m, Y_L[0], Y_L[0].flip(-1))]))
    assert torch.equal(w, torch.ones(2, S, S))


def test_ema_teacher_update_is_exact_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student = Tiny(torch.float64)
    st = peers.Teacher(0.9, start=2)
    ctx = _bcp_ctx(it=0, teacher_net=None, student=student)
    ctx.batch["image"] = ctx.batch["image"].double()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def step(it):
        ctx.it, ctx.state["bcp"] = it, st
        ctx.shared.clear()
        opt.zero_grad()
        TERMS["bcp"].compute(ctx).backward()
        opt.step()
        peers._bcp_after_step(st, [student], it)

    step(0)
    assert st.net is None  # the labeled-only stage: no teacher yet
    step(1)  # the stage ends: the teacher is a copy of the student
    assert all(torch.equal(a, b) for a, b in zip(st.net.state_dict().values(), student.state_dict().values()))
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    step(2)  # self-training: the teacher labels the unlabeled slices, then moves by EMA
    for k, s in student.state_dict().items():
        t = st.net.state_dict()[k]
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.9 * before[k] + 0.1 * s, rtol=0, atol=1e-15)
        else:
            assert torch.equal(t, s)
    assert not torch.equal(st.net.conv.weight, before["conv.weight"])
    assert all(p.grad is None and not p.requires_grad for p in st.net.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not st.net.training  # the teacher predicts in eval mode
    # a checkpoint round trip: the teacher's weights come back once the student exists
    sd = st.state_dict()
    st2 = peers.Teacher(0.9, start=2)
    st2.load_state_dict(sd)
    back = st2.net_for(student)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), st.net.state_dict().values()))


# ----------------------------------------------------------------------------- UniMatch


def test_strong_views_are_deterministic_for_a_fixed_generator():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))

    def view(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        s = peers.strong_augment(x, g, kw.get("jitter", 0.8), kw.get("blur", 0.5))
        return s, peers.cutmix_boxes(4, 32, kw.get("cut", 0.5), g)

    a, b, c = view(7), view(7), view(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1 and not torch.equal(a[0], x)
    off = view(7, jitter=0.0, blur=0.0, cut=0.0)
    assert torch.equal(off[0], x) and not off[1].any()
    on = view(7, jitter=1.0, blur=1.0, cut=1.0)
    assert all(bool(m.any()) for m in on[1])
    frac = on[1].float().mean((1, 2))
    assert ((frac > 0.01) & (frac <= 0.41)).all()  # box areas within UniMatch's [0.02, 0.4] of the slice


def test_cutmix_fills_the_box_from_the_previous_slice():
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4)
    pl = torch.arange(3).view(3, 1, 1).expand(3, 4, 4)
    conf = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 4, 4)
    boxes = torch.zeros(3, 4, 4, dtype=torch.bool)
    boxes[0, :2, :2] = True
    xm, plm, cm = peers.cutmix(x, pl, conf, boxes)
    assert xm[0, 0, 0, 0] == 2 and xm[0, 0, 3, 3] == 0 and plm[0, 1, 1] == 2 and cm[0, 0, 0] == pytest.approx(0.3)
    assert torch.equal(xm[1:], x[1:]) and torch.equal(plm[1:], pl[1:])


def test_pixels_below_the_confidence_threshold_contribute_nothing():
    from cctr import losses as L

    weak = torch.tensor([[[4.0, 0.0], [0.0, 0.1]], [[0.0, 4.0], [0.2, 0.0]]]).unsqueeze(0)  # [1,2,2,2]
    conf, pl = torch.softmax(weak, 1).max(1)
    keep = conf >= 0.95  # the two pixels with a 4-logit margin
    assert keep.tolist() == [[[True, True], [False, False]]]
    strong = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = peers.confident_dice(strong, pl, conf, 0.95, 2)
    loss.backward()
    assert (strong.grad[:, :, ~keep[0]] == 0).all() and (strong.grad[:, :, keep[0]] != 0).any()
    # the same as the Dice of the confident pixels alone
    want = L.dice_loss(strong.detach()[:, :, 0:1, :], pl[:, 0:1, :], 2)
    torch.testing.assert_close(loss.detach(), want)
    other = strong.detach().clone()
    other[:, :, 1, :] = torch.tensor([[9.0, -9.0], [-9.0, 9.0]]).t()  # change only the unconfident pixels
    assert float(peers.confident_dice(other, pl, conf, 0.95, 2)) == pytest.approx(float(loss.detach()))
    assert float(peers.confident_dice(strong, pl, conf, 0.999, 2)) == 0.0  # nothing confident: nothing to learn


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return SegNet("Unet", "resnet18", 3, 8)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_feature_perturbation_really_perturbs(unet, mode):
    unet.train(mode == "train")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = unet(x)["logits"]
        same = unet.forward_fp(x, 0.0, torch.Generator().manual_seed(1))
        fp = unet.forward_fp(x, 0.5, torch.Generator().manual_seed(1))
        fp_again = unet.forward_fp(x, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert not torch.allclose(fp, plain, atol=1e-3)
    torch.testing.assert_close(fp, fp_again, rtol=0, atol=0)


def test_peer_keys_are_checked():
    from cctr.errors import CctrError
    from cctr.train import validate_config

    for key, bad in (("uni_feat_drop", 1.0), ("bcp_pretrain", 1.0), ("bcp_box", 0.0), ("uni_blur_p", 1.5),
                     ("uni_w_s", -0.1), ("bcp_alpha", -1.0)):
        with pytest.raises(CctrError, match=f"train.{key}"):
            validate_config(tiny_cfg(method="sup", **{key: bad}))  # bad everywhere, used or not
    with pytest.raises(CctrError, match="bcp pairs slices"):
        validate_config(tiny_cfg(method="bcp", batch_labeled=1))
    validate_config(tiny_cfg(method="sup", batch_labeled=1))  # only bcp needs pairs


# ----------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("method", ["bcp", "unimatch"])
def test_peer_trains_through_cctr_train_with_net_a_alone(method, tmp_path):
    from cctr import tracking

    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    p = cli("train", "--config", str(cfg), "--method", method, "--set", "train.iters=8", "--set",
            "train.val_every=4", "--set", "train.keep_last=true", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    run = tracking.client().get_run(res["run_id"])
    m = METHODS[method]
    assert {k for k in run.data.metrics if k.startswith("loss_")} == {f"loss_{t}" for t in m.terms}
    assert "pl_dice_a" in run.data.metrics and "pl_dice_b" not in run.data.metrics
    d = run.data.tags["checkpoint_dir"]
    best = torch.load(f"{d}/best.pt", weights_only=True)
    last = torch.load(f"{d}/last.pt", weights_only=True)
    assert best["predict"] == "a" and set(best) >= {"state_a", "state_b"}
    # net B is neither trained nor used: the same weights in every checkpoint as at the start
    assert all(torch.equal(best["state_b"][k], last["state_b"][k]) for k in best["state_b"])
    if method == "bcp":
        assert set(last["terms"]["bcp"]["net"]) == set(last["state_a"])  # the teacher is in last.pt
    ev = cli("evaluate", f"{d}/best.pt", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["dice"] == pytest.approx(run.data.metrics["test_dice"], abs=1e-9)


def test_peers_are_rows_of_a_tiny_table1_grid(tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    spec = write_yaml(tmp_path / "table1_peers.yaml", {
        "config": str(cfg), "methods": ["sup", "bcp", "unimatch"], "labeled": [1], "seeds": [0],
        "set": ["train.iters=4", "train.val_every=2"]})
    p = cli("table1", "--spec", str(spec), "--out", str(tmp_path / "results"), "--json", "--jobs", "1",
            "--no-figures", timeout=600)
    assert p.returncode == 0, p.stderr
    files = json.loads(p.stdout)["files"]
    rows = [r for r in csv.DictReader(open(files["csv"])) if r.get("checkpoint", "best") == "best"]
    assert [(r["method"], r["n_seeds"]) for r in rows] == [("sup", "1"), ("bcp", "1"), ("unimatch", "1")]
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)


def test_resume_is_exact_across_the_bcp_stage_switch(tmp_path):
    from cctr.train import train

    cfg = tiny_cfg(method="bcp", iters=8, val_every=4, keep_last=True, ckpt_every=3)  # teacher from iteration 2
    full = train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "part", progress=False, stop_after=3)
    resumed = train(cfg, tmp_path / "part", resume=tmp_path / "part" / "last.pt", progress=False)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in a["state_a"]:
        torch.testing.assert_close(a["state_a"][k], b["state_a"][k], rtol=1e-5, atol=1e-6)
    for k in a["terms"]["bcp"]["net"]:
        torch.testing.assert_close(a["terms"]["bcp"]["net"][k], b["terms"]["bcp"]["net"][k], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["test_dice"] == pytest.approx(full.metrics["test_dice"], abs=1e-6)
