"""`cctr ui` serves this repo's store: it says where only once the server answers, opens on the runs
table (experiments marked as model training), and refuses a taken port in one line."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.request

from cctr import tracking
from tests.helpers import cli, popen_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(ln) for ln in stream], daemon=True).start()
    return q


def test_ui_prints_runs_url_once_answering(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    with tracking.start_run("ui-check", "r") as run:
        run.log_metrics({"m": 1.0}, 0)
    exp_id = tracking.experiment_id("ui-check")
    port = _free_port()
    proc = popen_cli("ui", "--port", str(port))
    try:
        out, printed, deadline = _lines(proc.stdout), [], time.time() + 180
        while time.time() < deadline and not any("runs of ui-check" in ln for ln in printed):
            try:
                printed.append(out.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, f"ui exited early: {proc.stderr.read()}"
        runs_line = next(ln for ln in printed if "runs of ui-check" in ln)
        assert runs_line.split()[-1] == \
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        # printed only once answering: the very first request succeeds, no retry
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
        with urllib.request.urlopen(url, timeout=10) as r:
            exp = json.loads(r.read())["experiment"]
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND == "custom_model_development"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ui_taken_port_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        t0 = time.time()
        p = cli("ui", "--port", str(port), timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--port" in lines[0], p.stderr
    assert "http://" not in p.stdout and "Traceback" not in p.stderr
    assert time.time() - t0 < 30  # refused before any server starts


def test_old_experiment_marked_when_reopened(tmp_path, monkeypatch):
    """Stores made before experiments were tagged open on the runs table too."""
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    c = tracking.client()
    exp_id = c.create_experiment("old")
    assert tracking.EXPERIMENT_KIND_TAG not in c.get_experiment(exp_id).tags
    assert tracking.experiment_id("old") == exp_id
    assert c.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    c.set_experiment_tag(exp_id, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # chosen in the UI
    tracking.experiment_id("old")
    assert c.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
