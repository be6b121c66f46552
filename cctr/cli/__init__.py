"""Typer app: thin; parses arguments, calls the modules, prints tables or one JSON object.

Each command group lives in its own module here; this file assembles them and owns the
error contract (user errors: one stderr line, exit 2, no traceback).
"""

from __future__ import annotations

import signal
import sys

import typer
from rich.table import Table

from cctr.cli import data, register
from cctr.cli.common import emit_json
from cctr.cli.evaluate import evaluate_cmd, predict_cmd
from cctr.cli.sweep import sweep_cmd, table1_cmd, ui_cmd
from cctr.cli.train import train_cmd
from cctr.console import console, out
from cctr.errors import CctrError

app = typer.Typer(help="CCT-R: semi-supervised segmentation guided by registration.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data.app, name="data")
app.add_typer(register.app, name="register")
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("predict")(predict_cmd)
app.command("sweep")(sweep_cmd)
app.command("table1")(table1_cmd)
app.command("ui")(ui_cmd)


@app.command("bench")
def bench(as_json: bool = typer.Option(False, "--json")) -> None:
    """Speed figures side by side in one run (phantom build, loader, metrics, training step)."""
    from cctr.bench import run_bench

    res = run_bench(log=console.print)
    if as_json:
        emit_json(res)
        return
    t = Table(title="cctr bench")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def quiet_libraries() -> None:
    """Library chatter is not for users of the CLI: stderr carries progress and errors only."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module="optuna")
    # read when mlflow is imported (lazily, later): hides "Creating initial MLflow database tables..."
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main() -> None:
    """Entry point: user errors become one stderr line and exit 2, never a traceback."""
    import click

    quiet_libraries()
    signal.signal(signal.SIGTERM, _terminate)  # `kill` ends MLflow runs KILLED, like Ctrl-C
    try:
        app(standalone_mode=False)
    except CctrError as e:
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
