"""Usage errors typed at the real CLI: click's usage message, exit 2, never a traceback — whichever
click (the `click` package or Typer's vendored copy) raises them."""

from __future__ import annotations

import pytest

from tests.helpers import cli

CASES = [
    (["predict"], "Missing argument 'checkpoint'"),
    (["predict", "best.pt"], "Missing argument 'input'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["sweep", "--trials", "abc"], "Invalid value for '--trials'"),
    (["data", "show"], "Missing argument 'dataset'"),
    (["register", "report", "--dataset", "phantom-cardiac", "--labeled", "one"], "Invalid value for '--labeled'"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_error_exit_2_with_usage(args, message):
    p = cli(*args, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stderr.startswith("Usage: cctr "), p.stderr
    assert f"Error: {message}" in p.stderr, p.stderr
    assert p.stdout == ""


def test_both_clicks_caught():
    """The vendored click's exception base is caught when Typer carries one, click's always."""
    import click

    from cctr.cli import _click_exceptions

    usage, aborts = _click_exceptions()
    assert click.exceptions.ClickException in usage and click.exceptions.Abort in aborts
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        return
    assert ClickException in usage
