"""Registration stage end to end on a tiny synthetic dataset: train/resume, maps + cache, bad input, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cctr.config import RegistrationConfig
from cctr.data.case import Case
from cctr.data.datasets import SPECS, DatasetSpec, load_dataset, make_split, write_cache
from cctr.errors import CctrError
from cctr.registration import apply as reg_apply
from cctr.registration import train as reg_train
from cctr.registration.apply import maps_dir, registration_maps
from cctr.registration.grid import identity
from cctr.registration.net import register_pair
from cctr.registration.train import checkpoint_path, load_model, refine_velocity, train_registration

# the net alone (refine_iters 0): a 4-iteration model is the fixture; instance optimisation has its own test
TINY = RegistrationConfig(grid=(8, 16, 16), channels=(4, 8, 8), int_steps=3, iters=4, batch_size=1, lr=1e-3,
                          refine_iters=0)
TOY, OTHER = "regtoy", "regtoy2"


def _toy_case(i: int, rng: np.random.Generator) -> Case:
    """A blob (class 1 shell around class 2 core) at a random position/size in a volume of varying shape."""
    shape = (6 + i % 3, 20 + i % 4, 22 - i % 3)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    c = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    r = np.array([2.0, 6.0, 6.0]) * rng.uniform(0.8, 1.2)
    d = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
    label = np.where(d < 0.35, 2, np.where(d < 1.0, 1, 0)).astype(np.uint8)
    image = (np.array([0.1, 0.5, 0.9], np.float32)[label] + rng.normal(0, 0.02, shape)).astype(np.float32)
    return Case(f"t{i:02d}", image, label, (5.0, 1.5, 1.5))


def _make(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_cache(SPECS[name], [_toy_case(i, rng) for i in range(8)], f"test:{name}")


@pytest.fixture(scope="module")
def toy(session_dirs):
    """Two toy datasets in the session cache and a model trained on the first (done once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCTR_CACHE", str(session_dirs["cache"]))
        mp.setenv("CCTR_MLRUNS", str(session_dirs["mlruns"]))
        for n in (TOY, OTHER):
            mp.setitem(SPECS, n, DatasetSpec(n, ("bg", "shell", "core"), "mri", (1, 2)))
            _make(n, {TOY: 0, OTHER: 1}[n])
        split = make_split(load_dataset(TOY), 1, 0)
        ckpt = train_registration(TOY, TINY, split, progress=False)
        yield {"split": split, "ckpt": ckpt, "mp": mp}


def test_checkpoint_carries_config_and_reuses(toy):
    model, ck = load_model(toy["ckpt"], TOY, TINY.grid)
    assert ck["format"] == "cctr-registration" and ck["dataset"] == TOY and ck["iteration"] == TINY.iters
    assert ck["config"]["channels"] == list(TINY.channels) and ck["train"] == toy["split"].train
    before = toy["ckpt"].stat().st_mtime_ns
    assert train_registration(TOY, TINY, toy["split"], progress=False) == toy["ckpt"]  # finished: reused
    assert toy["ckpt"].stat().st_mtime_ns == before


def test_training_resumes_after_interrupt(toy, monkeypatch):
    cfg = dataclasses.replace(TINY, iters=5, seed=1)
    calls = {"n": 0}
    real = reg_train.grad_loss

    def flaky(d):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(d)

    monkeypatch.setattr(reg_train, "grad_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_registration(TOY, cfg, toy["split"], progress=False)
    path = checkpoint_path(TOY, cfg, toy["split"])
    first = reg_train.load_checkpoint(path, reg_train.FORMAT)
    assert first["iteration"] == 3
    with pytest.raises(CctrError, match="unfinished registration model.*cctr register train --dataset regtoy"):
        reg_train.find_checkpoint(TOY, cfg, toy["split"])
    monkeypatch.setattr(reg_train, "grad_loss", real)
    train_registration(TOY, cfg, toy["split"], progress=False)
    done = reg_train.load_checkpoint(path, reg_train.FORMAT)
    assert done["iteration"] == 5 and done["run_id"] == first["run_id"]
    from cctr import tracking

    run = tracking.client().get_run(done["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "registration"
    steps = [m.step for m in tracking.client().get_metric_history(done["run_id"], "loss")]
    assert steps == [5]  # one mean per 10 steps or at the end: the resumed run logs under one id


def test_maps_shapes_range_and_cache_reuse(toy, monkeypatch):
    split = toy["split"]
    ds = load_dataset(TOY)
    maps = registration_maps(TOY, TINY, split)
    assert not maps.reused and set(maps) == set(split.train + split.val + split.test)
    ref = ds.case(split.labeled[0])
    grid = np.array(TINY.grid)
    for cid in maps:
        m, case = maps[cid], ds.case(cid)
        y = maps.y_reg(cid)
        assert y.shape == case.shape and y.dtype == np.uint8 and y.max() < 3
        assert np.array_equal(np.stack([m.y_reg[z] for z in range(case.shape[0])]), y)
        # confidence and coordinates stay on the registration grid (they are smooth there)
        assert m.c_reg.values.shape == (1, *grid) and m.coords.values.shape == (3, *grid)
        assert m.c_reg.shape == m.coords.shape == case.shape
        c = maps.c_reg(cid)
        assert c.shape == case.shape and c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1
        # mm in the reference; points may map a little outside its field of view, not far
        extent = (np.array(ref.shape) - 1) * np.array(ref.spacing)
        flat = m.coords.values.reshape(3, -1).T
        assert np.isfinite(flat).all()
        assert (flat.min(0) >= -0.5 * extent).all() and (flat.max(0) <= 1.5 * extent).all()
    # the reference case mapped onto itself: coordinates close to its own voxel positions in mm
    own = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(ref.shape, ref.spacing)], indexing="ij"))
    co = maps[ref.case_id].coords
    native = np.stack([co.slice(z) for z in range(ref.shape[0])], axis=1)
    assert np.abs(native - own).mean() < 1.0
    # a map of a few MB at most, whatever the volume: y_reg compressed, the rest grid-sized
    assert (maps.root / f"{ref.case_id}.npz").stat().st_size < 4 * 4 * int(np.prod(grid)) + 4096

    def boom(*a, **k):
        raise AssertionError("cache not reused")

    monkeypatch.setattr(reg_apply.Registrar, "phi", boom)
    again = registration_maps(TOY, TINY, split)
    assert again.reused and again.root == maps.root
    assert np.array_equal(again.y_reg(split.test[0]), maps.y_reg(split.test[0]))


def test_instance_optimisation_fits_the_pair_and_leaves_the_model(toy):
    """refine_iters 0 is the net alone, bit for bit; refinement lowers the pair's own objective without
    touching the weights; the model's key ignores the setting, the maps' key does not."""
    ds, split = load_dataset(TOY), toy["split"]
    model, ck = load_model(toy["ckpt"], TOY, TINY.grid)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reg = reg_apply.Registrar(ds, model, TINY)
    mov, fix = reg.image(split.labeled[0])[None], reg.image(split.val[0])[None]
    net_phi = register_pair(model, mov, fix)[0].detach()
    off = TINY

    def refine_pair(cfg):
        return register_pair(model, mov, fix, velocity=refine_velocity(model, mov, fix, None, cfg))[0].detach()

    assert torch.equal(refine_pair(off), net_phi)

    def cost(cfg, phi):
        sim, smooth = reg_train.objective(cfg, mov, fix, phi, phi - identity(TINY.grid)[None])
        return float(sim + cfg.refine_smooth * cfg.lambda_smooth * smooth)

    on = dataclasses.replace(TINY, refine_iters=15, refine_lr=0.2, refine_smooth=2.0)
    refined = refine_pair(on)
    assert cost(on, refined) < cost(on, net_phi) - 1e-3
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert reg_train.model_key(TOY, on, split) == reg_train.model_key(TOY, off, split)
    others = (dataclasses.replace(on, refine_lr=0.1), dataclasses.replace(on, refine_smooth=1.0))
    assert len({maps_dir(TOY, toy["ckpt"], split, c) for c in (off, on, *others)}) == 4
    maps = registration_maps(TOY, on, split)  # the maps are made with it
    assert maps.root == maps_dir(TOY, toy["ckpt"], split, on) and not maps.reused
    assert all(np.isfinite(maps[c].coords.values).all() for c in maps)
    for bad in ({"refine_iters": -1}, {"refine_lr": 0.0}, {"refine_smooth": -1.0}):
        with pytest.raises(CctrError, match="refine_iters must be >= 0"):
            reg_train.check_config(dataclasses.replace(TINY, **bad))


def test_nested_labeled_sets_register_each_pair_once(toy, monkeypatch):
    """A velocity store shared across labeled sets (Table 1, sweeps): the 2-atlas maps after the
    1-atlas ones refine only the new atlas' pairs, and the maps equal those made without the store."""
    ds = load_dataset(TOY)
    on = dataclasses.replace(TINY, refine_iters=3, refine_lr=0.1, refine_smooth=2.0)
    one, two = make_split(ds, 1, 0, 1), make_split(ds, 2, 0, 1)  # labeled seed 1: nested sets, one model
    assert set(one.labeled) < set(two.labeled)
    calls, real = [], reg_apply.refine_velocity

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reg_apply, "refine_velocity", counted)
    store: dict = {}
    registration_maps(TOY, on, one, velocities=store)
    n_cases = len(calls)
    shared = registration_maps(TOY, on, two, velocities=store)
    assert n_cases > 0 and len(calls) == 2 * n_cases  # the second atlas' pairs only
    before = {c: (shared.y_reg(c), shared.c_reg(c)) for c in shared}
    shutil.rmtree(shared.root)  # the same maps again, from scratch
    fresh = registration_maps(TOY, on, two)
    assert len(calls) == 4 * n_cases and not fresh.reused
    for c, (y, conf) in before.items():
        assert np.array_equal(fresh.y_reg(c), y) and np.array_equal(fresh.c_reg(c), conf)
    other = next(sp for k in range(2, 50) if not set((sp := make_split(ds, 1, 0, k)).labeled) & set(two.labeled))
    registration_maps(TOY, on, other, velocities=store)  # another atlas: the earlier ones' pairs let go
    assert {k[0] for k in next(iter(store.values()))} == set(other.labeled)


