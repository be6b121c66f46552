"""Dataset registry, the prepared-case cache and case-level splits (DESIGN §3).

Every dataset, built-in or real, ends up as the same on-disk cache:
`<cache>/<name>/manifest.json` + `cases/<case_id>.npz`, written atomically, so the rest of
the code reads one format whatever the source was.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cctr.atomic import atomic_dir, atomic_file
from cctr.data.case import Case, check_case, load_npz
from cctr.errors import CctrError
from cctr.paths import cache_root, data_root

CACHE_VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: classes, modality, split protocol and where its raw files are expected."""

    name: str
    class_names: tuple[str, ...]
    modality: str  # "mri" | "ct"
    labeled_counts: tuple[int, ...]
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    expected: str = ""  # folder under the data root, for real datasets
    builtin: bool = False
    group_sep: str | None = None  # case_id prefix before this groups cases of one patient

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def group(self, case_id: str) -> str:
        """Patient a case belongs to: splits never separate two frames of one patient."""
        return case_id.split(self.group_sep)[0] if self.group_sep else case_id


CARDIAC = ("background", "RV", "Myo", "LV")
ABDOMEN = (
    "background", "aorta", "gallbladder", "left_kidney", "right_kidney",
    "liver", "pancreas", "spleen", "stomach",
)

SPECS: dict[str, DatasetSpec] = {
    "phantom-cardiac": DatasetSpec("phantom-cardiac", CARDIAC, "mri", (1, 2, 4), builtin=True),
    "phantom-abdomen": DatasetSpec("phantom-abdomen", ABDOMEN, "ct", (1, 2, 4), builtin=True),
    "acdc": DatasetSpec("acdc", CARDIAC, "mri", (1, 3, 7), expected="acdc", group_sep="_frame"),
    "synapse": DatasetSpec("synapse", ABDOMEN, "ct", (1, 2, 4), (0.55, 0.05, 0.4), expected="synapse"),
}


