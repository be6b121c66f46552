"""Everything Optuna (DESIGN §6): search spaces from YAML, one study per (dataset, labeled count),
pruning on validation Dice, resumable multi-worker storage with heartbeats and retries.

Each trial is a full `cctr.train.train` run, nested under one MLflow parent run per study.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.exceptions import ExperimentalWarning

from cctr import progress as progress_display
from cctr import workers
from cctr.config import RunConfig, apply_overrides, flatten, read_yaml
from cctr.errors import CctrError
from cctr.paths import mlruns_root

# heartbeats, stale-trial retries and the matplotlib plots are "experimental" in Optuna; we rely on them
warnings.filterwarnings("ignore", category=ExperimentalWarning)

PARAM_TYPES = ("float", "int", "categorical")
# the repo's search spaces, found from any working directory (like cctr.config.EXPERIMENTS)
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
DEFAULT_SPACE = SWEEPS / "default.yaml"


@dataclass(frozen=True)
class ParamSpec:
    name: str  # a flattened config key, e.g. "train.w_ct"
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        """The searched range, as logged on the study's parent run: `float 0.01..0.2 log`."""
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        return f"{self.kind} {self.low:g}..{self.high:g}" + (" log" if self.log else "") + \
            (f" step {self.step:g}" if self.step else "")


