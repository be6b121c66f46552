"""Shared CLI plumbing: the `--json` contract, the options several commands share, the fixed choices."""

from __future__ import annotations

import enum
import json
import sys
from functools import lru_cache

import typer

JSON_HELP = "Print one JSON object on stdout instead of tables."
SEED_HELP = ("The run's seed, as in Table 1: the training seed and which training cases are labeled "
             "(train.seed = data.labeled_seed = SEED). The train/val/test split is --split-seed.")
SPLIT_SEED_HELP = "The train/val/test split seed (data.seed; default: the config's, 0 in every shipped YAML)."
SET_HELP = "Override one config key, e.g. train.w_ct=0.3 (repeat --set for several; keys: docs/configuration.md)."


def json_option() -> bool:
    return typer.Option(False, "--json", help=JSON_HELP, show_default=False)


class Preset(str, enum.Enum):
    """The presets every shipped experiments/*.yaml defines."""

    quick = "quick"
    paper = "paper"


class Split(str, enum.Enum):
    test = "test"
    val = "val"
    train = "train"


class Convention(str, enum.Enum):
    strict = "strict"
    ssl4mis = "ssl4mis"
    transunet = "transunet"


@lru_cache(maxsize=1)
def method_enum() -> type[enum.Enum]:
    """The training methods, as a parse-time choice: the keys of `cctr.terms.METHODS`, after the modules
    named in CCTR_PLUGINS have registered theirs (a bad plugin: one line, exit 2)."""
    from cctr.errors import CctrError
    from cctr.terms import METHODS, load_plugins

    try:
        load_plugins()
    except CctrError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    return enum.Enum("Method", [(m, m) for m in METHODS], type=str)


def value(choice) -> str | None:
    """An Enum choice's string (or None)."""
    return None if choice is None else getattr(choice, "value", choice)


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
