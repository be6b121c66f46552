"""Worker processes on one machine, shared by `cctr table1 --jobs N` and `cctr sweep --jobs N`.

Each worker is a spawned process with its share of the CPU threads (and one GPU where there are
several), set through the environment before torch is imported in the child; it dies with the
process that started it, and SIGTERM reaches its code as Ctrl-C so the MLflow run it holds ends KILLED.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from collections.abc import Callable


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (respecting CUDA_VISIBLE_DEVICES); [] on a CPU machine."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip() in ("", "-1"):
        return []
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 — no usable CUDA
        return []
    if n == 0:
        return []
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def default_jobs(n_tasks: int | None = None) -> int:
    """What the machine has: one worker per GPU, else one per CPU core (two 1-thread runs beat one
    2-thread run on 2 cores); never more than the tasks to run."""
    gpus = visible_gpus()
    jobs = len(gpus) if gpus else cpu_count()
    return max(1, min(jobs, n_tasks) if n_tasks else jobs)


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    return threads if threads is not None else max(1, cpu_count() // jobs)


def raise_interrupt(signum, frame):  # noqa: ARG001
    """SIGTERM (and a worker's SIGINT) as Ctrl-C, once: the cleanup that ends runs KILLED must not
    itself be interrupted by the next signal. Later signals go to a no-op handler, not SIG_IGN: one that
    arrived together with this one (Ctrl-C reaches the worker and its parent, which then sends SIGTERM)
    is still pending, and Python raises OSError for a pending signal whose handler became SIG_IGN."""
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    raise KeyboardInterrupt


def _ignore(signum, frame):  # noqa: ARG001
    pass


def die_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def enter_worker(parent_pid: int, threads: int) -> bool:
    """A worker's first call: signals, death with the parent, torch threads; False if the parent is gone."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return False
    import torch

    torch.set_num_threads(threads)
    return True


def spawn(target: Callable, args: Callable[[int], tuple], jobs: int, threads: int, name: str) -> list:
    """Start `jobs` spawned processes running `target(*args(w))`; thread and GPU settings go in through
    the environment, so they hold before torch (or numpy's BLAS) is first imported in the child."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    gpus = visible_gpus()
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    saved = {k: os.environ.get(k) for k in keys}
    procs = []
    # the workers run only cctr code: hide the caller's __main__ so that spawn does not re-run a
    # script (a user's script without an `if __name__ == "__main__"` guard would run again in each)
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        for w in range(jobs):
            for k in keys[:3]:
                os.environ[k] = str(threads)
            if gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[w % len(gpus)]
            p = ctx.Process(target=target, args=args(w), daemon=False, name=f"{name}-{w}")
            p.start()
            procs.append(p)
    finally:
        sys.modules["__main__"] = main
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs


def stop(procs: list, grace_s: float = 60.0) -> None:
    """SIGTERM every live worker (its run ends KILLED), wait, then SIGKILL what is left."""
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
