"""Readers for the distributed formats, on tiny fakes written in each exact layout."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from cctr.data import readers
from cctr.data.case import normalize_mri
from cctr.data.datasets import SPECS, get_spec, open_cache
from cctr.data.prepare import dataset_stats, prepare
from cctr.errors import CctrError

ZOOMS = (1.4, 1.6, 8.0)  # x, y, z in the NIfTI header -> spacing (8.0, 1.6, 1.4)


def write_nifti(path: Path, xyz: np.ndarray, zooms=ZOOMS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(xyz, np.diag([*zooms, 1.0])), str(path))


def xyz_volume(rng: np.random.Generator, shape=(10, 12, 4), top: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """An image/label pair stored (x,y,z) like a NIfTI file; label values 0..top-1."""
    img = rng.normal(100.0, 30.0, shape).astype(np.float32)
    lab = rng.integers(0, top, shape).astype(np.uint8)
    return img, lab


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("CCTR_DATA_ROOT", str(tmp_path / "data"))
    yield tmp_path
    for name in [n for n in SPECS if n.startswith("mynii")]:
        del SPECS[name]


def make_acdc_raw(root: Path, patients=(1, 2, 3), frames=(1, 12), folder="training") -> dict:
    rng = np.random.default_rng(0)
    written = {}
    for p in patients:
        pdir = root / folder / f"patient{p:03d}"
        for f in frames:
            cid = f"patient{p:03d}_frame{f:02d}"
            img, lab = xyz_volume(rng)
            write_nifti(pdir / f"{cid}.nii.gz", img)
            write_nifti(pdir / f"{cid}_gt.nii.gz", lab)
            written[cid] = (img, lab)
        write_nifti(pdir / f"patient{p:03d}_4d.nii.gz", rng.normal(size=(10, 12, 4, 3)).astype(np.float32))
        (pdir / "Info.cfg").write_text(f"ED: {frames[0]}\nES: {frames[1]}\n")
    return written


def test_acdc_raw_orientation_spacing_and_normalisation(tmp_path):
    written = make_acdc_raw(tmp_path)
    r = readers.ACDC_RAW
    assert r.detect(tmp_path) and not readers.ACDC_SSL4MIS.detect(tmp_path)
    cases = {c.case_id: c for c in r.cases(tmp_path)}
    assert sorted(cases) == sorted(written)  # the 4D cine file is not a case
    for cid, (img, lab) in written.items():
        c = cases[cid]
        assert c.image.shape == (4, 12, 10) and c.image.dtype == np.float32
        np.testing.assert_array_equal(c.label, lab.transpose(2, 1, 0))  # (x,y,z) -> [Z,H,W]
        assert c.spacing == pytest.approx((8.0, 1.6, 1.4))
        np.testing.assert_allclose(np.diag(c.affine)[:3], ZOOMS, rtol=1e-6)
        assert c.image.min() == 0.0 and c.image.max() == 1.0
        np.testing.assert_allclose(c.image, normalize_mri(img.transpose(2, 1, 0)), atol=1e-6)
    assert r.split(tmp_path) is None


def test_acdc_raw_testing_folder_becomes_test_list(tmp_path):
    make_acdc_raw(tmp_path, patients=(1, 2))
    make_acdc_raw(tmp_path, patients=(101,), folder="testing")
    split = readers.ACDC_RAW.split(tmp_path)
    assert split == {"train": ["patient001_frame01", "patient001_frame12", "patient002_frame01",
                               "patient002_frame12"], "test": ["patient101_frame01", "patient101_frame12"]}
    assert len(list(readers.ACDC_RAW.cases(tmp_path))) == 6


def test_acdc_raw_missing_gt_names_file(tmp_path):
    make_acdc_raw(tmp_path, patients=(1,))
    gt = tmp_path / "training/patient001/patient001_frame12_gt.nii.gz"
    gt.unlink()
    with pytest.raises(CctrError, match="patient001_frame12_gt.nii.gz: missing ground truth"):
        list(readers.ACDC_RAW.cases(tmp_path))


def make_ssl4mis(root: Path, names=("patient001_frame01", "patient002_frame01", "patient003_frame02")) -> None:
    rng = np.random.default_rng(1)
    (root / "data" / "slices").mkdir(parents=True)
    for n in names:
        with h5py.File(root / "data" / f"{n}.h5", "w") as f:
            f["image"] = rng.random((3, 8, 9)).astype(np.float32)
            f["label"] = rng.integers(0, 4, (3, 8, 9)).astype(np.uint8)
        with h5py.File(root / "data" / "slices" / f"{n}_slice_0.h5", "w") as f:
            f["image"] = np.zeros((8, 9), np.float32)
            f["label"] = np.zeros((8, 9), np.uint8)
    (root / "train.list").write_text(f"{names[0]}\n")
    (root / "val.list").write_text(f"{names[1]}.h5\n")
    (root / "test.list").write_text(f"{names[2]}\n\n")
    (root / "train_slices.list").write_text(f"{names[0]}_slice_0\n")


def test_ssl4mis_h5_kept_as_scaled_with_lists(tmp_path):
    make_ssl4mis(tmp_path)
    r = readers.ACDC_SSL4MIS
    assert r.detect(tmp_path) and not readers.ACDC_RAW.detect(tmp_path)
    cases = list(r.cases(tmp_path))
    assert [c.case_id for c in cases] == ["patient001_frame01", "patient002_frame01", "patient003_frame02"]
    with h5py.File(tmp_path / "data" / "patient002_frame01.h5") as f:
        np.testing.assert_array_equal(cases[1].image, f["image"][()])  # already scaled: untouched
        np.testing.assert_array_equal(cases[1].label, f["label"][()])
    assert cases[0].spacing == readers.DEFAULT_SPACING_ACDC and cases[0].affine is None
    assert r.split(tmp_path) == {"train": ["patient001_frame01"], "val": ["patient002_frame01"],
                                 "test": ["patient003_frame02"]}
    (tmp_path / "train.list").unlink()  # volume names then come from the slice list
    assert r.split(tmp_path)["train"] == ["patient001_frame01"]


def test_ssl4mis_list_naming_a_missing_volume(tmp_path):
    make_ssl4mis(tmp_path)
    (tmp_path / "test.list").write_text("patient099_frame01\n")
    with pytest.raises(CctrError, match=r"test\.list: names patient099_frame01"):
        readers.ACDC_SSL4MIS.split(tmp_path)


def make_btcv(root: Path, ids=(1, 2, 3)) -> dict:
    rng = np.random.default_rng(2)
    written = {}
    for i in ids:
        hu = rng.uniform(-1000, 1000, (6, 5, 14)).astype(np.int16)
        organs = (np.arange(6 * 5 * 14).reshape(6, 5, 14) % 14).astype(np.uint8)  # every BTCV id 0..13
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", hu, (0.7, 0.7, 3.0))
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", organs, (0.7, 0.7, 3.0))
        written[f"case{i:04d}"] = (hu, organs)
    return written


def test_btcv_organ_mapping_and_ct_window(tmp_path):
    written = make_btcv(tmp_path)
    r = readers.SYNAPSE_RAW
    assert r.detect(tmp_path) and not readers.SYNAPSE_TRANSUNET.detect(tmp_path)
    cases = {c.case_id: c for c in r.cases(tmp_path)}
    assert sorted(cases) == ["case0001", "case0002", "case0003"]
    expected = {0: 0, 1: 7, 2: 4, 3: 3, 4: 2, 5: 0, 6: 5, 7: 8, 8: 1, 9: 0, 10: 0, 11: 6, 12: 0, 13: 0}
    hu, organs = written["case0002"]
    c = cases["case0002"]
    assert c.image.shape == (14, 5, 6) and c.spacing == pytest.approx((3.0, 0.7, 0.7))
    organs_zyx = organs.transpose(2, 1, 0)
    for btcv, syn in expected.items():
        assert np.all(c.label[organs_zyx == btcv] == syn)
    want = (np.clip(hu.transpose(2, 1, 0).astype(np.float32), -125, 275) + 125) / 400
    np.testing.assert_allclose(c.image, want, atol=1e-6)
    assert r.split(tmp_path) is None  # not the full 30-scan training set


def test_btcv_full_set_gets_benchmark_split(tmp_path):
    for i in readers.BTCV_TRAINING_IDS:
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "label").mkdir(exist_ok=True)
        (tmp_path / "img" / f"img{i:04d}.nii.gz").touch()
    split = readers.SYNAPSE_RAW.split(tmp_path)
    assert len(split["train"]) == 18 and len(split["test"]) == 12
    assert "case0008" in split["test"] and "case0005" in split["train"]
    assert not set(split["train"]) & set(split["test"])


def test_btcv_label_out_of_range(tmp_path):
    make_btcv(tmp_path, ids=(1,))
    write_nifti(tmp_path / "label" / "label0001.nii.gz", np.full((6, 5, 14), 14, np.uint8), (0.7, 0.7, 3.0))
    with pytest.raises(CctrError, match=r"label0001\.nii\.gz: label values 14\.\.14 outside 0\.\.13"):
        list(readers.SYNAPSE_RAW.cases(tmp_path))


def make_transunet(root: Path) -> dict:
    rng = np.random.default_rng(3)
    vols = {}
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists_Synapse").mkdir()
    train_lines = []
    for cid, z in (("case0005", 3), ("case0031", 12)):
        img = rng.random((z, 6, 7)).astype(np.float32)
        lab = rng.integers(0, 9, (z, 6, 7)).astype(np.float32)  # TransUNet stores float labels
        for k in range(z):
            np.savez(root / "train_npz" / f"{cid}_slice{k:03d}.npz", image=img[k], label=lab[k])
            train_lines.append(f"{cid}_slice{k:03d}")
        vols[cid] = (img, lab)
    for cid in ("case0001", "case0008"):
        img, lab = rng.random((4, 6, 7)).astype(np.float32), rng.integers(0, 9, (4, 6, 7)).astype(np.float32)
        with h5py.File(root / "test_vol_h5" / f"{cid}.npy.h5", "w") as f:
            f["image"], f["label"] = img, lab
        vols[cid] = (img, lab)
    (root / "lists_Synapse" / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "lists_Synapse" / "test_vol.txt").write_text("case0008\ncase0001\n")
    return vols


def test_transunet_slices_stacked_in_index_order(tmp_path):
    vols = make_transunet(tmp_path)
    r = readers.SYNAPSE_TRANSUNET
    assert r.detect(tmp_path) and not readers.SYNAPSE_RAW.detect(tmp_path)
    cases = {c.case_id: c for c in r.cases(tmp_path)}
    assert sorted(cases) == ["case0001", "case0005", "case0008", "case0031"]
    for cid, (img, lab) in vols.items():  # slice010/011 must follow slice009, not slice001
        np.testing.assert_array_equal(cases[cid].image, img)
        np.testing.assert_array_equal(cases[cid].label, lab.astype(np.uint8))
        assert cases[cid].label.dtype == np.uint8 and cases[cid].spacing == readers.DEFAULT_SPACING_SYNAPSE
    assert r.split(tmp_path) == {"train": ["case0005", "case0031"], "test": ["case0008", "case0001"]}


def test_transunet_h5_without_label(tmp_path):
    make_transunet(tmp_path)
    bad = tmp_path / "test_vol_h5" / "case0001.npy.h5"
    with h5py.File(bad, "w") as f:
        f["image"] = np.zeros((4, 6, 7), np.float32)
    with pytest.raises(CctrError, match=r"case0001\.npy\.h5: no 'label' dataset"):
        list(readers.SYNAPSE_TRANSUNET.cases(tmp_path))


def make_nnunet(root: Path, meta: dict | None, test_labels: bool = True) -> None:
    rng = np.random.default_rng(4)
    for i in range(3):
        img, lab = xyz_volume(rng, (9, 8, 5), top=3)
        write_nifti(root / "imagesTr" / f"liv_{i:03d}_0000.nii.gz", img * 10 - 500, (0.8, 0.8, 2.5))
        write_nifti(root / "imagesTr" / f"liv_{i:03d}_0001.nii.gz", img, (0.8, 0.8, 2.5))  # 2nd channel
        write_nifti(root / "labelsTr" / f"liv_{i:03d}.nii.gz", lab, (0.8, 0.8, 2.5))
    img, lab = xyz_volume(rng, (9, 8, 5), top=3)
    write_nifti(root / "imagesTs" / "liv_100.nii.gz", img, (0.8, 0.8, 2.5))  # no channel suffix
    if test_labels:
        write_nifti(root / "labelsTs" / "liv_100.nii.gz", lab, (0.8, 0.8, 2.5))
    (root / "imagesTr" / "._liv_000_0000.nii.gz").write_bytes(b"macOS metadata")
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta))


def test_nifti_folder_dataset_json_v2_ct(tmp_path):
    make_nnunet(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                           "file_ending": ".nii.gz"})
    r = readers.NIFTI_FOLDER
    assert r.detect(tmp_path)
    assert r.class_names(tmp_path) == ("background", "liver", "tumour") and r.modality(tmp_path) == "ct"
    cases = list(r.cases(tmp_path))
    assert [c.case_id for c in cases] == ["liv_000", "liv_001", "liv_002", "liv_100"]
    assert cases[0].image.shape == (5, 8, 9) and cases[0].spacing == pytest.approx((2.5, 0.8, 0.8))
    assert r.split(tmp_path) == {"train": ["liv_000", "liv_001", "liv_002"], "test": ["liv_100"]}


def test_nifti_folder_v1_labels_mri_and_no_json(tmp_path):
    make_nnunet(tmp_path, {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}},
                test_labels=False)
    r = readers.NIFTI_FOLDER
    assert r.class_names(tmp_path) == ("background", "a", "b") and r.modality(tmp_path) == "mri"
    assert r.split(tmp_path) is None and len(list(r.cases(tmp_path))) == 3  # unlabeled Ts skipped
    (tmp_path / "dataset.json").unlink()
    assert r.class_names(tmp_path) == ("background", "class_1", "class_2")  # from the largest label


def test_nifti_folder_declared_classes_bound_labels(tmp_path):
    make_nnunet(tmp_path, {"labels": {"background": 0, "liver": 1}})
    with pytest.raises(CctrError, match=r"labelsTr/liv_000\.nii\.gz: label values 0\.\.2 outside 0\.\.1"):
        list(readers.NIFTI_FOLDER.cases(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "4d", "2d"])
def test_bad_nifti_raises_one_line_naming_file(tmp_path, damage):
    path = tmp_path / "x.nii.gz"
    if damage == "truncate":
        write_nifti(path, np.random.default_rng(0).normal(size=(30, 30, 20)).astype(np.float32))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(gzip.compress(b"not a nifti header at all"))
    else:
        write_nifti(path, np.zeros((4, 4, 3, 2) if damage == "4d" else (4, 4), np.float32))
    with pytest.raises(CctrError) as e:
        readers.read_nifti(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_read_nifti_accepts_trailing_singleton_axis(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", np.ones((4, 5, 3, 1), np.float32))
    data, spacing, _ = readers.read_nifti(tmp_path / "x.nii.gz")
    assert data.shape == (3, 5, 4) and spacing == pytest.approx((8.0, 1.6, 1.4))


# ----------------------------------------------------------------------------- prepare / stats


def test_prepare_acdc_from_default_root_and_stats(env):
    make_acdc_raw(env / "data" / "acdc")
    ds = prepare("acdc", None)
    back = open_cache("acdc")
    assert back.case_ids == ds.case_ids and len(back.case_ids) == 6
    assert back.source == str(env / "data" / "acdc") and back.predefined_split is None
    c = back.case("patient002_frame12")
    assert c.image.shape == (4, 12, 10) and c.spacing == pytest.approx((8.0, 1.6, 1.4))
    assert c.affine is not None
    s = dataset_stats("acdc")
    assert s["cases"] == 6 and s["classes"] == 4 and s["labeled_cases"] == 6
    assert s["spacing"] == pytest.approx([8.0, 1.6, 1.4]) and s["slices_total"] == 24
    assert s["shape_median"] == [4.0, 12.0, 10.0]
    assert sum(s["class_fraction"].values()) == pytest.approx(1.0)
    json.dumps(s)


def test_prepare_synapse_transunet_keeps_split(env):
    make_transunet(env / "tu")
    ds = prepare("synapse", env / "tu")
    assert open_cache("synapse").predefined_split == {"train": ["case0005", "case0031"],
                                                      "test": ["case0008", "case0001"]}
    assert ds.case("case0031").image.shape == (12, 6, 7)


def test_prepare_missing_and_unrecognised(env):
    with pytest.raises(CctrError, match=r"dataset 'acdc' not found at /nonexistent: .*patientNNN_frameFF"):
        prepare("acdc", Path("/nonexistent"))
    (env / "empty").mkdir()
    with pytest.raises(CctrError, match="no known layout"):
        prepare("synapse", env / "empty")
    with pytest.raises(CctrError, match="unknown dataset 'acdcc'"):
        prepare("acdcc", None)
    assert not (env / "c").exists() or not any((env / "c").iterdir())


def test_prepare_failure_keeps_previous_cache(env):
    make_acdc_raw(env / "a", patients=(1,))
    prepare("acdc", env / "a")
    write_nifti(env / "a/training/patient001/patient001_frame12_gt.nii.gz", np.full((10, 12, 4), 7, np.uint8))
    with pytest.raises(CctrError, match=r"patient001_frame12_gt\.nii\.gz: label values 7\.\.7 outside 0\.\.3"):
        prepare("acdc", env / "a")
    assert open_cache("acdc").case_ids == ["patient001_frame01", "patient001_frame12"]
    assert sorted(p.name for p in (env / "c").iterdir()) == ["acdc"]  # no temp dir left


def test_prepare_generic_folder_registers_and_survives_a_new_process(env):
    make_nnunet(env / "data" / "mynii", {"channel_names": {"0": "CT"},
                                         "labels": {"background": 0, "liver": 1, "tumour": 2}})
    ds = prepare("mynii", None)
    assert ds.spec.class_names == ("background", "liver", "tumour") and ds.spec.modality == "ct"
    assert open_cache("mynii").predefined_split["test"] == ["liv_100"]
    del SPECS["mynii"]  # as in a fresh process
    assert get_spec("mynii").class_names == ("background", "liver", "tumour")
    assert SPECS["mynii"].class_names == ("background", "liver", "tumour")
    assert dataset_stats("mynii")["cases"] == 4


def test_prepare_phantom_rejects_source(env):
    with pytest.raises(CctrError, match="built in"):
        prepare("phantom-cardiac", env)
