"""`cctr evaluate` and `cctr predict` on a real (tiny) checkpoint: the checkpoint alone is enough."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from cctr import tracking
from cctr.evaluate import evaluate
from tests.helpers import cli_inprocess
from tests.helpers import tiny_cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, session_dirs):
    import os

    from cctr.train import train

    os.environ.update(CCTR_CACHE=str(session_dirs["cache"]), CCTR_MLRUNS=str(session_dirs["mlruns"]),
                      CCTR_PHANTOM_CASES="12")
    d = tmp_path_factory.mktemp("ckpt")
    res = train(tiny_cfg(method="sup", iters=6, val_every=3), d, progress=False)
    return d / "best.pt", res


def test_evaluate_checkpoint_and_run_id(checkpoint):
    path, res = checkpoint
    a = evaluate(str(path), "test", "strict")
    assert a["summary"]["dice"] == pytest.approx(res.metrics["test_dice"], abs=1e-9)
    assert a["csv"].exists() and len(a["csv"].read_text().splitlines()) == 1 + 2 * 3  # 2 cases x 3 classes
    b = evaluate(res.run_id, "test", "transunet")  # by MLflow run id
    assert set(a["per_class"]) == set(b["per_class"]) == {"RV", "Myo", "LV"}
    hist = tracking.client().get_run(res.run_id).data.metrics
    assert "eval_test_strict_dice" in hist and "eval_test_transunet_dice" in hist


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_predict_roundtrip_any_orientation(checkpoint, tmp_path, capsys):
    """Output on the input's own grid, same affine; a permuted/flipped copy gives the same labels."""
    path, _ = checkpoint
    rng = np.random.default_rng(0)
    ras = (rng.random((40, 36, 6)) * 400).astype(np.float32)  # x, y, z
    aff = np.diag([1.5, 1.5, 10.0, 1.0])
    _write(tmp_path / "ras.nii.gz", ras, aff)
    # the same scan stored LPS with axes permuted: voxel (a, b, k) = ras[39 - b, 35 - a, k]
    lps = np.transpose(ras[::-1, ::-1, :], (1, 0, 2)).copy()
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [39, 35, 0]
    aff2 = aff @ flip @ perm
    _write(tmp_path / "lps.nii.gz", lps, aff2)
    code, _, err = cli_inprocess(capsys, "predict", str(path), str(tmp_path), "-o", str(tmp_path / "out"))
    assert code == 0, err
    o1 = nib.load(tmp_path / "out" / "ras.nii.gz")
    o2 = nib.load(tmp_path / "out" / "lps.nii.gz")
    assert o1.shape == ras.shape and np.allclose(o1.affine, aff)
    assert o2.shape == lps.shape and np.allclose(o2.affine, aff2)
    l1, l2 = np.asarray(o1.dataobj), np.asarray(o2.dataobj)
    assert l1.dtype == np.uint8 and l1.max() <= 3
    np.testing.assert_array_equal(np.transpose(l1[::-1, ::-1, :], (1, 0, 2)), l2)  # voxel for voxel


def test_predict_and_evaluate_bad_input(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:5000])
    _write(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))
    _write(tmp_path / "four.nii.gz", np.zeros((8, 8, 4, 3), np.float32), np.eye(4))
    _write(tmp_path / "ok.nii.gz", np.zeros((32, 32, 3), np.float32), np.eye(4))
    cases = [
        ("evaluate", str(tmp_path / "junk.pt")),
        ("predict", str(tmp_path / "trunc.pt"), str(tmp_path / "ok.nii.gz"), "-o", str(tmp_path / "o1.nii.gz")),
        ("predict", str(path), str(tmp_path / "flat.nii.gz"), "-o", str(tmp_path / "o2.nii.gz")),
        ("predict", str(path), str(tmp_path / "four.nii.gz"), "-o", str(tmp_path / "o3.nii.gz")),
        ("predict", str(path), str(tmp_path / "ok.nii.gz"), "-o", "/proc/cctr_out.nii.gz"),
    ]
    for args in cases:
        code, _, err = cli_inprocess(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.glob("o[0-9]*")) and not list(tmp_path.glob(".o[0-9]*"))


def test_evaluate_json_cli(checkpoint, capsys):
    path, res = checkpoint
    code, stdout, err = cli_inprocess(capsys, "evaluate", str(path), "--json", "--split", "val")
    assert code == 0, err
    out = json.loads(stdout)
    assert 0 <= out["dice"] <= 1 and out["run_id"] == res.run_id
