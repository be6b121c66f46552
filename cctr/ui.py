"""`cctr ui`: the MLflow UI over this repo's store, bound to loopback unless asked otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

from cctr import tracking
from cctr.errors import CctrError


def ui_command(host: str, port: int) -> list[str]:
    tracking.mlruns_root().mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(),
            "--default-artifact-root", tracking.artifact_root(), "--host", host, "--port", str(port),
            "--workers", "1"]


def serve(host: str, port: int, log: Callable[[str], None] = print) -> int:
    """Run the UI in the foreground until Ctrl-C; prints the URL first."""
    if not 0 < port < 65536:
        raise CctrError(f"--port must be 1..65535, got {port}")
    tracking.client()  # creates the store (schema) if this is a fresh checkout
    log(f"MLflow UI: http://{host}:{port}  (store {tracking.tracking_uri()}; Ctrl-C to stop)")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri())
    # own process group, so stopping us (Ctrl-C, or SIGTERM via the CLI) stops every server process
    proc = subprocess.Popen(ui_command(host, port), env=env, start_new_session=True)
    try:
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
