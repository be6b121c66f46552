"""The data contract (DESIGN §3): one 3D case, its validation and intensity normalisation."""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cctr.errors import CctrError


@dataclass
class Case:
    """One 3D volume: image float32 [Z,H,W], label uint8 [Z,H,W] or None, spacing (z,y,x) mm."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


def check_case(case: Case, num_classes: int, source: str) -> Case:
    """Validate a freshly read case; raise CctrError naming `source` on the first problem.

    Returns the case with dtypes coerced to the contract (float32 image, uint8 label).
    """
    img = np.asarray(case.image)
    if img.ndim != 3:
        raise CctrError(f"{source}: expected a 3D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise CctrError(f"{source}: image contains NaN or inf values")
    lab = case.label
    if lab is not None:
        lab = np.asarray(lab)
        if lab.shape != img.shape:
            raise CctrError(f"{source}: image shape {img.shape} and label shape {lab.shape} differ")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise CctrError(
                f"{source}: label values {int(lab.min())}..{int(lab.max())} outside 0..{num_classes - 1}"
            )
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise CctrError(f"{source}: label map holds non-integer values")
        lab = lab.astype(np.uint8)
    sp = tuple(float(s) for s in case.spacing)
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise CctrError(f"{source}: invalid spacing {case.spacing}")
    return Case(case.case_id, img.astype(np.float32, copy=False), lab, sp, case.affine)  # type: ignore[arg-type]


def normalize_ct(hu: np.ndarray, lo: float = -125.0, hi: float = 275.0) -> np.ndarray:
    """CT protocol of the field (TransUNet): clip to a soft-tissue window, scale to [0,1]."""
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalize_mri(x: np.ndarray) -> np.ndarray:
    """MRI: per-volume 0.5/99.5 percentiles to [0,1] (robust to bright outliers)."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_npz(path: Path, mmap_bytes: int = 1 << 20) -> dict[str, np.ndarray]:
    """Every array of an `.npz`; uncompressed members of `mmap_bytes` or more are memory-mapped.

    A real CT volume is ~30 M voxels: reading every case whole (or keeping them all) does not fit a
    workstation, while a mapped member costs memory only for the slices actually read. Mappings are
    copy-on-write, so a caller that writes into an array never touches the file.
    """
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < mmap_bytes:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member)
                continue
            f.seek(info.header_offset + 26)  # local header: name and extra-field lengths, then the data
            n_name, n_extra = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + n_name + n_extra)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            out[name] = np.memmap(path, dtype=dtype, mode="c", offset=f.tell(), shape=shape,
                                  order="F" if fortran else "C")
    return out
