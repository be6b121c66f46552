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
        """Local mean, zero padding outside the volume; separable: 3k instead of k^3 operations per
        voxel for the same numbers (a 19^3 window took seconds per volume)."""
        for ax in range(3):
            if k[ax] > 1:
                size = tuple(k[ax] if i == ax else 1 for i in range(3))
                x = F.avg_pool3d(x, size, stride=1, padding=tuple(v // 2 for v in size), count_include_pad=True)
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
