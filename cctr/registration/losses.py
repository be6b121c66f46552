"""Registration losses: local NCC, MSE, gradient smoothness and an optional soft Dice on labeled pairs.

All take [B,C,Z,H,W] tensors and return a scalar to *minimise*; they run on whatever device the
inputs live on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cctr.errors import CctrError


def ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """-mean local squared normalised cross-correlation over `window`^3 boxes.

    `eps` in the denominator keeps flat (zero-variance) regions finite: they score 0, an image
    against itself scores the minimum possible for that image.
    """
    w = int(window)
    if w < 1 or w % 2 == 0:
        raise CctrError(f"registration.ncc_window must be odd and >= 1, got {window}")

    # windows larger than a (tiny) volume shrink to its largest odd size along that axis
    k = tuple(min(w, n - 1 + n % 2) for n in a.shape[2:])

    def box(x: torch.Tensor) -> torch.Tensor:
        """Local mean, zero padding outside the volume; separable, and each axis a difference of running
        sums: a few operations per voxel whatever the window (a 19^3 window took seconds per volume, and
        CPU avg_pool3d was half of an instance-optimisation step)."""
        for ax in range(3):
            kk = k[ax]
            if kk > 1:
                dim, n = ax + 2, x.shape[ax + 2]
                pad = [0, 0] * 3
                pad[2 * (2 - ax)], pad[2 * (2 - ax) + 1] = kk // 2 + 1, kk // 2  # F.pad lists the last axis first
                cs = torch.cumsum(F.pad(x, pad), dim)
                x = (cs.narrow(dim, kk, n) - cs.narrow(dim, 0, n)) / kk
        return x

    mu_a, mu_b = box(a), box(b)
    var_a = (box(a * a) - mu_a * mu_a).clamp(min=0)
    var_b = (box(b * b) - mu_b * mu_b).clamp(min=0)
    cross = box(a * b) - mu_a * mu_b
    return -(cross * cross / (var_a * var_b + eps)).mean()


def mse_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def grad_loss(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement along each axis (diffusion regulariser)."""
    dz = disp[:, :, 1:] - disp[:, :, :-1]
    dy = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dx = disp[..., 1:] - disp[..., :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def dice_loss(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over foreground channels (channel 0 = background is left out)."""
    dims = (0, 2, 3, 4)
    p, q = p[:, 1:], q[:, 1:]
    inter = (p * q).sum(dims)
    return 1.0 - ((2 * inter + eps) / (p.sum(dims) + q.sum(dims) + eps)).mean()


def similarity(kind: str, a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """The configured image similarity (`registration.similarity`)."""
    return ncc_loss(a, b, window) if kind == "ncc" else mse_loss(a, b)
