"""Shared CLI plumbing: the `--json` contract."""

from __future__ import annotations

import json
import sys


def emit_json(obj: dict) -> None:
    """The `--json` contract: exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=float) + "\n")


TRACKING_URI_HELP = ("MLflow tracking store: a server (http://host:5000, started with `mlflow server`; every "
                     "artifact goes through it) or a database URL. Default: $MLFLOW_TRACKING_URI, else the local "
                     "mlruns/mlflow.db. See docs/cluster.md.")


def use_tracking(uri: str | None) -> None:
    """`--tracking-uri` (or MLFLOW_TRACKING_URI) for this command and its workers; an unreachable
    server or a bad URL is one line and exit 2 here, before any training starts."""
    from cctr import tracking

    tracking.set_tracking_uri(uri)
    tracking.check_store()
