"""Tiny run configurations shared by the training, sweep and table tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "data": {"dataset": "phantom-cardiac", "labeled": 1, "size": 32},
    "model": {"proj_dim": 16},
    "registration": {"grid": [4, 16, 16], "iters": 3, "batch_size": 1},
    "train": {"method": "cctr", "iters": 4, "batch_labeled": 2, "batch_unlabeled": 2, "val_every": 2,
              "memory_size": 64, "anchors_per_class": 4, "ramp_iters": 2},
}

TINY_SPACE = {
    "params": {"train.w_ct": {"type": "float", "low": 0.1, "high": 1.0},
               "train.w_con": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
    "pruner": {"type": "median", "n_startup_trials": 1},
    "sampler": {"type": "random", "seed": 0},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env_extra: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process with the test's isolated store locations."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "cctr.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cctr.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
