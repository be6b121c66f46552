"""Two concurrent sweep workers sharing one study on a real PostgreSQL server.

`.ci/run` installs and starts the Debian server; this fixture creates a throw-away database on
loopback. Without a server the test fails (never skips): multi-worker storage is a promised feature.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import optuna
import pytest

from cctr import tracking
from tests.helpers import TINY, TINY_SPACE, popen_cli, write_yaml

PG_ROLE, PG_PASS = "cctr_test", "cctr_test"


def _psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["su", "postgres", "-c", f'psql -v ON_ERROR_STOP=1 -qAtc "{sql}"'],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pg_url():
    if shutil.which("pg_lsclusters") is None:
        pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql` (see .ci/run)")
    subprocess.run("pg_lsclusters -h | awk '{print $1, $2}' | while read v c; do pg_ctlcluster $v $c start; done",
                   shell=True, capture_output=True, timeout=120)
    r = _psql("select 1")
    if r.returncode != 0:
        pytest.fail(f"PostgreSQL server not reachable: {r.stderr.strip()}")
    if _psql(f"select 1 from pg_roles where rolname='{PG_ROLE}'").stdout.strip() != "1":
        _psql(f"create role {PG_ROLE} login password '{PG_PASS}' createdb")
    db = f"cctr_{uuid.uuid4().hex[:8]}"
    r = _psql(f"create database {db} owner {PG_ROLE}")
    assert r.returncode == 0, r.stderr
    yield f"postgresql+psycopg2://{PG_ROLE}:{PG_PASS}@127.0.0.1:5432/{db}"
    _psql(f"drop database if exists {db} with (force)")


def test_two_workers_share_one_study(pg_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    tiny = json.loads(json.dumps(TINY))
    tiny["train"]["method"] = "ct"
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny)
    space = write_yaml(tmp_path / "space.yaml", TINY_SPACE)
    tracking.client()  # create the MLflow schema once, before two workers race for it
    args = ["sweep", "--config", str(cfg), "--dataset", "phantom-cardiac", "--labeled", "1", "--trials", "4",
            "--space", str(space), "--storage", pg_url, "--json"]
    workers = [popen_cli(*args) for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="phantom-cardiac-l1-space", storage=pg_url)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 4  # both workers stop once 4 are finished; one in flight may add one more
    assert len(trials) <= 5 and all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no duplicates
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(run_ids) == len(set(run_ids))
    parent = study.user_attrs["mlflow_parent_run_id"]
    nested = tracking.find_runs("phantom-cardiac", f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in nested} == set(run_ids)  # every trial tracked, none lost
    assert all(r.info.status == "FINISHED" for r in nested)
