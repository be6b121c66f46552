"""`cctr ui` serves this repo's store: the experiment is visible through MLflow's REST API."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from cctr import tracking
from tests.helpers import popen_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_experiments(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    with tracking.start_run("ui-check", "r") as run:
        run.log_metrics({"m": 1.0}, 0)
    port = _free_port()
    proc = popen_cli("ui", "--port", str(port))
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
    try:
        body, deadline = None, time.time() + 120
        while time.time() < deadline and body is None:
            if proc.poll() is not None:
                raise AssertionError(f"ui exited early: {proc.stderr.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "UI did not answer"
        assert body["experiment"]["name"] == "ui-check"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
