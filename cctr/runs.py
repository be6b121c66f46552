"""Where a run's files go: one folder per configuration, so a Table-1 cell re-run finds its own
checkpoints; a run started by hand gets a fresh folder inside it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cctr.checkpoint import config_hash
from cctr.config import RunConfig, to_dict
from cctr.paths import mlruns_root


def run_dir_for(cfg: RunConfig) -> Path:
    name = f"{cfg.train.method}-l{cfg.data.labeled}-s{cfg.train.seed}-{config_hash(to_dict(cfg))}"
    return mlruns_root() / "checkpoints" / cfg.data.dataset / name


def new_run_dir(cfg: RunConfig) -> Path:
    """A folder of its own under the configuration's: two `cctr train` runs of one configuration (at
    once, or one after the other) never overwrite each other's checkpoints."""
    return run_dir_for(cfg) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
