"""The one training loop: every variant runs, resume is exact, bad input never leaves a RUNNING run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cctr import tracking
from cctr.config import apply_overrides
from cctr.errors import CctrError
from cctr.terms import METHODS, Contrast, contrastive_term
from cctr.train import monitor_metrics, train
from tests.helpers import TINY, cli_inprocess, tiny_cfg, write_yaml


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    return tmp_path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_variant_smoke(method, registration_ready, tmp_path):
    cfg = tiny_cfg(method=method, iters=20, val_every=10)
    res = train(cfg, tmp_path / method, progress=False)
    run = tracking.client().get_run(res.run_id)
    m = METHODS[method]
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == method and run.data.params["train.method"] == method
    assert 0.0 <= res.metrics["test_dice"] <= 1.0 and res.metrics["test_hd95_mm"] > 0
    if method == "reg-only":
        return
    # a finished run keeps the best-val weights only (train.keep_last keeps the resumable file)
    assert (tmp_path / method / "best.pt").exists() and not (tmp_path / method / "last.pt").exists()
    hist = tracking.client().get_metric_history(res.run_id, "val_dice")
    assert [h.step for h in hist] == [10, 20]
    assert np.isfinite(res.metrics["test_last_dice"])
    losses = {k for k in run.data.metrics if k.startswith("loss_")}
    assert losses == {f"loss_{t}" for t in m.terms}
    assert ("pl_dice_a" in run.data.metrics) == m.unlabeled
    assert ("pl_dice_reg" in run.data.metrics) == (m.unlabeled and m.needs_registration)
    # REPS really pairs anchors; pair precision and similarity are monitored in every contrastive variant,
    # REPS pairs wherever there are registration coordinates (`cct+rsl` finds them without pulling them)
    assert ("reps_pos_per_anchor" in run.data.metrics) == ("reps_pair_sim" in run.data.metrics) \
        == ("reps_pair_sim_early" in res.metrics) == (m.has("con") and m.needs_registration)
    if m.has("con") and m.needs_registration:
        assert run.data.metrics["reps_anchor_frac"] > 0 and 0 <= res.metrics["reps_pair_precision_early"] <= 1
    assert ("pl_pair_precision_early" in res.metrics) == ("pl_pair_sim" in run.data.metrics) \
        == ("pl_pair_sim_early" in res.metrics) == m.has("con")
    assert ("rsl_yield_frac" in run.data.metrics) == m.has("rsl")
    if m.needs_registration:  # the confidence calibration on validation cases, in --json and MLflow
        assert 0 <= res.metrics["reg_dice_conf_low"] <= 1 and 0 <= res.metrics["reg_dice_conf_high"] <= 1


def test_reps_changes_the_weights(registration_ready, tmp_path):
    """Same seed, same batches: `cct+reps` trains other weights than `cct` (REPS is not a no-op)."""
    a = train(tiny_cfg(method="cct", iters=6, val_every=6, keep_last=True), tmp_path / "cct", progress=False)
    b = train(tiny_cfg(method="cct+reps", iters=6, val_every=6, keep_last=True), tmp_path / "reps", progress=False)
    wa = torch.load(a.run_dir / "last.pt", weights_only=True)["state_a"]
    wb = torch.load(b.run_dir / "last.pt", weights_only=True)["state_a"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_scrambled_unlabeled_labels_give_bit_identical_weights(registration_ready, session_dirs, tmp_path,
                                                               monkeypatch):
    """Held-back labels of unlabeled cases are read for monitoring only: scrambling them changes no weight."""
    import shutil

    from cctr.data.datasets import load_dataset, make_split

    cfg = tiny_cfg(method="cctr", iters=6, val_every=3, keep_last=True)
    ref = train(cfg, tmp_path / "ref", progress=False)
    cache = tmp_path / "cache"
    shutil.copytree(session_dirs["cache"], cache)
    monkeypatch.setenv("CCTR_CACHE", str(cache))
    ds = load_dataset("phantom-cardiac")
    split = make_split(ds, cfg.data.labeled, cfg.data.seed)
    before = ds.case(split.unlabeled[0]).label.copy()
    rng = np.random.default_rng(0)
    for cid in split.unlabeled:
        path = ds.root / "cases" / f"{cid}.npz"
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["label"] = rng.permutation(arrays["label"].ravel()).reshape(arrays["label"].shape)
        np.savez(path, **arrays)
    assert not np.array_equal(ds.case(split.unlabeled[0]).label, before)
    scr = train(cfg, tmp_path / "scrambled", progress=False)
    wa = torch.load(ref.run_dir / "last.pt", weights_only=True)
    wb = torch.load(scr.run_dir / "last.pt", weights_only=True)
    for net in ("state_a", "state_b"):
        assert all(torch.equal(wa[net][k], wb[net][k]) for k in wa[net])
    # ... while the monitor that reads them did change
    assert scr.metrics["pl_pair_precision_early"] != ref.metrics["pl_pair_precision_early"]


def _hand_built_contrast():
    """A 2-slice batch (case 0 labeled, case 1 not), identity projection heads and a filled bank whose REPS
    partners are known by hand: pixel (i, j) of slice b sits at (z, y, x) = (b, 10 i, 10 j) mm."""
    import cctr.losses as L

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(2, 4, 2, 2, generator=g), dim=1)
    outs = [{"feat": emb}, {"feat": emb.clone()}]
    nets = [SimpleNamespace(embed=lambda f: f)] * 2  # identity heads: anchors are the pixels' features
    logits = [torch.randn(2, 2, 2, 2, generator=g) for _ in range(2)]
    y = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    grid = torch.stack(torch.meshgrid(torch.arange(2.0) * 10, torch.arange(2.0) * 10, indexing="ij"))
    coords = torch.stack([torch.cat([torch.full((1, 2, 2), float(b)), grid]) for b in range(2)])
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 1, 1] = False  # rotated in from outside the slice
    c_reg = torch.ones(2, 1, 2, 2)
    c_reg[1, 0, 0, 1] = 0.2  # registration not trusted here
    batch = {"case_index": torch.tensor([0, 1]), "valid": valid, "c_reg": c_reg, "coords": coords,
             "label_mon": torch.zeros(2, 2, 2, dtype=torch.long)}
    bank = L.MemoryBank(5, 4)
    bank.push(torch.nn.functional.normalize(torch.randn(4, 4, generator=g), dim=1), torch.tensor([2, 2, 2, 1]),
              torch.tensor([0, 1, 0, 1]), torch.tensor([[0.0, 0, 0], [0, 0, 2], [0, 10, 10], [0, 10, 0]]))
    con = Contrast([bank, L.MemoryBank(5, 4)], cap_xy=5.0, cap_z=5.0)
    pseudo = tuple(lg[1:].argmax(1) for lg in logits)
    return g, emb, nets, outs, pseudo, y, batch, con


def test_contrastive_term_reps_slots_on_a_hand_built_batch(monkeypatch):
    """Which keys become REPS positives: the nearest per other case, gated by `valid` and `c_reg`."""
    import cctr.losses as L

    cfg = tiny_cfg(method="cctr", batch_labeled=1, anchors_per_class=100, conf_threshold=0.5, memory_size=5)
    g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
    calls = []
    real = L.masked_supcon_terms
    monkeypatch.setattr(L, "masked_supcon_terms", lambda a, k, ps, d, tau: calls.append((a, ps)) or real(a, k, ps, d, tau))
    contrastive_term(cfg, METHODS["cctr"], nets, outs, pseudo, y, batch, con, g, torch.device("cpu"), {})
    anchors, (_, reps) = calls[0]  # net A: the class positives, then REPS's
    pix = emb.permute(0, 2, 3, 1).reshape(8, 4)
    where = [int(torch.nonzero((pix == a).all(1))[0]) for a in anchors]  # anchor -> b*4 + i*2 + j
    n = len(where)
    assert sorted(where) == list(range(7))  # pixel 7 was rotated in from outside the slice: never an anchor
    slots = {w: set(torch.nonzero(reps[r, n:]).flatten().tolist()) for r, w in enumerate(where)}
    mates = {w: {where[c] for c in torch.nonzero(reps[r, :n]).flatten().tolist()} for r, w in enumerate(where)}
    # labeled (case 0): (0,0) -> bank slot 0 (0 mm; slot 1 is 2 mm away); (1,0) -> slot 3 (case 1 at 0 mm, nearer
    # than the batch pixel of case 1 at 1 mm through-plane); (1,1) -> slot 2; (0,1): nothing within 5 mm in case 2
    assert slots[0] == {0} and slots[2] == {3} and slots[3] == {2} and slots[1] == set()
    assert mates[0] == {4} and mates[1] == set() and mates[2] == set() and mates[3] == set()
    # unlabeled (case 1): its own case's slot 3 is never a partner; (0,1) has low confidence and (1,1) is
    # invalid: no partner at all, and nobody's partner
    assert slots[4] == {0} and mates[4] == {0} and slots[6] == set() and mates[6] == {2}
    assert slots[5] == mates[5] == set()
    assert all(5 not in v and 7 not in v for v in mates.values())


def test_coordinates_are_gated_by_c_coord_where_the_batch_has_it():
    """With several atlases the batch carries `c_coord` (the reference atlas' own confidence): the REPS
    gate reads it, not the fused c_reg. Fused confidence low everywhere but c_coord high: the same pairs
    as the hand-built batch gated by its own c_reg, now without the one low-confidence pixel."""
    cfg = tiny_cfg(method="cctr", batch_labeled=1, anchors_per_class=100, conf_threshold=0.5, memory_size=5)
    counts = []
    for gate in ("c_reg", "c_coord"):
        g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
        if gate == "c_coord":
            batch["c_coord"] = torch.ones_like(batch["c_reg"])
            batch["c_reg"] = torch.zeros_like(batch["c_reg"])
        stats: dict[str, float] = {}
        contrastive_term(cfg, METHODS["cctr"], nets, outs, pseudo, y, batch, con, g, torch.device("cpu"), stats)
        counts.append(stats["reps_pos"])
    assert counts[1] > counts[0] > 0  # pixel 5 (c_reg 0.2 in the hand-built batch) now pairs too


def test_padding_pixels_are_never_anchors(monkeypatch):
    """Anchors are sampled only where `valid` (the image) is, whatever the labels say there: with every
    pixel of the unlabeled slice but one marked as padding, that one pixel is its only anchor."""
    import cctr.losses as L

    cfg = tiny_cfg(method="cct", batch_labeled=1, anchors_per_class=100, memory_size=5)
    g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
    batch["valid"][1] = torch.tensor([[False, False], [True, False]])
    batch["valid"][0, 0, 1] = False
    seen = []
    real = L.masked_supcon_terms
    monkeypatch.setattr(L, "masked_supcon_terms", lambda a, k, ps, d, tau: seen.append(a) or real(a, k, ps, d, tau))
    contrastive_term(cfg, METHODS["cct"], nets, outs, pseudo, y,
                     {k: v for k, v in batch.items() if k != "coords"}, con, g, torch.device("cpu"), None)
    pix = emb.permute(0, 2, 3, 1).reshape(8, 4)
    for anchors in seen:  # both nets
        where = sorted(int(torch.nonzero((pix == a).all(1))[0]) for a in anchors)
        assert where == [0, 2, 3, 6]


def test_reps_replace_paired_keeps_the_class_positives_of_unpaired_volumes():
    """`train.reps_replace: paired` reaches the contrast: on the hand-built batch, where some anchors have
    no partner, it keeps class positives that "all" leaves out, so the class part differs."""
    out = {}
    for mode in ("all", "paired"):
        cfg = tiny_cfg(method="cctr", batch_labeled=1, anchors_per_class=100, conf_threshold=0.5, memory_size=5,
                       reps_replace=mode)
        g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
        out[mode] = contrastive_term(cfg, METHODS["cctr"], nets, outs, pseudo, y, batch, con, g,
                                     torch.device("cpu"), {})
    assert not torch.allclose(out["all"]["con"], out["paired"]["con"])


def test_reps_pairs_are_monitored_without_reps_and_pull_nothing():
    """`cct+rsl` finds the pairs REPS would pull (same pairs as `cctr`) and logs their embedding similarity,
    while its loss equals the loss without coordinates: the monitor takes no part in training."""
    cfg = tiny_cfg(method="cct+rsl", batch_labeled=1, anchors_per_class=100, conf_threshold=0.5, memory_size=5)
    stats: dict[str, float] = {}
    g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
    terms = contrastive_term(cfg, METHODS["cct+rsl"], nets, outs, pseudo, y, batch, con, g, torch.device("cpu"),
                             stats)
    g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
    no_coords = {k: v for k, v in batch.items() if k != "coords"}
    plain = contrastive_term(cfg, METHODS["cct+rsl"], nets, outs, pseudo, y, no_coords, con, g,
                             torch.device("cpu"), {})
    assert set(terms) == {"con"} and torch.equal(terms["con"], plain["con"])
    reps_stats: dict[str, float] = {}
    g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
    contrastive_term(cfg, METHODS["cctr"], nets, outs, pseudo, y, batch, con, g, torch.device("cpu"), reps_stats)
    # net A (previous test): 4 pairs with its bank, and in the batch 0<->4 both ways and 6 -> 2 (2's case-1
    # partner is bank slot 3, nearer than pixel 6); net B's bank is empty: 0<->4 and 2<->6, both ways
    assert stats["reps_pos"] == reps_stats["reps_pos"] == 7 + 4
    assert stats["reps_sim"] == pytest.approx(reps_stats["reps_sim"])
    # the similarity is each pair's cosine, by hand: both nets see the same pixels
    pix = emb.permute(0, 2, 3, 1).reshape(8, 4)
    bank_a = _hand_built_contrast()[-1].banks[0].feats[:4]
    pairs = [(pix[0], bank_a[0]), (pix[2], bank_a[3]), (pix[3], bank_a[2]), (pix[4], bank_a[0]), (pix[0], pix[4]),
             (pix[4], pix[0]), (pix[6], pix[2])] + [(pix[0], pix[4]), (pix[4], pix[0]), (pix[2], pix[6]), (pix[6], pix[2])]
    assert stats["reps_sim"] == pytest.approx(sum(float(a @ b) for a, b in pairs), abs=1e-5)
    assert monitor_metrics(stats, 1)["reps_pair_sim"] == pytest.approx(stats["reps_sim"] / 11)
    assert 0 < stats["pl_n"] and -1 <= monitor_metrics(stats, 1)["pl_pair_sim"] <= 1


def test_pair_monitor_off_changes_no_loss():
    """Without `stats` (the loop's non-logging steps) nothing is counted, and every loss term and the
    memory banks are exactly what a monitored step gives: the monitor only reads."""
    for method in ("cctr", "cct+rsl"):
        cfg = tiny_cfg(method=method, batch_labeled=1, anchors_per_class=100, conf_threshold=0.5, memory_size=5)
        runs = []
        for stats in ({}, None):
            g, emb, nets, outs, pseudo, y, batch, con = _hand_built_contrast()
            terms = contrastive_term(cfg, METHODS[method], nets, outs, pseudo, y, batch, con, g,
                                     torch.device("cpu"), stats)
            runs.append((stats, terms, con.banks[0].state_dict()))
        (counted, monitored, bank_m), (_, quiet, bank_q) = runs
        assert counted["reps_pos"] > 0 and counted["pl_pairs"] > 0
        assert monitored.keys() == quiet.keys() and all(torch.equal(monitored[k], quiet[k]) for k in monitored)
        assert all(torch.equal(bank_m[k], bank_q[k]) for k in bank_m)


def test_cct_rsl_monitors_the_same_reps_pairs_as_cctr(registration_ready, tmp_path):
    """At the first step both variants see the same batch, weights and empty banks: the REPS pairs that
    `cct+rsl` monitors are exactly those `cctr` pulls (same caps, same gates)."""
    runs = [train(tiny_cfg(method=m, iters=2, val_every=2), tmp_path / m, progress=False) for m in ("cctr", "cct+rsl")]
    first = [tracking.client().get_metric_history(r.run_id, "reps_pos_per_anchor")[0] for r in runs]
    assert first[0].step == first[1].step == 0 and first[0].value == first[1].value > 0


def test_resume_is_exact(registration_ready, tmp_path):
    cfg = tiny_cfg(method="cctr", iters=8, val_every=4, keep_last=True)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=4)
    assert part.metrics["iteration"] == 4
    assert tracking.client().get_run(part.run_id).info.status == "FINISHED"
    resumed = train(cfg, tmp_path / "part", resume=tmp_path / "part" / "last.pt", progress=False)
    assert resumed.run_id == part.run_id  # the same MLflow run continues
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in a["state_a"]:
        torch.testing.assert_close(a["state_a"][k], b["state_a"][k], rtol=1e-5, atol=1e-6)
    for k in a["state_b"]:
        torch.testing.assert_close(a["state_b"][k], b["state_b"][k], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["test_dice"] == pytest.approx(full.metrics["test_dice"], abs=1e-6)


def test_checkpoints_best_is_weights_only_and_artifacts_are_links(registration_ready, tmp_path):
    """best.pt drops the optimizer (half the bytes); MLflow's copies are hard links, not second copies."""
    import os
    from pathlib import Path
    from urllib.parse import urlparse

    res = train(tiny_cfg(method="sup", iters=4, val_every=2, keep_last=True), tmp_path / "run", progress=False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "optimizer" not in best and "rng_torch" not in best and "optimizer" in last
    assert best["state_a"].keys() == last["state_a"].keys() and best["config"] == last["config"]
    art = Path(urlparse(tracking.client().get_run(res.run_id).info.artifact_uri).path) / "checkpoints"
    for name in ("best.pt", "last.pt"):
        assert os.path.samefile(art / name, tmp_path / "run" / name)
    with pytest.raises(CctrError, match="weights only"):
        train(tiny_cfg(method="sup", iters=4, val_every=2), tmp_path / "run", resume=tmp_path / "run" / "best.pt",
              progress=False)


def test_nan_loss_fails_the_run(tmp_path, monkeypatch):
    import cctr.losses as L

    monkeypatch.setattr(L, "dice_ce", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(CctrError, match="non-finite loss"):
        train(tiny_cfg(method="sup", iters=4), tmp_path / "nan", progress=False)
    runs = tracking.find_runs("phantom-cardiac", "tags.method = 'sup'")
    failed = [r for r in runs if r.data.tags.get("checkpoint_dir", "").endswith("nan")]
    assert failed and failed[0].info.status == "FAILED" and "non-finite" in failed[0].data.tags["failure_reason"]


@pytest.mark.parametrize(
    "sets,msg",
    [(["data.labeled=99"], "asked for 99 labeled"), (["train.w_ct=-1"], "w_ct must be >= 0"),
     (["train.method=magic"], "unknown method"), (["model.encoder_a=resnet999"], "resnet999"),
     (["train.rsl_schedule=sometimes"], "rsl_schedule must be one of constant, ramp, decay"),
     (["train.reps_schedule=early"], "reps_schedule must be one of constant, ramp, decay"),
     (["train.norm_batches=both"], "norm_batches must be joint or split"),
     (["train.reps_replace=some"], "reps_replace must be all or paired")],
)
def test_bad_input_no_running_run(fresh_store, sets, msg):
    with pytest.raises(CctrError, match=msg):
        cfg = apply_overrides(tiny_cfg(method="sup"), sets)
        train(cfg, fresh_store / "bad", progress=False)
    assert not [r for r in tracking.find_runs("phantom-cardiac") if r.info.status == "RUNNING"]


def test_cli_needs_registration_names_command(fresh_store, monkeypatch, capsys):
    monkeypatch.setenv("CCTR_CACHE", str(fresh_store / "cache"))  # no registration trained here
    cfg = write_yaml(fresh_store / "cfg.yaml", TINY)
    code, _, err = cli_inprocess(capsys, "train", "--config", str(cfg), "--method", "cctr", "--json")
    assert code == 2 and "cctr register train" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli_inprocess(capsys, "train", "--config", str(cfg), "--set", "train.w_con=-0.5")
    assert code == 2 and "w_con must be >= 0" in err
    assert not [r for r in tracking.find_runs("phantom-cardiac") if r.info.status == "RUNNING"]


def test_cli_runs_of_one_config_keep_their_own_checkpoints(registration_ready, session_dirs, tmp_path):
    """Two `cctr train` runs of the same configuration (here at once) write separate folders: neither
    evaluates nor keeps the other's best.pt."""
    from tests.helpers import popen_cli

    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    procs = [popen_cli("train", "--config", str(cfg), "--method", "sup", "--json") for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    dirs = {o["run_dir"] for o in outs}
    assert len(dirs) == 2 and len({o["run_id"] for o in outs}) == 2
    for o in outs:
        assert (Path(o["run_dir"]) / "best.pt").is_file()
        assert tracking.require_run(o["run_id"]).data.tags["checkpoint_dir"] == str(Path(o["run_dir"]).resolve())


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_matches_the_reference_update_even_when_a_gradient_appears_late(name):
    """`make_optimizer`'s fused SGD (momentum buffers started at zero) and fused AdamW take the same steps
    as torch's plain loops, also for a parameter whose first gradient comes after the others' (a
    projection head)."""
    from cctr.config import TrainConfig
    from cctr.train import make_optimizer

    t = TrainConfig(optimizer=name, lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    fused = [torch.nn.Parameter(p.clone()) for p in start]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt_f = make_optimizer(t, fused)
    opt_p = (torch.optim.SGD(plain, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False) if name == "sgd"
             else torch.optim.AdamW(plain, lr=0.1, weight_decay=0.01, foreach=False))
    for step in range(4):
        grads = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
        for params, opt in ((fused, opt_f), (plain, opt_p)):
            opt.zero_grad(set_to_none=True)
            params[0].grad = grads[0].clone()
            if step >= 2:  # the second parameter takes part from the third step on
                params[1].grad = grads[1].clone()
            opt.step()
        for a, b in zip(fused, plain):
            assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(fused[1], start[1])  # it did move once it had gradients


def test_rsl_crossed_reads_the_validation_curves():
    """The crossover: some validation at which the nets' Dice reached y_reg's (on validation cases)."""
    from cctr.train import rsl_crossed

    below = [{"iteration": 80, "val_dice": 0.40, "val_reg_dice": 0.55}, {"iteration": 160, "val_dice": 0.54,
                                                                         "val_reg_dice": 0.55}]
    assert rsl_crossed([]) is None and rsl_crossed(below) is None
    after = [{"iteration": 240, "val_dice": 0.55, "val_reg_dice": 0.55}, {"iteration": 320, "val_dice": 0.6,
                                                                        "val_reg_dice": 0.55}]
    assert rsl_crossed(below + after) == 240  # the first validation that reached it
    assert rsl_crossed([{"iteration": 80, "val_dice": 0.9}]) is None  # no registration: never


@pytest.mark.parametrize("schedule,reg_fails", [("crossover", False), ("crossover", True), ("fade", True)])
def test_crossover_schedules_follow_the_logged_validation_curves(registration_ready, tmp_path, monkeypatch,
                                                                 schedule, reg_fails):
    """The RSL weight logged at each step is w_rsl before the first validation at which val_dice reached
    val_reg_dice (both logged); after it, 0 (`crossover`) or a straight line to 0 at the last iteration
    (`fade`). A tiny run's nets stay below y_reg; with `reg_fails` y_reg's monitoring Dice is that of an
    all-background map (the training maps are untouched), so the nets cross it at the first validation."""
    from cctr.registration.apply import RegMaps

    if reg_fails:
        monkeypatch.setattr(RegMaps, "y_reg", lambda self, cid: np.zeros_like(self[cid].y_reg.read()))
    res = train(tiny_cfg(method="cct+rsl", iters=12, val_every=4, rsl_schedule=schedule, w_rsl=0.5),
                tmp_path / "x", progress=False)
    c = tracking.client()
    val = {h.step: h.value for h in c.get_metric_history(res.run_id, "val_dice")}
    reg = {h.step: h.value for h in c.get_metric_history(res.run_id, "val_reg_dice")}
    assert sorted(val) == sorted(reg) == [4, 8, 12]
    logged = {h.step: h.value for h in c.get_metric_history(res.run_id, "w_rsl")}
    assert sorted(logged) == [0, 10, 11]
    for step, w in logged.items():
        crossed = min((v for v in val if v <= step and val[v] >= reg[v]), default=None)
        if crossed is None:
            assert w == 0.5
        else:
            assert w == pytest.approx(0.0 if schedule == "crossover" else 0.5 * (12 - step) / (12 - crossed))
    assert (min(logged.values()) < 0.5) == reg_fails  # the crossed branch really ran where it should


@pytest.mark.parametrize("schedule", ["ramp", "constant"])
def test_reps_term_has_its_own_weight_and_schedule(registration_ready, tmp_path, schedule):
    """The REPS part of the contrast is weighted w_con·reps_weight on `reps_schedule`, the class part w_con
    on the ramp, and the logged loss is the weighted sum of the logged terms at every logged step."""
    res = train(tiny_cfg(method="cctr", iters=12, val_every=12, ramp_iters=12, w_con=0.2, reps_weight=0.5,
                         reps_schedule=schedule), tmp_path / "x", progress=False)
    c = tracking.client()
    hist = {k: {h.step: h.value for h in c.get_metric_history(res.run_id, k)}
            for k in ("loss", "loss_sup", "loss_ct", "loss_rsl", "loss_con", "loss_reps",
                      "w_ct", "w_rsl", "w_con", "w_reps")}
    assert sorted(hist["w_reps"]) == [0, 10, 11]
    for step, w in hist["w_reps"].items():
        ramped = 0.2 * math.exp(-5 * (1 - step / 12) ** 2)
        assert hist["w_con"][step] == pytest.approx(ramped)
        assert w == pytest.approx(0.1 if schedule == "constant" else ramped / 2)
        assert hist["loss"][step] == pytest.approx(hist["loss_sup"][step] + sum(
            hist[f"w_{k}"][step] * hist[f"loss_{k}"][step] for k in ("ct", "rsl", "con", "reps")), rel=1e-5)
    assert max(hist["loss_reps"].values()) > 0  # REPS pairs were found: the term is not trivially zero
