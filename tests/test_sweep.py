"""Sweep harness end to end: Optuna studies whose trials really train, tracked in MLflow."""

from __future__ import annotations

import json
import signal
import time

import optuna
import pytest

from cctr import tracking
from cctr.config import RunConfig, apply_overrides, from_dict
from cctr.errors import CctrError
from cctr.sweep import load_space, parse_labeled, run_sweep
from tests.helpers import TINY, TINY_SPACE, cli, cli_inprocess, popen_cli, write_yaml


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
    waiter = threading.Thread(target=lambda: got.update(b=_parent_run(study_b, cfg, "s", owner_b, space, wait_s=30)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # the non-owner does not create a parent of its own
    a = _parent_run(study_a, cfg, "s", owner_a, space)
    waiter.join(timeout=30)
    assert got["b"] == a
    assert len(tracking.find_runs("phantom-cardiac", "tags.role = 'study'")) == 1
    assert _parent_run(study_b, cfg, "s", False, space, wait_s=0) == a  # a re-run finds it at once


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
    # the parent holds what trials share and the searched ranges, not base values no trial used
    pp = parent.data.params
    assert "base.train.w_ct" not in pp and "base.train.w_con" not in pp
    assert pp["search.train.w_ct"] == "float 0.1..1" and pp["search.train.w_con"] == "float 0.01..0.2 log"
    assert pp["base.train.iters"] == "4"
    # ... and, at the end of the study, the winner
    bt = study.best_trial
    pt = parent.data.tags
    assert pt["best.trial"] == str(bt.number) and pt["best.run_id"] == bt.user_attrs["mlflow_run_id"]
    assert float(pt["best.val_dice"]) == pytest.approx(bt.value, abs=1e-4)
    assert {k: float(pt[f"best.{k}"]) for k in bt.params} == pytest.approx(bt.params)
    assert f"best trial #{bt.number}" in pt["mlflow.note.content"]
    assert parent.data.metrics["best_val_dice"] == pytest.approx(bt.value)
    nested = tracking.find_runs("phantom-cardiac", f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_id for r in nested} == {t.user_attrs["mlflow_run_id"] for t in trials}
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    for r in [parent, *nested]:  # provenance on every run
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
        assert r.data.tags["git_dirty"] in ("true", "false") and r.data.tags["metric_convention"] == "strict"
    for r in nested:
        assert r.info.status == "FINISHED"
        t = by_run[r.info.run_id]
        assert r.data.tags["optuna_trial"] == str(t.number)
        sampled = " ".join(f"{p.name.split('.')[-1]}={t.params[p.name]:.3g}" for p in space.params)
        assert r.info.run_name == f"cctr-l1-t{t.number} {sampled}"  # e.g. cctr-l1-t1 w_con=0.0608 w_ct=0.59
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


def test_sweep_jobs_runs_trials_in_parallel_workers(fresh_store):
    """`--jobs 2`: two spawned workers share the study; their trials overlap in time, one parent run."""
    space = load_space(write_yaml(fresh_store / "space.yaml", TINY_SPACE))
    storage = f"sqlite:///{fresh_store / 'optuna.db'}"
    cfg = apply_overrides(from_dict(RunConfig, TINY), ["train.method=ct", "train.iters=12", "train.val_every=4"])
    res = run_sweep(cfg, [1], space, 2, storage, progress=False, log=lambda m: None, jobs=2, threads=1)
    trials = optuna.load_study(study_name=res[0].study_name, storage=storage).get_trials()
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) >= 2 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    a, b = sorted(done, key=lambda t: t.datetime_start)[:2]
    assert b.datetime_start < a.datetime_complete  # the second started before the first finished
    assert a.params != b.params  # each worker's sampler draws its own values (the space's seed is shared)
    runs = [tracking.client().get_run(t.user_attrs["mlflow_run_id"]) for t in done]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {res[0].parent_run_id}
    assert all(r.info.status == "FINISHED" for r in runs)


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


def _tiny_ct(path):
    tiny = json.loads(json.dumps(TINY))
    tiny["train"]["method"] = "ct"  # no registration: the quickest real training
    return write_yaml(path, tiny)


def test_cli_sweep_outside_repo_finds_default_space(fresh_store, monkeypatch, capsys):
    """`--space` defaults to the repo's sweeps/default.yaml wherever the command is started."""
    cfg = _tiny_ct(fresh_store / "cfg.yaml")
    monkeypatch.chdir(fresh_store)
    code, out, err = cli_inprocess(capsys, "sweep", "--config", str(cfg), "--labeled", "1", "--trials", "1", "--json")
    assert code == 0, err
    (study,) = json.loads(out)["studies"]
    assert study["study_name"] == "phantom-cardiac-l1-default" and study["n_complete"] + study["n_pruned"] == 1


@pytest.mark.parametrize("args,message", [(["--labeled", "1,50"], "50 labeled"),
                                          (["--set", "data.size=48"], "multiple of 32")])
def test_cli_failed_sweep_leaves_nothing(fresh_store, args, message, monkeypatch, capsys):
    """Bad input found at the start: one line, exit 2, and no optuna.db, study or MLflow run."""
    cfg = _tiny_ct(fresh_store / "cfg.yaml")
    monkeypatch.chdir(fresh_store)
    code, _, err = cli_inprocess(capsys, "sweep", "--config", str(cfg), "--labeled", "1", "--trials", "1", *args)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (fresh_store / "mlruns" / "optuna.db").exists()
    assert tracking.find_runs("phantom-cardiac") == []


def _sweep_args(cfg, space, storage, trials, *extra):
    return ["sweep", "--config", str(cfg), "--dataset", "phantom-cardiac", "--labeled", "1", "--trials",
            str(trials), "--space", str(space), "--storage", storage, "--json", *extra]


def test_killed_worker_trial_fails_and_is_retried(fresh_store, capsys):
    """SIGKILL a worker mid-trial; re-running finishes the study, the killed trial FAIL, no run RUNNING."""
    tiny = json.loads(json.dumps(TINY))
    tiny["train"].update(method="ct", iters=12, val_every=4)
    cfg = write_yaml(fresh_store / "cfg.yaml", tiny)
    space = write_yaml(fresh_store / "space.yaml", TINY_SPACE)
    storage = f"sqlite:///{fresh_store / 'optuna.db'}"
    worker = popen_cli(*_sweep_args(cfg, space, storage, 2, "--heartbeat", "1", "--jobs", "1"))
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
    code, _, err = cli_inprocess(capsys, *_sweep_args(cfg, space, storage, 2, "--heartbeat", "1", "--jobs", "1"))
    assert code == 0, err
    study = optuna.load_study(study_name="phantom-cardiac-l1-space", storage=storage)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[victim.number] == optuna.trial.TrialState.FAIL
    done = [n for n, s in states.items() if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 2
    runs = tracking.find_runs("phantom-cardiac")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert tracking.client().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
