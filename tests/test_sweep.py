"""Sweep harness end to end: Optuna studies whose trials really train, tracked in MLflow."""

from __future__ import annotations

import json
import signal
import time

import optuna
import pytest

from cctr import tracking
from cctr.config import RunConfig, from_dict
from cctr.errors import CctrError
from cctr.sweep import load_space, parse_labeled, run_sweep
from tests.helpers import TINY, TINY_SPACE, cli, popen_cli, write_yaml


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    return tmp_path


def test_one_parent_run_per_study_whoever_starts_first(fresh_store):
    """The worker whose create_study succeeds owns the parent run; a second one opening the same study
    at the same moment waits for that id instead of making a second parent (no sleep-and-hope)."""
    import threading

    from cctr.sweep import _open_study, _parent_run, make_storage

    space = load_space(write_yaml(fresh_store / "space.yaml", TINY_SPACE))
    storage = make_storage(f"sqlite:///{fresh_store / 'optuna.db'}", 30)
    cfg = from_dict(RunConfig, TINY)
    study_a, owner_a = _open_study("s", storage, space)
    study_b, owner_b = _open_study("s", storage, space)
    assert (owner_a, owner_b) == (True, False)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(b=_parent_run(study_b, cfg, "s", owner_b, wait_s=30)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # the non-owner does not create a parent of its own
    a = _parent_run(study_a, cfg, "s", owner_a)
    waiter.join(timeout=30)
    assert got["b"] == a
    assert len(tracking.find_runs("phantom-cardiac", "tags.role = 'study'")) == 1
    assert _parent_run(study_b, cfg, "s", False, wait_s=0) == a  # a re-run finds it at once


def test_two_trial_sweep_end_to_end(fresh_store):
    space = load_space(write_yaml(fresh_store / "space.yaml", TINY_SPACE))
    storage = f"sqlite:///{fresh_store / 'optuna.db'}"
    res = run_sweep(from_dict(RunConfig, TINY), [1], space, 2, storage, progress=False, log=lambda m: None)
    assert len(res) == 1 and res[0].n_complete + res[0].n_pruned == 2

    study = optuna.load_study(study_name=res[0].study_name, storage=storage)
    trials = study.get_trials()
    assert len(trials) == 2
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert all(t.value is not None for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert all(t.intermediate_values for t in trials)  # validation Dice reported for pruning

    c = tracking.client()
    parent = c.get_run(res[0].parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == res[0].study_name
    nested = tracking.find_runs("phantom-cardiac", f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_id for r in nested} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for r in nested:
        assert r.info.status == "FINISHED"
        assert r.data.tags["optuna_trial"] in {str(t.number) for t in trials}
        assert r.data.params["train.method"] == "cctr"
        hist = c.get_metric_history(r.info.run_id, "val_dice")
        assert [m.step for m in hist] == [2, 4][: len(hist)] and hist
        assert c.get_metric_history(r.info.run_id, "loss")
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        if r.data.tags.get("ended_early") is None:  # completed trials carry the full set
            assert {"test_per_case_best.csv", "val_overlays.png", "pseudo_label_quality.png",
                    "checkpoints"} <= arts
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"optimization_history.png"}

    again = run_sweep(from_dict(RunConfig, TINY), [1], space, 2, storage, progress=False, log=lambda m: None)
    assert len(optuna.load_study(study_name=res[0].study_name, storage=storage).get_trials()) == 2  # resumed
    assert again[0].parent_run_id == res[0].parent_run_id


@pytest.mark.parametrize("text", ["1,,x", "0", "", "a", "-1"])
def test_bad_labeled(text):
    with pytest.raises(CctrError, match="--labeled"):
        parse_labeled(text)


@pytest.mark.parametrize(
    "params,msg",
    [({"train.nope": {"low": 0, "high": 1}}, "unknown parameter"),
     ({"train.w_ct": {"low": 1.0, "high": 1.0}}, "empty range"),
     ({"train.memory_size": {"type": "categorical", "choices": []}}, "no choices"),
     ({"train.w_ct": {"type": "weird", "low": 0, "high": 1}}, "type")],
)
def test_bad_space(tmp_path, params, msg):
    with pytest.raises(CctrError, match=msg):
        load_space(write_yaml(tmp_path / "s.yaml", {"params": params}))


def test_cli_bad_input(tmp_path):
    space = write_yaml(tmp_path / "bad.yaml", {"params": {"train.w_ct": {"low": 2, "high": 1}}})
    cases = [
        ["sweep", "--dataset", "nope"],
        ["sweep", "--labeled", "1,,x"],
        ["sweep", "--labeled", "0"],
        ["sweep", "--space", str(space)],
        ["sweep", "--storage", "postgresql+psycopg2://u:p@127.0.0.1:1/none", "--trials", "1"],
    ]
    for args in cases:
        p = cli(*args, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr)


def _sweep_args(cfg, space, storage, trials, *extra):
    return ["sweep", "--config", str(cfg), "--dataset", "phantom-cardiac", "--labeled", "1", "--trials",
            str(trials), "--space", str(space), "--storage", storage, "--json", *extra]


def test_killed_worker_trial_fails_and_is_retried(fresh_store):
    """SIGKILL a worker mid-trial; re-running finishes the study, the killed trial FAIL, no run RUNNING."""
    tiny = json.loads(json.dumps(TINY))
    tiny["train"].update(method="ct", iters=12, val_every=4)
    cfg = write_yaml(fresh_store / "cfg.yaml", tiny)
    space = write_yaml(fresh_store / "space.yaml", TINY_SPACE)
    storage = f"sqlite:///{fresh_store / 'optuna.db'}"
    worker = popen_cli(*_sweep_args(cfg, space, storage, 2, "--heartbeat", "1"))
    try:
        victim = None
        deadline = time.time() + 240
        while time.time() < deadline and victim is None:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="phantom-cardiac-l1-space", storage=storage)
            except KeyError:
                continue
            running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING
                       and "mlflow_run_id" in t.user_attrs]
            victim = running[0] if running else None
        assert victim is not None, "no trial started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert tracking.client().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    time.sleep(3)  # let the heartbeat go stale (grace = 2 x 1 s)
    p = cli(*_sweep_args(cfg, space, storage, 2, "--heartbeat", "1"), timeout=600)
    assert p.returncode == 0, p.stderr
    study = optuna.load_study(study_name="phantom-cardiac-l1-space", storage=storage)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[victim.number] == optuna.trial.TrialState.FAIL
    done = [n for n, s in states.items() if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 2
    runs = tracking.find_runs("phantom-cardiac")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert tracking.client().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
