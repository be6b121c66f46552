"""The registration grid: resampling volumes to it and back, and the moments pre-alignment.

Positions are voxel indices (z, y, x) of the volume they refer to. Grid and native indices are
related per axis by `native = scale * grid + offset` (`GridMap`): along an axis with no field of
view the grid spans the whole volume (align-corners: first and last voxel centres coincide, nothing
shifted by half a voxel); with `fov_mm` it spans that many millimetres centred on the volume, so
every case has the same physical scale on the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cctr.data.case import Case
from cctr.errors import CctrError

Shape3 = tuple[int, int, int]


class GridMap(NamedTuple):
    """native voxel index = scale * grid voxel index + offset, per axis (z, y, x)."""

    scale: torch.Tensor  # [3]
    offset: torch.Tensor  # [3]

    def to_native(self, pos: torch.Tensor) -> torch.Tensor:
        """Grid positions [3,Z,H,W] or [B,3,Z,H,W] -> native positions."""
        return pos * self.scale.to(pos).view(3, 1, 1, 1) + self.offset.to(pos).view(3, 1, 1, 1)

    def to_grid(self, pos: torch.Tensor) -> torch.Tensor:
        """Native positions [3,Z,H,W] or [B,3,Z,H,W] -> grid positions."""
        return (pos - self.offset.to(pos).view(3, 1, 1, 1)) / self.scale.to(pos).view(3, 1, 1, 1)


def grid_map(shape: tuple[int, ...], spacing: tuple[float, ...], grid: Shape3, fov_mm: tuple[float, ...]
             ) -> GridMap:
    """The map between a volume of `shape`/`spacing` and the registration grid (module docstring)."""
    scale, offset = [], []
    for n, sp, g, fov in zip(shape, spacing, grid, fov_mm):
        if fov > 0:
            s = fov / max(g - 1, 1) / sp
            scale.append(s)
            offset.append((n - 1) / 2 - s * (g - 1) / 2)
        else:
            scale.append((n - 1) / max(g - 1, 1))
            offset.append(0.0)
    return GridMap(torch.tensor(scale, dtype=torch.float32), torch.tensor(offset, dtype=torch.float32))


def case_map(case: Case, grid: Shape3, fov_mm: tuple[float, ...]) -> GridMap:
    return grid_map(tuple(case.shape), tuple(case.spacing), grid, fov_mm)


def on_grid(vol: torch.Tensor, m: GridMap, grid: Shape3) -> torch.Tensor:
    """[C,Z,H,W] native volume sampled (linearly) at every grid voxel, [C,*grid]."""
    return sample(vol[None].float(), m.to_native(identity(grid))[None])[0]


def grid_label(case: Case, num_classes: int, grid: Shape3, fov_mm: tuple[float, ...]) -> torch.Tensor:
    """The case's one-hot label on the registration grid (linear: soft at boundaries), [C,*grid]."""
    pos = case_map(case, grid, fov_mm).to_native(identity(grid))
    return warped_onehot(np.asarray(case.label), pos, num_classes).reshape(num_classes, *grid)