@dataclass
class Space:
    """A search space plus the pruner/sampler settings that belong with it."""

    name: str
    params: list[ParamSpec]
    pruner: dict = field(default_factory=lambda: {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    sampler: dict = field(default_factory=lambda: {"type": "tpe", "seed": 0})


def load_space(path: str | Path) -> Space:
    """Read and validate `sweeps/*.yaml`; unknown parameters and empty ranges are one-line errors."""
    p = Path(path)
    raw = read_yaml(p, "search space")
    known = flatten(RunConfig())
    params = []
    for name, d in (raw.get("params") or {}).items():
        if name not in known:
            raise CctrError(f"{p}: unknown parameter '{name}' (not a config key)")
        d = d or {}
        kind = d.get("type", "float")
        if kind not in PARAM_TYPES:
            raise CctrError(f"{p}: parameter '{name}' has type '{kind}'; use one of {', '.join(PARAM_TYPES)}")
        if kind == "categorical":
            choices = tuple(d.get("choices") or ())
            if not choices:
                raise CctrError(f"{p}: parameter '{name}' has no choices")
            params.append(ParamSpec(name, kind, choices=choices))
            continue
        lo, hi = d.get("low"), d.get("high")
        if lo is None or hi is None or not float(lo) < float(hi):
            raise CctrError(f"{p}: parameter '{name}' has an empty range (low={lo}, high={hi})")
        if d.get("log") and float(lo) <= 0:
            raise CctrError(f"{p}: parameter '{name}' is log-scaled but low={lo} <= 0")
        params.append(ParamSpec(name, kind, float(lo), float(hi), bool(d.get("log", False)), d.get("step")))
    if not params:
        raise CctrError(f"{p}: no parameters to search")
    sp = Space(p.stem, params)
    if raw.get("pruner"):
        sp.pruner = dict(raw["pruner"])
    if raw.get("sampler"):
        sp.sampler = dict(raw["sampler"])
    return sp


def parse_labeled(text: str) -> list[int]:
    """`1,2,4` → [1, 2, 4]; anything else is one clear error."""
    parts = [s.strip() for s in str(text).split(",")]
    if not parts or any(not s.isdigit() or int(s) < 1 for s in parts):
        raise CctrError(f"--labeled must be a comma-separated list of positive integers, got '{text}'")
    return [int(s) for s in parts]


def default_storage() -> str:
    return f"sqlite:///{(mlruns_root() / 'optuna.db').resolve()}"


def _make_pruner(d: dict):
    import optuna

    d = dict(d)
    kind = d.pop("type", "median")
    table = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
             "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    if kind not in table:
        raise CctrError(f"unknown pruner '{kind}'; known: {', '.join(table)}")
    return table[kind](**d)


def _make_sampler(d: dict, salt: int = 0):
    """The space's sampler; `salt` shifts its seed, so parallel workers (each with its own sampler
    object) do not draw the very same values: seeded alike, two workers' first trials were identical."""
    import optuna

    d = dict(d)
    kind = d.pop("type", "tpe")
    if salt and d.get("seed") is not None:
        d["seed"] = (int(d["seed"]) + salt) % 2**32
    table = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if kind not in table:
        raise CctrError(f"unknown sampler '{kind}'; known: {', '.join(table)}")
    return table[kind](**d)


def make_storage(url: str, heartbeat_s: int, on_stale: Callable | None = None):
    """An RDB storage with heartbeats: a killed worker's trial becomes FAIL and is retried
    (`on_stale(study, trial)` replaces the sweep's retry, for boards of tasks: `cctr.claims`)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

    def sweep_stale(study, trial) -> None:
        _close_orphan_run(trial)
        retry(study, trial)

    on_stale = on_stale or sweep_stale

    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}
        Path(url.split("sqlite:///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                              grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=on_stale)
        except (ImportError, ModuleNotFoundError) as e:
            raise CctrError(f"storage {_redact(url)}: driver missing ({e}); install the 'distributed' extra") from None
        except Exception as e:  # sqlalchemy OperationalError, ArgumentError, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if ("duplicate key" in msg or "already exists" in msg) and attempt < 4:
                time.sleep(1 + attempt)  # another worker is creating the schema right now
                continue
            raise CctrError(f"cannot open Optuna storage {_redact(url)}: {msg[:200]}") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _close_orphan_run(trial) -> None:
    """A trial whose worker died left its MLflow run RUNNING: end it as KILLED."""
    from cctr import tracking

    rid = trial.user_attrs.get("mlflow_run_id")
    if not rid:
        return
    try:
        if tracking.client().get_run(rid).info.status == "RUNNING":
            tracking.end_run(rid, "KILLED", "worker died (Optuna heartbeat expired)")
    except Exception:  # noqa: BLE001 — the run may never have been created
        pass


class Pruned(Exception):
    """Raised from the validation hook: Optuna prunes the trial; its MLflow run ended as asked."""

    run_status = "FINISHED"


@dataclass
class StudyResult:
    labeled: int
    study_name: str
    parent_run_id: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best: dict | None


def study_name(dataset: str, labeled: int, space: Space) -> str:
    return f"{dataset}-l{labeled}-{space.name}"


def run_sweep(
    base: RunConfig,
    labeled_counts: list[int],
    space: Space,
    n_trials: int,
    storage_url: str | None = None,
    timeout_s: float | None = None,
    heartbeat_s: int = 30,
    log: Callable[[str], None] = print,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
) -> list[StudyResult]:
    """Run (or resume, or join as one more worker) one study per labeled count.

    `jobs` > 1 runs that many worker processes on this machine (each with its share of the CPU
    threads, or one GPU each), all on the same storage: the same thing as starting the command `jobs`
    times, without the typing.
    """
    import optuna

    from cctr import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url or default_storage()
    # every labeled count's config and split first: bad input fails here, before a storage (an
    # empty optuna.db), a study or an MLflow run exists; then the storage, which fails fast when
    # unreachable, before the slow registration
    cfgs = [apply_overrides(base, [f"data.labeled={n}"]) for n in labeled_counts]
    splits = [_check_inputs(cfg) for cfg in cfgs]
    storage = make_storage(url, heartbeat_s)
    results = []
    deadline = time.time() + timeout_s if timeout_s else None
    velocities: dict = {}  # pairs shared by the nested labeled sets are registered once
    for n_lab, cfg, split in zip(labeled_counts, cfgs, splits):
        _prepare_registration(cfg, split, velocities, url, heartbeat_s)  # trained/applied once, reused by every trial
        name = study_name(cfg.data.dataset, n_lab, space)
        study, owner = _open_study(name, storage, space)
        parent = _parent_run(study, cfg, name, owner, space)
        log(f"study {name}: storage {_redact(url)}, parent MLflow run {parent}")
        with tracking.start_run(cfg.data.dataset, name, run_id=parent) as prun, \
                progress_display.study(name, url, n_trials, cfg.train.iters, jobs, enabled=progress) as shown:
            if jobs > 1:
                _optimize_parallel(url, heartbeat_s, name, cfg, space, n_trials, prun.run_id, deadline, jobs,
                                   workers.threads_per_job(jobs, threads), log)
            else:
                _optimize(study, cfg, space, n_trials, prun.run_id, deadline, progress and not shown, log)
            res = summarize_study(study, n_lab, prun.run_id)
            prun.log_metrics({f"best_{k}": v for k, v in (res.best or {}).items() if isinstance(v, float)}, 0)
            if res.best:
                prun.set_tags(best_tags(res.best, study_name=name))
            _log_study_figures(study, prun)
        results.append(res)
    return results


def _check_inputs(cfg: RunConfig):
    """The config's values and the split it asks for (a CctrError when either is bad)."""
    from cctr.data.datasets import load_dataset, make_split
    from cctr.train import validate_config

    validate_config(cfg)
    return make_split(load_dataset(cfg.data.dataset), cfg.data.labeled, cfg.data.seed, cfg.data.labeled_seed)


def _prepare_registration(cfg: RunConfig, split, velocities: dict, storage: str | None = None,
                          heartbeat_s: int = 30) -> None:
    from cctr.terms import get_method

    if get_method(cfg.train.method).needs_registration:
        from cctr.registration import ensure_registration, registration_maps

        ensure_registration(cfg.data.dataset, cfg.registration, split, progress=False, storage=storage,
                            heartbeat_s=heartbeat_s)
        registration_maps(cfg.data.dataset, cfg.registration, split, velocities=velocities)


def _open_study(name: str, storage, space: Space, salt: int = 0):
    """(study, owner). Creating the study is the one step the storage makes atomic (a unique name), so
    of several workers starting together exactly one owns it and names the MLflow parent run. `salt`:
    this worker's sampler seed offset (`_make_sampler`)."""
    import optuna

    kw = {"study_name": name, "storage": storage, "pruner": _make_pruner(space.pruner),
          "sampler": _make_sampler(space.sampler, salt)}
    try:
        return optuna.create_study(direction="maximize", **kw), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kw), False


def _parent_run(study, cfg: RunConfig, name: str, owner: bool, space: Space, wait_s: float = 60.0) -> str:
    """One MLflow parent run per study, remembered on the study so workers and re-runs share it.

    Only the study's owner creates it; other workers wait for its id. If none appears in `wait_s`
    (the owner died before writing it), this worker creates one. Its params are what every trial
    shares (`base.*`) and the searched ranges (`search.*`); a searched key's base value, which no
    trial used, is not logged.
    """
    from cctr import tracking

    key = "mlflow_parent_run_id"
    deadline = time.time() + (0.0 if owner else wait_s)
    while not (rid := study.user_attrs.get(key)) and time.time() < deadline:
        time.sleep(0.5)
    if rid:
        return rid
    searched = {p.name: p.describe() for p in space.params}
    params = {"study": name, **{f"base.{k}": v for k, v in flatten(cfg).items() if k not in searched},
              **{f"search.{k}": v for k, v in searched.items()}}
    run = tracking.create_run(cfg.data.dataset, name, params=params,
                              tags={"optuna_study": name, "role": "study", "labeled": cfg.data.labeled})
    tracking.end_run(run.run_id, "FINISHED")
    study.set_user_attr(key, run.run_id)
    return run.run_id


def _taken(study) -> int:
    """Trials that count towards --trials (complete, pruned) plus those a worker is training now."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def _optimize(study, cfg: RunConfig, space: Space, n_trials: int, parent: str, deadline, progress, log) -> None:
    import optuna
    from optuna.storages import fail_stale_trials

    def objective(trial: optuna.Trial) -> float:
        return _objective(trial, cfg, space, parent, progress)

    while True:
        fail_stale_trials(study)  # a dead worker's trial is FAIL (and retried), no longer counted as running
        if _taken(study) >= n_trials:  # workers in flight finish the study: no overshoot
            break
        if deadline and time.time() > deadline:
            log("sweep: timeout reached")
            break
        try:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True)
        except Exception:
            from cctr import tracking

            if tracking.reachable():
                raise
            raise CctrError(f"lost the tracking store {tracking.redact(tracking.tracking_uri())}: the trial is "
                            "failed in the study (other workers go on; a re-run joins again)") from None


def _optimize_parallel(url: str, heartbeat_s: int, name: str, cfg: RunConfig, space: Space, n_trials: int,
                       parent: str, deadline, jobs: int, threads: int, log) -> None:
    """`jobs` spawned workers optimise the one study until it has `n_trials` finished trials; Ctrl-C
    or SIGTERM stops them all (their runs end KILLED, their trials are failed and retried on resume)."""
    log(f"sweep: {jobs} workers, {threads} thread(s) each")
    args = (url, heartbeat_s, name, cfg, space, n_trials, parent, deadline, threads, os.getpid())
    procs = workers.spawn(_sweep_worker, lambda w: args, jobs, threads, "cctr-sweep-worker")
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        workers.stop(procs)
        raise
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise CctrError(f"sweep: {len(failed)} worker(s) failed (exit codes {failed}); see the FAILED trials")


def _sweep_worker(url: str, heartbeat_s: int, name: str, cfg: RunConfig, space: Space, n_trials: int, parent: str,
                  deadline, threads: int, parent_pid: int) -> None:
    import optuna

    if not workers.enter_worker(parent_pid, threads):
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # a worker's own seed offset: its host and process (workers on other machines join the same study)
        salt = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
        study, _ = _open_study(name, make_storage(url, heartbeat_s), space, salt)
        _optimize(study, cfg, space, n_trials, parent, deadline, False, lambda m: None)
    except KeyboardInterrupt:
        return


def _objective(trial, cfg: RunConfig, space: Space, parent: str, progress: bool) -> float:
    import optuna

    from cctr.runs import run_dir_for
    from cctr.train import Diverged, train

    values = {p.name: p.suggest(trial) for p in space.params}
    tcfg = apply_overrides(cfg, [f"{k}={v}" for k, v in values.items()])
    name = trial.study.study_name

    def on_validation(step: int, val: float) -> None:
        trial.report(val, step)
        if trial.should_prune():
            raise Pruned(f"pruned at iteration {step} (val dice {val:.4f})")

    run_name = trial_run_name(tcfg, trial.number, values)

    def on_start(rid: str) -> None:
        trial.set_user_attr("mlflow_run_id", rid)
        trial.set_user_attr("mlflow_run_name", run_name)

    run_dir = run_dir_for(tcfg) / f"trial{trial.number}-{os.getpid()}"
    try:
        res = train(tcfg, run_dir, progress=progress, on_validation=on_validation, parent_run_id=parent,
                    tags={"optuna_study": name, "optuna_trial": trial.number}, on_start=on_start,
                    run_name=run_name)
    except Pruned as e:
        raise optuna.TrialPruned(str(e)) from None
    except Diverged as e:
        raise optuna.TrialPruned(f"diverged: {e}") from None
    for k in ("test_dice", "test_hd95_mm", "val_best_dice"):
        if k in res.metrics:
            trial.set_user_attr(k, float(res.metrics[k]))
    return float(res.metrics["val_best_dice"])


def _short_keys(keys) -> dict[str, str]:
    """`train.w_ct` → `w_ct`; the full key where two sections share the last part."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def format_params(values: dict[str, Any], sep: str = ", ", prec: str = ".3g", short: bool = True) -> str:
    """`w_ct=0.42, w_con=0.05`: sampled values as people read them (short keys where unambiguous)."""
    names = _short_keys(values) if short else {k: k for k in values}
    return sep.join(f"{names[k]}={v:{prec}}" if isinstance(v, float) else f"{names[k]}={v}" for k, v in values.items())


def trial_run_name(cfg: RunConfig, number: int, values: dict[str, Any]) -> str:
    """`cctr-l1-t3 w_ct=0.42 w_con=0.05`: method, labeled count, trial number and the sampled values,
    so the trials of a study differ in the runs table and in chart legends."""
    return f"{cfg.train.method}-l{cfg.data.labeled}-t{number} {format_params(values, ' ')}".strip()


def best_tags(best: dict, study_name: str) -> dict[str, str]:
    """`best.*` tags (tags, not params: a resumed study may find a better trial) and the run's
    description naming the winner, shown at the top of the parent run's page."""
    params = format_params(best["params"], prec=".4g", short=False)
    note = (f"Study {study_name}: best trial #{best['trial']}, run {best['run_name']} "
            f"({best['run_id']}), validation Dice {best['val_dice']:.4f}; {params}.")
    return {"best.trial": best["trial"], "best.run_id": best["run_id"], "best.run_name": best["run_name"],
            "best.val_dice": f"{best['val_dice']:.4f}", **{f"best.{k}": v for k, v in best["params"].items()},
            "mlflow.note.content": note}


def summarize_study(study, labeled: int, parent: str) -> StudyResult:
    from optuna.trial import TrialState

    ts = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s for t in ts) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = None
    if n[TrialState.COMPLETE]:
        bt = study.best_trial
        best = {"trial": bt.number, "val_dice": float(bt.value), "params": dict(bt.params),
                "run_id": bt.user_attrs.get("mlflow_run_id", "-"),
                "run_name": bt.user_attrs.get("mlflow_run_name", f"trial {bt.number}"),
                "test_dice": float(bt.user_attrs.get("test_dice", float("nan"))),
                "test_hd95_mm": float(bt.user_attrs.get("test_hd95_mm", float("nan")))}
    return StudyResult(labeled, study.study_name, parent, n[TrialState.COMPLETE], n[TrialState.PRUNED],
                       n[TrialState.FAIL], best)


def _log_study_figures(study, run) -> None:
    """Optuna's history and importance plots as artifacts of the parent run (when computable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vm
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("optimization_history.png", vm.plot_optimization_history)]
    if len(complete) >= 2 and len(complete[0].params) >= 2:
        plots.append(("param_importances.png", vm.plot_param_importances))
    for fname, fn in plots:
        if not complete:
            break
        try:
            ax = fn(study)
        except (ValueError, RuntimeError):  # e.g. importances need variation across trials
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        run.log_figure(fig, fname)
        plt.close(fig)
