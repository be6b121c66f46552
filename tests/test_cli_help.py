"""The CLI explains itself: main uses and version at the top, flags shown as flags, every option with
help text, fixed choices checked at parse time, and `cctr train --dataset D ... --seed S` building the
exact config of Table 1's cell (D, method, labeled, S)."""

from __future__ import annotations

import pytest
import typer

from cctr.cli import app
from cctr.config import EXPERIMENTS, to_dict
from tests.helpers import cli


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _root():
    return typer.main.get_command(app)


def test_every_option_and_argument_has_help():
    missing = []
    for path, cmd in _commands(_root()):
        for p in cmd.params:
            if not getattr(p, "help", None):
                missing.append(f"cctr {' '.join(path)} {p.name}")
    assert not missing, missing


def test_root_help_names_main_uses_and_version():
    p = cli("--help", timeout=60)
    assert p.returncode == 0
    for s in ("Main uses", "cctr sweep", "cctr table1", "cctr ui", "make demo", "--version", "CCTR_MLRUNS"):
        assert s in p.stdout, s
    v = cli("--version", timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("cctr ")


def test_flags_show_no_value_placeholder():
    p = cli("train", "--help", timeout=60, env_extra={"COLUMNS": "200"})
    assert "<bool>" not in p.stdout and "list[str]" not in p.stdout
    assert "KEY=VALUE" in p.stdout


def test_method_typo_rejected_at_parse_time():
    from cctr.terms import METHODS

    p = cli("train", "--method", "cctx", timeout=60)
    assert p.returncode == 2
    assert "Invalid value for '--method'" in p.stderr
    for m in METHODS:
        assert f"'{m}'" in p.stderr


@pytest.mark.parametrize("cmd", [["evaluate", "x.pt", "--convention", "mm"], ["sweep", "--preset", "fast"],
                                 ["evaluate", "x.pt", "--split", "testing"]])
def test_fixed_choices_rejected_at_parse_time(cmd):
    p = cli(*cmd, timeout=60)
    assert p.returncode == 2 and "Invalid value" in p.stderr


@pytest.mark.parametrize("method,labeled,seed", [("cctr", 1, 1), ("sup", 4, 2), ("full", 1, 0)])
def test_train_builds_the_table1_cell(method, labeled, seed):
    from cctr.cli.train import run_config
    from cctr.table1 import cell_config, load_table_spec

    spec = load_table_spec(EXPERIMENTS / "table1_phantom_cardiac.yaml", "quick")
    want = to_dict(cell_config(spec, method, labeled, seed))
    got = to_dict(run_config("phantom-cardiac", None, "quick", method, labeled, seed, None, []))
    assert got == want


def test_train_finds_the_dataset_yaml_from_anywhere(tmp_path, monkeypatch):
    from cctr.cli.train import run_config

    monkeypatch.chdir(tmp_path)
    cfg = run_config("phantom-abdomen", None, None, None, None, None, None, [])
    assert cfg.data.dataset == "phantom-abdomen" and cfg.preset == "quick"
    assert cfg.train.iters == 800  # phantom_abdomen.yaml's quick preset, not the defaults


def test_seed_means_one_thing(tmp_path):
    from cctr.cli.train import run_config

    cfg = run_config("phantom-cardiac", None, "quick", None, None, 3, 5, ["train.w_ct=0.2"])
    assert (cfg.train.seed, cfg.data.labeled_seed, cfg.data.seed, cfg.train.w_ct) == (3, 3, 5, 0.2)


def test_sweep_labeled_default_comes_from_the_dataset():
    from cctr.data.datasets import get_spec

    assert get_spec("acdc").labeled_counts == (1, 3, 7)
    sweep = _root().commands["sweep"]
    labeled = next(p for p in sweep.params if p.name == "labeled")
    assert labeled.default is None and "1,3,7" in labeled.help