def warped_onehot(label: np.ndarray, pos: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Linearly interpolated one-hot of a label volume at voxel positions `pos` [3,...], [C,N].

    The same numbers as `sample` of a float one-hot (border-clamped trilinear), computed from the
    8 neighbouring labels of each point: no float one-hot of the whole volume per class, which for a
    512 x 512 x 120 CT would be 126 MB each.
    """
    labs, frac = neighbours(label, pos)
    return torch.zeros(num_classes, labs.shape[1]).scatter_add_(0, labs.long(), corner_weights(frac))


def neighbours(label: np.ndarray, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 neighbouring labels (uint8 [8,N]) of positions `pos` [3,...] in `label`, and the
    fractional offsets [3,N] that give their trilinear weights (`corner_weights`); border-clamped
    like `sample`. Weights are separate because most points need none: all 8 labels agree."""
    shape = label.shape
    flat = np.ascontiguousarray(label, dtype=np.uint8).reshape(-1)
    p = pos.reshape(3, -1).numpy()
    base = np.zeros(p.shape[1], np.intp)
    fr, steps = [], []
    stride = (shape[1] * shape[2], shape[2], 1)
    for ax in range(3):
        q = np.clip(p[ax], 0, shape[ax] - 1)
        i0 = np.minimum(np.floor(q), max(shape[ax] - 2, 0))
        fr.append(q - i0)
        i0 = i0.astype(np.intp)
        base += i0 * stride[ax]
        steps.append((i0 + 1 < shape[ax]).astype(np.intp) * stride[ax])  # 0 on a one-voxel axis
    labs = np.empty((8, base.size), np.uint8)
    k = 0
    for dz in (0, 1):
        bz = base + steps[0] if dz else base
        for dy in (0, 1):
            bzy = bz + steps[1] if dy else bz
            flat.take(bzy, out=labs[k])
            flat.take(bzy + steps[2], out=labs[k + 1])
            k += 2
    return torch.from_numpy(labs), torch.from_numpy(np.stack(fr))


def corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights [8,N] of the corners `neighbours` lists, from its offsets [3,N]."""
    fz, fy, fx = frac
    out = []
    for wz in (1 - fz, fz):
        for wy in (1 - fy, fy):
            wzy = wz * wy
            out += [wzy * (1 - fx), wzy * fx]
    return torch.stack(out)


def check_grid(grid: Shape3) -> Shape3:
    g = tuple(int(v) for v in grid)
    if len(g) != 3 or min(g) < 2:
        raise CctrError(f"registration.grid must be three sizes >= 2 (Z,H,W), got {grid}")
    return g  # type: ignore[return-value]


def identity(shape: Shape3, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[3, Z, H, W] voxel positions of every voxel (the identity map)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def sample(vol: torch.Tensor, pos: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """Sample `vol` [B,C,Z,H,W] at voxel positions `pos` [B,3,...] (linear or nearest; border-clamped).

    Border clamping keeps warped one-hots on the probability simplex outside the field of view.
    """
    if mode not in ("linear", "nearest"):
        raise CctrError(f"interpolation mode must be 'linear' or 'nearest', got '{mode}'")
    sizes = vol.shape[2:]
    norm = [2.0 * pos[:, i] / max(sizes[i] - 1, 1) - 1.0 for i in range(3)]
    g = torch.stack(norm[::-1], dim=-1)  # grid_sample wants (x, y, z) last
    return F.grid_sample(vol, g.to(vol.dtype), mode="bilinear" if mode == "linear" else "nearest",
                         padding_mode="border", align_corners=True)


def scale_between(src: Shape3 | tuple[int, ...], dst: Shape3 | tuple[int, ...]) -> torch.Tensor:
    """Per-axis factor turning voxel indices of a `src`-shaped volume into those of `dst`."""
    return torch.tensor([(d - 1) / max(s - 1, 1) for s, d in zip(src, dst)], dtype=torch.float32)


def grid_image(case: Case, grid: Shape3, source: str, fov_mm: tuple[float, ...]) -> torch.Tensor:
    """Image on the registration grid, [1,Z,H,W], robustly scaled to [0,1]; NaN is a user error."""
    img = np.asarray(case.image, dtype=np.float32)
    if img.ndim != 3:
        raise CctrError(f"{source}: expected a 3D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise CctrError(f"{source}: image contains NaN or inf values")
    g = on_grid(torch.from_numpy(img)[None], case_map(case, grid, fov_mm), grid)
    lo, hi = torch.quantile(g.flatten(), torch.tensor([0.005, 0.995])).tolist()
    if hi <= lo:
        return torch.zeros_like(g)
    return ((g - lo) / (hi - lo)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- moments pre-alignment


def moments(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass and covariance (grid voxels) of the foreground: intensity above the volume mean.

    Thresholding at the mean drops the dark background so the moments describe the anatomy,
    not the field of view.
    """
    x = img.reshape(img.shape[-3:]).double()
    w = (x - x.mean()).clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(x)
    pos = identity(tuple(x.shape), dtype=torch.float64).reshape(3, -1)
    w = w.reshape(-1) / w.sum()
    c = (pos * w).sum(1)
    d = pos - c[:, None]
    cov = (d * w) @ d.T
    return c.float(), cov.float()


def _inplane(cov_f: torch.Tensor, cov_m: torch.Tensor, max_scale: float) -> torch.Tensor:
    """2x2 map taking the fixed in-plane principal axes and spreads onto the moving ones.

    Of the two proper rotations that align the axes, the smaller one is taken; nearly round
    shapes (axes ill-defined) get an isotropic scale only.
    """
    lf, ef = torch.linalg.eigh(cov_f.double())
    lm, em = torch.linalg.eigh(cov_m.double())
    lf, lm = lf.clamp(min=1e-6), lm.clamp(min=1e-6)
    iso = float(torch.sqrt(torch.sqrt(lm.prod() / lf.prod()))) if float(lf.prod()) > 0 else 1.0
    iso = float(np.clip(iso, 1 / max_scale, max_scale))
    if lf[1] / lf[0] < 1.3 or lm[1] / lm[0] < 1.3:
        return torch.eye(2, dtype=torch.float32) * iso
    best, best_angle = None, None
    for s0 in (1.0, -1.0):
        for s1 in (1.0, -1.0):
            e = em * torch.tensor([s0, s1], dtype=torch.float64)
            r = e @ ef.T
            if torch.det(r) < 0:
                continue
            angle = abs(float(torch.atan2(r[1, 0], r[0, 0])))
            if best_angle is None or angle < best_angle:
                best, best_angle = e, angle
    scales = torch.sqrt(lm / lf).clamp(1 / max_scale, max_scale)
    return (best @ torch.diag(scales) @ ef.T).float()


def moments_affine(fixed: torch.Tensor, moving: torch.Tensor, max_scale: float = 1.6) -> torch.Tensor:
    """4x4 map of fixed-grid voxel positions to moving-grid ones aligning foreground moments.

    Centre of mass in 3D, slice-axis spread by a scale, in-plane principal axes by rotation and
    scale: cheap, deterministic, and it brings hearts of different position/size/orientation
    within reach of the deformable net.
    """
    cf, sf = moments(fixed)
    cm, sm = moments(moving)
    a = torch.eye(4)
    sz = float(torch.sqrt(sm[0, 0].clamp(min=1e-6) / sf[0, 0].clamp(min=1e-6)))
    a[0, 0] = float(np.clip(sz, 1 / max_scale, max_scale))
    a[1:3, 1:3] = _inplane(sf[1:, 1:], sm[1:, 1:], max_scale)
    a[:3, 3] = cm - a[:3, :3] @ cf
    return a


def apply_affine(a: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Affine [4,4] (or [B,4,4]) applied to positions [B,3,...]."""
    b = pos.shape[0]
    a = a.expand(b, 4, 4) if a.dim() == 2 else a
    flat = pos.reshape(b, 3, -1)
    out = a[:, :3, :3].to(pos) @ flat + a[:, :3, 3:].to(pos)
    return out.reshape(pos.shape)


def pair_affine(mode: str, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor | None:
    """The configured pre-alignment (`registration.affine`) of one pair, or None for 'none'."""
    if mode == "none":
        return None
    if mode == "moments":
        return moments_affine(fixed, moving)
    raise CctrError(f"registration.affine must be 'moments' or 'none', got '{mode}'")
