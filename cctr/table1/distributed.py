"""Table 1 on many machines: the grid's cells claimed through a shared Optuna storage.

`cctr table1 --storage URL` started on any number of machines (each with `--jobs` workers, one per
GPU) shares one study per table whose trials are the cells (`cctr.claims.Board`): each cell is
trained by exactly one worker; a worker that dies (heartbeats stop) or loses the tracking server
has its cell failed in the study and enqueued again, so another worker retries it; its local
`last.pt` stays for a re-run on that machine, which resumes from it. Every worker logs to the same
tracking store (an MLflow server), so any machine — or `cctr table1 --collect` — writes the table
from the store alone. Cells already FINISHED in the store (from an earlier run) are not enqueued.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from cctr import workers
from cctr.checkpoint import config_hash
from cctr.table1.collect import _finished_by_hash, _table_runs, collect_records
from cctr.table1.plan import Table1Spec, _cell_name, cell_config, cell_hashes, cell_split, cells, table_dataset
from cctr.table1.run import _resume_point, prepare_shared

PARENT = "mlflow_parent_run_id"


def study_name(spec: Table1Spec, dataset: str) -> str:
    """One study per table and grid: a changed grid (preset, seeds, overrides) is a new study."""
    return f"table1-{dataset}-{spec.name}-{config_hash(sorted(cell_hashes(spec).values()))}"


def _parent_run(board, spec: Table1Spec, dataset: str, wait_s: float = 60.0) -> str:
    """The table's MLflow parent run, shared by every worker: the study's owner finds (an earlier
    run's) or creates it and records it on the study; the others read it there."""
    from cctr import tracking

    deadline = time.time() + (0.0 if board.owner else wait_s)
    while not (rid := board.study.user_attrs.get(PARENT)) and time.time() < deadline:
        time.sleep(0.5)
    if rid:
        return rid
    parents = _table_runs(dataset, spec.name, role="table")
    if parents:
        rid = sorted(parents, key=lambda r: r.info.start_time)[0].info.run_id
    else:
        run = tracking.create_run(dataset, f"table1-{spec.name}", tags={"table1": spec.name, "role": "table"},
                                  params={"methods": spec.methods, "labeled": spec.labeled, "seeds": spec.seeds,
                                          "preset": spec.preset, "config": spec.config,
                                          "overrides": spec.overrides, "optuna_study": board.name})
        tracking.end_run(run.run_id, "FINISHED")  # cells nest under it; nobody holds it RUNNING
        rid = run.run_id
    board.study.set_user_attr(PARENT, rid)
    return rid


def _board(storage: str, spec: Table1Spec, dataset: str, heartbeat_s: int):
    from cctr.claims import Board
    from cctr.sweep import _close_orphan_run

    return Board(storage, study_name(spec, dataset), heartbeat_s, on_stale=_close_orphan_run)


def run_distributed(spec: Table1Spec, storage: str, log: Callable[[str], None] = print, progress: bool = True,
                    jobs: int | None = None, threads: int | None = None, register: bool = False,
                    heartbeat_s: int = 30) -> list[dict]:
    """Join the table's study as one more machine: claim and train cells until none is left
    anywhere; returns one record per cell, from the tracking store."""
    all_cells = cells(spec)
    hashes = cell_hashes(spec)
    dataset = table_dataset(spec)
    board = _board(storage, spec, dataset, heartbeat_s)
    parent = _parent_run(board, spec, dataset)
    finished = _finished_by_hash(dataset, spec.name)
    missing = {_cell_name(c): list(c) for c in all_cells if hashes[c] not in finished}
    board.publish(missing)
    board.fail_stale()
    for k in board.revive(missing):  # failed on every retry in an earlier run: this run tries again
        log(f"{k}: failed before, enqueued again")
    open_keys = {t.user_attrs.get("task") for t in board.trials() if t.state.name in ("WAITING", "RUNNING")}
    todo = [c for c in all_cells if _cell_name(c) in open_keys]
    log(f"table {spec.name}: study {board.name} ({'created' if board.owner else 'joined'}), "
        f"{len(todo)} of {len(all_cells)} cells open, parent MLflow run {parent}")
    outcome: dict[tuple, tuple[str, str | None]] = {}
    if todo:
        prepare_shared([cell_config(spec, *c) for c in todo], log, register=register, progress=progress,
                       storage=storage, heartbeat_s=heartbeat_s)
        n_jobs = max(1, min(jobs if jobs is not None else workers.default_jobs(len(todo)), len(todo)))
        n_threads = workers.threads_per_job(n_jobs, threads)
        log(f"{n_jobs} worker(s) on this machine, {n_threads} thread(s) each")
        if n_jobs == 1:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(n_threads)
            try:
                done = work(board, spec, parent, progress, log)
            finally:
                torch.set_num_threads(old)
        else:
            done = _work_parallel(storage, spec, dataset, parent, heartbeat_s, n_jobs, n_threads, log)
        byname = {_cell_name(c): c for c in all_cells}
        outcome = {byname[k]: ("FAILED", v[len("failed: "):]) for k, v in done.items() if v.startswith("failed")}
    return collect_records(spec, dataset, outcome)


def work(board, spec: Table1Spec, parent: str, progress: bool, log: Callable[[str], None]) -> dict[str, str]:
    """This worker's loop: claim a cell, train it, until no cell is open anywhere."""
    from cctr.runs import run_dir_for
    from cctr.train import train

    hashes = cell_hashes(spec)

    def do(claim) -> float:
        c = tuple(claim.payload)
        name = _cell_name(c)
        cfg = cell_config(spec, *c)
        dataset = cfg.data.dataset
        if _finished_by_hash(dataset, spec.name, hashes[c]):  # finished, but its trial was not closed
            log(f"{name}: finished already")
            return 0.0
        _end_orphans(board, claim)
        split = cell_split(cfg)
        run_dir = run_dir_for(cfg)
        resume = _resume_point(cfg, run_dir, spec.name)
        log(f"{name}: training (trial {claim.number}, pid {os.getpid()}"
            + (f", retry {claim.retry}" if claim.retry else "") + (", resuming" if resume else "") + ")")
        t0 = time.monotonic()
        tags = {"table1": spec.name, "role": "cell", "config_hash": hashes[c], "labeled_cases": ",".join(split.labeled),
                "table1_pid": os.getpid(), "table1_host": socket.gethostname(), "optuna_study": board.name, "optuna_trial": claim.number}
        res = train(cfg, run_dir, resume=resume, progress=progress, parent_run_id=parent, tags=tags,
                    on_start=lambda rid: board.set_attr(claim, "mlflow_run_id", rid))
        log(f"{name}: finished in {time.monotonic() - t0:.0f} s")
        return float(res.metrics.get("val_best_dice", 0.0))

    def fatal(claim, e: Exception):
        from cctr import tracking
        from cctr.errors import CctrError

        if tracking.reachable():
            return None
        return CctrError(f"lost the tracking store {tracking.redact(tracking.tracking_uri())} during "
                         f"{claim.key}: the cell is failed in the study (another worker retries it); its last.pt "
                         f"stays under {run_dir_for(cell_config(spec, *claim.payload))} for a re-run here")

    return board.work(do, log, fatal=fatal)


def _end_orphans(board, claim) -> None:
    """Runs of this cell's earlier, failed attempts still RUNNING (their worker lost the tracking
    server, or died before its heartbeat expired): end them KILLED, so none stays RUNNING."""
    from cctr import tracking

    for t in board.trials():
        rid = t.user_attrs.get("mlflow_run_id")
        if t.user_attrs.get("task") != claim.key or t.state.name != "FAIL" or not rid:
            continue
        try:
            if tracking.client().get_run(rid).info.status == "RUNNING":
                tracking.end_run(rid, "KILLED", "its worker lost the tracking store or died; retried")
        except Exception:  # noqa: BLE001 — gone, or not ours to see
            pass


def _work_parallel(storage: str, spec: Table1Spec, dataset: str, parent: str, heartbeat_s: int, jobs: int,
                   threads: int, log: Callable[[str], None]) -> dict[str, str]:
    """`jobs` spawned workers on this machine, each claiming cells from the shared study."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    rq = ctx.Queue()
    args = (storage, spec, dataset, parent, heartbeat_s, threads, os.getpid(), rq)
    procs = workers.spawn(_worker, lambda w: args, jobs, threads, "cctr-table1-worker")
    done: dict[str, str] = {}
    errors: list[str] = []
    try:
        while any(p.is_alive() for p in procs) or not rq.empty():
            try:
                kind, a = rq.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "log":
                log(a)
            elif kind == "error":
                errors.append(a)
            else:
                done.update(a)
    except BaseException:
        workers.stop(procs)
        raise
    for p in procs:
        p.join(30)
    if errors:
        from cctr.errors import CctrError

        raise CctrError(errors[0])
    return done


def _worker(storage: str, spec: Table1Spec, dataset: str, parent: str, heartbeat_s: int, threads: int,
            parent_pid: int, rq) -> None:
    if not workers.enter_worker(parent_pid, threads):
        return
    try:
        board = _board(storage, spec, dataset, heartbeat_s)
        rq.put(("done", work(board, spec, parent, False, lambda m: rq.put(("log", m)))))
    except KeyboardInterrupt:
        return
    except Exception as e:  # noqa: BLE001 — the parent reports it as one line
        rq.put(("error", str(e) if type(e).__name__ == "CctrError" else f"{type(e).__name__}: {e}"))
