"""Where a run's files go: one folder per configuration, so re-running finds its own checkpoints."""

from __future__ import annotations

from pathlib import Path

from cctr.checkpoint import config_hash
from cctr.config import RunConfig, to_dict
from cctr.paths import mlruns_root


def run_dir_for(cfg: RunConfig) -> Path:
    name = f"{cfg.train.method}-l{cfg.data.labeled}-s{cfg.train.seed}-{config_hash(to_dict(cfg))}"
    return mlruns_root() / "checkpoints" / cfg.data.dataset / name
