"""`cctr sweep`, `cctr table1`, `cctr ui`: the research-facing entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cctr.cli.common import SET_HELP, TRACKING_URI_HELP, Preset, emit_json, json_option, use_tracking, value
from cctr.console import console, out


def sweep_cmd(
    dataset: str = typer.Option("phantom-cardiac", "--dataset", help="Dataset name."),
    labeled: Optional[str] = typer.Option(None, "--labeled", help="Labeled counts, comma-separated, one study "
                                          "each (default: the dataset's protocol: 1,2,4 on the phantoms and "
                                          "Synapse, 1,3,7 on ACDC)."),
    trials: int = typer.Option(8, "--trials", help="Finished (complete or pruned) trials per study."),
    space: Optional[Path] = typer.Option(None, "--space", help="Search space YAML (default: the repo's "
                                         "sweeps/default.yaml, found from any directory)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite "
                                          "$CCTR_MLRUNS/optuna.db); a shared PostgreSQL URL lets workers on "
                                          "many machines join one study (docs/cluster.md)."),
    preset: Preset = typer.Option(Preset.quick, "--preset", help="quick: minutes per trial on a CPU; paper: "
                                  "the SSL4MIS protocol on a GPU."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run YAML (default: experiments/<dataset>.yaml)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP + " Applies to every trial."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after S seconds."),
    heartbeat: int = typer.Option(30, "--heartbeat", help="Seconds between worker heartbeats; a trial whose "
                                  "worker stops beating is failed and retried."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Worker processes on this machine "
                                       "(default: one per core or GPU, at most --trials)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per worker (default: cores // jobs)."),
    as_json: bool = json_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Tune a method's loss weights: one Optuna study per labeled count, maximising validation Dice.

    Each trial trains the config's method (cctr unless --set train.method=...) with values drawn from the search space (default: sweeps/default.yaml: train.w_ct, w_rsl, w_con, memory_size, tau, reps_cap), reports validation Dice as it trains (weak trials are pruned by the median rule) and logs test Dice; the best trial per study is printed and tagged in MLflow. Re-running resumes the studies; a second command on the same --storage joins them as more workers.

    Cost: one quick-preset training per trial (a few minutes on 2 CPU cores), --trials x labeled counts in all.
    """
    from cctr.config import default_config_path, load_config
    from cctr.data.datasets import get_spec
    from cctr.sweep import DEFAULT_SPACE, load_space, parse_labeled, run_sweep

    ds = get_spec(dataset)
    counts = parse_labeled(labeled) if labeled else list(ds.labeled_counts)
    if trials < 1:
        from cctr.errors import CctrError

        raise CctrError(f"--trials must be >= 1, got {trials}")
    sp = load_space(space or DEFAULT_SPACE)
    cfg = load_config(config or default_config_path(dataset), value(preset), [*overrides, f"data.dataset={dataset}"])
    from cctr.workers import default_jobs

    if jobs is not None and jobs < 1:
        from cctr.errors import CctrError

        raise CctrError(f"--jobs must be >= 1, got {jobs}")
    use_tracking(tracking_uri)
    results = run_sweep(cfg, counts, sp, trials, storage, timeout, heartbeat,
                        log=lambda m: console.print(m, markup=False), progress=not as_json,
                        jobs=jobs or default_jobs(trials), threads=threads)
    if as_json:
        emit_json({"dataset": dataset, "studies": [r.__dict__ for r in results]})
        return
    print_sweep_table(dataset, results)
    out.print("browse the runs: `make ui` (or `cctr ui`)")


def print_sweep_table(dataset: str, results) -> None:
    from cctr.sweep import format_params

    t = Table(title=f"sweep: {dataset} (best trial per labeled count)")
    for col in ("labeled", "complete/pruned/failed", "best trial", "val Dice", "test Dice", "test HD95 mm"):
        t.add_column(col, justify="right")
    for r in results:
        b = r.best or {}
        t.add_row(str(r.labeled), f"{r.n_complete}/{r.n_pruned}/{r.n_failed}", str(b.get("trial", "-")),
                  _f(b.get("val_dice")), _f(b.get("test_dice")), _f(b.get("test_hd95_mm"), 2))
    out.print(t)
    for r in results:
        params = format_params((r.best or {}).get("params", {}))
        out.print(f"  {r.study_name}: {params or '-'}")


