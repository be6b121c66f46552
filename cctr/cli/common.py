"""Shared CLI plumbing: the `--json` contract."""

from __future__ import annotations

import json
import sys


def emit_json(obj: dict) -> None:
    """The `--json` contract: exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=float) + "\n")
