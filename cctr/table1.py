"""Table 1: methods x labeled counts x seeds, each cell one tracked run; resumable and parallel.

A cell is done when MLflow holds a FINISHED run tagged with this table, the cell and the same
config hash; re-running only trains what is missing, then the table is rebuilt from MLflow.

Seeds (issue 11): a Table-1 seed `s` sets `train.seed = s` and `data.labeled_seed = s` (which
training cases are labeled); `data.seed` (train/val/test) stays fixed, so every seed is tested on
the same cases and the registration net (trained without labels) is trained once per dataset.

Parallel cells: `run_table(spec, jobs=N)` runs N spawned worker processes, each with its share of
CPU threads (and one GPU each where there are several). The parent creates everything shared first
(dataset cache, splits, registration maps of every labeled set), so workers only read those stores;
MLflow's sqlite store serialises writers itself (busy timeout). Ctrl-C / SIGTERM end every cell's
run KILLED; a re-run resumes interrupted cells from their `last.pt` (or retrains them) and skips
finished ones, giving the same table as an uninterrupted run.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cctr import progress as progress_display
from cctr import workers
from cctr.atomic import atomic_file
from cctr.checkpoint import config_hash
from cctr.config import (
    EXPERIMENTS,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)
from cctr.errors import CctrError

CHECKPOINTS = (("best", "best-val checkpoint"), ("last", "last checkpoint"))
REFERENCE = "cctr"  # every other method is tested against this row


@dataclass
class Table1Spec:
    name: str
    config: str
    preset: str
    methods: list[str]
    labeled: list[int]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)


def load_table_spec(path: Path, preset: str | None = None, seeds: int | None = None) -> Table1Spec:
    raw = read_yaml(path, "table spec")
    from cctr.train import get_method

    for m in raw.get("methods", []):
        get_method(m)
    preset = preset or raw.get("preset", "quick")
    sets = raw.get("set") or {}  # optional overrides, per preset (a dict) or for every preset (a list)
    config = str(raw["config"])
    if not Path(config).exists() and (EXPERIMENTS.parent / config).exists():  # the repo's specs work from anywhere
        config = str(EXPERIMENTS.parent / config)
    spec = Table1Spec(Path(path).stem, config, preset, list(raw["methods"]),
                      [int(x) for x in raw["labeled"]], [int(x) for x in raw.get("seeds", [0])],
                      list(sets.get(preset, []) if isinstance(sets, dict) else sets))
    if seeds is not None:
        if seeds < 1:
            raise CctrError(f"SEEDS must be >= 1, got {seeds}")
        spec.seeds = list(range(seeds))
    if not spec.methods or not spec.labeled or not spec.seeds:
        raise CctrError(f"{path}: methods, labeled and seeds must be non-empty")
    return spec


def cell_config(spec: Table1Spec, method: str, labeled: int, seed: int) -> RunConfig:
    """Seed `seed` is the training seed and the labeled-set seed; the split seed `data.seed` stays."""
    base = load_config(spec.config, spec.preset, spec.overrides)
    return apply_overrides(base, [f"train.method={method}", f"data.labeled={labeled}", f"train.seed={seed}",
                                  f"data.labeled_seed={seed}"])


def cells(spec: Table1Spec) -> list[tuple[str, int, int]]:
    """`full` ignores the labeled count: it is trained once per seed and shown in every column."""
    out = []
    for m in spec.methods:
        for lab in ([spec.labeled[0]] if m == "full" else spec.labeled):
            for s in spec.seeds:
                out.append((m, lab, s))
    return out


def cell_split(cfg: RunConfig):
    from cctr.data.datasets import load_dataset, make_split

    return make_split(load_dataset(cfg.data.dataset), cfg.data.labeled, cfg.data.seed, cfg.data.labeled_seed)


# ----------------------------------------------------------------------------- shared stores


def prepare_shared(cfgs: list[RunConfig], log: Callable[[str], None] = print, register: bool = False,
                   progress: bool = False) -> list:
    """Create, in this process, everything the cells share, so parallel workers only read it:
    the dataset cache, the split files, the registration model and the registration maps of every
    labeled set a registration-based cell needs.

    Without `register` a missing registration model is the trainer's CctrError (naming
    `cctr register train`); with it the model is trained here, once. Returns each config's split.
    """
    from cctr.data.datasets import load_dataset
    from cctr.train import get_method

    if not cfgs:
        return []
    load_dataset(cfgs[0].data.dataset)
    needs_maps: dict[tuple, tuple[RunConfig, Any]] = {}
    splits = []
    for cfg in cfgs:
        split = cell_split(cfg)  # writes the split file once, here
        splits.append(split)
        if get_method(cfg.train.method).needs_registration:
            key = (config_hash(to_dict(cfg.registration)), tuple(split.labeled), tuple(split.train))
            needs_maps.setdefault(key, (cfg, split))
    if not needs_maps:
        return splits
    from cctr.registration import ensure_registration, registration_maps

    velocities: dict = {}  # pairs shared by nested labeled sets are registered once
    order = sorted(needs_maps.values(), key=lambda cs: (cs[1].labeled[0], len(cs[1].labeled)))
    for i, (cfg, split) in enumerate(order):
        if register:  # returns at once when this split's model is finished; else maps name the command
            ensure_registration(cfg.data.dataset, cfg.registration, split, progress=progress)
        log(f"registration maps {i + 1}/{len(needs_maps)}: labeled {', '.join(split.labeled)}")
        registration_maps(cfg.data.dataset, cfg.registration, split, progress=progress, velocities=velocities)
    return splits


# ----------------------------------------------------------------------------- running cells


def _lock_table(dataset: str, name: str):
    """An exclusive lock per table (released by the OS even on SIGKILL): two `cctr table1` of one
    table at once would train the same cells into the same folders."""
    import fcntl

    from cctr.paths import mlruns_root

    path = mlruns_root() / "locks" / f"table1-{dataset}-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise CctrError(f"another `cctr table1` is running this table ({path}{', pid ' + who if who else ''})") \
            from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _table_runs(dataset: str, name: str, status: str | None = None, role: str = "cell") -> list:
    from cctr import tracking

    flt = f"tags.table1 = '{name}' and tags.role = '{role}'"
    if status:
        flt += f" and attributes.status = '{status}'"
    runs, token = [], None
    c = tracking.client()
    exp = c.get_experiment_by_name(dataset)
    if exp is None:
        return []
    while True:
        page = c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _end_stale_runs(dataset: str, name: str, log: Callable[[str], None]) -> None:
    """Cells left RUNNING by a process that died without cleaning up (SIGKILL, power loss): we hold
    the table lock, so nobody else runs them; they end KILLED."""
    from cctr import tracking

    for r in _table_runs(dataset, name, "RUNNING") + _table_runs(dataset, name, "RUNNING", "table"):
        tracking.end_run(r.info.run_id, "KILLED", "the table process ended without finishing this cell")
        log(f"marked stale run {r.info.run_id} ({r.info.run_name}) KILLED")


def _resume_point(cfg: RunConfig, run_dir: Path, table: str) -> Path | None:
    """`last.pt` of an interrupted cell of this table, if it is resumable here; else train afresh."""
    from cctr import tracking
    from cctr.checkpoint import load_checkpoint

    last = run_dir / "last.pt"
    if not last.is_file():
        return None
    try:
        ck = load_checkpoint(last, "cctr-segmentation")
        if "optimizer" not in ck or ck.get("config") != to_dict(cfg) or not ck.get("run_id"):
            return None
        run = tracking.client().get_run(ck["run_id"])
    except Exception:  # noqa: BLE001 — unreadable, or its run is not in this store: start again
        return None
    if run.data.tags.get("table1") != table:
        return None
    return last


def _train_cell(task: dict, progress: bool, note: Callable[[str], None] | None = None) -> str:
    """Train one cell (in a worker or in-process); returns its MLflow run id."""
    from cctr.runs import run_dir_for
    from cctr.train import train

    cfg = from_dict(RunConfig, task["config"])
    run_dir = run_dir_for(cfg)
    resume = _resume_point(cfg, run_dir, task["tags"]["table1"])
    if resume is not None and note is not None:
        note(f"resuming the interrupted run from {resume}")
    return train(cfg, run_dir, resume=resume, progress=progress, parent_run_id=task["parent_run_id"],
                 tags=task["tags"]).run_id


def _worker(wid: int, tasks, results, threads: int, parent_pid: int) -> None:
    """A worker process: takes cells from `tasks` until None; reports on `results`."""
    if not workers.enter_worker(parent_pid, threads):
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            idx = task["index"]
            results.put(("start", idx, wid, os.getpid()))
            try:
                run_id = _train_cell(task, False, note=lambda msg: results.put(("note", idx, msg, None)))
            except KeyboardInterrupt:
                results.put(("killed", idx, None, "interrupted"))
                return
            except Exception as e:  # noqa: BLE001 — one failed cell must not stop the others
                results.put(("failed", idx, None, f"{type(e).__name__}: {e}"))
            else:
                results.put(("done", idx, run_id, None))
    except KeyboardInterrupt:
        return


def _run_parallel(tasks_list: list[dict], jobs: int, threads: int, log: Callable[[str], None],
                  names: list[str]) -> dict[int, tuple[str, str | None]]:
    """Run the tasks on `jobs` workers; returns index -> (status, error). Interrupts propagate after
    every worker has ended its cell's run."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    tq, rq = ctx.Queue(), ctx.Queue()
    # the tasks outgrow a pipe's buffer: without this, a parent interrupted with tasks still queued
    # waits at exit for a feeder thread that no worker will ever drain (hung after Ctrl-C or SIGTERM)
    tq.cancel_join_thread()
    for t in tasks_list:
        tq.put(t)
    for _ in range(jobs):
        tq.put(None)
    procs = workers.spawn(_worker, lambda w: (w, tq, rq, threads, os.getpid()), jobs, threads, "cctr-table1-worker")
    outcome: dict[int, tuple[str, str | None]] = {}
    current: dict[int, int] = {}  # worker id -> task index
    started: dict[int, float] = {}
    try:
        while len(outcome) < len(tasks_list):
            try:
                kind, idx, a, b = rq.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w, p in enumerate(procs) if not p.is_alive()]
                for w in dead:  # a worker died hard (OOM killer, segfault): its cell failed
                    if w in current:
                        i = current.pop(w)
                        outcome[i] = ("FAILED", f"worker {w} died (exit code {procs[w].exitcode})")
                        log(f"{names[i]}: worker died (exit code {procs[w].exitcode})")
                if len(dead) == len(procs) and len(outcome) < len(tasks_list):
                    for i, _ in enumerate(tasks_list):
                        outcome.setdefault(i, ("FAILED", "not run: every worker has exited"))
                continue
            if kind == "start":
                current[a] = idx
                started[idx] = time.monotonic()
                log(f"{names[idx]}: training (worker {a}, pid {b})")
            elif kind == "note":
                log(f"{names[idx]}: {a}")
            else:
                for w, i in list(current.items()):
                    if i == idx:
                        current.pop(w)
                took = time.monotonic() - started.get(idx, time.monotonic())
                status = {"done": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[kind]
                outcome[idx] = (status, b)
                log(f"{names[idx]}: {status.lower()} in {took:.0f} s" + (f" — {b}" if b else ""))
                if kind == "killed":
                    raise KeyboardInterrupt
    except BaseException:
        import threading

        if threading.current_thread() is threading.main_thread():  # a 2nd Ctrl-C must not cut the cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        workers.stop(procs)
        raise
    for p in procs:
        p.join(30)
    workers.stop(procs, grace_s=5)
    return outcome


def run_table(spec: Table1Spec, log: Callable[[str], None] = print, progress: bool = True,
              jobs: int | None = None, threads: int | None = None, register: bool = False) -> list[dict]:
    """Train every missing cell under one parent run, then return one record per cell (from MLflow).

    `jobs`: worker processes (None: `default_jobs`; 1 trains in this process). `threads`: torch
    threads per worker (None: CPU cores // jobs). `register`: train the registration model if it
    is missing instead of failing with the command that does. A record has `method`, `labeled`,
    `seed`, `status` (FINISHED, or FAILED with `error`), `run_id`, `run_dir`, `labeled_cases` and
    the run's metrics.
    """
    from cctr import tracking

    if jobs is not None and jobs < 1:
        raise CctrError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise CctrError(f"threads per worker must be >= 1, got {threads}")
    all_cells = cells(spec)
    cfgs = {c: cell_config(spec, *c) for c in all_cells}
    dataset = cfgs[all_cells[0]].data.dataset
    lock = _lock_table(dataset, spec.name)
    restore: dict = {}
    try:
        import threading

        if threading.current_thread() is threading.main_thread():  # SIGTERM/kill ends runs like Ctrl-C
            restore = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            signal.signal(signal.SIGTERM, workers.raise_interrupt)
        _end_stale_runs(dataset, spec.name, log)
        finished = _finished_by_hash(dataset, spec.name)
        hashes = {c: config_hash(to_dict(cfgs[c])) for c in all_cells}
        todo = [c for c in all_cells if hashes[c] not in finished]
        for c in all_cells:
            if c not in todo:
                log(f"{_cell_name(c)}: done already ({finished[hashes[c]].info.run_id})")
        outcome: dict[tuple, tuple[str, str | None]] = {}
        if todo:
            splits = prepare_shared([cfgs[c] for c in todo], log, register=register, progress=progress)
            n_jobs = max(1, min(jobs if jobs is not None else workers.default_jobs(len(todo)), len(todo)))
            n_threads = workers.threads_per_job(n_jobs, threads)
            log(f"{len(todo)} of {len(all_cells)} cells to train: {n_jobs} worker(s), {n_threads} thread(s) each")
            parents = tracking.find_runs(dataset, f"tags.table1 = '{spec.name}' and tags.role = 'table'")
            parent_id = parents[0].info.run_id if parents else None
            with tracking.start_run(dataset, f"table1-{spec.name}", tags={"table1": spec.name, "role": "table"},
                                    params={"methods": spec.methods, "labeled": spec.labeled,
                                            "seeds": spec.seeds, "preset": spec.preset,
                                            "config": spec.config, "overrides": spec.overrides}
                                    if parent_id is None else None, run_id=parent_id) as parent:
                tasks = []
                for i, (c, split) in enumerate(zip(todo, splits)):
                    tasks.append({"index": i, "config": to_dict(cfgs[c]), "parent_run_id": parent.run_id,
                                  "tags": {"table1": spec.name, "role": "cell", "config_hash": hashes[c],
                                           "labeled_cases": ",".join(split.labeled), "table1_pid": os.getpid()}})
                names = [f"[{i + 1}/{len(todo)}] {_cell_name(c)}" for i, c in enumerate(todo)]
                watch = f"tags.table1 = '{spec.name}' and tags.role = 'cell' and tags.table1_pid = '{os.getpid()}'"
                try:
                    with progress_display.cells(dataset, watch, len(tasks), cfgs[todo[0]].train.iters, n_jobs,
                                                enabled=progress, title=f"table1 {spec.name}") as shown:
                        if n_jobs == 1:
                            res = _run_inprocess(tasks, n_threads, progress and not shown, log, names)
                        else:
                            res = _run_parallel(tasks, n_jobs, n_threads, log, names)
                except BaseException:
                    _end_stale_runs(dataset, spec.name, log)  # a worker killed hard leaves none RUNNING
                    raise
                outcome = {todo[i]: v for i, v in res.items()}
        records = collect_records(spec, dataset, outcome)
        failed = [r for r in records if r["status"] != "FINISHED"]
        if failed:
            log(f"{len(failed)} cell(s) did not finish: " + "; ".join(
                f"{r['method']} l={r['labeled']} seed={r['seed']} ({r.get('error') or r['status']})" for r in failed))
        du = disk_usage(records)
        log(f"disk used by the table's {du['run_dirs']} run folder(s): {du['bytes'] / 2**20:.1f} MiB "
            f"({du['checkpoint_bytes'] / 2**20:.1f} MiB in checkpoints)")
        return records
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        lock.close()


def _run_inprocess(tasks: list[dict], threads: int, progress: bool, log, names) -> dict[int, tuple[str, str | None]]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[int, tuple[str, str | None]] = {}
    try:
        for t in tasks:
            i = t["index"]
            log(f"{names[i]}: training")
            t0 = time.monotonic()
            try:
                _train_cell(t, progress, note=lambda msg: log(f"{names[i]}: {msg}"))
            except CctrError as e:
                out[i] = ("FAILED", f"{type(e).__name__}: {e}")
                log(f"{names[i]}: failed — {e}")
                continue
            out[i] = ("FINISHED", None)
            log(f"{names[i]}: finished in {time.monotonic() - t0:.0f} s")
    finally:
        torch.set_num_threads(old)
    return out


def _cell_name(c: tuple[str, int, int]) -> str:
    return f"{c[0]} l={c[1]} seed={c[2]}"


def _finished_by_hash(dataset: str, name: str) -> dict[str, Any]:
    """config hash -> the first FINISHED run of it (a later duplicate never changes the table)."""
    out: dict[str, Any] = {}
    for r in sorted(_table_runs(dataset, name, "FINISHED"), key=lambda r: (r.info.start_time, r.info.run_id)):
        out.setdefault(r.data.tags.get("config_hash", ""), r)
    return out


def collect_records(spec: Table1Spec, dataset: str | None = None,
                    outcome: dict[tuple, tuple[str, str | None]] | None = None) -> list[dict]:
    """One record per cell, read back from MLflow (so a resumed table equals an uninterrupted one)."""
    all_cells = cells(spec)
    cfgs = {c: cell_config(spec, *c) for c in all_cells}
    dataset = dataset or cfgs[all_cells[0]].data.dataset
    finished = _finished_by_hash(dataset, spec.name)
    records = []
    for c in all_cells:
        m, lab, s = c
        run = finished.get(config_hash(to_dict(cfgs[c])))
        rec: dict[str, Any] = {"method": m, "labeled": lab, "seed": s}
        if run is None:
            status, err = (outcome or {}).get(c, ("MISSING", None))
            rec.update(status=status if status != "FINISHED" else "MISSING", error=err, run_id=None, run_dir=None,
                       labeled_cases="")
        else:
            rec.update(status="FINISHED", error=None, run_id=run.info.run_id,
                       run_dir=run.data.tags.get("checkpoint_dir"), labeled_cases=run.data.tags.get("labeled_cases", ""),
                       **{k: float(v) for k, v in run.data.metrics.items()})
        records.append(rec)
    return records


def disk_usage(records: list[dict]) -> dict[str, int]:
    """Bytes of every file under the table's run folders (and of the checkpoints among them)."""
    total = ckpt = n = 0
    for d in sorted({r["run_dir"] for r in records if r.get("run_dir")}):
        p = Path(d)
        if not p.is_dir():
            continue
        n += 1
        for f in p.rglob("*"):
            if f.is_file() and not f.is_symlink():
                size = f.stat().st_size
                total += size
                ckpt += size if f.suffix == ".pt" else 0
    return {"run_dirs": n, "bytes": total, "checkpoint_bytes": ckpt}


# ----------------------------------------------------------------------------- statistics


def metric(rec: dict, ckpt: str, name: str, cls: str | None = None) -> float:
    """A test metric of a record: `name` in dice/hd95/asd for checkpoint best|last, per class if
    `cls`; accepts the names with and without the `_mm` unit. `reg-only` has one evaluation, used
    for both checkpoints."""
    prefixes = ["test"] if ckpt == "best" else ["test_last"] + (["test"] if rec.get("method") == "reg-only" else [])
    names = [name] if name == "dice" else [f"{name}_mm", name]
    for p in prefixes:
        for n in names:
            k = f"{p}_{n}" + (f"_{cls}" if cls else "")
            if k in rec and rec[k] is not None:
                return float(rec[k])
    return float("nan")


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p of x vs y (pairs with a NaN dropped; zero differences
    dropped, scipy's zero_method='wilcox'); 1.0 when every difference is zero, NaN with no pairs."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return float("nan")
    if np.all(x == y):
        return 1.0
    return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvals: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaNs stay NaN and do
    not count as tests."""
    p = np.asarray(pvals, float)
    out = np.full(len(p), np.nan)
    idx = [i for i in np.argsort(p, kind="stable") if np.isfinite(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def per_case_dice(rec: dict, ckpt: str) -> dict[str, float]:
    """case -> mean foreground Dice over classes, from the run's per-case CSV (run folder, else the
    MLflow artifact)."""
    path = _per_case_csv(rec, ckpt)
    if path is None:
        return {}
    acc: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                v = float(row["dice"])
            except (KeyError, ValueError):
                continue
            acc.setdefault(row["case"], []).append(v)
    return {c: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for c, v in acc.items()}


def _per_case_csv(rec: dict, ckpt: str) -> Path | None:
    names = [f"test_per_case_{ckpt}.csv"]
    if rec.get("method") == "reg-only":
        names += ["test_per_case_best.csv", "test_per_case.csv"]
    if rec.get("run_dir"):
        for n in names:
            if (Path(rec["run_dir"]) / n).is_file():
                return Path(rec["run_dir"]) / n
    if rec.get("run_id"):
        import tempfile

        from cctr import tracking

        dst = Path(tempfile.mkdtemp(prefix="cctr-table1-"))
        for n in names:
            try:
                return Path(tracking.client().download_artifacts(rec["run_id"], n, str(dst)))
            except Exception:  # noqa: BLE001 — not logged under that name
                continue
    return None


def paired_tests(records: list[dict], methods: list[str], labeled: list[int], ckpt: str,
                 reference: str = REFERENCE) -> dict[tuple[str, int], dict]:
    """(method, labeled) -> {p, p_holm, n_pairs, diff}: every method against `reference` at the same
    labeled count over (seed, test case) pairs of per-case mean foreground Dice; Holm across the
    methods of each labeled count. `full` (one run per seed) is paired with every labeled count."""
    cache: dict[str, dict[str, float]] = {}

    def cases_of(rec):
        key = f"{rec['run_id']}:{ckpt}"
        if key not in cache:
            cache[key] = per_case_dice(rec, ckpt)
        return cache[key]

    out: dict[tuple[str, int], dict] = {}
    if reference not in methods:
        return out
    for lab in labeled:
        ref = {r["seed"]: r for r in records if r["method"] == reference and r["labeled"] == lab
               and r["status"] == "FINISHED"}
        keys, ps = [], []
        for m in methods:
            if m == reference:
                continue
            xs, ys = [], []
            for r in records:
                if r["method"] != m or r["status"] != "FINISHED" or (m != "full" and r["labeled"] != lab):
                    continue
                if r["seed"] not in ref:
                    continue
                a, b = cases_of(r), cases_of(ref[r["seed"]])
                for c in sorted(set(a) & set(b)):
                    xs.append(a[c])
                    ys.append(b[c])
            x, y = np.array(xs, float), np.array(ys, float)
            ok = np.isfinite(x) & np.isfinite(y)
            p = wilcoxon_p(x, y)
            out[(m, lab)] = {"p": p, "n_pairs": int(ok.sum()),
                             "diff": float(np.mean(x[ok] - y[ok])) if ok.any() else float("nan")}
            keys.append((m, lab))
            ps.append(p)
        for k, ph in zip(keys, holm(ps)):
            out[k]["p_holm"] = ph
            out[k]["n_tests"] = int(np.isfinite(ps).sum())
    return out


# ----------------------------------------------------------------------------- the table


def _stats(vals: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def summarize(spec: Table1Spec, records: list[dict], class_names: tuple[str, ...]) -> list[dict]:
    """One row per (checkpoint, method, labeled): mean/std over seeds of every metric, the paired
    test against `cctr`, and the runs it comes from."""
    rows = []
    for ckpt, _ in CHECKPOINTS:
        tests = paired_tests(records, spec.methods, spec.labeled, ckpt)
        for m in spec.methods:
            for lab in spec.labeled:
                sel = [r for r in records if r["method"] == m and (r["labeled"] == lab or m == "full")
                       and r["status"] == "FINISHED"]
                row: dict[str, Any] = {"checkpoint": ckpt, "method": m, "labeled": lab,
                                       "n_seeds": len(sel), "seeds": " ".join(str(r["seed"]) for r in sel)}
                for name in ("dice", "hd95", "asd"):
                    mean, std, _ = _stats([metric(r, ckpt, name) for r in sel])
                    key = name if name == "dice" else f"{name}_mm"
                    row[f"{key}_mean"], row[f"{key}_std"] = mean, std
                for cls in class_names[1:]:
                    for name in ("dice", "hd95"):
                        mean, std, _ = _stats([metric(r, ckpt, name, cls) for r in sel])
                        key = name if name == "dice" else f"{name}_mm"
                        row[f"{key}_{cls}_mean"], row[f"{key}_{cls}_std"] = mean, std
                t = tests.get((m, lab), {})
                row["p_vs_cctr"] = t.get("p", float("nan"))
                row["p_vs_cctr_holm"] = t.get("p_holm", float("nan"))
                row["n_pairs"] = t.get("n_pairs", 0)
                row["dice_diff_vs_cctr"] = t.get("diff", float("nan"))
                rows.append(row)
    return rows


def _fmt(mean: float, std: float, n: int, digits: int, pm: str = " ± ") -> str:
    if not np.isfinite(mean):
        return "–"
    s = f"{mean:.{digits}f}"
    return s + (f"{pm}{std:.{digits}f}" if n > 1 and np.isfinite(std) else "")


def _fmt_p(p: float, latex: bool = False) -> str:
    if not np.isfinite(p):
        return "–"
    if p < 0.001:
        return "$<$0.001" if latex else "<0.001"
    return f"{p:.3f}"


def sanity_checks(spec: Table1Spec, rows: list[dict], ckpt: str = "best") -> list[str]:
    """Lines for the reader's first checks on mean test Dice: `full` at or above every row, `sup` at
    or below every semi-supervised row, at every labeled count. Violations are flagged, not hidden."""
    from cctr.train import get_method

    semi = [m for m in spec.methods if get_method(m).unlabeled]
    lines = []
    for lab in spec.labeled:
        at = {r["method"]: r for r in rows if r["checkpoint"] == ckpt and r["labeled"] == lab}
        d = {m: r["dice_mean"] for m, r in at.items() if np.isfinite(r["dice_mean"])}
        if "full" in d:
            bad = [m for m in d if m != "full" and d[m] > d["full"]]
            lines.append(f"- {lab} labeled: `full` ({d['full']:.3f}) is at or above every other row: "
                         + ("yes" if not bad else "**NO** — " + ", ".join(f"`{m}` {d[m]:.3f}" for m in bad)))
        if "sup" in d and semi:
            bad = [m for m in semi if m in d and d[m] < d["sup"]]
            lines.append(f"- {lab} labeled: `sup` ({d['sup']:.3f}) is at or below every semi-supervised row "
                         f"({', '.join(f'`{m}`' for m in semi if m in d)}): "
                         + ("yes" if not bad else "**NO** — " + ", ".join(f"`{m}` {d[m]:.3f}" for m in bad)))
    return lines


def _labeled_sets(spec: Table1Spec, records: list[dict]) -> list[str]:
    lines = []
    for s in spec.seeds:
        parts = []
        for lab in spec.labeled:
            r = next((r for r in records if r["seed"] == s and r["labeled"] == lab and r.get("labeled_cases")), None)
            if r is not None:
                parts.append(f"{lab}: {r['labeled_cases'].replace(',', ', ')}")
        if parts:
            lines.append(f"- seed {s}: " + "; ".join(parts))
    return lines


def _n_test_cases(records: list[dict]) -> int:
    for r in records:
        if r["status"] == "FINISHED":
            n = len(per_case_dice(r, "best"))
            if n:
                return n
    return 0


def _intro(spec: Table1Spec, dataset: str, records: list[dict], n_tests: int) -> str:
    n = len(spec.seeds)
    seeds = (f"mean ± sample std (ddof=1) over {n} seeds, {n} runs per cell" if n > 1
             else "one seed, one run per cell (no spread)")
    return (f"{dataset}, {spec.preset} preset; test set ({_n_test_cases(records)} cases), ensemble of both nets; "
            f"{seeds}. A seed s sets the training seed and which training cases are labeled "
            f"(data.labeled_seed = s; labeled sets nested within a seed); the train/val/test split is fixed "
            f"(data.seed), so every run is tested on the same cases. `full` uses every training label, is trained "
            f"once per seed and repeated in every column. "
            + (f"p: two-sided paired Wilcoxon signed-rank test against `cctr` at the same labeled count over "
               f"(seed, test case) pairs of per-case mean foreground Dice, Holm-corrected across the {n_tests} "
               f"methods compared at each labeled count (per checkpoint)." if n_tests else
               "No paired test: the grid has no `cctr` row to test against."))


def _markdown(spec: Table1Spec, dataset: str, rows: list[dict], records: list[dict]) -> str:
    n_tests = len([m for m in spec.methods if m != REFERENCE]) if REFERENCE in spec.methods else 0
    lines = [f"# Table 1 — {dataset} ({spec.preset} preset, {len(spec.seeds)} seed(s))", "",
             _intro(spec, dataset, records, n_tests), "",
             "Dice: mean foreground Dice (higher is better); HD95 in mm (lower is better); "
             "p: Holm-adjusted p-value vs `cctr` (raw p in the CSV).", ""]
    for ckpt, title in CHECKPOINTS:
        lines += [f"## {title[0].upper() + title[1:]}", "",
                  "| method | " + " | ".join(f"{lab} labeled: Dice | HD95 (mm) | p" for lab in spec.labeled) + " |",
                  "|---|" + "---|---|---|" * len(spec.labeled)]
        for m in spec.methods:
            cellsx = []
            for lab in spec.labeled:
                r = next(r for r in rows if r["checkpoint"] == ckpt and r["method"] == m and r["labeled"] == lab)
                if r["n_seeds"] == 0:
                    cellsx.append("not run | – | –")
                    continue
                short = "" if r["n_seeds"] == len(spec.seeds) else f" ({r['n_seeds']}/{len(spec.seeds)} seeds)"
                cellsx.append(f"{_fmt(r['dice_mean'], r['dice_std'], r['n_seeds'], 3)}{short} | "
                              f"{_fmt(r['hd95_mm_mean'], r['hd95_mm_std'], r['n_seeds'], 2)} | "
                              + ("ref." if m == REFERENCE else _fmt_p(r["p_vs_cctr_holm"])))
            lines.append(f"| {m} | " + " | ".join(cellsx) + " |")
        checks = sanity_checks(spec, rows, ckpt) or ["- not applicable: the grid has no `full` or no `sup` row"]
        lines += ["", f"Sanity checks ({title}, mean test Dice):", ""] + checks + [""]
    failed = [r for r in records if r["status"] != "FINISHED"]
    if failed:
        lines += ["## Cells without a finished run", ""] + [
            f"- {r['method']} l={r['labeled']} seed={r['seed']}: {r['status']}"
            + (f" ({r['error']})" if r.get("error") else "") for r in failed] + [""]
    ls = _labeled_sets(spec, records)
    if ls:
        lines += ["## Labeled training cases per seed", ""] + ls + [""]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    """Plain text to LaTeX (no backslashes expected in it); ± and backticks become math and nothing."""
    for x, y in (("&", "\\&"), ("%", "\\%"), ("#", "\\#"), ("_", "\\_"), ("{", "\\{"), ("}", "\\}"),
                 ("`", ""), ("±", "$\\pm$")):
        s = s.replace(x, y)
    return s


def _latex(spec: Table1Spec, dataset: str, rows: list[dict], records: list[dict]) -> str:
    """A booktabs table (needs only \\usepackage{booktabs}); both checkpoints as two row blocks."""
    L = len(spec.labeled)
    ncol = 1 + 3 * L
    n_tests = len([m for m in spec.methods if m != REFERENCE]) if REFERENCE in spec.methods else 0
    out = [f"% Table 1 — {_tex_escape(dataset)}, written by cctr (results/table1_*.tex); needs \\usepackage{{booktabs}}",
           "\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{{_tex_escape(_intro(spec, dataset, records, n_tests))} "
           f"Dice: mean foreground Dice ($\\uparrow$); HD95 in mm ($\\downarrow$); $p$: Holm-adjusted.}}",
           f"\\label{{tab:table1-{_tex_escape(dataset)}}}",
           "\\begin{tabular}{l" + "ccc" * L + "}", "\\toprule",
           " & " + " & ".join(f"\\multicolumn{{3}}{{c}}{{{lab} labeled}}" for lab in spec.labeled) + " \\\\",
           " ".join(f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(L)),
           "Method & " + " & ".join("Dice & HD95 (mm) & $p$" for _ in spec.labeled) + " \\\\"]
    for ckpt, title in CHECKPOINTS:
        out += ["\\midrule", f"\\multicolumn{{{ncol}}}{{l}}{{\\emph{{{title[0].upper() + title[1:]}}}}} \\\\"]
        for m in spec.methods:
            cellsx = []
            for lab in spec.labeled:
                r = next(r for r in rows if r["checkpoint"] == ckpt and r["method"] == m and r["labeled"] == lab)
                if r["n_seeds"] == 0:
                    cellsx += ["--", "--", "--"]
                    continue
                cellsx += [_fmt(r["dice_mean"], r["dice_std"], r["n_seeds"], 3, "$\\pm$").replace("–", "--"),
                           _fmt(r["hd95_mm_mean"], r["hd95_mm_std"], r["n_seeds"], 2, "$\\pm$").replace("–", "--"),
                           "ref." if m == REFERENCE else _fmt_p(r["p_vs_cctr_holm"], latex=True).replace("–", "--")]
            out.append(f"{_tex_escape(m)} & " + " & ".join(cellsx) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                            ("" if isinstance(v, float) else v)) for k, v in r.items()})


def write_table(spec: Table1Spec, records: list[dict], dataset: str, class_names: tuple[str, ...],
                out_dir: Path = Path("results"), figures: bool = True) -> dict[str, Path]:
    """results/table1_<dataset>.{md,csv,tex,png} (+ `_runs.csv`, one row per run), and with
    `figures` the qualitative and pseudo-label figures. Returns the paths by kind."""
    from cctr.report import table1_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(spec, records, class_names)
    base = out_dir / f"table1_{dataset.replace('-', '_')}"
    _write_csv(base.with_suffix(".csv"), rows)
    run_rows = [{k: v for k, v in r.items() if not k.startswith(("val_", "loss", "lr", "pl_", "iteration"))}
                for r in records]
    keys = list(dict.fromkeys(k for r in run_rows for k in r))
    runs_csv = base.with_name(base.name + "_runs.csv")
    _write_csv(runs_csv, [{k: r.get(k, "") for k in keys} for r in run_rows])
    with atomic_file(base.with_suffix(".md")) as tmp:
        tmp.write_text(_markdown(spec, dataset, rows, records))
    with atomic_file(base.with_suffix(".tex")) as tmp:
        tmp.write_text(_latex(spec, dataset, rows, records))
    best = [{"method": r["method"], "labeled": r["labeled"], "test_dice_mean": r["dice_mean"],
             "test_dice_std": r["dice_std"] if np.isfinite(r["dice_std"]) else 0.0}
            for r in rows if r["checkpoint"] == "best" and r["n_seeds"] > 0]
    fig = table1_figure(best, spec.methods, spec.labeled, base.with_suffix(".png"))
    files = {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv"), "tex": base.with_suffix(".tex"),
             "png": fig, "runs_csv": runs_csv}
    if figures:
        from cctr import table_figures as tf

        q = tf.qualitative_figure(spec, records, dataset, base.with_name(base.name + "_qualitative.png"))
        if q is not None:
            files["qualitative"] = q
        p = tf.pseudo_label_figure(spec, records, base.with_name(base.name + "_pseudo_labels.png"))
        if p is not None:
            files["pseudo_labels"] = p
    _log_to_parent(spec, dataset, files)
    return files


def _log_to_parent(spec: Table1Spec, dataset: str, files: dict[str, Path]) -> None:
    """The written table and figures become artifacts (`table1/`) of the table's parent run."""
    from cctr import tracking

    parents = tracking.find_runs(dataset, f"tags.table1 = '{spec.name}' and tags.role = 'table'")
    if not parents:
        return
    run = tracking.Run(parents[0].info.run_id)
    for path in files.values():
        run.log_artifact(path, "table1")