def _f(v, nd: int = 4) -> str:
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def ui_cmd(
    port: int = typer.Option(5000, "--port", help="Port to serve on; a taken port is an error (exit 2)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
) -> None:
    """Browse every run (sweeps, Table 1, single runs) in the MLflow UI; prints the URLs, the server's log goes to a file.

    Serves $CCTR_MLRUNS (default mlruns/) until Ctrl-C.
    """
    from cctr.ui import serve

    serve(host, port, log=out.print)


def table1_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name; picks the table spec (default: "
                                          "phantom-cardiac; with --spec, the spec's dataset)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Table spec YAML (default: the repo's "
                                        "experiments/table1_<dataset>.yaml: methods, labeled counts, seeds, config)."),
    preset: Optional[Preset] = typer.Option(None, "--preset", help="quick or paper (default: the spec's, quick)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="How many seeds: seeds 0..N-1 (default: the spec's, "
                                        "3). Seed S of a cell is the `--seed S` of `cctr train`."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Worker processes (default: one per core or GPU)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per worker (default: cores // jobs)."),
    register: bool = typer.Option(True, "--register/--no-register",
                                  help="Train the registration model first if it is missing."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Also write the qualitative and curve figures."),
    out_dir: Path = typer.Option(Path("results"), "--out", help="Folder for table1_<dataset>.md/.csv/.tex/.png "
                                 "and the per-run CSV."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by workers on many "
                                          "machines: each cell is claimed by one worker, a dead worker's cell is "
                                          "retried (docs/cluster.md). Default: this machine only."),
    collect: bool = typer.Option(False, "--collect", help="Train nothing: write the table from the tracking "
                                 "store's finished cells."),
    heartbeat: int = typer.Option(30, "--heartbeat", help="Seconds between worker heartbeats (with --storage)."),
    as_json: bool = json_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Train every Table-1 cell not finished yet (methods x labeled counts x seeds), then write the table.

    The grid (phantom-cardiac): 11 methods (CCT-R's rows, the peers bcp, unimatch and their one-net floor sup-a) x labeled 1,2,4 x seeds 0-2, full trained once per seed: 93 cells of the quick preset (its wall time: docs/performance.md). Finished cells are found in MLflow by their config hash and skipped, so an interrupted run resumes. Writes results/table1_<dataset>.md/.csv/.tex, figures and a per-run CSV.

    One cell again: `cctr train --dataset D --method M --labeled N --seed S`.
    """
    from cctr.config import EXPERIMENTS
    from cctr.data.datasets import get_spec
    from cctr.errors import CctrError
    from cctr.table1 import collect_records, disk_usage, load_table_spec, run_table, table_dataset, write_table

    if spec is None:
        dataset = dataset or "phantom-cardiac"
        get_spec(dataset)  # an unknown name is one line before any file is read
    path = spec or EXPERIMENTS / f"table1_{dataset.replace('-', '_')}.yaml"
    ts = load_table_spec(path, value(preset), seeds)
    trains = table_dataset(ts)  # the table's names, classes and store come from what its cells train
    if dataset and dataset != trains:
        raise CctrError(f"{path}: its cells train {trains}, not --dataset {dataset}")
    dataset, ds_spec = trains, get_spec(trains)
    use_tracking(tracking_uri)
    if collect:
        records = collect_records(ts, dataset)
    else:
        records = run_table(ts, log=lambda m: console.print(m, markup=False), progress=not as_json, jobs=jobs,
                            threads=threads, register=register, storage=storage, heartbeat_s=heartbeat)
    files = write_table(ts, records, dataset, ds_spec.class_names, out_dir, figures=figures)
    failed = [r for r in records if r.get("status") != "FINISHED"]
    if as_json:
        emit_json({"dataset": dataset, "files": {k: str(v) for k, v in files.items()}, "disk": disk_usage(records),
                   "cells": records})
    else:
        out.print(files["md"].read_text())
        out.print("wrote " + ", ".join(str(v) for v in files.values()))
    if failed:
        raise CctrError(f"{len(failed)} cell(s) did not finish: " + ", ".join(
            f"{r['method']} l={r['labeled']} seed={r['seed']} ({r.get('status')})" for r in failed))
