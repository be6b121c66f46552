"""Checkpoints: plain dicts of tensors and primitives, so `torch.load(weights_only=True)` reads them.

Every checkpoint carries its config, so a checkpoint alone can be evaluated or used for prediction.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cctr.atomic import atomic_file
from cctr.errors import CctrError


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    with atomic_file(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, fmt: str) -> dict[str, Any]:
    """Load and check the `format` tag; anything else is one clear CctrError."""
    p = Path(path)
    if not p.is_file():
        raise CctrError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        kind = "truncated or corrupt" if isinstance(e, (EOFError, zipfile.BadZipFile)) or "zip" in str(e) else \
            "not a torch checkpoint"
        raise CctrError(f"{p}: not a readable cctr checkpoint ({kind}: {type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise CctrError(f"{p}: not a cctr {fmt} checkpoint")
    return ck


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config: cache keys survive process restarts."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