def get_spec(name: str) -> DatasetSpec:
    """A built-in spec, or a generic NIfTI dataset prepared earlier (its manifest holds the spec)."""
    if name not in SPECS:
        mf = dataset_dir(name) / "manifest.json"
        if "/" not in name and mf.exists():
            try:
                m = json.loads(mf.read_text())
                return register_nifti_dataset(name, [str(c) for c in m["class_names"]], str(m["modality"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CctrError(f"{mf}: unreadable manifest ({type(e).__name__}); re-run `cctr data prepare`") from None
        raise CctrError(f"unknown dataset '{name}'; known: {', '.join(SPECS)}")
    return SPECS[name]


def register_nifti_dataset(name: str, class_names: Iterable[str], modality: str) -> DatasetSpec:
    """A generic nnU-Net-style NIfTI folder becomes a dataset under its own name."""
    spec = DatasetSpec(name, tuple(class_names), modality, (1, 2, 4), expected=name)
    SPECS[name] = spec
    return spec


# ----------------------------------------------------------------------------- cache


def dataset_dir(name: str) -> Path:
    return cache_root() / name


@dataclass
class Dataset:
    """A prepared dataset in the cache: lazy per-case loading (real CT volumes are large)."""

    spec: DatasetSpec
    root: Path
    case_ids: list[str]
    spacing: dict[str, tuple[float, float, float]]
    predefined_split: dict[str, list[str]] | None = None
    source: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def case(self, case_id: str) -> Case:
        """The cached case, image and label memory-mapped (not kept: a real CT set does not fit in RAM)."""
        path = self.root / "cases" / f"{case_id}.npz"
        try:
            z = load_npz(path)
            lab = z["label"] if z["has_label"] else None
            aff = z["affine"] if z["has_affine"] else None
            return Case(case_id, z["image"], lab, tuple(float(v) for v in z["spacing"]), aff)  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise CctrError(f"{path}: unreadable cached case ({e}); re-run `cctr data prepare`") from None

    def cases(self, ids: Iterable[str] | None = None) -> list[Case]:
        return [self.case(c) for c in (self.case_ids if ids is None else ids)]


def write_cache(
    spec: DatasetSpec,
    cases: Iterable[Case],
    source: str,
    predefined_split: dict[str, list[str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Dataset:
    """Validate and store cases; the cache appears only once every case is written."""
    final = dataset_dir(spec.name)
    ids: list[str] = []
    spacing: dict[str, tuple[float, float, float]] = {}
    with atomic_dir(final) as tmp:
        (tmp / "cases").mkdir()
        for raw in cases:
            c = check_case(raw, spec.num_classes, f"{source}:{raw.case_id}")
            np.savez(
                tmp / "cases" / f"{c.case_id}.npz",
                image=c.image,
                label=c.label if c.label is not None else np.zeros(0, np.uint8),
                has_label=c.label is not None,
                spacing=np.asarray(c.spacing),
                affine=c.affine if c.affine is not None else np.eye(4),
                has_affine=c.affine is not None,
            )
            ids.append(c.case_id)
            spacing[c.case_id] = c.spacing
            if progress:
                progress(c.case_id)
        if not ids:
            raise CctrError(f"{source}: no cases found")
        manifest = {
            "version": CACHE_VERSION, "dataset": spec.name, "num_classes": spec.num_classes,
            "class_names": list(spec.class_names), "modality": spec.modality, "source": source,
            "case_ids": ids, "spacing": spacing, "predefined_split": predefined_split,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return open_cache(spec.name)


def open_cache(name: str) -> Dataset:
    spec = get_spec(name)
    root = dataset_dir(name)
    mf = root / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(mf)
    m = json.loads(mf.read_text())
    if m.get("version") != CACHE_VERSION:
        raise FileNotFoundError(mf)
    sp = {k: tuple(v) for k, v in m["spacing"].items()}
    return Dataset(spec, root, list(m["case_ids"]), sp, m.get("predefined_split"), m.get("source", ""))


def load_dataset(name: str, progress: Callable[[str], None] | None = None, rebuild: bool = False) -> Dataset:
    """The prepared dataset; built-in phantoms are generated on first use (or `rebuild`), real data
    must be prepared."""
    spec = get_spec(name)
    if not rebuild:
        try:
            return open_cache(name)
        except FileNotFoundError:
            pass
    if spec.builtin:
        from cctr.data.phantoms import PHANTOM_CASES, generate_cases

        n = int(os.environ.get("CCTR_PHANTOM_CASES", PHANTOM_CASES))  # tests build smaller phantoms
        return write_cache(spec, generate_cases(name, n), f"builtin:{name}", progress=progress)
    where = data_root() / spec.expected
    raise CctrError(
        f"dataset '{name}' is not prepared: put it under {where} and run "
        f"`cctr data prepare {name} --source {where}`"
    )


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Case-level split; `labeled` is a prefix of a seeded order of `train`, so sets are nested."""

    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    labeled: list[str]

    @property
    def unlabeled(self) -> list[str]:
        s = set(self.labeled)
        return [c for c in self.train if c not in s]

    def to_json(self) -> dict:
        return {"seed": self.seed, "train": self.train, "val": self.val, "test": self.test,
                "labeled": self.labeled}


def make_split(ds: Dataset, n_labeled: int, seed: int = 0, labeled_seed: int | None = None) -> Split:
    """Deterministic split by patient group, written beside the cache (DESIGN §3).

    `seed` fixes train/val/test; `labeled_seed` (default: `seed`) picks which training cases are
    labeled, so Table-1 seeds vary the labeled case while every seed is tested on the same cases.
    """
    spec = ds.spec
    if n_labeled < 1:
        raise CctrError(f"--labeled must be >= 1, got {n_labeled}")
    rng = np.random.default_rng(seed)
    if ds.predefined_split and ds.predefined_split.get("train"):
        pre = ds.predefined_split
        train, test = list(pre["train"]), list(pre.get("test", []))
        val = list(pre.get("val", []))
        if not val:  # carve a val set from train, by group
            n_groups = len({spec.group(c) for c in train})
            val = _take_groups(spec, train, max(1, round(n_groups * spec.split_fractions[1])), rng)
            train = [c for c in train if c not in set(val)]
    else:
        groups = sorted({spec.group(c) for c in ds.case_ids})
        order = [groups[i] for i in rng.permutation(len(groups))]
        n = len(order)
        n_test = max(1, round(n * spec.split_fractions[2]))
        n_val = max(1, round(n * spec.split_fractions[1]))
        if n - n_test - n_val < 1:
            raise CctrError(f"dataset '{ds.name}' has too few cases ({len(ds.case_ids)}) to split")
        g_test, g_val = set(order[:n_test]), set(order[n_test:n_test + n_val])
        test = [c for c in ds.case_ids if spec.group(c) in g_test]
        val = [c for c in ds.case_ids if spec.group(c) in g_val]
        train = [c for c in ds.case_ids if spec.group(c) not in g_test | g_val]
    with_label = [c for c in train if ds.case(c).label is not None]
    if n_labeled > len(with_label):
        raise CctrError(
            f"asked for {n_labeled} labeled cases but dataset '{ds.name}' has only "
            f"{len(with_label)} labeled training cases"
        )
    lseed = seed if labeled_seed is None else labeled_seed
    order = [with_label[i] for i in np.random.default_rng(lseed + 1).permutation(len(with_label))]
    split = Split(seed, train, val, test, order[:n_labeled])
    tag = "" if labeled_seed is None else f"_lab{labeled_seed}"
    with atomic_file(ds.root / "splits" / f"split_seed{seed}{tag}_l{n_labeled}.json") as tmp:
        tmp.write_text(json.dumps(split.to_json(), indent=1))
    return split


def _take_groups(spec: DatasetSpec, ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    groups = sorted({spec.group(c) for c in ids})
    pick = {groups[i] for i in rng.permutation(len(groups))[:n]}
    return [c for c in ids if spec.group(c) in pick]
