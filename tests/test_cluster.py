"""Beyond one machine: workers that share nothing but an MLflow server (PostgreSQL backend,
artifact proxy) and an Optuna database, each with its own cache, store and working directory (two
"machines"), run one sweep and one Table-1 grid; a worker killed mid-cell has its cell retried.

Servers are real and on loopback, started here (tests/pg.py); without PostgreSQL the tests skip with
the install line (fail in CI, CCTR_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, TINY_SPACE, write_yaml
from tests.pg import mlflow_server
from tests.test_sweep_postgres import _free_port

REPO = Path(__file__).resolve().parents[1]
PYPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="module")
def server(pg, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from mlflow_server(pg.database(), root / "artifacts", root / "server.log")


def machine(root: Path, name: str, tracking: str | None) -> dict:
    """A "machine": its own working directory, cache and local store (nothing shared on disk)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CCTR_CACHE=str(d / "cache"), CCTR_MLRUNS=str(d / "mlruns"), PYTHONPATH=PYPATH,
               OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    return {"cwd": d, "env": env}


def start(m: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cctr.cli", *args], cwd=m["cwd"], env=m["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(m: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "cctr.cli", *args], cwd=m["cwd"], env=m["env"],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def trained_cells(log: str) -> list[str]:
    return re.findall(r"^(\S+ l=\d+ seed=\d+): training \(trial", log, re.M)


def table_spec(root: Path, name: str, **kw) -> Path:
    cfg = write_yaml(root / "cfg.yaml", TINY)
    d = {"config": str(cfg), "preset": "quick", "methods": ["sup", "cctr", "reg-only"], "labeled": [1],
         "seeds": [0, 1], "set": ["train.iters=2", "train.val_every=2", "train.ramp_iters=1"], **kw}
    return write_yaml(root / f"{name}.yaml", d)


def client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def server_runs(url: str, flt: str) -> list:
    c = client(url)
    exp = c.get_experiment_by_name("phantom-cardiac")
    return [] if exp is None else c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


def test_two_machines_share_one_server_study_and_table(pg, server, tmp_path):
    t0 = time.monotonic()
    spec = table_spec(tmp_path, "table1_two", seeds=[0])
    storage = pg.database()
    a, b = machine(tmp_path, "machine_a", server), machine(tmp_path, "machine_b", server)
    args = ["table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--storage", storage, "--jobs", "1",
            "--no-figures", "--heartbeat", "2"]
    procs = [start(m, *args, "--out", str(m["cwd"] / "results")) for m in (a, b)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    cells = [trained_cells(err) for _, err in outs]
    print(f"\ntable1 on two machines: {time.monotonic() - t0:.0f} s; cells per worker: "
          f"A {cells[0]}, B {cells[1]}")
    assert sorted(cells[0] + cells[1]) == sorted({*cells[0], *cells[1]})  # no cell trained twice
    assert len(cells[0]) + len(cells[1]) == 3 and cells[0] and cells[1]  # every cell, by both machines

    # every cell is in the server, FINISHED, once; the registration net was trained once
    runs = server_runs(server, "tags.table1 = 'table1_two' and tags.role = 'cell'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["config_hash"] for r in runs}) == 3
    reg = server_runs(server, "tags.stage = 'registration'")
    print(f"registration runs in the server: {len(reg)}")
    assert len(reg) == 1 and reg[0].info.status == "FINISHED"
    assert "downloaded" in outs[0][1] + outs[1][1]  # the other machine fetched it

    # a sweep on the same two machines and the same database
    space = write_yaml(tmp_path / "space.yaml", TINY_SPACE)
    ct = dict(TINY, train={**TINY["train"], "method": "ct"})
    cfg = write_yaml(tmp_path / "ct.yaml", ct)
    sargs = ["sweep", "--config", str(cfg), "--dataset", "phantom-cardiac", "--labeled", "1", "--trials", "2",
             "--space", str(space), "--storage", storage, "--json", "--jobs", "1", "--heartbeat", "2"]
    procs = [start(m, *sargs) for m in (a, b)]
    outs2 = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs2):
        assert p.returncode == 0, err[-3000:]
    import optuna

    study = optuna.load_study(study_name="phantom-cardiac-l1-space", storage=storage)
    ids = [t.user_attrs["mlflow_run_id"] for t in study.get_trials() if "mlflow_run_id" in t.user_attrs]
    assert len(ids) >= 2 and len(set(ids)) == len(ids)
    tracked = {r.info.run_id: r for r in server_runs(server, "tags.optuna_study = 'phantom-cardiac-l1-space'")}
    assert set(ids) <= set(tracked)  # every trial is in the server
    print(f"sweep trials in the server: {len(ids)}")

    # the table from a third directory with no local runs equals a single-machine run's
    c = machine(tmp_path, "machine_c", server)
    run(c, "table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--collect", "--no-figures",
        "--out", str(c["cwd"] / "results"))
    single = machine(tmp_path, "single", None)
    run(single, "table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--jobs", "1", "--no-figures",
        "--out", str(single["cwd"] / "results"))
    for ext in ("md", "csv", "tex"):
        got = (c["cwd"] / "results" / f"table1_phantom_cardiac.{ext}").read_text()
        assert got == (single["cwd"] / "results" / f"table1_phantom_cardiac.{ext}").read_text(), ext
    print(f"table from a third directory == single-machine table (md, csv, tex); "
          f"{time.monotonic() - t0:.0f} s in all")
    assert not server_runs(server, "attributes.status = 'RUNNING'")


def test_a_killed_worker_leaves_its_cell_to_the_other(pg, server, tmp_path):
    spec = table_spec(tmp_path, "table1_kill", methods=["sup"],
                      set=["train.iters=20", "train.val_every=10", "train.ramp_iters=1"])
    storage = pg.database()
    a, b = machine(tmp_path, "machine_a", server), machine(tmp_path, "machine_b", server)
    args = ["table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--storage", storage, "--jobs", "1",
            "--no-figures", "--heartbeat", "1"]
    victim = start(a, *args, "--out", str(a["cwd"] / "results"))
    lines = []
    deadline = time.monotonic() + 300
    for line in victim.stderr:  # wait until it is training a cell
        lines.append(line)
        if ": training (trial" in line or time.monotonic() > deadline:
            break
    assert any(": training (trial" in x for x in lines), "".join(lines)
    time.sleep(2)
    os.killpg(victim.pid, signal.SIGKILL)  # mid-cell: no cleanup at all
    victim.wait(30)
    survivor = start(b, *args, "--out", str(b["cwd"] / "results"))
    killed_cell = trained_cells("".join(lines))[0]
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-3000:]
    print(f"\nkilled worker's cell: {killed_cell}; the survivor trained: {trained_cells(err)}")
    assert killed_cell in trained_cells(err) and "retry 1" in err
    assert len((b["cwd"] / "results" / "table1_phantom_cardiac.csv").read_text().splitlines()) > 1
    runs = server_runs(server, "tags.table1 = 'table1_kill' and tags.role = 'cell'")
    status = sorted(r.info.status for r in runs)
    assert status.count("FINISHED") == 2 and "RUNNING" not in status, status
    assert not server_runs(server, "attributes.status = 'RUNNING'")


@pytest.mark.parametrize("uri, says", [
    ("http://127.0.0.1:{port}", "cannot reach the tracking server"),
    ("http://", "bad tracking URI"),
    ("bogus://x", "bad tracking URI"),
    ("postgresql+psycopg2://u:p@127.0.0.1:{port}/db", "cannot reach the tracking database"),
])
def test_unreachable_or_bad_tracking_store_is_one_line_exit_2(tmp_path, uri, says):
    m = machine(tmp_path, "m", None)
    spec = table_spec(tmp_path, "table1_bad")
    p = subprocess.run([sys.executable, "-m", "cctr.cli", "table1", "--spec", str(spec), "--tracking-uri",
                        uri.format(port=_free_port())], cwd=m["cwd"], env=m["env"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "u:p" not in lines[0], p.stderr
    assert not (m["cwd"] / "cache").exists()  # nothing started


def test_unreachable_storage_is_one_line_exit_2(tmp_path):
    m = machine(tmp_path, "m", None)
    spec = table_spec(tmp_path, "table1_badstore")
    p = subprocess.run([sys.executable, "-m", "cctr.cli", "table1", "--spec", str(spec), "--storage",
                        f"postgresql+psycopg2://u:p@127.0.0.1:{_free_port()}/db"], cwd=m["cwd"], env=m["env"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "cannot open Optuna storage" in p.stderr and not (m["cwd"] / "cache").exists()


def test_evaluate_by_run_id_downloads_the_checkpoint(pg, server, tmp_path):
    """A run trained on one machine is evaluated on another by its id alone."""
    a, b = machine(tmp_path, "a", server), machine(tmp_path, "b", server)
    cfg = write_yaml(tmp_path / "sup.yaml", dict(TINY, train={**TINY["train"], "method": "sup"}))
    res = json.loads(run(a, "train", "--config", str(cfg), "--json").stdout)
    for target in (["--run-id", res["run_id"]], [f"runs:/{res['run_id']}/checkpoints/best.pt"]):
        got = json.loads(run(b, "evaluate", *target, "--json").stdout)
        assert got["dice"] == pytest.approx(res["test_dice"]) and got["run_id"] == res["run_id"]


def test_a_worker_that_loses_the_server_fails_its_cell_for_another(pg, tmp_path):
    """The tracking server dies mid-cell: the worker ends with one line (exit 2), its cell is failed
    in the study and enqueued again for another worker, and its last.pt stays for a re-run here."""
    import optuna

    from cctr.table1 import load_table_spec
    from cctr.table1.distributed import study_name
    from tests.pg import PROCS

    gen = mlflow_server(pg.database(), tmp_path / "artifacts", tmp_path / "server.log")
    url = next(gen)
    try:
        spec = table_spec(tmp_path, "table1_lost", methods=["sup"], seeds=[0],
                          set=["train.iters=40", "train.val_every=20", "train.ramp_iters=1"])
        storage = pg.database()
        a = machine(tmp_path, "machine_a", url)
        w = start(a, "table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--storage", storage,
                  "--jobs", "1", "--no-figures", "--heartbeat", "2", "--out", str(a["cwd"] / "results"))
        deadline = time.monotonic() + 300
        while not list((a["cwd"] / "mlruns" / "checkpoints").rglob("last.pt")):  # mid-cell: a checkpoint
            assert w.poll() is None and time.monotonic() < deadline, w.stderr.read()[-3000:]
            time.sleep(0.2)
        os.killpg(PROCS[url].pid, signal.SIGKILL)
        _, err = w.communicate(timeout=300)
        assert w.returncode == 2, err[-3000:]
        assert "lost the tracking store" in err.strip().splitlines()[-1], err[-3000:]
        ts = optuna.load_study(study_name=study_name(load_table_spec(spec), "phantom-cardiac"), storage=storage)
        states = sorted(t.state.name for t in ts.get_trials())
        assert states == ["FAIL", "WAITING"], states  # failed, and waiting for another worker
        assert list((a["cwd"] / "mlruns" / "checkpoints").rglob("last.pt"))
    finally:
        gen.close()
