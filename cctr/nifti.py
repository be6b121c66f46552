"""NIfTI in and out for `cctr predict`: any stored orientation in, labels on the input's own grid out.

Volumes are reoriented to the training orientation (axis codes such as RAS: voxel axes closest to
those world directions; no resampling, only flips and axis permutations) and transposed to the
[Z,H,W] layout of the data contract, so the nets see anatomy the way round they were trained on
whatever the scanner wrote. Labels go back through the exact inverse flips/permutation and are
written with the input's affine and header, so they overlay the input voxel for voxel.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from cctr.atomic import atomic_file
from cctr.errors import CctrError

CANONICAL = ("R", "A", "S")
Orientation = tuple[str, str, str] | None  # target axis codes; None keeps the stored voxel order


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _why(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _open(path: Path) -> nib.Nifti1Image:
    """Header-level checks (cheap: the voxel data is not read yet)."""
    if not path.is_file():
        raise CctrError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for junk files; all mean the same to the user
        raise CctrError(f"{path}: not a readable NIfTI file ({_why(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CctrError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise CctrError(f"{path}: expected a 3D volume, got {len(shape)}D shape {tuple(shape)}")
    if min(shape[:3]) == 0:
        raise CctrError(f"{path}: empty volume, shape {tuple(shape)}")
    return img


def _inverse(transform: np.ndarray) -> np.ndarray:
    """Inverse of an orientation transform: input axis i -> (axis j, flip f) becomes j -> (i, f)."""
    inv = np.empty_like(transform)
    for i, (j, flip) in enumerate(transform):
        inv[int(j)] = (i, flip)
    return inv


def _read(
    img: nib.Nifti1Image, path: Path, orientation: Orientation
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as e:  # truncated / corrupt data block
        raise CctrError(f"{path}: cannot read the voxel data, file truncated or corrupt ({_why(e)})") from None
    data = data.reshape(data.shape[:3])
    if not np.all(np.isfinite(data)):
        raise CctrError(f"{path}: image contains NaN or inf values")
    if orientation is None:
        transform = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    else:
        try:
            transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(orientation))
        except Exception as e:
            raise CctrError(f"{path}: affine has no usable orientation ({_why(e)})") from None
    canon = apply_orientation(data, transform)  # (x, y, z) in the target orientation
    vox = nib.affines.voxel_sizes(img.affine @ inv_ornt_aff(transform, data.shape))
    spacing = (float(vox[2]), float(vox[1]), float(vox[0]))
    return np.ascontiguousarray(canon.transpose(2, 1, 0), dtype=np.float32), spacing, transform


def read_nifti_volume(
    path: Path, orientation: Orientation = CANONICAL
) -> tuple[np.ndarray, tuple[float, float, float], nib.Nifti1Image, np.ndarray]:
    """(image float32 [Z,H,W] in `orientation`, spacing (z,y,x) mm, the nibabel image, transform).

    `orientation` must be the one the nets were trained in: the axis codes of the training volumes
    (`nib.aff2axcodes(case.affine)`), or None to keep the stored voxel order, as
    `cctr.data.readers.read_nifti` does. The transform (nibabel orientation array, stored axes ->
    target axes) is what `write_label_like` needs to bring labels back. A 4D file with one volume
    is accepted as 3D; anything unreadable, 2D, 4D or non-finite raises CctrError naming the file.
    """
    path = Path(path)
    img = _open(path)
    data, spacing, transform = _read(img, path, orientation)
    return data, spacing, img, transform


def write_label_like(labels_zhw: np.ndarray, ref: nib.Nifti1Image, transform: np.ndarray, path: Path) -> None:
    """Write uint8 labels [Z,H,W], laid out as `read_nifti_volume` gave the image, on `ref`'s grid.

    The output carries `ref`'s affine and header (dtype uint8, no scaling). Written to a temporary sibling then renamed: an interrupted or failed write leaves no file.
    """
    path = Path(path)
    if not is_nifti_name(path):
        raise CctrError(f"{path}: output name must end in .nii or .nii.gz")
    lab = np.asarray(labels_zhw)
    native = apply_orientation(lab.transpose(2, 1, 0), _inverse(transform))
    if native.shape != tuple(ref.shape[:3]):
        raise CctrError(f"{path}: label shape {lab.shape} does not map onto the input grid {tuple(ref.shape[:3])}")
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)  # labels are stored as-is, never rescaled
    hdr["cal_min"], hdr["cal_max"] = 0, 0  # the input's intensity display window means nothing here
    out = type(ref)(np.ascontiguousarray(native, dtype=np.uint8), ref.affine, hdr)
    raw = out.to_bytes()
    try:
        with atomic_file(path) as tmp:  # tmp keeps only the ".gz" suffix, so we write bytes ourselves
            tmp.write_bytes(gzip.compress(raw, compresslevel=1) if path.name.lower().endswith(".gz") else raw)
    except OSError as e:
        raise CctrError(f"{path}: cannot write output ({_why(e)})") from None


def _plan(input: Path, output: Path) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs; output is a file for one input, else a folder."""
    if input.is_dir():
        files = sorted(p for p in input.iterdir() if p.is_file() and is_nifti_name(p))
        if not files:
            raise CctrError(f"{input}: folder holds no .nii or .nii.gz file")
        if is_nifti_name(output):
            raise CctrError(f"{output}: output must be a folder when the input is a folder")
        pairs = [(f, output / f.name) for f in files]
    elif input.is_file():
        if not is_nifti_name(input):
            raise CctrError(f"{input}: not a NIfTI file name (expected .nii or .nii.gz)")
        pairs = [(input, output if is_nifti_name(output) else output / input.name)]
    else:
        raise CctrError(f"{input}: no such file or folder")
    for src, dst in pairs:
        if dst.resolve() == src.resolve():
            raise CctrError(f"{dst}: output would overwrite its input")
    return pairs


def predict_nifti(
    segment: Callable[[np.ndarray, tuple[float, float, float]], np.ndarray],
    normalise: Callable[[np.ndarray], np.ndarray],
    input: Path,
    output: Path,
    on_file: Callable[[Path, Path], None] | None = None,
    orientation: Orientation = CANONICAL,
) -> list[Path]:
    """Segment one NIfTI file or every .nii/.nii.gz of a folder; returns the label files written.

    `segment(image_zhw, spacing_zyx)` gets the normalised image, in `orientation` (see
    `read_nifti_volume`), and returns labels of the same shape. Every input header and the output folder are checked before anything is
    computed, so a bad file or an unwritable destination fails fast; each output appears whole or
    not at all. `on_file(input, output)` is called after each file (progress display).
    """
    pairs = _plan(Path(input), Path(output))
    imgs = [_open(src) for src, _ in pairs]
    for folder in sorted({dst.parent for _, dst in pairs}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CctrError(f"{folder}: cannot create the output folder ({_why(e)})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CctrError(f"{folder}: output folder is not writable")
    written = []
    for (src, dst), img in zip(pairs, imgs):
        data, spacing, transform = _read(img, src, orientation)
        lab = np.asarray(segment(normalise(data), spacing))
        if lab.shape != data.shape:
            raise CctrError(f"{src}: segmenter returned shape {lab.shape}, expected {data.shape}")
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise CctrError(f"{src}: segmenter returned labels outside 0..255")
        write_label_like(lab.astype(np.uint8), img, transform, dst)
        written.append(dst)
        if on_file is not None:
            on_file(src, dst)
    return written
