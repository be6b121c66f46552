"""Table 1, stage 2 (run): train every cell not finished yet, resumable and parallel.

Parallel cells on one machine: `run_table(spec, jobs=N)` runs N spawned worker processes, each with
its share of CPU threads (and one GPU each where there are several). The parent creates everything
shared first (dataset cache, splits, registration maps of every labeled set), so workers only read
those stores. Ctrl-C / SIGTERM end every cell's run KILLED; a re-run resumes interrupted cells from
their `last.pt` (or retrains them) and skips finished ones, giving the same table as an
uninterrupted run.

Without a storage, one machine runs the table under a file lock. With `storage` (an Optuna RDB URL
shared by many machines, see `cctr.table1.distributed`) the cells are claimed through it instead.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cctr import progress as progress_display
from cctr import workers
from cctr.checkpoint import config_hash
from cctr.config import RunConfig, from_dict, to_dict
from cctr.errors import CctrError
from cctr.table1.collect import _finished_by_hash, _table_runs, collect_records, disk_usage
from cctr.table1.plan import Table1Spec, _cell_name, cell_config, cell_split, cells


def prepare_shared(cfgs: list[RunConfig], log: Callable[[str], None] = print, register: bool = False,
                   progress: bool = False, storage: str | None = None, heartbeat_s: int = 30) -> list:
    """Create, in this process, everything the cells share, so parallel workers only read it:
    the dataset cache, the split files, the registration model and the registration maps of every
    labeled set a registration-based cell needs.

    Without `register` a missing registration model is the trainer's CctrError (naming
    `cctr register train`); with it the model is trained here, once. Returns each config's split.
    """
    from cctr.data.datasets import load_dataset
    from cctr.terms import get_method

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
            ensure_registration(cfg.data.dataset, cfg.registration, split, progress=progress, storage=storage,
                                heartbeat_s=heartbeat_s, log=log)
        log(f"registration maps {i + 1}/{len(needs_maps)}: labeled {', '.join(split.labeled)}")
        registration_maps(cfg.data.dataset, cfg.registration, split, progress=progress, velocities=velocities)
    return splits


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


def _end_stale_runs(dataset: str, name: str, log: Callable[[str], None]) -> None:
    """Cells left RUNNING by a process that died without cleaning up (SIGKILL, power loss): we hold
    the table lock, so nobody else runs them; they end KILLED. In a tracking store shared with other
    machines only this host's runs are ours to end (the lock is this host's)."""
    import socket

    from cctr import tracking

    for r in _table_runs(dataset, name, "RUNNING") + _table_runs(dataset, name, "RUNNING", "table"):
        if not tracking.is_local() and r.data.tags.get("table1_host") != socket.gethostname():
            continue
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
              jobs: int | None = None, threads: int | None = None, register: bool = False,
              storage: str | None = None, heartbeat_s: int = 30) -> list[dict]:
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
    if storage:  # cells claimed through a storage shared by machines
        from cctr.table1.distributed import run_distributed

        return run_distributed(spec, storage, log=log, progress=progress, jobs=jobs, threads=threads,
                               register=register, heartbeat_s=heartbeat_s)
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
        if not tracking.is_local():
            log("the tracking store is shared but this table's cells are not: with --storage URL workers on "
                "other machines share them (docs/cluster.md)")
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
            with tracking.start_run(dataset, f"table1-{spec.name}", tags={"table1": spec.name, "role": "table",
                                                                          "table1_host": socket.gethostname()},
                                    params={"methods": spec.methods, "labeled": spec.labeled,
                                            "seeds": spec.seeds, "preset": spec.preset,
                                            "config": spec.config, "overrides": spec.overrides}
                                    if parent_id is None else None, run_id=parent_id) as parent:
                tasks = []
                for i, (c, split) in enumerate(zip(todo, splits)):
                    tasks.append({"index": i, "config": to_dict(cfgs[c]), "parent_run_id": parent.run_id,
                                  "tags": {"table1": spec.name, "role": "cell", "config_hash": hashes[c],
                                           "labeled_cases": ",".join(split.labeled), "table1_pid": os.getpid(),
                                           "table1_host": socket.gethostname()}})
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
