"""Cache and splits: atomic writes, case-level deterministic splits, nested labeled sets, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from cctr.data.case import Case
from cctr.data.datasets import SPECS, DatasetSpec, make_split, open_cache, write_cache
from cctr.errors import CctrError


def _cases(n, frames=1, with_label=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        for f in range(frames):
            lab = rng.integers(0, 4, (3, 8, 8)).astype(np.uint8) if with_label else None
            yield Case(f"patient{i:03d}_frame{f:02d}", rng.random((3, 8, 8), dtype=np.float32), lab, (10, 1.5, 1.5))


@pytest.fixture
def acdc_like(monkeypatch, tmp_path):
    monkeypatch.setenv("CCTR_CACHE", str(tmp_path / "cache"))
    spec = DatasetSpec("t-acdc", ("bg", "a", "b", "c"), "mri", (1, 3), expected="t", group_sep="_frame")
    monkeypatch.setitem(SPECS, spec.name, spec)
    return spec


def test_cache_roundtrip(acdc_like):
    ds = write_cache(acdc_like, _cases(4), "test")
    again = open_cache(acdc_like.name)
    assert again.case_ids == ds.case_ids and len(ds.case_ids) == 4
    c = again.case(ds.case_ids[1])
    assert c.image.dtype == np.float32 and c.label.dtype == np.uint8 and c.spacing == (10, 1.5, 1.5)


def test_failed_write_leaves_no_cache(acdc_like):
    def bad():
        yield from _cases(2)
        yield Case("broken", np.zeros((3, 8, 8), np.float32), np.full((3, 8, 8), 9, np.uint8), (1, 1, 1))

    with pytest.raises(CctrError, match="outside 0..3"):
        write_cache(acdc_like, bad(), "src")
    root = open_cache.__globals__["dataset_dir"](acdc_like.name)
    assert not root.exists() or not (root / "manifest.json").exists()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{acdc_like.name}.tmp")]


def test_split_by_patient_deterministic_nested(acdc_like):
    ds = write_cache(acdc_like, _cases(20, frames=2), "test")
    s1 = make_split(ds, 1, seed=3)
    s3 = make_split(ds, 3, seed=3)
    assert s1.train == s3.train and s1.labeled == s3.labeled[:1]  # nested labeled sets
    assert make_split(ds, 3, seed=3) == s3
    assert make_split(ds, 3, seed=4).test != s3.test
    groups = {k: {c.split("_frame")[0] for c in getattr(s3, k)} for k in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert len(s3.train) + len(s3.val) + len(s3.test) == 40
    assert len(groups["test"]) == 4 and len(groups["val"]) == 2  # 70/10/20 of 20 patients
    assert set(s3.unlabeled) == set(s3.train) - set(s3.labeled)
    assert (ds.root / "splits" / "split_seed3_l3.json").exists()


def test_too_many_labeled(acdc_like):
    ds = write_cache(acdc_like, _cases(10), "test")
    with pytest.raises(CctrError, match="asked for 50 labeled cases"):
        make_split(ds, 50)
    with pytest.raises(CctrError, match=">= 1"):
        make_split(ds, 0)


def test_predefined_split_gets_val_carved(acdc_like):
    cases = list(_cases(10))
    ids = [c.case_id for c in cases]
    ds = write_cache(acdc_like, cases, "test", predefined_split={"train": ids[:8], "test": ids[8:]})
    s = make_split(ds, 2)
    assert s.test == ids[8:] and s.val and not set(s.val) & set(s.train)
    assert set(s.val) | set(s.train) == set(ids[:8])
