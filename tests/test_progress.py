"""The sweep / table progress display: counts, ETA, and one line per finished item off a terminal."""

from __future__ import annotations

import time

from cctr import progress
from cctr.progress import Display, Item


def test_eta_from_finished_and_running():
    now = time.time()
    items = [Item("t0", "done", None, now - 100, now - 40), Item("t1", "pruned", None, now - 40, now - 20),
             Item("t2", "running", 50, now - 10)]
    # mean finished 40 s; 4 total - 2 finished - half of t2 = 1.5 left; 1 job
    assert abs(progress._eta(items, 4, 100, 1) - 60) < 1
    assert progress._eta([Item("t0", "running", None, now)], 4, 100, 1) is None


def test_one_line_per_finished_item_off_a_terminal(monkeypatch, capsys):
    now = time.time()
    states = [[Item("trial 0", "running", 20, now)],
              [Item("trial 0", "done", None, now - 5, now, 0.81), Item("trial 1", "running", 40, now)],
              [Item("trial 0", "done", None, now - 5, now, 0.81), Item("trial 1", "pruned", None, now - 3, now, 0.5)]]
    calls = iter(states)
    last = {}

    def poll():
        last["v"] = next(calls, last.get("v"))
        return last["v"]

    monkeypatch.setattr(progress, "POLL_S", 0.05)
    with Display("study s", 2, 100, 1, poll) as d:
        assert d.live is None  # pytest's stderr is no terminal
        time.sleep(0.4)
    err = capsys.readouterr().err.splitlines()
    finished = [ln for ln in err if ln.startswith("trial ")]
    assert [ln.split(":")[0] for ln in finished] == ["trial 0", "trial 1"]
    assert "done" in finished[0] and "val Dice 0.8100" in finished[0] and "pruned" in finished[1]
    assert "2/2 finished" in finished[1]


def test_render_has_the_columns():
    now = time.time()
    d = Display("table1 x", 3, 400, 2, lambda: [])
    d.items = [Item("cctr l=1 seed=0", "running", 120, now - 30), Item("sup l=1 seed=0", "failed", None, now - 9, now)]
    from rich.console import Console

    c = Console(width=200, record=True)
    c.print(d.render())
    text = c.export_text()
    assert "120/400" in text and "failed" in text and "1 running" in text and "ETA" in text
