"""2D slice dataset, two-stream sampler and joint augmentation (cctr.data.slices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cctr.data.slices import (
    AugmentConfig,
    GridField,
    SliceDataset,
    TwoStreamBatchSampler,
    _bilinear,
    bench_loader,
    make_loader,
    split_batch,
)
from cctr.errors import CctrError

NO_JITTER = AugmentConfig(p_intensity=0.0)


def _blocks(rng: np.random.Generator, shape: tuple[int, int, int], values: list[int], block: int = 4) -> np.ndarray:
    """Piecewise-constant label volume (block x block pixels) so that most pixels are away from edges."""
    z, h, w = shape
    coarse = rng.choice(values, size=(z, h // block + 1, w // block + 1))
    return np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)[:, :h, :w].astype(np.uint8)


def _dataset(size: int = 16, augment: bool = True, seed: int = 0, aug: AugmentConfig | None = None) -> SliceDataset:
    """Two volumes of different in-plane shapes; only the first has a label."""
    rng = np.random.default_rng(0)
    shapes = [(3, 20, 24), (2, 32, 28)]
    vols = [rng.random(s, dtype=np.float32) for s in shapes]
    label = [_blocks(rng, shapes[0], [0, 1, 2]), None]
    coords = [rng.uniform(-5, 5, size=(*s, 3)).astype(np.float32) for s in shapes]
    conf = [rng.random(s, dtype=np.float32) for s in shapes]
    return SliceDataset(
        vols,
        {"label": label, "coords": coords, "conf": conf},
        {"label": "label", "coords": "linear", "conf": "linear"},
        size=size,
        augment=augment,
        seed=seed,
        aug=aug,
    )


def test_sample_shapes_dtypes_and_missing_maps() -> None:
    ds = _dataset()
    assert len(ds) == 5
    assert ds.slices_of([1]) == [3, 4] and ds.slices_of([0, 1]) == list(range(5))
    s = ds[1]
    assert s["image"].shape == (1, 16, 16) and s["image"].dtype == torch.float32
    assert s["label"].shape == (16, 16) and s["label"].dtype == torch.int64
    assert s["coords"].shape == (3, 16, 16) and s["coords"].dtype == torch.float32
    assert s["conf"].shape == (1, 16, 16)
    assert s["valid"].shape == (16, 16) and s["valid"].dtype == torch.bool
    assert (s["case_index"], s["slice_index"]) == (0, 1)
    assert s["has_label"] is True and s["has_coords"] is True
    u = ds[4]
    assert (u["case_index"], u["slice_index"]) == (1, 1)
    assert u["has_label"] is False and u["has_conf"] is True
    assert u["label"].shape == (16, 16) and not u["label"].any()


def test_batch_equals_stacked_samples() -> None:
    ds = _dataset()
    keys = [(0, 7), (4, 1), (2, 9)]  # mixes source shapes
    b = ds.batch(keys)
    for j, k in enumerate(keys):
        s = ds[k]
        for name, v in s.items():
            assert torch.equal(b[name][j], torch.as_tensor(v)), name


def test_augmentation_deterministic_per_key_and_varied() -> None:
    a, b = _dataset(seed=3), _dataset(seed=3)
    assert torch.equal(a[(2, 5)]["image"], b[(2, 5)]["image"])
    assert not torch.equal(a[(2, 5)]["image"], a[(2, 6)]["image"])
    assert not torch.equal(a[(2, 5)]["image"], _dataset(seed=4)[(2, 5)]["image"])
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], b[2]["image"])  # plain indexing: epoch is the draw


def test_label_maps_keep_their_values() -> None:
    rng = np.random.default_rng(1)
    lab = _blocks(rng, (4, 30, 30), [0, 3, 7])
    img = rng.random(lab.shape, dtype=np.float32)
    ds = SliceDataset([img], {"label": [lab]}, {"label": "label"}, size=24, augment=True)
    seen = torch.cat([ds[(i, d)]["label"].flatten() for i in range(4) for d in range(5)])
    assert set(seen.unique().tolist()) <= {0, 3, 7}
    assert {3, 7} <= set(seen.unique().tolist())


def test_linear_maps_interpolated_without_overshoot() -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    coords = np.stack([np.broadcast_to(v, (3, 20, 20)) for v in (10.5 + yy, 50.0 - 2 * xx, yy * xx / 7.0)], -1)
    img = rng.random((3, 20, 20), dtype=np.float32)
    ds = SliceDataset([img], {"a": [coords.astype(np.float32)]}, {"a": "linear"}, size=32, augment=True)
    for d in range(5):
        out = ds[(1, d)]["a"]
        for c in range(3):
            lo, hi = coords[..., c].min(), coords[..., c].max()
            assert out[c].min() >= lo - 1e-4 and out[c].max() <= hi + 1e-4
        frac = (out - out.round()).abs().gt(1e-3).float().mean()
        assert frac > 0.5  # resampled linearly, never rounded


def test_same_geometry_for_image_and_every_map() -> None:
    """Label = source pixel id (nearest), map = source pixel position (bilinear), image = row index."""
    z, h, w = 2, 40, 30
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    pix_id = np.broadcast_to((yy * w + xx).astype(np.int32), (z, h, w))
    pos = np.broadcast_to(np.stack([yy, xx], -1), (z, h, w, 2))
    ds = SliceDataset(
        [np.broadcast_to(yy, (z, h, w))],
        {"id": [pix_id], "pos": [pos]},
        {"id": "label", "pos": "linear"},
        size=32,
        augment=True,
        aug=NO_JITTER,
    )
    for d in range(6):
        s = ds[(1, d)]
        ny, nx = np.divmod(s["id"].numpy(), w)
        py, px = s["pos"][0].numpy(), s["pos"][1].numpy()
        inner = s["valid"].numpy() & (py > 0.5) & (py < h - 1.5) & (px > 0.5) & (px < w - 1.5)
        assert inner.mean() > 0.3
        # The nearest source pixel is within half a pixel of the exact (bilinear) source position.
        assert np.abs(ny - py)[inner].max() <= 0.5 + 1e-3 and np.abs(nx - px)[inner].max() <= 0.5 + 1e-3
        np.testing.assert_allclose(s["image"][0].numpy()[inner], py[inner], atol=1e-4)


def test_image_as_label_agrees_after_augmentation() -> None:
    rng = np.random.default_rng(4)
    lab = _blocks(rng, (3, 48, 40), [0, 1, 2, 3], block=8)
    ds = SliceDataset(
        [lab.astype(np.float32)], {"label": [lab]}, {"label": "label"}, size=40, augment=True, aug=NO_JITTER
    )
    for i in range(3):
        s = ds[(i, 11)]
        lab_out = s["label"].numpy()
        img = s["image"][0].numpy()
        # Pixels whose 3x3 neighbourhood has one class: away from edges where linear and nearest differ.
        pad = np.pad(lab_out, 1, mode="edge")
        same = np.ones_like(lab_out, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                same &= pad[dy : dy + 40, dx : dx + 40] == lab_out
        keep = same & s["valid"].numpy()
        assert keep.mean() > 0.3
        assert (np.rint(img)[keep] == lab_out[keep]).mean() >= 0.95


def test_bilinear_kernel_is_grid_sample_border() -> None:
    """The in-place ATen call must be exactly grid_sample(bilinear, border, align_corners=False)."""
    src = np.random.default_rng(8).random((12, 10, 4), dtype=np.float32)
    grid = torch.rand(1, 7, 9, 2) * 2.6 - 1.3  # partly outside the source
    out = torch.empty(1, 4, 7, 9)
    _bilinear(src, grid, out=out)
    ref = F.grid_sample(
        torch.from_numpy(src).permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    assert torch.equal(out, ref)


def test_without_augment_resize_is_exact_on_sized_input() -> None:
    rng = np.random.default_rng(5)
    img = rng.random((2, 16, 16), dtype=np.float32)
    lab = _blocks(rng, (2, 16, 16), [0, 1, 5])
    coords = rng.random((2, 16, 16, 3), dtype=np.float32)
    ds = SliceDataset([img], {"label": [lab], "c": [coords]}, {"label": "label", "c": "linear"}, size=16, augment=False)
    for i in range(2):
        s = ds[i]
        np.testing.assert_allclose(s["image"][0].numpy(), img[i], atol=1e-5)
        np.testing.assert_array_equal(s["label"].numpy(), lab[i])
        np.testing.assert_allclose(s["c"].numpy(), np.moveaxis(coords[i], -1, 0), atol=1e-5)
        assert s["valid"].all()


def test_without_augment_resizes_non_square_input() -> None:
    rng = np.random.default_rng(6)
    lab = _blocks(rng, (1, 40, 20), [0, 2])
    s = SliceDataset([lab.astype(np.float32)], {"label": [lab]}, {"label": "label"}, size=10)[0]
    assert s["image"].shape == (1, 10, 10)
    np.testing.assert_array_equal(s["label"].numpy(), lab[0, 2::4, 1::2])  # nearest = pixel centres


def test_intensity_jitter_changes_image_only() -> None:
    a = _dataset(aug=AugmentConfig(p_intensity=1.0))
    b = _dataset(aug=NO_JITTER)
    sa, sb = a[(1, 3)], b[(1, 3)]
    assert not torch.allclose(sa["image"], sb["image"])
    for name in ("label", "coords", "conf", "valid"):
        assert torch.equal(sa[name], sb[name]), name


def test_two_stream_sampler_composition_and_determinism() -> None:
    prim, sec = list(range(5)), list(range(100, 130))
    sampler = TwoStreamBatchSampler(prim, sec, 2, 3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    for b in batches:
        assert len(b) == 5 and set(b[:2]) <= set(prim) and set(b[2:]) <= set(sec)
    assert sorted(i for b in batches for i in b[2:]) == sec  # one pass over the unlabeled stream
    assert {i for b in batches for i in b[:2]} == set(prim)  # the labeled stream cycles
    assert list(TwoStreamBatchSampler(prim, sec, 2, 3, seed=0)) == batches
    assert list(TwoStreamBatchSampler(prim, sec, 2, 3, seed=1)) != batches
    assert list(sampler) != batches  # a new epoch reshuffles
    long = [b[2:] for b in TwoStreamBatchSampler(prim, sec, 2, 3, seed=0, num_batches=20)]
    flat = [i for b in long for i in b]
    assert sorted(flat[:30]) == sec and sorted(flat[30:]) == sec and flat[:30] != flat[30:]


def test_rendering_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _dataset()[0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_split_batch() -> None:
    ds = _dataset()
    lab, unl = split_batch(ds.batch([0, 1, 3, 4]), 2)
    assert lab["image"].shape[0] == 2 and unl["image"].shape[0] == 2
    assert lab["has_label"].all() and not unl["has_label"].any()


def test_loader_two_workers_matches_in_process() -> None:
    ds = _dataset()
    lab, unl = ds.slices_of([0]), ds.slices_of([1])
    runs = []
    for workers in (0, 2):
        loader = make_loader(ds, lab, unl, b_l=2, b_u=2, iters=4, num_workers=workers, seed=0)
        runs.append(list(loader))
        del loader
    assert len(runs[0]) == 4
    for b0, b2 in zip(*runs):
        assert b2["image"].shape == (4, 1, 16, 16) and b2["has_label"].tolist() == [True, True, False, False]
        for name in b0:
            assert torch.equal(b0[name], b2[name]), name
    images = torch.cat([b["image"] for b in runs[1]])
    assert len({tuple(x.flatten()[:20].tolist()) for x in images}) == len(images)  # no repeated augmentation


def test_bad_input_raises_one_line_errors() -> None:
    rng = np.random.default_rng(7)
    vol = rng.random((2, 8, 8), dtype=np.float32)
    with pytest.raises(CctrError, match="'label' of volume 0 has shape"):
        SliceDataset([vol], {"label": [np.zeros((2, 8, 9), np.uint8)]}, {"label": "label"})
    with pytest.raises(CctrError, match="non-integer dtype"):
        SliceDataset([vol], {"label": [vol]}, {"label": "label"})
    with pytest.raises(CctrError, match="kind 'cubic'"):
        SliceDataset([vol], {"m": [vol]}, {"m": "cubic"})  # type: ignore[dict-item]
    with pytest.raises(CctrError, match="reserved"):
        SliceDataset([vol], {"valid": [vol]}, {"valid": "linear"})
    with pytest.raises(CctrError, match="unlabeled"):
        TwoStreamBatchSampler([0], [], 1, 1)
    with pytest.raises(CctrError, match="cannot fill"):
        TwoStreamBatchSampler([0], [1, 2], 1, 3)


def test_bench_loader_reports_throughput(monkeypatch) -> None:
    """Slices per second = whole batches (4 + 4 slices) delivered / elapsed time, on a fake clock."""
    import itertools

    import cctr.data.slices as S

    ticks = itertools.count()
    monkeypatch.setattr(S.time, "perf_counter", lambda: next(ticks) * 0.1)
    # clock reads: t0 = 0.0, then 0.1, 0.2, 0.3 (< 0.35: three batches), 0.4 (stop), elapsed read at 0.5
    out = bench_loader(num_workers=0, seconds=0.35, warmup_batches=1)
    assert out == {"loader_slices_per_s": pytest.approx(3 * 8 / 0.5)}


def test_field_read_at_the_image_pixel_source_position() -> None:
    """A field holding each voxel's own native (z, y, x) index, on a lattice 4x coarser in-plane, reads
    back at every output pixel the source position its image value came from (image = row + col/100)."""
    z, h, w = 3, 41, 33
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    img = np.broadcast_to(yy + xx / 100, (z, h, w))
    gz, gy, gx = np.meshgrid(np.arange(z), np.arange(0, h, 4), np.arange(0, w, 4), indexing="ij")
    field = GridField(np.stack([gz, gy, gx]).astype(np.float32), (1, 4, 4), (0, 0, 0), (z, h, w))
    ds = SliceDataset([img], {"pos": [field]}, {"pos": "field"}, size=32, augment=True, aug=NO_JITTER)
    for d in range(6):
        s = ds[(1, d)]
        pz, py, px = s["pos"].numpy()
        inner = s["valid"].numpy() & (py > 0) & (py < h - 1) & (px > 0) & (px < w - 1)
        assert inner.mean() > 0.3 and np.allclose(pz, 1.0)
        np.testing.assert_allclose((py + px / 100)[inner], s["image"][0].numpy()[inner], atol=1e-3)


def test_lazy_sources_equal_in_memory_arrays(tmp_path) -> None:
    """Memory-mapped volumes and per-slice label stacks (anything with shape, dtype and [z]) render the
    same batches as in-memory arrays: nothing is copied up front."""
    from cctr.data.case import load_npz
    from cctr.registration.apply import SliceStack

    rng = np.random.default_rng(9)
    vol = rng.random((4, 24, 20), dtype=np.float32)
    lab = _blocks(rng, (4, 24, 20), [0, 1, 2])
    np.savez(tmp_path / "c.npz", image=vol, label=lab)
    z = load_npz(tmp_path / "c.npz", mmap_bytes=0)
    assert isinstance(z["image"], np.memmap) and isinstance(z["label"], np.memmap)
    stack = SliceStack(*SliceStack.pack(lab), lab.shape)
    assert np.array_equal(stack.read(), lab)
    eager = SliceDataset([vol], {"label": [lab]}, {"label": "label"}, size=16, augment=True)
    lazy = SliceDataset([z["image"]], {"label": [stack]}, {"label": "label"}, size=16, augment=True)
    keys = [(i, d) for i in range(4) for d in range(2)]
    a, b = eager.batch(keys), lazy.batch(keys)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CctrError, match="field 'c' of volume 0 must be a GridField"):
        SliceDataset([vol], {"c": [vol]}, {"c": "field"})
