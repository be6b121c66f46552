"""VoxelMorph-style registration network (DESIGN §4): a 3D U-Net on the (moving, fixed) pair predicts a
stationary velocity field; scaling-and-squaring integrates it into a diffeomorphic displacement.

Displacements are in voxels of the registration grid, [B,3,Z,H,W] with channels (z, y, x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cctr.registration.grid import apply_affine, identity, sample, scale_between


def warp(vol: torch.Tensor, disp: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """Spatial transformer: `vol` [B,C,Z,H,W] sampled at x + disp(x) (same spatial shape)."""
    grid = identity(tuple(disp.shape[2:]), disp.device, disp.dtype)[None]
    return sample(vol, grid + disp, mode)


def integrate(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """exp(v) by scaling and squaring: v / 2^steps composed with itself `steps` times (0: v itself)."""
    if steps <= 0:
        return velocity
    d = velocity / (2 ** steps)
    for _ in range(steps):
        d = d + warp(d, d)
    return d


def jacobian_det(pos: torch.Tensor) -> torch.Tensor:
    """det of d(pos)/dx for a position field [B,3,Z,H,W] (central differences, grid voxels); [B,Z,H,W]."""
    grads = [torch.gradient(pos, dim=j + 2)[0] for j in range(3)]  # grads[j][:, i] = d pos_i / d x_j
    jac = torch.stack([torch.stack([grads[j][:, i] for j in range(3)], dim=-1) for i in range(3)], dim=-2)
    return torch.linalg.det(jac)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class RegNet(nn.Module):
    """U-Net (strided-conv encoder, upsample+skip decoder) -> velocity -> displacement.

    With `downsize` > 1 the first conv is strided and the velocity is predicted and integrated
    at 1/downsize of the grid, then the displacement is upsampled: full-resolution 3D convs and
    grid samples dominate CPU time, and a smooth field loses nothing by it.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 16, 16), int_steps: int = 7, downsize: int = 2):
        super().__init__()
        self.int_steps, self.downsize = int_steps, downsize
        ch = list(channels)
        self.inc = _block(2, ch[0], downsize)
        self.down = nn.ModuleList(_block(ch[i], ch[i + 1], 2) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(_block(ch[i + 1] + ch[i], ch[i], 1) for i in reversed(range(len(ch) - 1)))
        self.flow = nn.Conv3d(ch[0], 3, 3, padding=1)
        # start at (almost) the identity so early training is a gentle refinement
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        # channels-last 3D makes CPU conv backward several times faster (oneDNN's fast path)
        self.to(memory_format=torch.channels_last_3d)

    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Stationary velocity at 1/downsize of the grid, in voxels of that coarse grid."""
        x = self.inc(torch.cat([moving, fixed], dim=1).contiguous(memory_format=torch.channels_last_3d))
        skips = [x]
        for d in self.down:
            x = d(x)
            skips.append(x)
        skips.pop()
        for u in self.up:
            s = skips.pop()
            x = F.interpolate(x, size=s.shape[2:], mode="trilinear", align_corners=False)
            x = u(torch.cat([x, s], dim=1))
        return self.flow(x)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(displacement in grid voxels, coarse velocity) taking `fixed` voxels to their match in `moving`."""
        v = self.velocity(moving, fixed)
        return self.displacement(v, tuple(fixed.shape[2:])), v

    def displacement(self, v: torch.Tensor, full: tuple[int, ...]) -> torch.Tensor:
        """The displacement on the `full` grid of a coarse velocity: integrated, then upsampled."""
        d = integrate(v, self.int_steps)
        if tuple(d.shape[2:]) != full:
            scale = scale_between(tuple(d.shape[2:]), full).to(d)
            d = F.interpolate(d, size=full, mode="trilinear", align_corners=True) * scale[None, :, None, None, None]
        return d


def register_pair(model: RegNet, moving: torch.Tensor, fixed: torch.Tensor, affine: torch.Tensor | None = None,
                  velocity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampling map phi = A(x + u(x)): fixed-grid voxels -> moving-grid positions, [B,3,Z,H,W].

    The pre-alignment `affine` [B,4,4] (or None) is composed analytically with the deformable
    displacement u the net predicts on the pre-aligned moving image, so warping needs one
    interpolation. A given coarse `velocity` replaces the net's prediction (instance optimisation
    moves it). Returns (phi, u, velocity).
    """
    b = fixed.shape[0]
    ident = identity(tuple(fixed.shape[2:]), fixed.device, fixed.dtype)[None].expand(b, -1, -1, -1, -1)
    if velocity is None:
        aligned = moving if affine is None else sample(moving, apply_affine(affine, ident))
        disp, vel = model(aligned, fixed)
    else:
        disp, vel = model.displacement(velocity, tuple(fixed.shape[2:])), velocity
    pos = ident + disp
    return (pos if affine is None else apply_affine(affine, pos)), disp, vel
