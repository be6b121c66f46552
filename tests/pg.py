"""Real servers on loopback for the multi-machine tests: PostgreSQL (databases made on demand) and
an MLflow tracking server on a PostgreSQL backend with its artifact proxy.

PostgreSQL as in tests/test_sweep_postgres.py: the system cluster when `.ci/run` (root) has started
it, else a throw-away cluster in a temp directory on a free loopback port. Without the binaries the
tests skip with the install line, except under CCTR_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.test_sweep_postgres import (
    PG_PASS,
    PG_ROLE,
    _free_port,
    _system_cluster_port,
    _throwaway_cluster,
    ensure_role,
    require_postgres,
)


class Postgres:
    """A running server; `database()` makes a fresh database and returns its SQLAlchemy URL."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url  # .../postgres, as a role that may create databases
        self.made: list[str] = []

    def database(self) -> str:
        import psycopg2

        name = f"cctr_{uuid.uuid4().hex[:10]}"
        conn = psycopg2.connect(self.admin_url.replace("postgresql+psycopg2://", "postgresql://"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"create database {name}")
        conn.close()
        self.made.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop_all(self) -> None:
        import psycopg2

        try:
            conn = psycopg2.connect(self.admin_url.replace("postgresql+psycopg2://", "postgresql://"))
        except Exception:  # noqa: BLE001 — the server is gone with its databases
            return
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in self.made:
                cur.execute(f"drop database if exists {name} with (force)")
        conn.close()


def postgres_server():
    """Generator for a fixture: a `Postgres` (skips, or fails in CI, without the binaries)."""
    bindir = require_postgres()
    port = _system_cluster_port()
    if port is not None:
        ensure_role()
        pg = Postgres(f"postgresql+psycopg2://{PG_ROLE}:{PG_PASS}@127.0.0.1:{port}/postgres")
        try:
            yield pg
        finally:
            pg.drop_all()
        return
    for url in _throwaway_cluster(bindir):
        pg = Postgres(url)
        try:
            yield pg
        finally:
            pg.drop_all()


PROCS: dict[str, subprocess.Popen] = {}  # url -> the server process (a test may kill it)


def mlflow_server(backend_url: str, artifacts: Path, log: Path):
    """Generator for a fixture: `mlflow server` (database backend, `--serve-artifacts` proxy) on a
    free loopback port; yields its URL once /health answers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else shutil.which("mlflow") or "mlflow", "server",
           "--backend-store-uri", backend_url, "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    f.flush()
                    pytest.fail(f"mlflow server did not start: {log.read_text()[-1500:]}")
                time.sleep(0.5)
        PROCS[url] = proc
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        f.close()
