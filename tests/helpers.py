"""Tiny run configurations shared by the training, sweep and table tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "data": {"dataset": "phantom-cardiac", "labeled": 1, "size": 32},
    "model": {"encoder_a": "tu-mobilenetv3_small_050", "proj_dim": 16},
    # 2 refinement steps: the instance optimisation runs, at a test's cost (40 steps x 40 cases each map)
    "registration": {"grid": [8, 32, 32], "iters": 3, "batch_size": 1, "ncc_window": 3, "refine_iters": 2},
    "train": {"method": "cctr", "iters": 4, "batch_labeled": 2, "batch_unlabeled": 2, "val_every": 2,
              "memory_size": 64, "anchors_per_class": 4, "ramp_iters": 2, "ckpt_every": 2},
}

TINY_SPACE = {
    "params": {"train.w_ct": {"type": "float", "low": 0.1, "high": 1.0},
               "train.w_con": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
    "pruner": {"type": "median", "n_startup_trials": 1},
    "sampler": {"type": "random", "seed": 0},
}


def tiny_cfg(**train_overrides):
    """The tiny run configuration with `train.*` overrides."""
    import json

    from cctr.config import RunConfig, from_dict

    d = json.loads(json.dumps(TINY))
    d["train"].update(train_overrides)
    return from_dict(RunConfig, d)


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


def cli_inprocess(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI's `main` in this process (fast); returns (exit code, stdout, stderr).

    An unhandled exception propagates here instead of becoming exit code 2, so a traceback still fails.
    """
    import pytest

    from cctr.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["cctr", *args]
    try:
        with pytest.raises(SystemExit) as e:
            main()
            raise SystemExit(0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err
