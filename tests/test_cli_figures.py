"""Figures a user reads without the code at hand: overlays say which colour is which class."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from cctr import report
from cctr.data.case import Case
from cctr.viz import class_colors


def test_overlay_figure_has_class_legend(tmp_path, monkeypatch):
    names = ("background", "RV", "Myo", "LV")
    lab = np.zeros((3, 16, 16), np.uint8)
    lab[1, 4:12, 4:12] = 3
    lab[1, 6:10, 6:10] = 1
    case = Case("c0", np.random.default_rng(0).random((3, 16, 16), dtype=np.float32), lab, (5.0, 1.0, 1.0))
    ds = SimpleNamespace(spec=SimpleNamespace(num_classes=4, class_names=names), case=lambda cid: case)
    seen = {}
    save = report._save

    def spy(fig, path):
        seen["legends"] = [[(t.get_text(), tuple(h.get_facecolor()[:3])) for t, h in
                            zip(lg.get_texts(), lg.legend_handles)] for lg in fig.legends]
        return save(fig, path)

    monkeypatch.setattr(report, "_save", spy)
    out = report.overlay_figure(ds, {"c0": {"a": lab, "b": lab}}, tmp_path / "ov.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    (legend,) = seen["legends"]
    cols = class_colors(4)
    assert [t for t, _ in legend] == ["RV", "Myo", "LV"]  # every foreground class, named
    assert [c for _, c in legend] == [tuple(float(v) for v in cols[i]) for i in (1, 2, 3)]  # in its colour
