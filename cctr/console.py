"""Terminal output: the two consoles and the one progress bar, shared by the CLI and the library."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console


def _console(stderr: bool) -> Console:
    """Off a terminal (`make demo | tee log`) rich assumes 80 columns and wraps wide tables; use 200
    there unless COLUMNS says otherwise. Printed lines are never broken at the width (soft wrap; tables
    still fit their columns): a URL or path broken across lines cannot be clicked or copied."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 200
    return Console(stderr=stderr, width=width, soft_wrap=True)


console = _console(stderr=True)  # progress, logs, errors
out = _console(stderr=False)  # tables and results


def progress_bar(enabled: bool = True):
    """The one progress bar (on stderr, left on screen when done); the task's description carries the
    live figures. A null context when disabled (tests, sweeps)."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)