def test_interrupted_write_leaves_no_valid_cache(toy, monkeypatch):
    split = make_split(load_dataset(TOY), 2, 0)  # another labeled set: another cache key
    final = maps_dir(TOY, toy["ckpt"], split, TINY)
    real, calls = reg_apply.fuse, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reg_apply, "fuse", dying)
    with pytest.raises(KeyboardInterrupt):
        registration_maps(TOY, TINY, split)
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}")]
    monkeypatch.setattr(reg_apply, "fuse", real)
    maps = registration_maps(TOY, TINY, split)
    assert not maps.reused and len(list(final.glob("*.npz"))) == len(maps)


def test_bad_inputs(toy, tmp_path):
    split = toy["split"]
    untrained = dataclasses.replace(TINY, iters=7)
    with pytest.raises(CctrError, match=r"no registration model for dataset 'regtoy' \(grid 8x16x16\).*"
                                        r"`cctr register train --dataset regtoy`"):
        registration_maps(TOY, untrained, split)
    other_split = make_split(load_dataset(OTHER), 1, 0)
    with pytest.raises(CctrError, match="checkpoint is for dataset 'regtoy', not 'regtoy2'"):
        registration_maps(OTHER, TINY, other_split, checkpoint=toy["ckpt"])
    with pytest.raises(CctrError, match="uses grid 8x16x16, the config asks for 8x16x24"):
        registration_maps(TOY, dataclasses.replace(TINY, grid=(8, 16, 24)), split, checkpoint=toy["ckpt"])
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(CctrError, match="bogus.pt"):
        registration_maps(TOY, TINY, split, checkpoint=bogus)
    # a NaN sneaking into a cached image: one clear error, no cache written
    ds = load_dataset(TOY)
    victim = split.test[0]
    path = ds.root / "cases" / f"{victim}.npz"
    keep = path.read_bytes()
    with np.load(path) as z:
        arrays = dict(z)
    arrays["image"][0, 0, 0] = np.nan
    np.savez(path, **arrays)
    try:
        split3 = make_split(ds, 3, 0)
        with pytest.raises(CctrError, match=f"regtoy:{victim}: image contains NaN"):
            registration_maps(TOY, TINY, split3)
        assert not maps_dir(TOY, toy["ckpt"], split3, TINY).exists()
    finally:
        path.write_bytes(keep)


