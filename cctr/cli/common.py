"""Shared CLI plumbing: consoles and the `--json` contract."""

from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console(stderr=True)  # progress, logs, errors
out = Console()  # tables and results


def emit_json(obj: dict) -> None:
    """The `--json` contract: exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=float) + "\n")
