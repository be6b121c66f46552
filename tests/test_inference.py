"""Volume inference (cctr.inference) and NIfTI prediction I/O (cctr.nifti), with tiny fake nets."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from cctr.errors import CctrError
from cctr.inference import predict_volume
from cctr.nifti import predict_nifti, read_nifti_volume


class Threshold(torch.nn.Module):
    """Logits linear in the input: class 1 wins exactly where x > t (+ a dummy parameter for .to())."""

    def __init__(self, t: float = 0.5, out: str = "tensor") -> None:
        super().__init__()
        self.t, self.out = t, out
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor):
        d = (x - self.t) * 50.0 + self.p
        logits = torch.cat([-d, d], dim=1)
        if self.out == "dict":
            return {"logits": logits, "emb": x}
        if self.out == "tuple":
            return logits, x
        return logits


def _planes(z: int, h: int, w: int) -> np.ndarray:
    """Each slice is a linear function of (row, col): bilinear resizing reproduces it exactly."""
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(h), np.arange(w), indexing="ij")
    return (0.03 * xx + 0.02 * yy + 0.05 * zz).astype(np.float32)


@pytest.mark.parametrize("out", ["tensor", "dict", "tuple"])
def test_resize_round_trip_recovers_threshold(out: str) -> None:
    img = _planes(5, 22, 30)
    t = float(np.median(img))
    labels = predict_volume([Threshold(t, out)], img, size=32, batch_size=2)
    assert labels.shape == img.shape and labels.dtype == np.uint8
    # bilinear resampling is exact on linear images except where edge clamping bites: the outer ring
    inner = (slice(None), slice(1, -1), slice(1, -1))
    np.testing.assert_array_equal(labels[inner], (img > t).astype(np.uint8)[inner])
    assert 0.2 < labels.mean() < 0.8


def test_native_size_is_identity() -> None:
    img = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(predict_volume([Threshold()], img, size=16), (img > 0.5).astype(np.uint8))


def test_conv_net_probs_and_batching() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    net.train()
    img = np.random.default_rng(1).random((7, 20, 18)).astype(np.float32)
    probs = predict_volume([net], img, size=24, batch_size=3, return_probs=True)
    assert probs.shape == (3, 7, 20, 18) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    labels = predict_volume([net], img, size=24, batch_size=16)
    np.testing.assert_array_equal(labels, probs.argmax(0))
    assert labels.max() < 3
    assert net.training  # the caller's mode is restored


def test_ensemble_averages_softmax() -> None:
    torch.manual_seed(1)
    nets = [torch.nn.Conv2d(1, 3, 3, padding=1) for _ in range(2)]
    img = np.random.default_rng(2).random((4, 12, 14)).astype(np.float32)
    p = [predict_volume([n], img, size=16, return_probs=True) for n in nets]
    both = predict_volume(nets, img, size=16, return_probs=True)
    np.testing.assert_allclose(both, (p[0] + p[1]) / 2, atol=1e-6)
    np.testing.assert_array_equal(predict_volume(nets, img, size=16), both.argmax(0))
    assert not np.array_equal(p[0].argmax(0), p[1].argmax(0))  # the average is not trivially one net



def test_case_labels_stream_and_match_full_volume_probabilities() -> None:
    """predict_case_labels gives exactly what argmaxing whole-volume probabilities gave (net A, net B,
    mean of both softmaxes), for any slab size, on a memory-mapped-like read-only input."""
    from cctr.inference import predict_case_labels

    torch.manual_seed(3)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 1))
            for _ in range(2)]
    img = np.random.default_rng(4).random((9, 20, 14)).astype(np.float32)
    img.setflags(write=False)
    pa, pb = (predict_volume([n], img, size=16, return_probs=True) for n in nets)
    want = {"a": pa.argmax(0), "b": pb.argmax(0), "ens": ((pa + pb) / 2).argmax(0)}
    assert not np.array_equal(want["a"], want["b"])
    for batch in (16, 4):
        got = predict_case_labels(nets, img, 16, batch_size=batch)
        assert set(got) == {"a", "b", "ens"}
        for k in got:
            assert got[k].dtype == np.uint8
            np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(predict_volume(nets, img, size=16), want["ens"])
    with pytest.raises(CctrError, match="expected the two nets"):
        predict_case_labels(nets[:1], img, 16)


def test_predict_volume_rejects_bad_input() -> None:
    with pytest.raises(CctrError, match="Z,H,W"):
        predict_volume([Threshold()], np.zeros((4, 4), np.float32), size=8)
    with pytest.raises(CctrError, match="no network"):
        predict_volume([], np.zeros((2, 4, 4), np.float32), size=8)


# ----------------------------------------------------------------------------- NIfTI


def _ras_volume() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric image in RAS voxel order (x,y,z) and its affine (anisotropic, translated)."""
    x, y, z = np.meshgrid(np.arange(12), np.arange(10), np.arange(7), indexing="ij")
    data = (np.sin(0.5 * x) + 0.1 * y + 0.2 * z + 0.01 * x * y).astype(np.float32)
    aff = np.diag([1.5, 1.2, 3.0, 1.0])
    aff[:3, 3] = (-10.0, 20.0, 5.0)
    return data, aff


