"""Where things live on disk; every location can be moved by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """Raw datasets as distributed (`data/acdc`, `data/synapse`, ...)."""
    return Path(os.environ.get("CCTR_DATA_ROOT", "data"))


def cache_root() -> Path:
    """Prepared cases, splits and registration caches (git-ignored)."""
    return Path(os.environ.get("CCTR_CACHE", "data_cache"))


def mlruns_root() -> Path:
    """MLflow sqlite store, artifacts and the Optuna db (git-ignored contents)."""
    return Path(os.environ.get("CCTR_MLRUNS", "mlruns"))
