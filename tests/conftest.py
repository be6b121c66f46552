"""Test isolation: no test writes into the repo's data_cache/ or mlruns/; CPU only, few threads."""

from __future__ import annotations


import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cctr-session")
    return {"cache": root / "cache", "mlruns": root / "mlruns", "data": root / "data"}


@pytest.fixture(autouse=True)
def _isolated_store(session_dirs, monkeypatch):
    monkeypatch.setenv("CCTR_CACHE", str(session_dirs["cache"]))
    monkeypatch.setenv("CCTR_MLRUNS", str(session_dirs["mlruns"]))
    monkeypatch.setenv("CCTR_DATA_ROOT", str(session_dirs["data"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CCTR_PHANTOM_CASES", "12")

