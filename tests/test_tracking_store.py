"""The MLflow store under concurrency: processes started together on a fresh store all get it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

SCRIPT = """
import sys, time
t0 = float(sys.argv[1])
from cctr import tracking
import mlflow  # the import is slow: do it before the common start so the processes meet at the store
while time.time() < t0:
    time.sleep(0.005)
exp = tracking.experiment_id("race")
r = tracking.client().create_run(exp)
tracking.client().set_terminated(r.info.run_id)
print("ok")
"""


def test_fresh_store_opened_by_several_processes_at_once(tmp_path, monkeypatch):
    """Two `cctr train` started together on a new mlruns/ raced in MLflow's schema migration
    ("duplicate column name: step", a traceback); the first touch of a store is now serialised."""
    env = dict(os.environ, CCTR_MLRUNS=str(tmp_path / "mlruns"))
    t0 = time.time() + 12  # after every child has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(t0)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-800:]
    from cctr import tracking

    monkeypatch.setenv("CCTR_MLRUNS", env["CCTR_MLRUNS"])
    runs = tracking.client().search_runs([tracking.experiment_id("race")])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
