"""Typer app: thin; parses arguments, calls the modules, prints tables or one JSON object.

Each command group lives in its own module here; this file assembles them and owns the
error contract (user errors: one stderr line, exit 2, no traceback).
"""

from __future__ import annotations

import signal
import sys

import typer
from rich.table import Table

from cctr import tracking
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


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
          smoke: bool = typer.Option(False, "--smoke", help="Token sizes, seconds: checks the command, not speed."),
          scale: bool = typer.Option(False, "--scale", help="Every stage on a Synapse-sized set (30 x 512x512x120; "
                                     "--cases/--size/--slices/--iters/--workdir ... make it smaller); one JSON object.")
          ) -> None:
    """Speed figures side by side in one run (phantom build, loader, metrics, training step vs its floor)."""
    from cctr.bench import run_bench

    if scale:
        from cctr.scale_bench import main as scale_main

        scale_main(list(ctx.args))
        return
    if ctx.args:
        raise typer.BadParameter(f"unexpected arguments {' '.join(ctx.args)} (only --scale takes more)")

    res = run_bench(log=console.print, smoke=smoke)
    if as_json:
        emit_json(res)
        return
    t = Table(title="cctr bench")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        vals = v if isinstance(v, list) else [v]
        t.add_row(k, ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in vals))
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


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error bases, abort classes) of every click Typer may raise through.

    Typer >= 0.20 vendors its own click (`typer._click`), whose exceptions do not derive from the
    installed `click` package's; older Typer raises `click`'s. Catch both so a usage error is never
    a traceback, whichever Typer is installed.
    """
    import click

    usage: list[type] = [click.exceptions.ClickException]
    abort: list[type] = [click.exceptions.Abort]
    try:
        from typer import exceptions as typer_exceptions
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        usage.append(vendored.ClickException)
        abort.append(typer_exceptions.Abort)
    return tuple(usage), tuple(abort)


def main() -> None:
    """Entry point: user errors become one stderr line and exit 2, never a traceback; usage errors
    (missing argument, unknown option or command, bad value) print click's usage message, exit 2."""
    quiet_libraries()
    tracking.SOURCE_NAME = " ".join(["cctr", *sys.argv[1:2]])  # e.g. `cctr sweep` on every run it makes
    signal.signal(signal.SIGTERM, _terminate)  # `kill` ends MLflow runs KILLED, like Ctrl-C
    usage_errors, aborts = _click_exceptions()
    try:
        code = app(standalone_mode=False, prog_name="cctr")
    except CctrError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(2)
    except usage_errors as e:
        e.show()
        sys.exit(2)
    except (KeyboardInterrupt, *aborts):
        console.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
