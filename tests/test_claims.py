"""Tasks claimed through an Optuna RDB storage (cctr.claims): each task once, failures retried,
a dead worker's task handed back after its heartbeats stop. sqlite here (fast, no server); the
same code runs on PostgreSQL in tests/test_cluster.py."""

from __future__ import annotations

import time

from cctr.claims import Board


def boards(tmp_path, n=2, heartbeat_s=1, max_retry=2):
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    return [Board(url, "t", heartbeat_s, max_retry=max_retry) for _ in range(n)]


def test_each_task_is_claimed_once(tmp_path):
    a, b = boards(tmp_path)
    assert a.owner and not b.owner
    a.publish({"x": [1], "y": [2], "z": [3]})
    b.publish({"x": [1], "y": [2], "z": [3]})  # joins: enqueues nothing more
    got = []
    while True:
        c = a.claim() or b.claim()
        if c is None:
            break
        got.append(c.key)
        (a if len(got) % 2 else b).complete(c)
    assert sorted(got) == ["x", "y", "z"] and a.open_work() == 0
    assert all(s == {"COMPLETE"} for s in a.states().values())


def test_a_failed_task_is_retried_then_given_up_and_revived(tmp_path):
    (a,) = boards(tmp_path, 1, max_retry=1)
    a.publish({"x": None})
    calls = []

    def do(claim):
        calls.append(claim.retry)
        raise RuntimeError("boom")

    done = a.work(do, log=lambda m: None, poll_s=0.1)
    assert calls == [0, 1] and done["x"].startswith("failed") and a.open_work() == 0
    assert a.revive({"x": None}) == ["x"] and a.claim().retry == 0


def test_a_dead_workers_task_comes_back(tmp_path):
    a, b = boards(tmp_path, heartbeat_s=1)
    a.publish({"x": "payload"})
    dead = a.claim()  # claimed, then never a heartbeat again: its worker died
    assert dead is not None and b.claim() is None
    time.sleep(3.5)  # past the grace period (2 heartbeats; the store keeps whole seconds)
    again = b.claim()
    assert again is not None and again.key == "x" and again.retry == 1 and again.payload == "payload"
    b.complete(again)
    assert b.states()["x"] == {"FAIL", "COMPLETE"} and b.open_work() == 0
