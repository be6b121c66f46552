"""Two concurrent sweep workers sharing one study on a real PostgreSQL server.

Runs wherever PostgreSQL's binaries are installed, as root or not. Root uses the system cluster
when `.ci/run` has started it; anyone else, or root without a running system cluster,
gets a throw-away cluster in a temp directory on a free loopback port (initdb refuses root, so as
root it runs as `postgres`). Without the binaries the test skips with the install line, except under
CCTR_REQUIRE_POSTGRES=1 (`.ci/run`): multi-worker storage is a promised feature, so CI fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import optuna
import pytest

from cctr import tracking
from tests.helpers import TINY, TINY_SPACE, popen_cli, write_yaml

PG_ROLE, PG_PASS = "cctr_test", "cctr_test"
INSTALL = "apt-get install -y postgresql"


def _bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    if shutil.which("initdb") and (pg_ctl := shutil.which("pg_ctl")):
        return Path(pg_ctl).resolve().parent
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parent.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name)) if found else None


def _psql(sql: str) -> subprocess.CompletedProcess:
    """SQL as the system cluster's superuser (peer authentication over its socket)."""
    return subprocess.run(["su", "postgres", "-c", f'psql -v ON_ERROR_STOP=1 -qAtc "{sql}"'],
                          capture_output=True, text=True, timeout=60)


def _system_cluster_port() -> int | None:
    """As root with Debian's cluster tools, the port of a running system cluster (`.ci/run` starts
    them; a test does not start system services)."""
    if os.geteuid() != 0 or shutil.which("pg_lsclusters") is None:
        return None
    online = re.findall(r"^\S+\s+\S+\s+(\d+)\s+online", subprocess.run(
        ["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=60).stdout, re.M)
    if not online or _psql("select 1").returncode != 0:
        return None
    return int(online[0])


def ensure_role() -> None:
    """The tests' role in the system cluster. Fixtures on parallel pytest workers may create it at
    the same moment; the loser's error is fine once the role exists."""
    def exists() -> bool:
        return _psql(f"select 1 from pg_roles where rolname='{PG_ROLE}'").stdout.strip() == "1"

    if not exists():
        r = _psql(f"create role {PG_ROLE} login password '{PG_PASS}' createdb")
        assert r.returncode == 0 or exists(), r.stderr


def _system_database(port: int):
    ensure_role()
    db = f"cctr_{uuid.uuid4().hex[:8]}"
    r = _psql(f"create database {db} owner {PG_ROLE}")
    assert r.returncode == 0, r.stderr
    yield f"postgresql+psycopg2://{PG_ROLE}:{PG_PASS}@127.0.0.1:{port}/{db}"
    _psql(f"drop database if exists {db} with (force)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _throwaway_cluster(bindir: Path):
    """initdb + pg_ctl in a temp directory (socket there too), trust auth on loopback only."""
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None and shutil.which("su") is None:
        pytest.fail("as root, initdb must run as the 'postgres' user, and `su` is missing")
    root = Path(tempfile.mkdtemp(prefix="cctr-pg-"))
    if user is not None:
        shutil.chown(root, user)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        argv = ["su", user, "-c", shlex.join(cmd)] if user else list(cmd)
        return subprocess.run(argv, capture_output=True, text=True, timeout=180)

    try:
        r = run(str(bindir / "initdb"), "-D", str(data), "-U", PG_ROLE, "--auth=trust", "-E", "UTF8", "--no-sync")
        assert r.returncode == 0, f"initdb failed: {r.stderr.strip()[-500:]}"
        r = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        assert r.returncode == 0, f"pg_ctl start failed: {r.stdout.strip()[-300:]} {r.stderr.strip()[-300:]}"
        yield f"postgresql+psycopg2://{PG_ROLE}@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def require_postgres() -> Path:
    """PostgreSQL's bindir; without the binaries the test skips with the install line, or fails under
    CCTR_REQUIRE_POSTGRES=1 (CI: multi-machine storage is a promised feature)."""
    bindir = _bindir()
    if bindir is None:
        if os.environ.get("CCTR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is not installed and CCTR_REQUIRE_POSTGRES=1: `{INSTALL}` (see .ci/run)")
        pytest.skip(f"PostgreSQL is not installed: `{INSTALL}` to run the multi-worker tests")
    return bindir


@pytest.fixture(scope="module")
def pg_url():
    bindir = require_postgres()
    port = _system_cluster_port()
    yield from (_system_database(port) if port is not None else _throwaway_cluster(bindir))


def test_two_workers_share_one_study(pg_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    tiny = json.loads(json.dumps(TINY))
    tiny["train"]["method"] = "ct"
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny)
    space = write_yaml(tmp_path / "space.yaml", TINY_SPACE)
    tracking.client()  # create the MLflow schema once, before two workers race for it
    args = ["sweep", "--config", str(cfg), "--dataset", "phantom-cardiac", "--labeled", "1", "--trials", "4",
            "--space", str(space), "--storage", pg_url, "--json", "--jobs", "1"]  # one worker per "machine"
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
