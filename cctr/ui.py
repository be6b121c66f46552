"""`cctr ui`: the MLflow UI over this repo's store, bound to loopback unless asked otherwise."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from cctr import tracking
from cctr.errors import CctrError


def ui_command(host: str, port: int) -> list[str]:
    tracking.mlruns_root().mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(),
            "--default-artifact-root", tracking.artifact_root(), "--host", host, "--port", str(port),
            "--workers", "1"]


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when `host:port` cannot be listened on (another program, or a
    `cctr ui` already running): otherwise the server only logs the error while the URL printed points
    at whoever holds the port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
            s.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CctrError(f"port {port} on {host} is already in use; choose another with "
                            f"`cctr ui --port {port + 1 if port < 65535 else 5001}`") from None
        raise CctrError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def base_url(host: str, port: int) -> str:
    """The address a browser on this machine uses (a wildcard bind is reached through loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://{shown}:{port}"


def server_log_path():
    """Where the MLflow server's own output goes (start-up lines, warnings): a file under the store."""
    return tracking.mlruns_root() / "ui-server.log"


def wait_until_answering(url: str, proc: subprocess.Popen, timeout_s: float, log_path=None) -> None:
    """Poll MLflow's `/health` until it answers; one clear error if the server dies or never answers.
    Direct, never through an `http_proxy` from the environment: the server is on this machine."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        if (rc := proc.poll()) is not None:
            where = f"see its log {log_path}" if log_path else "see its log above"
            raise CctrError(f"the MLflow server exited (code {rc}) before answering at {url}; {where}")
        try:
            with direct.open(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise CctrError(f"the MLflow server did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


def runs_pages(url: str) -> list[tuple[str, str]]:
    """(experiment, URL of its runs table) for every experiment holding runs; each is marked as a
    model-training experiment first, so stores made before cctr tagged them open on the runs too.
    `workflowType=machine_learning` switches the UI's sidebar from its GenAI default to model training."""
    c = tracking.client()
    pages = []
    for exp in c.search_experiments():
        if not c.search_runs([exp.experiment_id], max_results=1):
            continue
        tracking.mark_training_experiment(exp)
        pages.append((exp.name, f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"))
    return pages


def serve(host: str, port: int, log: Callable[[str], None] = print, ready_timeout_s: float = 180.0) -> int:
    """Run the UI in the foreground until Ctrl-C; prints the URLs once the server answers."""
    if not 0 < port < 65536:
        raise CctrError(f"--port must be 1..65535, got {port}")
    check_port_free(host, port)
    tracking.client()  # creates the store (schema) if this is a fresh checkout
    url = base_url(host, port)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri())
    # own process group, so stopping us (Ctrl-C, or SIGTERM via the CLI) stops every server process
    log_path = server_log_path()
    with open(log_path, "ab") as server_log:
        proc = subprocess.Popen(ui_command(host, port), env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_until_answering(url, proc, ready_timeout_s, log_path)
        log(f"MLflow UI: {url}  (store {tracking.tracking_uri()}; Ctrl-C to stop)")
        log(f"  server log: {log_path}")
        for name, page in runs_pages(url):
            log(f"  runs of {name}: {page}")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
