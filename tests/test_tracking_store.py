"""The MLflow store under concurrency: processes started together on a fresh store all get it, and
writers tagging one run at once on a database store all succeed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
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


def test_writers_tagging_one_run_at_once_on_a_database_store_all_succeed(pg, monkeypatch):
    """Two machines ending a shared sweep tag its parent run with the best trial at the same moment.
    On PostgreSQL one `set_tag` per key failed there (both inserted a key that neither had seen:
    UniqueViolation on tag_pk); every writer must succeed and the run end with the tags."""
    from cctr import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg.database())
    run_id = tracking.client().create_run(tracking.experiment_id("race")).info.run_id
    for rep in range(3):  # a fresh set of keys each time: the race is on the first insert of a key
        tags = {f"best_{rep}_{i}": i for i in range(20)}
        meet, errors = threading.Barrier(4), []

        def write():
            meet.wait()
            try:
                tracking.Run(run_id).set_tags(tags)
            except Exception as e:  # collected: an exception in a thread would not fail the test
                errors.append(repr(e)[:300])

        threads = [threading.Thread(target=write) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
    got = tracking.client().get_run(run_id).data.tags
    assert all(got[f"best_{rep}_{i}"] == str(i) for rep in range(3) for i in range(20))
