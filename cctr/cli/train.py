"""`cctr train`: one training run of any method, from a YAML config plus overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cctr.cli.common import TRACKING_URI_HELP, emit_json, use_tracking
from cctr.console import out


def train_cmd(
    config: Path = typer.Option(Path("experiments/phantom_cardiac.yaml"), "--config", "-c", help="Run YAML."),
    preset: Optional[str] = typer.Option(None, "--preset", help="quick | paper (from the YAML)."),
    method: Optional[str] = typer.Option(None, "--method", help="sup, ct, cct, cct+rsl, cct+reps, cctr, full, reg-only"),
    labeled: Optional[int] = typer.Option(None, "--labeled", help="Number of labeled training cases."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value, repeatable."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a last.pt checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as one JSON object."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Train one configuration; logs everything to MLflow and keeps best/last checkpoints."""
    from cctr.config import load_config
    from cctr.runs import new_run_dir
    from cctr.train import train

    sets = list(overrides)
    if method is not None:
        sets.append(f"train.method={method}")
    if labeled is not None:
        sets.append(f"data.labeled={labeled}")
    if seed is not None:
        sets.append(f"train.seed={seed}")
    cfg = load_config(config, preset, sets)
    use_tracking(tracking_uri)
    res = train(cfg, resume.parent if resume else new_run_dir(cfg), resume=resume, progress=not as_json)
    summary = {"run_id": res.run_id, "run_dir": str(res.run_dir), **res.metrics}
    if as_json:
        emit_json(summary)
    else:
        for k, v in summary.items():
            out.print(f"{k:>20}: {v}")
