"""Tables and figures from finished runs: qualitative overlays, pseudo-label curves, Table 1."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cctr.atomic import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def overlay_figure(ds, preds: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """One row per case (its middle labelled slice): image, ground truth, net A, net B (where `preds`
    has it: a one-net method has none); below, a legend naming each class's colour."""
    from cctr.viz import add_class_legend, label_overlay

    C = ds.spec.num_classes
    ids = list(preds)
    nets = [k for k in ("a", "b") if k in preds[ids[0]]]
    fig, axes = plt.subplots(len(ids), 2 + len(nets), figsize=(2.5 * (2 + len(nets)), 2.6 * len(ids)), squeeze=False)
    for r, cid in enumerate(ids):
        case = ds.case(cid)
        fg = np.flatnonzero(case.label.reshape(case.label.shape[0], -1).any(1))
        z = int(fg[len(fg) // 2]) if len(fg) else case.image.shape[0] // 2
        img = case.image[z]
        panels = [("image", None), ("ground truth", case.label[z])] + \
            [(f"net {k.upper()}", preds[cid][k][z]) for k in nets]
        for c, (title, lab) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img if lab is None else label_overlay(img, lab, C), cmap="gray",
                      aspect=case.spacing[1] / case.spacing[2])
            ax.set_title(f"{cid} {title}" if c == 0 else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()  # the legend goes just below the last row, not below a default margin
    add_class_legend(fig, ds.spec.class_names)
    return _save(fig, path)


def pseudo_label_figure(history: list[dict], path: Path) -> Path:
    """The paper's Figure 4: pseudo-label Dice of net A, net B and registration over training."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    its = [h["iteration"] for h in history]
    for key, label in (("pl_dice_a", "net A pseudo-labels"), ("pl_dice_b", "net B pseudo-labels"),
                       ("pl_dice_reg", "registration labels"), ("val_dice", "val Dice (ensemble)")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot(its, [np.nan if v is None else v for v in vals], marker="o", ms=3, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def table1_figure(rows: list[dict], methods: list[str], labeled: list[int], path: Path) -> Path:
    """Grouped bars: test Dice per method, one group per labeled count, std as error bars. Each method
    has its own colour (tab20: Table 1 has more rows than tab10's ten) and the legend sits right of the
    axes, where it hides no bar."""
    fig, ax = plt.subplots(figsize=(2.8 + 1.4 * len(labeled) * max(1, len(methods)) / 4, 3.6))
    width = 0.8 / max(1, len(methods))
    colours = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        means, stds = [], []
        for lab in labeled:
            r = next((r for r in rows if r["method"] == m and r["labeled"] == lab), None)
            means.append(np.nan if r is None else r["test_dice_mean"])
            stds.append(0.0 if r is None or r["test_dice_std"] != r["test_dice_std"] else r["test_dice_std"])
        ax.bar(np.arange(len(labeled)) + i * width, means, width, yerr=stds, label=m, capsize=2,
               color=colours[i % len(colours)])
    ax.set_xticks(np.arange(len(labeled)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([f"{lab} labeled" for lab in labeled])
    ax.set_ylabel("test mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
