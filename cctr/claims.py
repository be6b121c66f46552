"""Work shared by machines through an Optuna RDB storage (PostgreSQL): each task is a trial.

A board is one Optuna study whose trials are tasks (a Table-1 cell, a registration model). The
worker that creates the study (the one step the storage makes atomic: a unique name) enqueues one
WAITING trial per task; a worker claims a task by moving its trial WAITING -> RUNNING, which the
RDB storage does under a row lock, so exactly one worker gets it. While it works it records
heartbeats; a trial whose heartbeats stop (the worker died: SIGKILL, power loss, lost network) is
failed by the next worker that looks (`fail_stale_trials`) and enqueued again, as is a task that
raised; so every task is done once, and retried (at most `max_retry` times) when its worker died.

No scheduler or queue of our own: Optuna's storage, heartbeats and stale-trial handling do the work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

TASK = "task"  # user attr: the task's key (a string)
PAYLOAD = "payload"  # user attr: what the worker needs to do it (JSON-able)
RETRY = "retry"  # user attr: 0 for the first attempt
PUBLISHED = "tasks_published"  # study user attr, set once every task is enqueued


@dataclass
class Claim:
    trial_id: int
    number: int
    key: str
    payload: Any
    retry: int


class Board:
    """The tasks of one study on a shared storage (see the module docstring)."""

    def __init__(self, storage_url: str, name: str, heartbeat_s: int = 30, max_retry: int = 2,
                 on_stale: Callable[[Any], None] | None = None):
        import optuna

        from cctr.sweep import make_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name, self.max_retry, self._on_stale = name, max_retry, on_stale
        self.storage = make_storage(storage_url, heartbeat_s, on_stale=self._stale)
        try:
            self.study = optuna.create_study(study_name=name, storage=self.storage, direction="maximize")
            self.owner = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=name, storage=self.storage)
            self.owner = False

    # ------------------------------------------------------------------ tasks

    def publish(self, tasks: dict[str, Any], wait_s: float = 60.0) -> None:
        """The owner enqueues one trial per task; others wait until it has. Should the owner die
        before it finishes, another worker enqueues what is missing after `wait_s`."""
        if not self.owner:
            deadline = time.time() + wait_s
            while not self.study.user_attrs.get(PUBLISHED) and time.time() < deadline:
                time.sleep(0.5)
            if self.study.user_attrs.get(PUBLISHED):
                return
        have = {t.user_attrs.get(TASK) for t in self.trials()}
        for key, payload in tasks.items():
            if key not in have:
                self.enqueue(key, payload, 0)
        self.study.set_user_attr(PUBLISHED, True)

    def revive(self, tasks: dict[str, Any]) -> list[str]:
        """Enqueue again, with fresh retries, the given tasks whose every trial failed (a re-run after
        the retries were spent). Returns their keys."""
        states = self.states()
        again = [k for k in tasks if k in states and states[k] == {"FAIL"}]
        for k in again:
            self.enqueue(k, tasks[k], 0)
        return again

    def enqueue(self, key: str, payload: Any, retry: int) -> None:
        self.study.enqueue_trial({}, user_attrs={TASK: key, PAYLOAD: payload, RETRY: retry}, skip_if_exists=False)

    def trials(self, states=None) -> list:
        return self.storage.get_all_trials(self.study._study_id, deepcopy=False, states=states)

    def claim(self) -> Claim | None:
        """Take one WAITING task (atomically: of several workers, one wins each), or None."""
        from optuna.trial import TrialState

        self.fail_stale()
        for t in self.trials((TrialState.WAITING,)):
            try:
                won = self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
            except Exception:  # noqa: BLE001 — taken and finished meanwhile (UpdateFinishedTrialError)
                won = False
            if won:
                self.storage.record_heartbeat(t._trial_id)  # stale from now on if this worker dies
                return Claim(t._trial_id, t.number, t.user_attrs[TASK], t.user_attrs.get(PAYLOAD),
                             int(t.user_attrs.get(RETRY, 0)))
        return None

    @contextlib.contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[None]:
        from optuna.storages._heartbeat import get_heartbeat_thread

        thread = get_heartbeat_thread(claim.trial_id, self.storage)
        thread.start()
        try:
            yield
        finally:
            thread.join()

    def set_attr(self, claim: Claim, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(claim.trial_id, key, value)

    def complete(self, claim: Claim, value: float = 0.0) -> None:
        from optuna.trial import TrialState

        self.storage.set_trial_state_values(claim.trial_id, TrialState.COMPLETE, values=[float(value)])

    def fail(self, claim: Claim, retry: bool = True) -> bool:
        """End the task's trial FAIL; enqueue it again (True) unless its retries are spent."""
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_state_values(claim.trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001 — failed as stale by another worker already (and re-enqueued)
            return False
        if retry and claim.retry < self.max_retry:
            self.enqueue(claim.key, claim.payload, claim.retry + 1)
            return True
        return False

    def fail_stale(self) -> None:
        from optuna.storages import fail_stale_trials

        fail_stale_trials(self.study)

    def _stale(self, study, trial) -> None:
        """A dead worker's trial (failed by whoever noticed): clean up after it and retry the task."""
        if self._on_stale is not None:
            try:
                self._on_stale(trial)
            except Exception:  # noqa: BLE001 — best effort: the retry matters more
                pass
        retry = int(trial.user_attrs.get(RETRY, 0))
        if retry < self.max_retry and TASK in trial.user_attrs:
            self.enqueue(trial.user_attrs[TASK], trial.user_attrs.get(PAYLOAD), retry + 1)

    # ------------------------------------------------------------------ state

    def states(self) -> dict[str, set[str]]:
        """task key -> the states of its trials (e.g. {"FAIL", "COMPLETE"} for a retried task)."""
        out: dict[str, set[str]] = {}
        for t in self.trials():
            out.setdefault(t.user_attrs.get(TASK, ""), set()).add(t.state.name)
        return out

    def open_work(self) -> int:
        """Tasks waiting or being worked on (by anyone)."""
        from optuna.trial import TrialState

        return len(self.trials((TrialState.WAITING, TrialState.RUNNING)))

    def work(self, do: Callable[[Claim], float], log: Callable[[str], None] = print, poll_s: float = 2.0,
             should_stop: Callable[[], bool] = lambda: False,
             fatal: Callable[[Claim, Exception], Exception | None] | None = None) -> dict[str, str]:
        """Claim and do tasks until none is waiting or running anywhere; returns key -> outcome
        ("done", "failed: ...") of the tasks this worker did. A task that raises is failed and
        enqueued again; Ctrl-C fails it (another worker, or a re-run, retries it) and propagates.
        `fatal(claim, error)` may return an exception that ends this worker after the task is
        failed (e.g. the tracking server is gone: no point in claiming more)."""
        done: dict[str, str] = {}
        while not should_stop():
            claim = self.claim()
            if claim is None:
                if self.open_work() == 0:
                    break
                time.sleep(poll_s)  # others hold the rest: one of them may die and leave it to us
                continue
            try:
                with self.heartbeat(claim):
                    value = do(claim)
            except KeyboardInterrupt:
                self.fail(claim)
                raise
            except Exception as e:  # noqa: BLE001 — one failed task must not stop the others
                again = self.fail(claim)
                stop = fatal(claim, e) if fatal is not None else None
                if stop is not None:
                    raise stop from None
                done[claim.key] = f"failed: {type(e).__name__}: {e}"
                log(f"{claim.key}: failed ({type(e).__name__}: {e})" + ("; enqueued again" if again else ""))
            else:
                self.complete(claim, value)
                done[claim.key] = "done"
        return done
