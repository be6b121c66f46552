"""Test isolation: no test writes into the repo's data_cache/ or mlruns/; CPU only, one thread.

Tiny shapes gain nothing from intra-op threads, and several processes (CLI children, sweep
workers) each spinning two OpenMP threads on two cores slow down by an order of magnitude.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cctr-session")
    return {"cache": root / "cache", "mlruns": root / "mlruns", "data": root / "data"}


@pytest.fixture(autouse=True)
def _isolated_store(session_dirs, monkeypatch):
    monkeypatch.setenv("CCTR_CACHE", str(session_dirs["cache"]))
    monkeypatch.setenv("CCTR_MLRUNS", str(session_dirs["mlruns"]))
    monkeypatch.setenv("CCTR_DATA_ROOT", str(session_dirs["data"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # never a user's server
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CCTR_PHANTOM_CASES", "12")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def pg():
    """A PostgreSQL server (tests/pg.py) for a module's tests; skips without one (fails in CI)."""
    from tests.pg import postgres_server

    yield from postgres_server()


@pytest.fixture(scope="module")
def registration_ready(session_dirs):
    """Train the tiny registration model once for the variants that need it."""
    import os

    from cctr.registration.train import ensure_registration
    from tests.helpers import tiny_cfg

    os.environ["CCTR_CACHE"] = str(session_dirs["cache"])
    os.environ["CCTR_MLRUNS"] = str(session_dirs["mlruns"])
    os.environ["CCTR_PHANTOM_CASES"] = "12"
    ensure_registration("phantom-cardiac", tiny_cfg().registration)
