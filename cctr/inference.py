"""Volume inference with the 2D nets: slice-wise, at the training size, back to the native grid.

Each slice is resized (bilinear) to `size` x `size`, the nets' logits are resized back (bilinear)
to the native in-plane size, and only then turned into probabilities and labels: resampling
logits rather than labels keeps thin structures and smooth boundaries (nearest-neighbour
resizing of an argmax map makes staircases at every upsampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cctr.errors import CctrError
from cctr.losses import hard_labels

NATIVE_SLICES = 4  # slices whose native-size probabilities are held at once


def _logits(out: object) -> torch.Tensor:
    """Nets may return logits, a dict with "logits" (e.g. with embeddings), or a tuple led by logits."""
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out  # type: ignore[return-value]


def _net_logits(net: torch.nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """One net's logits [B,C,size,size] for a [B,1,size,size] batch, shape-checked."""
    lg = _logits(net(x)).float()
    if lg.ndim != 4 or lg.shape[0] != x.shape[0] or tuple(lg.shape[-2:]) != (size, size):
        raise CctrError(f"predict_volume: net output shape {tuple(lg.shape)}, expected [B,C,{size},{size}]")
    return lg


def _native_probs(lg: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Softmax of logits resized (bilinear) to the native in-plane size `hw` first."""
    if tuple(hw) != tuple(lg.shape[-2:]):
        lg = F.interpolate(lg, size=hw, mode="bilinear", align_corners=False)
    return torch.softmax(lg, dim=1)


def class_argmax(prob: torch.Tensor) -> torch.Tensor:
    """uint8 class per pixel of [B,C,H,W] (`losses.hard_labels`: first class on ties, as `torch.argmax`,
    whose walk over the strided class axis was 3x slower than everything else after the nets at 512 x 512)."""
    return hard_labels(prob).to(torch.uint8)


def _default_device(nets: Sequence[torch.nn.Module]) -> torch.device:
    for p in nets[0].parameters():
        return p.device
    return torch.device("cpu")


def _slabs(
    nets: Sequence[torch.nn.Module], image: np.ndarray, size: int, batch_size: int, device: torch.device | str | None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(first slice, each net's native-size softmax [b,C,H,W]) for consecutive slabs of slices.

    The nets see `batch_size` slices at a time (the batch size fixes their numerics); probabilities
    exist for a few slices at a time only. Each net's train/eval mode is restored afterwards,
    so this is safe mid-training (validation).
    """
    if not nets:
        raise CctrError("predict_volume: no network given")
    img = np.asarray(image)
    if img.ndim != 3 or min(img.shape) == 0:
        raise CctrError(f"predict_volume: expected a non-empty [Z,H,W] image, got shape {img.shape}")
    if size < 1 or batch_size < 1:
        raise CctrError(f"predict_volume: size and batch_size must be >= 1, got {size}, {batch_size}")
    dev = torch.device(device) if device is not None else _default_device(nets)
    modes = [n.training for n in nets]
    z, h, w = img.shape
    try:
        for n in nets:
            n.to(dev).eval()
        with torch.inference_mode():
            for s in range(0, z, batch_size):
                slab = np.asarray(img[s : s + batch_size], dtype=np.float32)  # memory-mapped input: read here
                x = torch.tensor(slab, device=dev).unsqueeze(1)  # [B,1,H,W], a copy
                if (h, w) != (size, size):
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                logits = [_net_logits(n, x, size) for n in nets]
                if any(lg.shape != logits[0].shape for lg in logits):
                    raise CctrError(
                        f"predict_volume: ensemble nets disagree on classes: {[lg.shape[1] for lg in logits]}"
                    )
                # native-size probabilities a few slices at a time: per-slice ops, the same numbers
                # as the whole batch at once, and 4x less memory at 512 x 512
                for j in range(0, x.shape[0], NATIVE_SLICES):
                    yield s + j, [_native_probs(lg[j : j + NATIVE_SLICES], (h, w)) for lg in logits]
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)


def predict_volume(
    nets: Sequence[torch.nn.Module],
    image: np.ndarray,
    size: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    return_probs: bool = False,
) -> np.ndarray:
    """Labels uint8 [Z,H,W] of a normalised float image [Z,H,W]; with `return_probs`, probs [C,Z,H,W].

    Several nets form an ensemble: their softmax probabilities (at native size) are averaged.
    `device=None` runs where the first net's parameters live; a given device moves the nets there.
    Labels are computed slab by slab; `return_probs` holds the whole volume's probabilities (small
    volumes and tests only: 1.1 GB for a 512 x 512 x 120 CT at 9 classes).
    """
    z, h, w = np.shape(image)[:3] if np.ndim(image) == 3 else (0, 0, 0)
    labels = np.empty((z, h, w), dtype=np.uint8)
    probs_out: np.ndarray | None = None
    for s, probs in _slabs(nets, image, size, batch_size, device):
        prob = probs[0]
        for p in probs[1:]:
            prob += p
        prob /= len(nets)
        labels[s : s + prob.shape[0]] = class_argmax(prob).cpu().numpy()
        if return_probs:
            if probs_out is None:
                probs_out = np.empty((prob.shape[1], z, h, w), dtype=np.float32)
            probs_out[:, s : s + prob.shape[0]] = prob.permute(1, 0, 2, 3).cpu().numpy()
    return probs_out if return_probs else labels  # type: ignore[return-value]


def predict_case_labels(
    nets: Sequence[torch.nn.Module], image: np.ndarray, size: int, device: torch.device | str | None = None,
    batch_size: int = 16, keys: Sequence[str] = ("a", "b", "ens"),
) -> dict[str, np.ndarray]:
    """uint8 [Z,H,W] labels of net A alone ("a"), net B alone ("b") and their ensemble ("ens": mean of
    both softmaxes), at native resolution, from one pass of each net over slabs of `batch_size` slices.

    The same labels as argmaxing each net's `predict_volume(..., return_probs=True)`, without ever
    holding C x Z x H x W probabilities. Only the labels named in `keys` are computed, and net B is
    never run (nor needed: `nets` may be [A]) when only "a" is asked for.
    """
    if not set(keys) <= {"a", "b", "ens"}:
        raise CctrError(f"predict_case_labels: keys must be among a, b, ens, got {list(keys)}")
    need_b = bool(set(keys) & {"b", "ens"})
    if len(nets) != 2 and (need_b or len(nets) != 1):
        raise CctrError(f"predict_case_labels: expected the two nets (A, B), got {len(nets)}")
    z, h, w = np.shape(image)[:3] if np.ndim(image) == 3 else (0, 0, 0)
    out = {k: np.empty((z, h, w), dtype=np.uint8) for k in keys}
    for s, probs in _slabs(list(nets) if need_b else list(nets)[:1], image, size, batch_size, device):
        pa, pb = probs[0], probs[-1]
        e = s + pa.shape[0]
        for k, prob in out.items():
            prob_k = pa if k == "a" else pb if k == "b" else (pa + pb) / 2
            prob[s:e] = class_argmax(prob_k).cpu().numpy()
    return out
