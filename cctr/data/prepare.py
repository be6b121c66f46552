"""`cctr data prepare` / `cctr data stats`: raw files -> the case cache, and what is in it.

Preparing picks the reader whose layout is found under the source folder, streams its cases
through `write_cache` (validated, atomic: a failure leaves no cache behind) and records the
format's own split lists. A folder prepared under a new name is a generic NIfTI dataset; its
classes and modality live in the cache manifest, so later processes can find it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cctr.data.datasets import (
    SPECS,
    Dataset,
    DatasetSpec,
    load_dataset,
    register_nifti_dataset,
    write_cache,
)
from cctr.data.readers import NIFTI_FOLDER, READERS
from cctr.errors import CctrError
from cctr.paths import data_root

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def prepare(dataset: str, source: Path | None = None,
            progress: Callable[[str], None] | None = None) -> Dataset:
    """Read `dataset` from `source` (default: the data root's expected folder) into the cache.

    Built-in phantoms are regenerated. Any name other than a known dataset is taken as a generic
    nnU-Net-style NIfTI folder and registered under that name.
    """
    spec = SPECS.get(dataset)
    if spec is not None and spec.builtin:
        if source is not None:
            raise CctrError(f"dataset '{dataset}' is built in (generated); it takes no --source")
        return load_dataset(dataset, progress=progress, rebuild=True)

    readers = READERS.get(dataset, (NIFTI_FOLDER,))
    layouts = "; or ".join(r.layout for r in readers)
    if spec is None and not _NAME.fullmatch(dataset):
        raise CctrError(f"invalid dataset name '{dataset}': use letters, digits, '_', '-' and '.'")
    root = Path(source) if source is not None else data_root() / (spec.expected if spec else dataset)
    if not root.exists():
        if spec is None and source is None:
            raise CctrError(
                f"unknown dataset '{dataset}' (known: {', '.join(SPECS)}) and no NIfTI folder at {root}: "
                f"pass --source FOLDER holding {layouts}"
            )
        raise CctrError(
            f"dataset '{dataset}' not found at {root}: put it there or pass --source FOLDER "
            f"(expected layout: {layouts})"
        )
    if not root.is_dir():
        raise CctrError(f"{root}: not a folder (expected layout: {layouts})")
    reader = next((r for r in readers if r.detect(root)), None)
    if reader is None:
        raise CctrError(f"dataset '{dataset}': no known layout in {root} (expected: {layouts})")
    if dataset not in READERS:  # a generic folder: (re)register, its dataset.json may have changed
        spec = _register(dataset, root)
    split = reader.split(root)  # list problems surface before the long read
    return write_cache(spec, reader.cases(root), source=str(root), predefined_split=split, progress=progress)


def _register(name: str, root: Path) -> DatasetSpec:
    """A generic folder's spec, from its dataset.json (or its labels) and modality."""
    names = NIFTI_FOLDER.class_names(root)
    if len(names) < 2:
        raise CctrError(f"{root / 'dataset.json'}: need background and a foreground class, got {list(names)}")
    return register_nifti_dataset(name, names, NIFTI_FOLDER.modality(root))


def _label_and_shape(ds: Dataset, case_id: str) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """Read one cached case's label (and shape) without keeping it: `Dataset.case` memoises
    whole volumes, which for a real CT dataset would hold every scan in memory at once."""
    path = ds.root / "cases" / f"{case_id}.npz"
    try:
        with np.load(path) as z:
            if bool(z["has_label"]):
                label = z["label"]
                return label, tuple(label.shape)
            return None, tuple(z["image"].shape)
    except (OSError, KeyError, ValueError) as e:
        raise CctrError(f"{path}: unreadable cached case ({type(e).__name__}); re-run `cctr data prepare`") from None


def dataset_stats(name: str) -> dict:
    """Cases, classes, spacing (median/min/max, z,y,x mm), shapes and per-class voxel fractions."""
    ds = load_dataset(name)
    k = ds.spec.num_classes
    counts = np.zeros(k, dtype=np.int64)
    shapes, labeled = [], 0
    for cid in ds.case_ids:
        label, shape = _label_and_shape(ds, cid)
        shapes.append(shape)
        if label is not None:
            labeled += 1
            counts += np.bincount(label.ravel(), minlength=k)[:k]
    spacing = np.array([ds.spacing[c] for c in ds.case_ids], dtype=np.float64)
    total = counts.sum()
    return {
        "dataset": ds.name,
        "cases": len(ds.case_ids),
        "classes": k,
        "class_names": list(ds.spec.class_names),
        "modality": ds.spec.modality,
        "spacing": [round(float(v), 6) for v in np.median(spacing, axis=0)],
        "spacing_min": [float(v) for v in spacing.min(axis=0)],
        "spacing_max": [float(v) for v in spacing.max(axis=0)],
        "shape_median": [float(v) for v in np.median(np.array(shapes), axis=0)],
        "slices_total": int(sum(s[0] for s in shapes)),
        "class_fraction": {n: (float(c / total) if total else 0.0) for n, c in zip(ds.spec.class_names, counts)},
        "labeled_cases": labeled,
    }