def _save(data: np.ndarray, aff: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(data, aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=2)
    nib.save(img, str(path))
    return path


def _segment(img: np.ndarray, spacing) -> np.ndarray:
    return (img > 0.5).astype(np.uint8) + (img > 1.2).astype(np.uint8)


def _identity(img: np.ndarray) -> np.ndarray:
    return img


def test_nifti_round_trip_ras(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    src = _save(data, aff, tmp_path / "case.nii.gz")
    img, spacing, _, _ = read_nifti_volume(src)
    assert img.shape == (7, 10, 12) and img.dtype == np.float32
    assert spacing == pytest.approx((3.0, 1.2, 1.5))
    np.testing.assert_allclose(img, data.transpose(2, 1, 0))
    out = predict_nifti(_segment, _identity, src, tmp_path / "pred")
    assert out == [tmp_path / "pred" / "case.nii.gz"]
    res = nib.load(str(out[0]))
    lab = np.asarray(res.dataobj)
    assert lab.dtype == np.uint8 and lab.shape == data.shape and set(np.unique(lab)) <= {0, 1, 2}
    np.testing.assert_allclose(res.affine, aff)
    np.testing.assert_array_equal(lab, _segment(data, None))
    assert int(res.header["qform_code"]) == 1 and int(res.header["sform_code"]) == 2


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "S", "L"), ("I", "L", "A")])
def test_nifti_non_canonical_orientation_overlays_input(tmp_path: Path, codes: tuple[str, ...]) -> None:
    data, aff = _ras_volume()
    t = ornt_transform(io_orientation(aff), axcodes2ornt(codes))
    stored = apply_orientation(data, t)
    stored_aff = aff @ inv_ornt_aff(t, data.shape)
    assert nib.aff2axcodes(stored_aff) == codes
    src = _save(np.ascontiguousarray(stored), stored_aff, tmp_path / "odd.nii")
    img, spacing, _, _ = read_nifti_volume(src)
    # the nets see the same canonical image whatever the storage order
    np.testing.assert_allclose(img, data.transpose(2, 1, 0))
    assert spacing == pytest.approx((3.0, 1.2, 1.5))
    out = predict_nifti(_segment, _identity, src, tmp_path / "odd_pred.nii.gz")[0]
    res = nib.load(str(out))
    np.testing.assert_allclose(res.affine, stored_aff)
    np.testing.assert_array_equal(np.asarray(res.dataobj), _segment(stored, None))


def test_nifti_other_training_orientations(tmp_path: Path) -> None:
    """The target orientation is the training one: stored order (None) or any axis codes."""
    data, aff = _ras_volume()
    t = ornt_transform(io_orientation(aff), axcodes2ornt(("P", "S", "L")))
    stored, stored_aff = apply_orientation(data, t), aff @ inv_ornt_aff(t, data.shape)
    src = _save(np.ascontiguousarray(stored), stored_aff, tmp_path / "odd.nii.gz")
    img, spacing, _, _ = read_nifti_volume(src, orientation=None)
    np.testing.assert_allclose(img, stored.transpose(2, 1, 0))
    assert spacing == pytest.approx((1.5, 3.0, 1.2))
    lps, _, _, _ = read_nifti_volume(src, orientation=("L", "P", "S"))
    np.testing.assert_allclose(lps, data[::-1, ::-1, :].transpose(2, 1, 0))
    for orientation in (None, ("L", "P", "S")):
        out = predict_nifti(_segment, _identity, src, tmp_path / "o.nii.gz", orientation=orientation)[0]
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), _segment(stored, None))


