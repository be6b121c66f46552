"""`cctr train`: one training run of any method, from a dataset's YAML (or your own) plus overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cctr.cli.common import (
    SEED_HELP,
    SET_HELP,
    SPLIT_SEED_HELP,
    TRACKING_URI_HELP,
    Preset,
    emit_json,
    json_option,
    method_enum,
    use_tracking,
    value,
)
from cctr.console import out

Method = method_enum()


def run_config(dataset: Optional[str], config: Optional[Path], preset: Optional[str], method: Optional[str],
               labeled: Optional[int], seed: Optional[int], split_seed: Optional[int], overrides: list[str]):
    """The RunConfig `cctr train` trains. With `--dataset D` (and no `--config`) it is the one `cctr table1`
    builds for the cell (method, labeled, seed) of D's table: the same YAML, preset and table overrides."""
    from cctr.config import EXPERIMENTS, default_config_path, load_config

    sets: list[str] = []
    if method is not None:
        sets.append(f"train.method={method}")
    if labeled is not None:
        sets.append(f"data.labeled={labeled}")
    if seed is not None:
        sets += [f"train.seed={seed}", f"data.labeled_seed={seed}"]
    if split_seed is not None:
        sets.append(f"data.seed={split_seed}")
    sets += list(overrides)
    if config is None:
        dataset = dataset or "phantom-cardiac"
        table = EXPERIMENTS / f"table1_{dataset.replace('-', '_')}.yaml"
        if table.exists():
            from cctr.table1 import load_table_spec

            spec = load_table_spec(table, preset)
            return load_config(spec.config, spec.preset, [*spec.overrides, f"data.dataset={dataset}", *sets])
        config = default_config_path(dataset)
    if dataset is not None:
        sets.insert(0, f"data.dataset={dataset}")
    return load_config(config, preset, sets)


def train_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name; its YAML "
                                          "experiments/<name>.yaml is found from any directory "
                                          "(default: phantom-cardiac, unless --config names one)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Your own run YAML instead of the "
                                          "dataset's (relative to the current directory)."),
    preset: Optional[Preset] = typer.Option(None, "--preset", help="quick: minutes on a CPU; paper: the "
                                            "SSL4MIS protocol on a GPU (default: the YAML's, quick)."),
    method: Optional[Method] = typer.Option(None, "--method", "-m", help="Training method (default: the "
                                            "YAML's, cctr)."),
    labeled: Optional[int] = typer.Option(None, "--labeled", "-l", help="Number of labeled training cases."),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help=SEED_HELP),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help=SPLIT_SEED_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its last.pt."),
    as_json: bool = json_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Train one configuration; logs to MLflow and keeps the best and last checkpoints.

    `cctr train --dataset D --method M --labeled N --seed S` trains exactly the cell (M, N, S) that `cctr table1 --dataset D` trains.
    """
    from cctr.runs import new_run_dir
    from cctr.train import train

    cfg = run_config(dataset, config, value(preset), value(method), labeled, seed, split_seed, overrides)
    use_tracking(tracking_uri)
    res = train(cfg, resume.parent if resume else new_run_dir(cfg), resume=resume, progress=not as_json)
    summary = {"run_id": res.run_id, "run_dir": str(res.run_dir), **res.metrics}
    if as_json:
        emit_json(summary)
    else:
        for k, v in summary.items():
            out.print(f"{k:>20}: {v}")