def test_cli_report_json_and_untrained_error(toy):
    from cctr.cli.register import app

    runner = CliRunner()
    res = runner.invoke(app, ["report", "--dataset", TOY, "--labeled", "1", "--json", "--checkpoint",
                              str(toy["ckpt"]), "--set", "registration.grid=[8,16,16]"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("dice_reg", "dice_identity", "dice_tvl1", "neg_jacobian_frac", "pair_s", "pair_s_tvl1"):
        assert isinstance(out[k], float) and out[k] == out[k]
    assert 0 <= out["neg_jacobian_frac"] <= 1 and out["pair_s"] > 0 and out["pair_s_tvl1"] > 0
    assert 0 <= out["dice_identity"] <= 1 and 0 < out["dice_reg"] <= 1
    res = runner.invoke(app, ["apply", "--dataset", TOY, "--labeled", "1", "--set", "registration.iters=9",
                              "--set", "registration.grid=[8,16,16]"])
    assert isinstance(res.exception, CctrError) and "cctr register train --dataset regtoy" in str(res.exception)


def test_optional_dice_term_and_mse(toy):
    ds = load_dataset(TOY)
    cfg = dataclasses.replace(TINY, dice_weight=1.0, similarity="mse", iters=2, affine="none")
    with pytest.raises(CctrError, match="dice_weight > 0 needs >= 2 labeled"):
        train_registration(TOY, cfg, toy["split"], progress=False)
    split2 = make_split(ds, 2, 0)
    ck = reg_train.load_checkpoint(train_registration(TOY, cfg, split2, progress=False), reg_train.FORMAT)
    assert sorted(ck["labeled"]) == sorted(split2.labeled)
    from cctr import tracking

    hist = tracking.client().get_metric_history(ck["run_id"], "loss_dice")
    assert len(hist) == 1 and 0 <= hist[0].value <= 1
    with pytest.raises(CctrError, match="registration.similarity must be"):
        train_registration(TOY, dataclasses.replace(TINY, similarity="l1"), split2, progress=False)


def test_confidence_tracks_image_agreement_and_atlas_disagreement():
    """c_reg is high where the target's intensity fits the class the atlas puts there, low where it
    does not (the right half shows fat where the atlas says organ), and at most 1/2 where two atlases
    disagree on the label."""
    from cctr.registration.apply import (
        Atlas,
        atlas_fits,
        atlas_weights,
        class_intensities,
        confidence,
    )
    from cctr.registration.grid import identity

    grid = (6, 12, 16)
    rng = np.random.default_rng(0)
    organ = torch.zeros(2, *grid)
    organ[1, :, 3:9, 2:14] = 1
    organ[0] = 1 - organ[1]
    atlas_img = (0.2 + 0.6 * organ[1] + 0.01 * torch.from_numpy(rng.standard_normal(grid)).float())[None]
    target = atlas_img.clone()
    target[..., 8:] = 0.2  # no organ here in the target: registration would be wrong
    phi = identity(grid)
    atlas = Atlas("a", np.zeros(grid, np.uint8), (1.0, 1.0, 1.0), None, atlas_img, organ,  # type: ignore[arg-type]
                  *class_intensities(atlas_img, organ))
    fits = atlas_fits({"a": phi}, target, {"a": atlas})
    c = confidence(fits, atlas_weights(fits))
    assert c.shape == grid and float(c.min()) >= 0 and float(c.max()) <= 1
    inside = organ[1].bool()
    assert float(c[..., :7][inside[..., :7]].mean()) > 0.8  # agreeing organ
    assert float(c[..., 9:][inside[..., 9:]].max()) < 0.1  # "organ" over fat
    flipped = Atlas("b", np.zeros(grid, np.uint8), (1.0, 1.0, 1.0), None, atlas_img, organ.flip(0),  # type: ignore[arg-type]
                    *class_intensities(atlas_img, organ.flip(0)))
    fits = atlas_fits({"a": phi, "b": phi}, target, {"a": atlas, "b": flipped})
    both = confidence(fits, atlas_weights(fits))  # equally plausible, opposite labels: a tie
    assert float(both.max()) <= 0.5 + 1e-6


def test_weighted_voting_follows_the_atlas_whose_label_fits_the_target():
    """Two atlases, one misregistered (its organ shifted): where they disagree, the plain average ties
    (confidence 1/2), while locally weighted voting takes the label that fits the target's intensity,
    and is confident there; with one atlas the weights change nothing."""
    from cctr.data.case import Case
    from cctr.registration.apply import (
        Atlas,
        atlas_fits,
        atlas_weights,
        class_intensities,
        confidence,
        transfer_labels,
    )
    from cctr.registration.grid import grid_map, identity

    grid, fov = (6, 12, 16), (0.0, 0.0, 0.0)
    rng = np.random.default_rng(0)
    noise = 0.01 * torch.from_numpy(rng.standard_normal(grid)).float()

    def atlas(name: str, x0: int, x1: int) -> Atlas:
        lab = np.zeros(grid, np.uint8)
        lab[:, 3:9, x0:x1] = 1
        onehot = torch.from_numpy(np.stack([lab == 0, lab == 1])).float()
        img = (0.2 + 0.6 * onehot[1] + noise)[None]
        return Atlas(name, lab, (1.0, 1.0, 1.0), grid_map(grid, (1.0, 1.0, 1.0), grid, fov), img, onehot,
                     *class_intensities(img, onehot))

    good, bad = atlas("good", 2, 10), atlas("bad", 6, 14)
    atlases, phis = {"good": good, "bad": bad}, {"good": identity(grid), "bad": identity(grid)}
    target = Case("v", good.image[0].numpy(), None, (1.0, 1.0, 1.0))
    fits = atlas_fits(phis, good.image, atlases)
    weights = atlas_weights(fits)
    disagree = good.label != bad.label
    assert disagree.sum() > 0
    y = transfer_labels(phis, target, atlases, 2, fov, weights)
    assert np.array_equal(y, good.label)
    plain = transfer_labels(phis, target, atlases, 2, fov)
    assert not np.array_equal(plain[disagree], good.label[disagree])  # a tie goes to class 0
    c = confidence(fits, weights)
    equal = {lid: torch.full(grid, 0.5) for lid in phis}
    assert float(c[torch.from_numpy(disagree)].mean()) > 0.8  # (the fit varies with the intensity noise)
    assert float(confidence(fits, equal)[torch.from_numpy(disagree)].max()) <= 0.5
    one = atlas_fits({"good": phis["good"]}, good.image, atlases)
    w1 = atlas_weights(one)
    assert torch.equal(w1["good"], torch.ones(grid))
    assert torch.equal(confidence(one, w1), (one["good"][0].max(0).values * one["good"][1]).clamp(0, 1))


def test_confidence_calibration_counts_dice_above_and_below(tmp_path):
    """Hand-made maps: y_reg right where c_reg is high, wrong where it is low -> Dice 1 vs 0."""
    from types import SimpleNamespace

    from cctr.registration.apply import (
        CONF_LEVELS,
        RegMaps,
        SliceStack,
        confidence_calibration,
    )

    shape = (3, 8, 10)
    gt = np.zeros(shape, np.uint8)
    gt[:, 2:6, 2:8] = 1
    gt[:, 3:5, 4:6] = 2
    y = gt.copy()
    y[:, :, 5:] = np.where(gt[:, :, 5:] == 1, 2, gt[:, :, 5:])  # wrong on the right half
    c = np.ones((3, 8, 10), np.float32)
    c[:, :, 5:] = 0.2
    data, offsets = SliceStack.pack(y)
    np.savez_compressed(tmp_path / "v.npz", y_reg_data=data, y_reg_offsets=offsets, shape=np.array(shape),
                        scale=np.ones(3, np.float32), offset=np.zeros(3, np.float32),
                        c_reg=np.round(c * CONF_LEVELS).astype(np.uint8), coords=np.zeros((3, *shape), np.float32))
    maps = RegMaps(tmp_path, ["v"], "v", reused=True)
    ds = SimpleNamespace(spec=SimpleNamespace(num_classes=3), case=lambda cid: SimpleNamespace(label=gt))
    out = confidence_calibration(maps, ds, ["v"], 0.6)  # type: ignore[arg-type]
    assert out["reg_dice_conf_high"] == 1.0 and out["reg_conf_frac_high"] == 0.5
    assert out["reg_dice_conf_low"] < 0.5


def test_coordinates_are_gated_by_the_confidence_of_their_own_atlas(toy):
    """With one atlas the coordinates' gate is c_reg itself (stored once); with two, it is the reference
    atlas' own confidence (its warped one-hot's max times its fit), not the fused c_reg."""
    from cctr.registration.apply import atlas_fits

    ds = load_dataset(TOY)
    one, two = make_split(ds, 1, 0, 1), make_split(ds, 2, 0, 1)
    m1 = registration_maps(TOY, TINY, one)
    cid = one.test[0]
    case_maps = m1[cid]
    assert case_maps.c_coord is case_maps.c_reg
    m2 = registration_maps(TOY, TINY, two)
    assert m2.root != maps_dir(TOY, toy["ckpt"], dataclasses.replace(two, labeled=two.labeled[:1]), TINY)
    reg = reg_apply.Registrar(ds, load_model(toy["ckpt"], TOY, TINY.grid)[0], TINY)
    ref = two.labeled[0]
    fits = atlas_fits({ref: reg.phi(ref, cid)}, reg.image(cid), {ref: reg.atlas(ref)})
    p, fit = fits[ref]
    own = (p.max(0).values * fit).clamp(0, 1).numpy()
    got = m2[cid].c_coord.values[0]
    assert np.abs(got - own).max() <= 0.5 / 255 + 1e-6  # stored as uint8
    assert not np.array_equal(got, m2[cid].c_reg.values[0])  # the other atlas moves the fused map
