"""Registration stage: spatial transformer, integration, losses, label transfer and coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from cctr.errors import CctrError
from cctr.registration.grid import grid_map, identity, moments_affine, on_grid, sample, warped_onehot
from cctr.registration.losses import dice_loss, grad_loss, ncc_loss
from cctr.registration.net import RegNet, integrate, jacobian_det, warp


def onehot(label, num_classes: int) -> torch.Tensor:
    """[C,Z,H,W] float one-hot: the reference `warped_onehot` must match."""
    lab = torch.as_tensor(np.asarray(label), dtype=torch.long)
    return torch.nn.functional.one_hot(lab, num_classes).permute(3, 0, 1, 2).float()


def _smooth_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, 1.0).astype(np.float32)


def test_zero_displacement_is_identity():
    img = torch.from_numpy(_smooth_image((6, 9, 11)))[None, None]
    zero = torch.zeros(1, 3, 6, 9, 11)
    assert torch.allclose(warp(img, zero), img, atol=1e-6)
    assert torch.equal(warp(img, zero, mode="nearest"), img)


@pytest.mark.parametrize("kind", ["translation", "affine"])
def test_known_displacement_matches_map_coordinates(kind):
    shape = (10, 14, 16)
    img = _smooth_image(shape, 1)
    pos = identity(shape).numpy().astype(np.float64)
    if kind == "translation":
        disp = np.stack([np.full(shape, v) for v in (0.6, -1.3, 2.25)])
    else:
        m = np.array([[1.05, 0.02, 0.0], [-0.04, 0.95, 0.08], [0.0, 0.1, 1.02]])
        centre = np.array(shape)[:, None] / 2
        flat = pos.reshape(3, -1)
        disp = ((m @ (flat - centre) + centre + np.array([[0.3], [-0.7], [0.5]])) - flat).reshape(3, *shape)
    ours = warp(torch.from_numpy(img)[None, None], torch.from_numpy(disp).float()[None])[0, 0].numpy()
    ref = map_coordinates(img, pos + disp, order=1, mode="nearest")
    inner = (slice(3, -3), slice(3, -3), slice(3, -3))
    assert np.abs(ours[inner] - ref[inner]).max() < 1e-4
    if kind == "translation":  # no sample sits on a .5 tie, where float32 and float64 may round apart
        near = warp(torch.from_numpy(img)[None, None], torch.from_numpy(disp).float()[None], mode="nearest")
        ref0 = map_coordinates(img, pos + disp, order=0, mode="nearest")
        assert np.abs(near[0, 0].numpy()[inner] - ref0[inner]).max() < 1e-6


def test_integration():
    zero = torch.zeros(1, 3, 6, 8, 8)
    assert torch.equal(integrate(zero, 7), zero)
    v = torch.randn(1, 3, 6, 8, 8)
    assert torch.equal(integrate(v, 0), v)  # 0 steps = plain displacement
    # a constant velocity is a translation: its exponential is the same translation (interior)
    const = torch.zeros(1, 3, 12, 16, 16)
    const[:, 1] = 1.5
    d = integrate(const, 5)
    assert torch.allclose(d[:, :, 3:-3, 3:-3, 3:-3], const[:, :, 3:-3, 3:-3, 3:-3], atol=1e-4)
    # a smooth random field that folds when used as a displacement does not once integrated
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 3, 4, 4, generator=gen) * 3
    rough = torch.nn.functional.interpolate(coarse, size=(12, 16, 16), mode="trilinear")
    ident = identity((12, 16, 16))[None]
    assert (jacobian_det(ident + rough) <= 0).float().mean() > 0.05
    assert (jacobian_det(ident + integrate(rough, 7)) <= 0).float().mean() < 0.01


def test_ncc_optimum_and_flat_regions():
    a = torch.from_numpy(_smooth_image((8, 16, 16), 2))[None, None]
    b = torch.from_numpy(_smooth_image((8, 16, 16), 3))[None, None]
    self_score = ncc_loss(a, a, 5)
    for other in (b, torch.roll(a, 2, dims=3), a + 0.05 * torch.randn_like(a), 1 - a):
        assert self_score <= ncc_loss(a, other, 5) + 1e-6
    assert self_score < -0.5
    flat = torch.full((1, 1, 8, 16, 16), 0.3, requires_grad=True)
    val = ncc_loss(flat, flat, 5)
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(flat.grad).all()
    assert torch.isfinite(ncc_loss(flat, a, 5))
    with pytest.raises(CctrError, match="odd"):
        ncc_loss(a, a, 4)


def test_smoothness_and_dice_losses():
    shift = torch.zeros(1, 3, 6, 8, 8)
    shift[:, 0] = 2.0
    assert float(grad_loss(shift)) == 0.0
    assert float(grad_loss(torch.randn(1, 3, 6, 8, 8))) > 0
    lab = onehot(np.random.default_rng(0).integers(0, 3, (6, 8, 8)), 3)[None]
    assert float(dice_loss(lab, lab)) < 1e-6
    assert float(dice_loss(lab, torch.roll(lab, 1, dims=1))) > 0.5


def test_warped_onehots_stay_on_simplex():
    lab = onehot(np.random.default_rng(1).integers(0, 4, (6, 10, 12)), 4)[None]
    disp = torch.nn.functional.interpolate(torch.randn(1, 3, 2, 3, 3) * 8, size=(6, 10, 12), mode="trilinear")
    warped = warp(lab, disp)  # large displacements: many samples fall outside the volume
    assert warped.min() >= 0
    assert torch.allclose(warped.sum(1), torch.ones(1, 6, 10, 12), atol=1e-5)


def test_net_starts_near_identity_on_odd_shapes():
    net = RegNet((4, 8, 8), int_steps=4, downsize=2)
    x = torch.rand(1, 1, 7, 15, 17)
    disp, vel = net(x, x)
    assert disp.shape == (1, 3, 7, 15, 17)
    assert disp.abs().max() < 1e-2


def test_moments_affine_recovers_translation():
    img = np.zeros((12, 32, 32), np.float32)
    img[4:8, 10:18, 8:20] = 1.0
    moved = np.roll(img, (1, 3, -2), axis=(0, 1, 2))
    a = moments_affine(torch.from_numpy(img)[None], torch.from_numpy(moved)[None])
    assert torch.allclose(a[:3, :3], torch.eye(3), atol=1e-3)
    assert torch.allclose(a[:3, 3], torch.tensor([1.0, 3.0, -2.0]), atol=1e-3)
    # and it aligns the two: sampling the moved image at A(x) gives back the original
    pos = (a[:3, :3] @ identity((12, 32, 32)).reshape(3, -1) + a[:3, 3:]).reshape(1, 3, 12, 32, 32)
    back = sample(torch.from_numpy(moved)[None, None], pos)[0, 0].numpy()
    assert np.abs(back - img).max() < 1e-4


def test_moments_affine_undoes_inplane_rotation_and_scale():
    shape = (8, 48, 48)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")

    def blob(cy, cx, angle, s):
        c, si = np.cos(angle), np.sin(angle)
        u, v = (y - cy) * c + (x - cx) * si, -(y - cy) * si + (x - cx) * c
        return (((z - 3.5) / 2.5) ** 2 + (u / (12 * s)) ** 2 + (v / (5 * s)) ** 2 < 1).astype(np.float32)

    fixed, moving = blob(24, 24, 0.0, 1.0), blob(22, 27, np.deg2rad(35), 1.2)
    a = moments_affine(torch.from_numpy(fixed)[None], torch.from_numpy(moving)[None])
    pos = (a[:3, :3] @ identity(shape).reshape(3, -1) + a[:3, 3:]).reshape(1, 3, *shape)
    aligned = sample(torch.from_numpy(moving)[None, None], pos)[0, 0].numpy() > 0.5

    def dice(p, q):
        return 2 * (p & q).sum() / (p.sum() + q.sum())

    assert dice(aligned, fixed > 0.5) > 0.9 > dice(moving > 0.5, fixed > 0.5) + 0.3


def test_grid_map_fov_gives_one_physical_scale():
    """With fov_mm, grid voxels are the same mm apart in every case and centred on the volume."""
    grid = (4, 16, 16)
    a = grid_map((10, 120, 100), (9.0, 1.5, 1.25), grid, (0.0, 150.0, 150.0))
    b = grid_map((12, 90, 140), (8.0, 2.0, 1.0), grid, (0.0, 150.0, 150.0))
    for m, shape, sp in ((a, (10, 120, 100), (9.0, 1.5, 1.25)), (b, (12, 90, 140), (8.0, 2.0, 1.0))):
        step_mm = m.scale * torch.tensor(sp)
        assert torch.allclose(step_mm[1:], torch.full((2,), 10.0))  # 150 mm / 15 steps
        centre = m.to_native(torch.tensor([1.5, 7.5, 7.5]).view(3, 1, 1, 1)).flatten()
        assert torch.allclose(centre, (torch.tensor(shape, dtype=torch.float32) - 1) / 2)
        # no FOV along z: the grid spans the whole stack, corners aligned
        assert m.to_native(torch.tensor([3.0, 0, 0]).view(3, 1, 1, 1)).flatten()[0] == shape[0] - 1
    pos = identity(grid)[None]
    assert torch.allclose(a.to_grid(a.to_native(pos)), pos, atol=1e-5)


def test_on_grid_matches_map_coordinates():
    vol = _smooth_image((6, 40, 30), seed=3)
    m = grid_map(vol.shape, (5.0, 1.2, 1.6), (5, 12, 12), (0.0, 30.0, 30.0))
    ours = on_grid(torch.from_numpy(vol)[None], m, (5, 12, 12))[0].numpy()
    pos = m.to_native(identity((5, 12, 12))).numpy()
    ref = map_coordinates(vol, pos, order=1, mode="nearest")
    assert np.abs(ours - ref).max() < 1e-4


def test_separable_ncc_window_equals_full_box():
    """The box filter is applied axis by axis: the same loss as one k^3 average."""
    rng = np.random.default_rng(4)
    a, b = (torch.from_numpy(rng.random((1, 1, 7, 12, 13), dtype=np.float32)) for _ in range(2))

    def box(x):
        return torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=True)

    mu_a, mu_b = box(a), box(b)
    va, vb = (box(a * a) - mu_a**2).clamp(min=0), (box(b * b) - mu_b**2).clamp(min=0)
    cross = box(a * b) - mu_a * mu_b
    assert abs(float(ncc_loss(a, b, 5)) + float((cross**2 / (va * vb + 1e-5)).mean())) < 1e-5


def test_warped_onehot_equals_sampled_onehot():
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 4, (5, 9, 11))
    pos = identity((6, 8, 7)) * torch.tensor([0.9, 1.2, 1.7]).view(3, 1, 1, 1) - 0.6  # some outside: clamped
    ref = sample(onehot(lab, 4)[None], pos[None])[0].reshape(4, -1)
    assert torch.allclose(warped_onehot(lab, pos, 4), ref, atol=1e-5)


def _analytic_label(zmm, ymm, xmm):
    """Two nested boxes in mm: class 2 inside class 1 inside background."""
    in1 = (np.abs(zmm - 15) < 12) & (np.abs(ymm - 18) < 14) & (np.abs(xmm - 17) < 14)
    in2 = (np.abs(zmm - 15) < 4) & (np.abs(ymm - 18) < 4) & (np.abs(xmm - 17) < 5)
    return np.where(in2, 2, np.where(in1, 1, 0)).astype(np.uint8)


def _away_from_boundaries(zmm, ymm, xmm, r):
    """True where the analytic label is the same at every corner of a cube of half-side `r` mm."""
    lab = _analytic_label(zmm, ymm, xmm)
    same = np.ones(lab.shape, bool)
    for dz in (-r, r):
        for dy in (-r, r):
            for dx in (-r, r):
                same &= _analytic_label(zmm + dz, ymm + dy, xmm + dx) == lab
    return same


def test_label_transfer_known_translation_other_shapes_and_spacings():
    """Atlas and target of different sizes and spacings, phi a known translation t (mm): the transferred
    label equals the analytically shifted label away from boundaries, and the coordinates equal the
    target's mm position + t everywhere (trilinear interpolation of an affine map is exact)."""
    from cctr.data.case import Case
    from cctr.data.slices import GridField
    from cctr.registration.apply import Atlas, reference_coords, transfer_labels
    from cctr.registration.grid import grid_map

    t = np.array([1.7, -2.3, 2.9])  # target mm -> atlas mm
    a_shape, a_sp = (12, 36, 40), (3.0, 1.2, 1.0)
    v_shape, v_sp = (11, 27, 31), (2.5, 1.5, 1.25)
    grid = (6, 10, 12)
    a_mm = np.meshgrid(*[np.arange(n) * s for n, s in zip(a_shape, a_sp)], indexing="ij")
    atlas_lab = _analytic_label(*a_mm)
    fov = (0.0, 0.0, 0.0)
    amap, vmap = grid_map(a_shape, a_sp, grid, fov), grid_map(v_shape, v_sp, grid, fov)
    # phi: target grid voxel -> its native index -> mm -> + t -> atlas native index -> atlas grid index
    v_native = vmap.to_native(identity(grid))
    a_native = (v_native * torch.tensor(v_sp).view(3, 1, 1, 1) + torch.tensor(t, dtype=torch.float32).view(3, 1, 1, 1)
                ) / torch.tensor(a_sp).view(3, 1, 1, 1)
    phi = amap.to_grid(a_native)
    atlas = Atlas("a", atlas_lab, a_sp, amap, torch.zeros(1, *grid), torch.zeros(3, *grid), torch.zeros(3), torch.ones(3))
    target = Case("v", np.zeros(v_shape, np.float32), None, v_sp)
    y = transfer_labels({"a": phi}, target, {"a": atlas}, 3, fov)
    v_mm = np.meshgrid(*[np.arange(n) * s for n, s in zip(v_shape, v_sp)], indexing="ij")
    shifted = [m + d for m, d in zip(v_mm, t)]
    expect = _analytic_label(*shifted)
    inside_atlas = np.all([(s >= 0) & (s <= (n - 1) * sp) for s, n, sp in zip(shifted, a_shape, a_sp)], axis=0)
    away = _away_from_boundaries(*shifted, max(a_sp)) & inside_atlas
    assert away.mean() > 0.3 and {0, 1, 2} <= set(np.unique(expect[away]))
    assert np.array_equal(y[away], expect[away])
    # coordinates: stored on the grid, read at native voxels, equal the shifted mm positions
    co = GridField(reference_coords(phi, atlas).numpy(), vmap.scale, vmap.offset, v_shape)
    for z in (0, 5, v_shape[0] - 1):
        got = co.slice(z)
        want = np.stack([s[z] for s in shifted])
        assert np.abs(got - want).max() < 1e-3
