"""Live progress of a sweep's trials or a table's cells: done / running / pruned / failed, the running
ones' iteration, and an ETA.

The display reads the stores the workers write anyway (the Optuna storage, the MLflow store) from a
background thread, so workers need no extra channel. On a terminal it is a rich live table; otherwise
(CI logs, `| tee`) it prints one line per finished trial or cell.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cctr.console import console

POLL_S = 2.0


@dataclass
class Item:
    name: str
    state: str  # "running" | "done" | "pruned" | "failed"
    iteration: int | None = None
    started: float | None = None  # unix seconds
    ended: float | None = None
    value: float | None = None  # validation Dice when known


def _eta(items: list[Item], total: int, iters: int, jobs: int) -> float | None:
    """Seconds left: mean finished duration x the work left (running items counted by their
    iteration), spread over the workers; None before anything can be estimated."""
    durs = [i.ended - i.started for i in items if i.state != "running" and i.started and i.ended]
    running = [i for i in items if i.state == "running"]
    finished = sum(i.state != "running" for i in items)
    now = time.time()
    if durs:
        per = sum(durs) / len(durs)
    else:
        rates = [(now - i.started) / (i.iteration / iters) for i in running if i.started and i.iteration]
        if not rates:
            return None
        per = sum(rates) / len(rates)
    left = max(total - finished, 0) - sum(min((i.iteration or 0) / iters, 1.0) for i in running)
    return max(left, 0.0) * per / max(jobs, 1)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Display:
    """Polls `poll()` (a list of Items) every POLL_S seconds until closed."""

    def __init__(self, title: str, total: int, iters: int, jobs: int, poll: Callable[[], list[Item]],
                 what: str = "trial"):
        self.title, self.total, self.iters, self.jobs, self.poll, self.what = title, total, iters, jobs, poll, what
        self.items: list[Item] = []
        self.reported: set[str] = set()
        self.stop = threading.Event()
        self.live = None
        self.thread = threading.Thread(target=self._run, name="cctr-progress", daemon=True)

    def counts(self) -> dict[str, int]:
        c = {"done": 0, "running": 0, "pruned": 0, "failed": 0}
        for i in self.items:
            c[i.state] = c.get(i.state, 0) + 1
        return c

    def summary(self) -> str:
        c = self.counts()
        eta = _eta(self.items, self.total, self.iters, self.jobs)
        return (f"{self.title}: {c['done'] + c['pruned']}/{self.total} finished ({c['done']} done, "
                f"{c['pruned']} pruned), {c['running']} running, {c['failed']} failed, ETA {_fmt_s(eta)}")

    def render(self):
        from rich.table import Table

        t = Table(title=self.summary(), title_justify="left", show_edge=False, pad_edge=False)
        for col in (self.what, "state", "iteration", "val Dice", "time"):
            t.add_column(col, justify="left" if col in (self.what, "state") else "right")
        now = time.time()
        style = {"done": "green", "running": "cyan", "pruned": "yellow", "failed": "red"}
        shown = [i for i in self.items if i.state == "running"] + [i for i in self.items if i.state != "running"][-8:]
        for i in shown:
            it = f"{i.iteration or 0}/{self.iters}" if i.state == "running" else ""
            took = (i.ended or now) - i.started if i.started else None
            t.add_row(i.name, f"[{style.get(i.state, '')}]{i.state}[/]", it,
                      "" if i.value is None else f"{i.value:.4f}", _fmt_s(took))
        return t

    def _tick(self) -> None:
        try:
            self.items = self.poll()
        except Exception:  # noqa: BLE001 — a store busy for a moment must not stop the work it watches
            return
        if self.live is not None:
            self.live.update(self.render())
            return
        for i in self.items:
            if i.state != "running" and i.name not in self.reported:
                self.reported.add(i.name)
                val = "" if i.value is None else f", val Dice {i.value:.4f}"
                took = f" in {_fmt_s(i.ended - i.started)}" if i.started and i.ended else ""
                console.print(f"{i.name}: {i.state}{took}{val}  [{self.summary()}]", markup=False, highlight=False)

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            self._tick()

    def __enter__(self) -> Display:
        self.reported = {i.name for i in self._safe_poll() if i.state != "running"}  # earlier runs: not news
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(self.render(), console=console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        self.thread.start()
        return self

    def _safe_poll(self) -> list[Item]:
        try:
            self.items = self.poll()
        except Exception:  # noqa: BLE001
            self.items = []
        return self.items

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self._tick()
        if self.live is not None:
            self.live.__exit__(*exc)


# ----------------------------------------------------------------------------- sources


def optuna_trials(study_name: str, storage_url: str) -> Callable[[], list[Item]]:
    """Items from an Optuna study's trials (its own storage connection: safe from another thread)."""
    import optuna
    from optuna.trial import TrialState

    state = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.PRUNED: "pruned",
             TrialState.FAIL: "failed"}
    holder: dict = {}

    def poll() -> list[Item]:
        if "study" not in holder:
            holder["study"] = optuna.load_study(study_name=study_name, storage=storage_url)
        out = []
        for t in holder["study"].get_trials(deepcopy=False):
            if t.state not in state:
                continue
            steps = t.intermediate_values
            last = max(steps) if steps else None
            value = t.value if t.state == TrialState.COMPLETE else (steps[last] if last is not None else None)
            out.append(Item(f"trial {t.number}", state[t.state], last,
                            t.datetime_start.timestamp() if t.datetime_start else None,
                            t.datetime_complete.timestamp() if t.datetime_complete else None, value))
        return out

    return poll


def mlflow_cells(experiment: str, filter_string: str, names: dict[str, str]) -> Callable[[], list[Item]]:
    """Items from the MLflow runs matching `filter_string`; a running run's iteration is its last logged
    loss step. `names`: run name -> the label to show (default: the run name)."""
    from cctr import tracking

    state = {"RUNNING": "running", "FINISHED": "done", "FAILED": "failed", "KILLED": "failed"}

    def poll() -> list[Item]:
        out = []
        c = tracking.client()
        for r in tracking.find_runs(experiment, filter_string):
            st = state.get(r.info.status)
            if st is None:
                continue
            it = None
            if st == "running":
                hist = c.get_metric_history(r.info.run_id, "loss")
                it = max((m.step for m in hist), default=0)
            out.append(Item(names.get(r.info.run_name, r.info.run_name), st, it, r.info.start_time / 1000,
                            r.info.end_time / 1000 if r.info.end_time else None, r.data.metrics.get("val_best_dice")))
        out.sort(key=lambda i: i.started or 0)
        return out

    return poll


@contextlib.contextmanager
def study(name: str, storage_url: str, n_trials: int, iters: int, jobs: int, enabled: bool = True) -> Iterator[bool]:
    """Around one study's optimisation; yields whether a display is shown (then in-process training
    must not draw its own progress bar: rich allows one live display at a time)."""
    if not enabled:
        yield False
        return
    with Display(f"study {name}", n_trials, iters, jobs, optuna_trials(name, storage_url), "trial"):
        yield True


@contextlib.contextmanager
def cells(experiment: str, filter_string: str, total: int, iters: int, jobs: int, enabled: bool = True,
          title: str = "table") -> Iterator[bool]:
    """Around a table's cells; yields whether a display is shown."""
    if not enabled:
        yield False
        return
    with Display(title, total, iters, jobs, mlflow_cells(experiment, filter_string, {}), "cell"):
        yield True
