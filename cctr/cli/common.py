"""Shared CLI plumbing: consoles and the `--json` contract."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console


def _console(stderr: bool) -> Console:
    """Off a terminal (`make demo | tee log`) rich assumes 80 columns and wraps wide tables; use 200
    there unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 200
    return Console(stderr=stderr, width=width)


console = _console(stderr=True)  # progress, logs, errors
out = _console(stderr=False)  # tables and results


def emit_json(obj: dict) -> None:
    """The `--json` contract: exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=float) + "\n")
