"""`cctr data ...` through the real entry point: bad input gives one line, exit 2, no cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

ENTRY = "from cctr.cli import main; main()"


def cctr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CCTR_CACHE": str(tmp_path / "cache"), "CCTR_DATA_ROOT": str(tmp_path / "data"),
           "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def write_nifti(path: Path, xyz: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(xyz, np.diag([1.5, 1.5, 10.0, 1.0])), str(path))


def acdc_raw(root: Path, patients: int = 2) -> None:
    rng = np.random.default_rng(0)
    for p in range(1, patients + 1):
        for f in (1, 10):
            stem = root / "training" / f"patient{p:03d}" / f"patient{p:03d}_frame{f:02d}"
            write_nifti(stem.with_name(stem.name + ".nii.gz"), rng.normal(size=(16, 14, 5)).astype(np.float32))
            write_nifti(stem.with_name(stem.name + "_gt.nii.gz"), rng.integers(0, 4, (16, 14, 5)).astype(np.uint8))


def ssl4mis(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    for n in ("patient001_frame01", "patient002_frame01"):
        with h5py.File(root / "data" / f"{n}.h5", "w") as f:
            f["image"] = np.zeros((3, 8, 8), np.float32)
            f["label"] = np.zeros((3, 8, 8), np.uint8)
    (root / "train.list").write_text("patient001_frame01\npatient002_frame01\n")


def _truncated(root: Path) -> str:
    acdc_raw(root)
    bad = root / "training/patient002/patient002_frame10.nii.gz"
    bad.write_bytes(bad.read_bytes()[:400])
    return "patient002_frame10.nii.gz"


def _h5_without_label(root: Path) -> str:
    ssl4mis(root)
    with h5py.File(root / "data" / "patient002_frame01.h5", "w") as f:
        f["image"] = np.zeros((3, 8, 8), np.float32)
    return "patient002_frame01.h5"


def _label_seven(root: Path) -> str:
    acdc_raw(root)
    lab = np.zeros((16, 14, 5), np.uint8)
    lab[3, 4, 2] = 7
    write_nifti(root / "training/patient002/patient002_frame01_gt.nii.gz", lab)
    return "patient002_frame01_gt.nii.gz"


def _shape_mismatch(root: Path) -> str:
    acdc_raw(root)
    write_nifti(root / "training/patient001/patient001_frame10_gt.nii.gz", np.zeros((16, 14, 6), np.uint8))
    return "patient001_frame10_gt.nii.gz"


def _missing(root: Path) -> str:
    return str(root)


@pytest.mark.parametrize("make", [_missing, _truncated, _h5_without_label, _label_seven, _shape_mismatch])
def test_bad_input_one_line_exit_2_nothing_cached(tmp_path, make):
    src = tmp_path / "src" if make is not _missing else Path("/nonexistent")
    culprit = make(src)
    r = cctr(tmp_path, "data", "prepare", "acdc", "--source", str(src))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert culprit in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))


def test_prepare_then_list_json(tmp_path):
    acdc_raw(tmp_path / "data" / "acdc")
    r = cctr(tmp_path, "data", "prepare", "acdc", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["dataset"] == "acdc" and summary["cases"] == 4
    assert (tmp_path / "cache" / "acdc" / "manifest.json").exists()
    r = cctr(tmp_path, "data", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {d["name"]: d for d in json.loads(r.stdout)["datasets"]}
    assert {"acdc", "synapse", "phantom-cardiac", "phantom-abdomen"} <= set(rows)
    assert rows["acdc"]["found"] and rows["acdc"]["prepared"] and not rows["synapse"]["found"]


def test_stats_phantom_json(tmp_path):
    r = cctr(tmp_path, "data", "stats", "phantom-cardiac", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    s = json.loads(r.stdout)
    assert s["classes"] == 4 and s["cases"] == int(os.environ["CCTR_PHANTOM_CASES"]) and len(s["spacing"]) == 3
    assert s["class_names"] == ["background", "RV", "Myo", "LV"]


def _nifti_folder(root: Path, stray: int | None) -> None:
    """A generic nnU-Net folder without dataset.json: labels 0..2, and optionally one stray voxel."""
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = rng.integers(0, 3, (12, 10, 4)).astype(np.uint8)
        if stray is not None and i == 2:
            lab[5, 5, 2] = stray
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", rng.normal(size=(12, 10, 4)).astype(np.float32))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", lab)


def test_nifti_folder_stray_label_rejected(tmp_path):
    """One stray voxel of 250 must not make a 251-class dataset: one line naming the file, exit 2."""
    _nifti_folder(tmp_path / "src", stray=250)
    r = cctr(tmp_path, "data", "prepare", "mydata", "--source", str(tmp_path / "src"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "c2.nii.gz" in lines[0] and "250" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))


def test_nifti_folder_consecutive_labels_prepared(tmp_path):
    _nifti_folder(tmp_path / "src", stray=None)
    r = cctr(tmp_path, "data", "prepare", "mydata", "--source", str(tmp_path / "src"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cases"] == 3
    r = cctr(tmp_path, "data", "stats", "mydata", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["class_names"] == ["background", "class_1", "class_2"]


def test_list_and_show_human_output(tmp_path):
    """The README's `cctr data list` (a table) and `cctr data show ... -o` (a PNG montage)."""
    r = cctr(tmp_path, "data", "list")
    assert r.returncode == 0, r.stderr
    assert "phantom-abdomen" in r.stdout and "synapse" in r.stdout
    r = cctr(tmp_path, "data", "show", "phantom-cardiac", "--cases", "2", "-o", "ab.png")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "ab.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "ab.png" in r.stdout


def test_piped_output_is_not_wrapped_at_80_columns(monkeypatch):
    """Tables piped to a log (`make demo | tee`) keep their rows on one line; COLUMNS still wins."""
    from cctr.console import _console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert _console(stderr=False).width == 200
    monkeypatch.setenv("COLUMNS", "100")
    assert _console(stderr=False).width == 100


def test_printed_lines_are_not_broken_at_the_width(monkeypatch):
    """A URL or path longer than a narrow terminal stays one line (copyable); tables still fit the width."""
    from rich.table import Table

    from cctr.console import _console

    monkeypatch.setenv("COLUMNS", "40")
    c = _console(stderr=False)
    url = "runs of ui-check: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    with c.capture() as cap:
        c.print(url)
    assert cap.get() == url + "\n"
    t = Table("method", "a long column header")
    t.add_row("cctr", "a long cell text that has to wrap inside its column")
    with c.capture() as cap:
        c.print(t)
    assert max(len(line) for line in cap.get().splitlines()) <= 40
