"""Typer app: thin; parses arguments, calls the modules, prints tables or one JSON object.

Each command group lives in its own module here; this file assembles them and owns the
error contract (user errors: one stderr line, exit 2, no traceback).
"""

from __future__ import annotations

import re
import signal
import sys

import typer
from rich.table import Table

from cctr import tracking
from cctr.cli import data, register
from cctr.cli.common import emit_json, json_option
from cctr.cli.evaluate import evaluate_cmd, predict_cmd
from cctr.cli.sweep import sweep_cmd, table1_cmd, ui_cmd
from cctr.cli.train import train_cmd
from cctr.console import console, out
from cctr.errors import CctrError

HELP = """CCT-R: semi-supervised medical image segmentation guided by registration.

Main uses: `cctr sweep` (tune a method's loss weights), `cctr table1` (every method x labeled count x seed, then the table), `cctr ui` (browse every run in MLflow). First time: `make demo`, then `make ui`.

Example pipeline (one run by hand; see README.md):
  cctr register train --dataset phantom-cardiac
  cctr train --dataset phantom-cardiac --method cctr --labeled 1 --seed 0
  cctr evaluate RUN_ID --convention strict
"""

EPILOG = ("Environment (paths relative to the current directory): CCTR_DATA_ROOT (raw datasets, default "
          "data/), CCTR_CACHE (prepared cases, registration nets and maps, default data_cache/), CCTR_MLRUNS "
          "(MLflow and Optuna stores, default mlruns/), MLFLOW_TRACKING_URI (a shared tracking server instead: "
          "docs/cluster.md), CCTR_PLUGINS (your modules of extra loss terms and methods: docs/method.md). "
          "Docs: README.md and docs/.")

MAIN, SINGLE, TOOLS = "Main uses", "Single runs", "Data and tools"

app = typer.Typer(help=HELP, epilog=EPILOG, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode="rich")
app.command("sweep", rich_help_panel=MAIN)(sweep_cmd)
app.command("table1", rich_help_panel=MAIN)(table1_cmd)
app.command("ui", rich_help_panel=MAIN)(ui_cmd)
app.add_typer(register.app, name="register", rich_help_panel=SINGLE)
app.command("train", rich_help_panel=SINGLE)(train_cmd)
app.command("evaluate", rich_help_panel=SINGLE)(evaluate_cmd)
app.command("predict", rich_help_panel=SINGLE)(predict_cmd)
app.add_typer(data.app, name="data", rich_help_panel=TOOLS)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("cctr")
        except PackageNotFoundError:  # a source tree that was never installed
            v = "unknown (not installed)"
        out.print(f"cctr {v}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit.", show_default=False)) -> None:
    pass


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             rich_help_panel=TOOLS)
def bench(ctx: typer.Context, as_json: bool = json_option(),
          smoke: bool = typer.Option(False, "--smoke", help="Token sizes, seconds: checks the command, not speed."),
          scale: bool = typer.Option(False, "--scale", help="Every stage on a Synapse-sized set (30 x 512x512x120), "
                                     "one JSON object. Options after it: --cases N (30), --size PX (512), --slices N (120), "
                                     "--labeled N (1), --reg-iters N (20), --refine-iters N, --iters N (20), "
                                     "--train-size PX, --batch N, --workdir DIR (scale_bench), --build-only; "
                                     "`cctr bench --scale --help` describes them.")
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


def show_flags_as_flags() -> None:
    """Typer >= 0.2x shows a type placeholder beside every option, flags included (`--json <bool>`,
    `--help <bool>`), which reads as if the flag took a value. Flags show none; a repeatable option
    shows its element type, not `list[...]`."""
    from typer import core

    orig = getattr(core.TyperOption, "display_type_rich", None)
    if orig is None or getattr(orig, "_cctr", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        shown = orig(self, ctx)
        if shown and getattr(self, "multiple", False) and self.metavar is None:
            shown = re.sub(r"list\[(.*)\]", r"\1", shown) + " (repeatable)"
        return shown

    display_type_rich._cctr = True
    core.TyperOption.display_type_rich = display_type_rich


show_flags_as_flags()


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
