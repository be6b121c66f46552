"""Label overlays and case montages: the figures people look at to trust data and predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cctr.atomic import atomic_file
from cctr.data.case import Case
from cctr.errors import CctrError

# fixed, distinguishable colours for classes 1..; class 0 (background) is never coloured
_PALETTE = np.array([
    (0.90, 0.10, 0.10), (0.10, 0.75, 0.20), (0.15, 0.45, 1.00), (1.00, 0.85, 0.10),
    (0.95, 0.35, 0.85), (0.10, 0.85, 0.90), (1.00, 0.55, 0.10), (0.60, 0.30, 0.95),
    (0.55, 0.95, 0.40), (0.95, 0.60, 0.60), (0.50, 0.50, 0.10), (0.20, 0.35, 0.55),
])


def class_colors(num_classes: int) -> np.ndarray:
    """RGB colour per class, row 0 (background) black; the same class always gets the same colour."""
    if num_classes < 1:
        raise CctrError(f"num_classes must be >= 1, got {num_classes}")
    n_fg = num_classes - 1
    cols = [_PALETTE[i] if i < len(_PALETTE) else
            hsv_to_rgb((((i * 0.618034) % 1.0), 0.8, 0.95)) for i in range(n_fg)]
    return np.vstack([np.zeros((1, 3)), *(np.asarray(c)[None] for c in cols)]) if n_fg else np.zeros((1, 3))


def legend_handles(class_names: Sequence[str]) -> list[Patch]:
    """One colour patch per foreground class, named: the key to every overlay's colours."""
    cc = class_colors(len(class_names))
    return [Patch(color=cc[i], label=class_names[i]) for i in range(1, len(class_names))]


def add_class_legend(fig, class_names: Sequence[str], **kw) -> None:
    """The class key just below a figure's panels (`kw` overrides the placement)."""
    handles = legend_handles(class_names)
    opts = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "ncol": min(len(handles), 8), "fontsize": 8,
            "frameon": False}
    fig.legend(handles=handles, **{**opts, **kw})


def _to_unit(image2d: np.ndarray) -> np.ndarray:
    """Display range: images already in [0,1] stay as they are, others get a robust percentile window."""
    img = np.asarray(image2d, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.clip(img, 0.0, 1.0)


def _boundary(label2d: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another class: one-pixel-thin contours of every region."""
    lab = label2d
    b = np.zeros(lab.shape, bool)
    b[1:, :] |= lab[1:, :] != lab[:-1, :]
    b[:-1, :] |= lab[:-1, :] != lab[1:, :]
    b[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    b[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return b & (lab > 0)


def label_overlay(image2d: np.ndarray, label2d: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """RGB float [H,W,3] in [0,1]: the grey image, each foreground class tinted in its fixed colour
    with weight `alpha`, and its contour drawn opaque so thin structures stay visible."""
    image2d = np.asarray(image2d)
    label2d = np.asarray(label2d)
    if image2d.ndim != 2 or image2d.shape != label2d.shape:
        raise CctrError(f"label_overlay: need 2D image and label of equal shape, got {image2d.shape} "
                        f"and {label2d.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise CctrError(f"label_overlay: alpha must be in [0,1], got {alpha}")
    lab = label2d.astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise CctrError(f"label_overlay: label values {lab.min()}..{lab.max()} outside 0..{num_classes - 1}")
    cols = class_colors(num_classes)
    grey = _to_unit(image2d)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    fg = lab > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * cols[lab[fg]]
    edge = _boundary(lab)
    rgb[edge] = cols[lab[edge]]
    return rgb.astype(np.float32)


def _pick_slices(case: Case, n: int) -> list[int]:
    """n evenly spaced slices over the labelled extent (the whole stack when unlabelled)."""
    nz = case.image.shape[0]
    zs = np.arange(nz)
    if case.label is not None:
        fg = np.flatnonzero(case.label.reshape(nz, -1).any(1))
        if len(fg):
            zs = np.arange(fg[0], fg[-1] + 1)
    idx = np.linspace(0, len(zs) - 1, min(n, len(zs))).round().astype(int)
    return [int(zs[i]) for i in idx]


def case_montage(cases: Sequence[Case], num_classes: int, path: Path, title: str = "",
                 class_names: Sequence[str] | None = None, n_slices: int = 5) -> None:
    """PNG grid, one row per case, `n_slices` evenly spaced slices with the label overlaid.

    Pixels are drawn with their physical aspect (y/x spacing); the PNG appears only once complete.
    """
    cases = list(cases)
    if not cases:
        raise CctrError("case_montage: no cases to draw")
    if n_slices < 1:
        raise CctrError(f"case_montage: n_slices must be >= 1, got {n_slices}")
    if class_names is not None and len(class_names) != num_classes:
        raise CctrError(f"case_montage: {len(class_names)} class names for {num_classes} classes")
    cols = n_slices
    fig = Figure(figsize=(2.0 * cols, 2.0 * len(cases) + (0.7 if class_names else 0.2) + (0.3 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cases), cols, squeeze=False)
    for r, case in enumerate(cases):
        aspect = case.spacing[1] / case.spacing[2]
        zs = _pick_slices(case, n_slices)
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(zs):
                continue
            z = zs[c]
            if case.label is None:
                ax.imshow(_to_unit(case.image[z]), cmap="gray", vmin=0, vmax=1, aspect=aspect,
                          interpolation="nearest")
            else:
                ax.imshow(label_overlay(case.image[z], case.label[z], num_classes), aspect=aspect,
                          interpolation="nearest")
            ax.set_title(f"{case.case_id} z={z}" if c == 0 else f"z={z}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    if class_names:
        add_class_legend(fig, class_names, loc="lower center", bbox_to_anchor=None, fontsize=7)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight() if class_names else 0, 1, 1))
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
