"""Readers for the real data formats people have on disk (DESIGN §3).

One reader per distributed layout. Each answers three questions about a folder:
`detect(root)` (is this layout here?), `cases(root)` (the volumes, as validated `Case`s with
intensities normalised to [0,1]) and `split(root)` (the train/val/test lists the format ships,
or None). Every problem with a file raises `CctrError` with one line naming that file, so a
user with a broken download learns which file to replace instead of reading a traceback.

Arrays are always returned as [Z,H,W]; NIfTI stores (x,y,z), so volumes are transposed and the
header voxel sizes reordered to (z,y,x). The kept affine is the file's own, i.e. it maps the
file's (x,y,z) voxel indices; transpose back before using it to write a prediction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cctr.data.case import Case, normalize_ct, normalize_mri
from cctr.errors import CctrError

# Formats without stored spacing get a typical value so mm-based metrics stay meaningful.
# ACDC: short-axis cine with mostly 10 mm between slices and ~1.5 mm in-plane pixels.
DEFAULT_SPACING_ACDC = (10.0, 1.5, 1.5)
# Synapse (BTCV): approximate median CT voxel, 3 mm slices and ~0.76 mm in-plane pixels.
DEFAULT_SPACING_SYNAPSE = (3.0, 0.76, 0.76)

ACDC_CLASSES = 4
SYNAPSE_CLASSES = 9

# BTCV's 13 organ ids -> the 8-organ Synapse benchmark (index = BTCV id, value = benchmark id).
BTCV_TO_SYNAPSE = np.zeros(14, dtype=np.uint8)
BTCV_TO_SYNAPSE[[8, 4, 3, 2, 6, 11, 1, 7]] = [1, 2, 3, 4, 5, 6, 7, 8]  # aorta, gallbladder, ..., stomach

# The split every Synapse paper uses (TransUNet's lists): 12 test cases, the other 18 of BTCV's
# 30 labelled training scans for training. Applied to raw BTCV so numbers stay comparable.
SYNAPSE_TEST_IDS = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
BTCV_TRAINING_IDS = tuple(range(1, 11)) + tuple(range(21, 41))


# ----------------------------------------------------------------------------- file helpers


def _why(e: BaseException) -> str:
    """An exception as one short line (library messages sometimes span lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A 3D NIfTI as ([Z,H,W] array, spacing (z,y,x), affine of that array), reoriented to RAS.

    The same reading as `cctr predict` (`cctr.nifti.read_nifti_volume`), so nets see scans in one
    orientation at training and at prediction; every failure is one line naming the file.
    """
    from nibabel.orientations import inv_ornt_aff

    from cctr.nifti import read_nifti_volume

    data, spacing, img, transform = read_nifti_volume(Path(path))
    affine = np.asarray(img.affine, dtype=np.float64) @ inv_ornt_aff(transform, img.shape[:3])
    return data, spacing, affine


def read_h5(path: Path, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`image` and `label` datasets of one HDF5 file (SSL4MIS / TransUNet), both required."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise CctrError(f"{path}: no '{missing[0]}' dataset (has: {', '.join(sorted(f.keys())) or 'nothing'})")
            image, label = f["image"][()], f["label"][()]
    except (CctrError, MemoryError):
        raise
    except Exception as e:
        raise CctrError(f"{path}: unreadable HDF5 file ({_why(e)})") from None
    _check_ndim(path, image, label, ndim)
    return image, label


def read_npz(path: Path, ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`image` and `label` arrays of one TransUNet `.npz` slice, both required."""
    try:
        with np.load(path) as z:
            missing = [k for k in ("image", "label") if k not in z.files]
            if missing:
                raise CctrError(f"{path}: no '{missing[0]}' array (has: {', '.join(z.files) or 'nothing'})")
            image, label = z["image"], z["label"]
    except (CctrError, MemoryError):
        raise
    except Exception as e:
        raise CctrError(f"{path}: unreadable .npz file ({_why(e)})") from None
    _check_ndim(path, image, label, ndim)
    return image, label


def _check_ndim(path: Path, image: np.ndarray, label: np.ndarray, ndim: int) -> None:
    if image.ndim != ndim:
        raise CctrError(f"{path}: expected a {ndim}D 'image', got shape {tuple(image.shape)}")
    if label.shape != image.shape:
        raise CctrError(f"{path}: 'label' shape {tuple(label.shape)} differs from 'image' shape {tuple(image.shape)}")


def check_label(label: np.ndarray, num_classes: int | None, path: Path) -> np.ndarray:
    """Integer label map in 0..num_classes-1 (any non-negative when None), as uint8."""
    if label.size == 0:
        return label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
        raise CctrError(f"{path}: label map holds non-integer values")
    lo, hi = int(label.min()), int(label.max())
    top = 255 if num_classes is None else num_classes - 1
    if lo < 0 or hi > top:
        raise CctrError(f"{path}: label values {lo}..{hi} outside 0..{top}")
    return label.astype(np.uint8)


def _same_shape(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape != label.shape:
        raise CctrError(
            f"{label_path}: label shape {tuple(label.shape)} differs from image shape "
            f"{tuple(image.shape)} of {image_path.name}"
        )


def nifti_case(case_id: str, image_path: Path, label_path: Path | None, num_classes: int | None,
               normalize: Callable[[np.ndarray], np.ndarray]) -> Case:
    """One case from an image NIfTI and an optional label NIfTI, validated against each other."""
    raw, spacing, affine = read_nifti(image_path)
    label = None
    if label_path is not None:
        lab, _, _ = read_nifti(label_path)
        _same_shape(raw, lab, image_path, label_path)
        label = check_label(lab, num_classes, label_path)
    if not np.all(np.isfinite(raw)):
        raise CctrError(f"{image_path}: image contains NaN or inf values")
    return Case(case_id, normalize(raw.astype(np.float32)), label, spacing, affine)


def _read_list(path: Path) -> list[str]:
    """Names of a split list, one per line; `.h5` suffixes (SSL4MIS val/test lists) dropped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CctrError(f"{path}: unreadable list ({_why(e)})") from None
    names = [ln.strip().removesuffix(".h5") for ln in lines]
    return list(dict.fromkeys(n for n in names if n))


def _check_listed(list_path: Path, names: list[str], known: set[str], where: Path) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise CctrError(f"{list_path}: names {missing[0]} but there is no such case in {where}")


class Reader:
    """One distributed layout; subclasses fill in `detect`, `cases` and maybe `split`."""

    name = ""
    layout = ""  # one line, shown when a dataset is missing or unrecognised
    num_classes: int | None = None

    def detect(self, root: Path) -> bool:
        raise NotImplementedError

    def cases(self, root: Path) -> Iterator[Case]:
        raise NotImplementedError

    def split(self, root: Path) -> dict[str, list[str]] | None:
        return None


# ----------------------------------------------------------------------------- ACDC


_ACDC_FRAME = re.compile(r"(patient\d{3}_frame\d{2})\.nii\.gz")
_ACDC_H5 = re.compile(r"(patient\d{3}_frame\d{2})\.h5")


class AcdcRaw(Reader):
    """ACDC as distributed: `training/patientNNN/patientNNN_frameFF.nii.gz` + `_gt.nii.gz`.

    Only the annotated ED/ES frames match the pattern (the `_4d` cine file does not). An optional
    `testing/` folder with ground truth (the post-challenge release) becomes the test list.
    """

    name = "acdc-nifti"
    layout = "training/patientNNN/patientNNN_frameFF.nii.gz + patientNNN_frameFF_gt.nii.gz"
    num_classes = ACDC_CLASSES

    @staticmethod
    def _frames(folder: Path) -> list[tuple[str, Path, Path]]:
        found = []
        if folder.is_dir():
            for pdir in sorted(p for p in folder.glob("patient[0-9][0-9][0-9]") if p.is_dir()):
                for f in sorted(pdir.iterdir()):
                    m = _ACDC_FRAME.fullmatch(f.name)
                    if m:
                        found.append((m.group(1), f, pdir / f"{m.group(1)}_gt.nii.gz"))
        return found

    def _training(self, root: Path) -> list[tuple[str, Path, Path]]:
        frames = self._frames(root / "training")
        for _, img, gt in frames:
            if not gt.exists():
                raise CctrError(f"{gt}: missing ground truth for {img.name}")
        return frames

    def _testing(self, root: Path) -> list[tuple[str, Path, Path]]:
        """Test frames with ground truth; a testing folder without any (the 2017 release) is ignored."""
        frames = self._frames(root / "testing")
        with_gt = [fr for fr in frames if fr[2].exists()]
        if with_gt and len(with_gt) < len(frames):
            lacking = next(fr for fr in frames if not fr[2].exists())
            raise CctrError(f"{lacking[2]}: missing ground truth for {lacking[1].name}")
        return with_gt

    def detect(self, root: Path) -> bool:
        return bool(self._frames(root / "training"))

    def cases(self, root: Path) -> Iterator[Case]:
        for cid, img, gt in self._training(root) + self._testing(root):
            yield nifti_case(cid, img, gt, self.num_classes, normalize_mri)

    def split(self, root: Path) -> dict[str, list[str]] | None:
        test = [c for c, _, _ in self._testing(root)]
        if not test:
            return None
        return {"train": [c for c, _, _ in self._training(root)], "test": test}


class AcdcSsl4mis(Reader):
    """SSL4MIS's ACDC: `data/patientNNN_frameFF.h5` volumes + `train.list`/`val.list`/`test.list`.

    Images are already scaled by SSL4MIS's preprocessing and kept as they are; no spacing is
    stored, so DEFAULT_SPACING_ACDC is used. The per-slice files under `data/slices/` are not read:
    the cache holds volumes and slices are cut from them.
    """

    name = "acdc-ssl4mis-h5"
    layout = "data/patientNNN_frameFF.h5 (image, label) + train.list/val.list/test.list"
    num_classes = ACDC_CLASSES

    @staticmethod
    def _volumes(root: Path) -> dict[str, Path]:
        data = root / "data"
        if not data.is_dir():
            return {}
        return {m.group(1): f for f in sorted(data.iterdir()) if (m := _ACDC_H5.fullmatch(f.name))}

    def detect(self, root: Path) -> bool:
        return bool(self._volumes(root))

    def cases(self, root: Path) -> Iterator[Case]:
        for cid, path in self._volumes(root).items():
            image, label = read_h5(path)
            if not np.all(np.isfinite(image)):
                raise CctrError(f"{path}: image contains NaN or inf values")
            yield Case(cid, image.astype(np.float32), check_label(label, self.num_classes, path),
                       DEFAULT_SPACING_ACDC)

    def split(self, root: Path) -> dict[str, list[str]] | None:
        known = set(self._volumes(root))
        out: dict[str, list[str]] = {}
        for part in ("train", "val", "test"):
            lst = root / f"{part}.list"
            if lst.exists():
                out[part] = _read_list(lst)
                _check_listed(lst, out[part], known, root / "data")
        slices = root / "train_slices.list"
        if "train" not in out and slices.exists():  # volume names from the slice list
            names = [re.sub(r"_slice_\d+$", "", n) for n in _read_list(slices)]
            out["train"] = list(dict.fromkeys(names))
            _check_listed(slices, out["train"], known, root / "data")
        return out or None


# ----------------------------------------------------------------------------- Synapse


_BTCV_IMG = re.compile(r"img(\d{4})\.nii\.gz")


class SynapseBtcv(Reader):
    """BTCV as distributed: `img/imgNNNN.nii.gz` + `label/labelNNNN.nii.gz`, 13 organs -> 8.

    When all 30 BTCV training scans are present the standard 18/12 benchmark split is returned,
    otherwise None (a seeded random split is made instead).
    """

    name = "synapse-btcv-nifti"
    layout = "img/imgNNNN.nii.gz + label/labelNNNN.nii.gz (BTCV, 13 organ ids)"
    num_classes = SYNAPSE_CLASSES

    @staticmethod
    def _pairs(root: Path) -> list[tuple[int, Path, Path]]:
        img = root / "img"
        if not (img.is_dir() and (root / "label").is_dir()):
            return []
        return [(int(m.group(1)), f, root / "label" / f"label{m.group(1)}.nii.gz")
                for f in sorted(img.iterdir()) if (m := _BTCV_IMG.fullmatch(f.name))]

    def detect(self, root: Path) -> bool:
        return bool(self._pairs(root))

    def cases(self, root: Path) -> Iterator[Case]:
        for num, img, lab in self._pairs(root):
            if not lab.exists():
                raise CctrError(f"{lab}: missing label for {img.name}")
            raw, spacing, affine = read_nifti(img)
            organs, _, _ = read_nifti(lab)
            _same_shape(raw, organs, img, lab)
            organs = check_label(organs, len(BTCV_TO_SYNAPSE), lab)
            if not np.all(np.isfinite(raw)):
                raise CctrError(f"{img}: image contains NaN or inf values")
            yield Case(f"case{num:04d}", normalize_ct(raw), BTCV_TO_SYNAPSE[organs], spacing, affine)

    def split(self, root: Path) -> dict[str, list[str]] | None:
        present = {num for num, _, _ in self._pairs(root)}
        if not set(BTCV_TRAINING_IDS) <= present:
            return None
        test = set(SYNAPSE_TEST_IDS)
        return {"train": [f"case{n:04d}" for n in BTCV_TRAINING_IDS if n not in test],
                "test": [f"case{n:04d}" for n in SYNAPSE_TEST_IDS]}


_TU_SLICE = re.compile(r"(case\d{4})_slice(\d+)\.npz")
_TU_VOL = re.compile(r"(case\d{4})\.npy\.h5")


class SynapseTransUnet(Reader):
    """TransUNet's Synapse: `train_npz/caseNNNN_sliceKKK.npz` + `test_vol_h5/caseNNNN.npy.h5`.

    Training slices are stacked back into volumes in slice-index order. Intensities are already
    clipped and scaled by TransUNet and kept; labels already use the 8-organ ids. The folders
    define the split; `lists_Synapse/train.txt` / `test_vol.txt`, when present, narrow it.
    """

    name = "synapse-transunet"
    layout = ("train_npz/caseNNNN_sliceKKK.npz + test_vol_h5/caseNNNN.npy.h5 "
              "(+ lists_Synapse/train.txt, test_vol.txt)")
    num_classes = SYNAPSE_CLASSES

    @staticmethod
    def _train(root: Path) -> dict[str, list[Path]]:
        folder = root / "train_npz"
        slices: dict[str, list[tuple[int, Path]]] = {}
        if folder.is_dir():
            for f in folder.iterdir():
                if m := _TU_SLICE.fullmatch(f.name):
                    slices.setdefault(m.group(1), []).append((int(m.group(2)), f))
        return {c: [p for _, p in sorted(v)] for c, v in sorted(slices.items())}

    @staticmethod
    def _test(root: Path) -> dict[str, Path]:
        folder = root / "test_vol_h5"
        if not folder.is_dir():
            return {}
        return {m.group(1): f for f in sorted(folder.iterdir()) if (m := _TU_VOL.fullmatch(f.name))}

    def detect(self, root: Path) -> bool:
        return bool(self._train(root) or self._test(root))

    def _stack(self, case_id: str, paths: list[Path]) -> Case:
        images, labels = [], []
        for p in paths:
            image, label = read_npz(p)
            if images and image.shape != images[0].shape:
                raise CctrError(f"{p}: slice shape {tuple(image.shape)} differs from {tuple(images[0].shape)} "
                                f"of {paths[0].name}")
            images.append(image)
            labels.append(check_label(label, self.num_classes, p))
        image = np.stack(images).astype(np.float32)
        if not np.all(np.isfinite(image)):
            raise CctrError(f"{paths[0].parent}/{case_id}_slice*.npz: image contains NaN or inf values")
        return Case(case_id, image, np.stack(labels), DEFAULT_SPACING_SYNAPSE)

    def cases(self, root: Path) -> Iterator[Case]:
        train, test = self._train(root), self._test(root)
        both = sorted(set(train) & set(test))
        if both:
            raise CctrError(f"{test[both[0]]}: {both[0]} is also in {root / 'train_npz'}")
        for cid, paths in train.items():
            yield self._stack(cid, paths)
        for cid, path in test.items():
            image, label = read_h5(path)
            if not np.all(np.isfinite(image)):
                raise CctrError(f"{path}: image contains NaN or inf values")
            yield Case(cid, image.astype(np.float32), check_label(label, self.num_classes, path),
                       DEFAULT_SPACING_SYNAPSE)

    def split(self, root: Path) -> dict[str, list[str]] | None:
        train, test = list(self._train(root)), list(self._test(root))
        lists = root / "lists_Synapse"
        if (lst := lists / "train.txt").exists():
            train = list(dict.fromkeys(re.sub(r"_slice\d+$", "", n) for n in _read_list(lst)))
            _check_listed(lst, train, set(self._train(root)), root / "train_npz")
        if (lst := lists / "test_vol.txt").exists():
            test = [n.removesuffix(".npy") for n in _read_list(lst)]
            _check_listed(lst, test, set(self._test(root)), root / "test_vol_h5")
        if not train:
            return None
        return {"train": train, "test": test}


# ----------------------------------------------------------------------------- generic NIfTI


_NII = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"(.+)_(\d{4})")


def _stem(name: str) -> str | None:
    return next((name[: -len(s)] for s in _NII if name.endswith(s)), None)


class NiftiFolder(Reader):
    """A generic nnU-Net / Medical-Decathlon folder: `imagesTr/NAME_0000.nii.gz` + `labelsTr/NAME.nii.gz`.

    Single-channel: only channel `_0000` is read. `imagesTs/` cases are used as the test list when
    `labelsTs/` holds their labels; unlabeled test images are skipped (nothing to evaluate them on).
    Classes and modality come from `dataset.json` when present (nnU-Net v1/MSD and v2 styles).
    """

    name = "nifti-folder"
    layout = "imagesTr/NAME_0000.nii.gz (or NAME.nii.gz) + labelsTr/NAME.nii.gz, optional dataset.json"

    def detect(self, root: Path) -> bool:
        return (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir()

    @staticmethod
    def _meta(root: Path) -> dict:
        path = root / "dataset.json"
        if not path.exists():
            return {}
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CctrError(f"{path}: unreadable dataset.json ({_why(e)})") from None
        if not isinstance(meta, dict):
            raise CctrError(f"{path}: expected a JSON object")
        return meta

    def _declared_classes(self, root: Path) -> tuple[str, ...] | None:
        """Class names from dataset.json `labels`: {"0": "background"} (v1) or {"background": 0} (v2)."""
        labels = self._meta(root).get("labels")
        if not labels:
            return None
        path = root / "dataset.json"
        try:
            if all(str(k).isdigit() for k in labels):
                by_id = {int(k): str(v) for k, v in labels.items()}
            else:
                by_id = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise CctrError(f"{path}: 'labels' must map ids to names (region-based labels are not supported)") from None
        if min(by_id) < 0 or max(by_id) > 255:
            raise CctrError(f"{path}: label ids must lie in 0..255")
        return tuple(by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1))

    def class_names(self, root: Path) -> tuple[str, ...]:
        """Declared classes, else `background`, `class_1`.. `class_K` for labels 0..K found.

        Undeclared labels must be consecutive, as nnU-Net requires: one stray voxel of 250 must not
        silently make a 251-class dataset.
        """
        declared = self._declared_classes(root)
        if declared is not None:
            return declared
        first_seen: dict[int, Path] = {}
        for _, _, lab in self._pairs(root):
            labels, _, _ = read_nifti(lab)
            for v in np.unique(check_label(labels, None, lab)).tolist():
                first_seen.setdefault(int(v), lab)
        top = max(first_seen, default=0)
        gap = next((v for v in range(top + 1) if v not in first_seen), None)
        if gap is not None:
            stray = sorted(v for v in first_seen if v > gap)
            raise CctrError(
                f"{first_seen[stray[0]]}: label value {stray[0]} is not consecutive with the folder's other "
                f"labels (no case holds {gap}); labels must be 0..K, or declared in {root / 'dataset.json'}")
        return ("background",) + tuple(f"class_{i}" for i in range(1, max(top, 1) + 1))

    def modality(self, root: Path) -> str:
        """'ct' when channel 0 is declared CT (so the HU window applies), else 'mri' (percentiles)."""
        meta = self._meta(root)
        channels = meta.get("channel_names") or meta.get("modality") or {}
        first = channels.get("0", "") if isinstance(channels, dict) else ""
        return "ct" if str(first).strip().upper() == "CT" else "mri"

    @staticmethod
    def _folder_pairs(images: Path, labels: Path) -> list[tuple[str, Path, Path]]:
        pairs = []
        for f in sorted(images.iterdir()) if images.is_dir() else []:
            stem = _stem(f.name)
            if stem is None or f.name.startswith("."):  # skips macOS `._` metadata files in MSD tars
                continue
            label = next((labels / f"{stem}{s}" for s in _NII if (labels / f"{stem}{s}").exists()), None)
            m = _CHANNEL.fullmatch(stem)
            if label is None and m:
                if m.group(2) != "0000":
                    continue  # another channel of a multi-channel case
                stem = m.group(1)
                label = next((labels / f"{stem}{s}" for s in _NII if (labels / f"{stem}{s}").exists()), None)
            if label is None:
                raise CctrError(f"{f}: no label {labels / (stem + '.nii.gz')}")
            pairs.append((stem, f, label))
        return pairs

    def _pairs(self, root: Path) -> list[tuple[str, Path, Path]]:
        pairs = self._folder_pairs(root / "imagesTr", root / "labelsTr")
        if (root / "labelsTs").is_dir():
            pairs += self._folder_pairs(root / "imagesTs", root / "labelsTs")
        seen: dict[str, Path] = {}
        for cid, img, _ in pairs:
            if cid in seen:
                raise CctrError(f"{img}: case '{cid}' also read from {seen[cid]}")
            seen[cid] = img
        return pairs

    def cases(self, root: Path) -> Iterator[Case]:
        declared = self._declared_classes(root)
        norm = normalize_ct if self.modality(root) == "ct" else normalize_mri
        for cid, img, lab in self._pairs(root):
            yield nifti_case(cid, img, lab, None if declared is None else len(declared), norm)

    def split(self, root: Path) -> dict[str, list[str]] | None:
        if not (root / "labelsTs").is_dir():
            return None
        test = [c for c, _, _ in self._folder_pairs(root / "imagesTs", root / "labelsTs")]
        if not test:
            return None
        return {"train": [c for c, _, _ in self._folder_pairs(root / "imagesTr", root / "labelsTr")], "test": test}


ACDC_RAW = AcdcRaw()
ACDC_SSL4MIS = AcdcSsl4mis()
SYNAPSE_RAW = SynapseBtcv()
SYNAPSE_TRANSUNET = SynapseTransUnet()
NIFTI_FOLDER = NiftiFolder()

# Readers tried in order for each named dataset; any other non-builtin name is a NIfTI folder.
READERS: dict[str, tuple[Reader, ...]] = {
    "acdc": (ACDC_RAW, ACDC_SSL4MIS),
    "synapse": (SYNAPSE_RAW, SYNAPSE_TRANSUNET),
}