def test_nifti_scaled_input_and_4d_single_volume(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    img = nib.Nifti1Image((data * 100).astype(np.int16)[..., None], aff)
    img.header.set_slope_inter(0.01, 0.0)  # stored ints, real values = data (to 0.01)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol, _, _, _ = read_nifti_volume(tmp_path / "s.nii.gz")
    assert vol.shape == (7, 10, 12)
    np.testing.assert_allclose(vol, data.transpose(2, 1, 0), atol=0.011)
    out = predict_nifti(_segment, _identity, tmp_path / "s.nii.gz", tmp_path / "o.nii.gz")[0]
    lab = nib.load(str(out)).get_fdata()
    assert lab.shape == data.shape and set(np.unique(lab)) <= {0.0, 1.0, 2.0}  # labels not rescaled


def test_folder_in_folder_out(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    (tmp_path / "in").mkdir()
    _save(data, aff, tmp_path / "in" / "a.nii.gz")
    _save(data + 1, aff, tmp_path / "in" / "b.nii")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = predict_nifti(_segment, _identity, tmp_path / "in", tmp_path / "out")
    assert [p.name for p in out] == ["a.nii.gz", "b.nii"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii"]
    with pytest.raises(CctrError, match="must be a folder"):
        predict_nifti(_segment, _identity, tmp_path / "in", tmp_path / "x.nii.gz")


def _bad_file(tmp_path: Path, kind: str) -> Path:
    data, aff = _ras_volume()
    if kind == "2d":
        return _save(data[:, :, 0], aff, tmp_path / "bad.nii.gz")
    if kind == "4d":
        return _save(np.stack([data, data], axis=-1), aff, tmp_path / "bad.nii.gz")
    if kind == "text":
        p = tmp_path / "bad.nii.gz"
        p.write_bytes(gzip.compress(b"hello, not an image" * 30))
        return p
    good = _save(data, aff, tmp_path / ("bad.nii.gz" if kind == "truncated_gz" else "bad.nii"))
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) * 2 // 3])
    return good


@pytest.mark.parametrize("kind", ["2d", "4d", "text", "truncated_gz", "truncated_nii"])
def test_bad_nifti_is_one_line_error_and_no_output(tmp_path: Path, kind: str) -> None:
    src = _bad_file(tmp_path, kind)
    with pytest.raises(CctrError) as err:
        predict_nifti(_segment, _identity, src, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(src) in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    src = _save(data, aff, tmp_path / "case.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(CctrError, match="output"):
        predict_nifti(_segment, _identity, src, blocker / "pred.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "file"]


def test_failed_segmenter_leaves_nothing(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    src = _save(data, aff, tmp_path / "case.nii.gz")
    with pytest.raises(CctrError, match="shape"):
        predict_nifti(lambda im, sp: im[:-1].astype(np.uint8), _identity, src, tmp_path / "o.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_output_must_not_overwrite_input(tmp_path: Path) -> None:
    data, aff = _ras_volume()
    src = _save(data, aff, tmp_path / "case.nii.gz")
    with pytest.raises(CctrError, match="overwrite"):
        predict_nifti(_segment, _identity, src, src)


def test_class_argmax_is_torch_argmax_with_first_class_on_ties() -> None:
    from cctr.inference import class_argmax

    p = torch.rand(2, 5, 6, 7)
    p[0, 3] = p[0, 1]  # exact ties: the first class wins, as in torch.argmax
    p[1, :, 0, 0] = 0.2
    got = class_argmax(p)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), p.argmax(1))
    assert int(got[1, 0, 0]) == 0
