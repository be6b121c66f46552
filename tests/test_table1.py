"""Table 1: seeds vary the labeled case on a fixed test set; cells run in parallel worker
processes; an interrupted table resumes to the identical table; Wilcoxon/Holm and the md/csv/tex
outputs are checked against hand-computed values."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cctr import tracking
from cctr.table1 import (
    Table1Spec,
    cell_config,
    cell_split,
    cells,
    holm,
    load_table_spec,
    paired_tests,
    run_table,
    sanity_checks,
    summarize,
    wilcoxon_p,
    write_table,
)
from tests.helpers import TINY, write_yaml

CLASSES = ("bg", "RV", "Myo", "LV")
REPO = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, name: str, **kw):
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    d = {"config": str(cfg), "preset": "quick", "methods": ["sup", "cctr", "reg-only"], "labeled": [1],
         "seeds": [0, 1], **kw}
    return load_table_spec(write_yaml(tmp_path / f"{name}.yaml", d))


# ----------------------------------------------------------------------------- seeds and grids


def test_seed_varies_the_labeled_case_not_the_test_set(tmp_path):
    spec = tiny_spec(tmp_path, "table1_seeds", labeled=[1, 2, 4], seeds=[0, 1, 2])
    splits = {}
    for s in spec.seeds:
        for lab in spec.labeled:
            cfg = cell_config(spec, "cctr", lab, s)
            assert cfg.train.seed == s and cfg.data.labeled_seed == s and cfg.data.seed == 0
            splits[s, lab] = cell_split(cfg)
    tests = {tuple(sp.test) for sp in splits.values()}
    trains = {tuple(sp.train) for sp in splits.values()}
    assert len(tests) == 1 and len(trains) == 1  # one split: paired tests stay valid
    assert len({tuple(splits[s, 1].labeled) for s in spec.seeds}) > 1  # seeds label different cases
    for s in spec.seeds:  # nested within a seed: 1 ⊂ 2 ⊂ 4
        assert set(splits[s, 1].labeled) < set(splits[s, 2].labeled) < set(splits[s, 4].labeled)
    full = tiny_spec(tmp_path, "table1_full", methods=["full"], labeled=[1, 2], seeds=[0, 1])
    assert cells(full) == [("full", 1, 0), ("full", 1, 1)]  # once per seed, shown in every column


@pytest.mark.parametrize("name", ["phantom_cardiac", "phantom_abdomen", "acdc", "synapse"])
def test_default_grids_are_the_quick_preset_with_three_seeds(name):
    spec = load_table_spec(REPO / "experiments" / f"table1_{name}.yaml")
    assert spec.preset == "quick" and spec.seeds == [0, 1, 2] and spec.overrides == []
    assert spec.methods == ["sup", "sup-a", "ct", "cct", "cct+rsl", "cct+reps", "cctr", "bcp", "unimatch", "reg-only", "full"]


# ----------------------------------------------------------------------------- statistics


def test_wilcoxon_and_holm_match_hand_computed_values():
    # differences 1,-2,3,4,5,6: W- = rank 2, exact two-sided p = 2 * #{subsets of 1..6 with rank sum <= 2} / 2^6
    assert wilcoxon_p(np.array([1, -2, 3, 4, 5, 6]) * 0.01 + 0.5, np.full(6, 0.5)) == pytest.approx(2 * 3 / 64)
    assert wilcoxon_p(np.arange(1, 7) * 0.01, np.zeros(6)) == pytest.approx(2 / 64)
    assert wilcoxon_p(np.ones(4), np.ones(4)) == 1.0  # no difference at all
    assert np.isnan(wilcoxon_p(np.array([np.nan]), np.array([0.3])))
    # Holm: sorted 0.01, 0.03, 0.04 -> 3*0.01, max(.03, 2*0.03), max(.06, 1*0.04); NaN is not a test
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _fake_run(tmp: Path, name: str, method: str, seed: int, case_dice: dict[str, float], lab: int = 1) -> dict:
    """A finished cell with per-case CSVs: two classes per case whose mean is `case_dice`."""
    d = tmp / name
    d.mkdir(parents=True)
    for tag in ("best", "last"):
        with open(d / f"test_per_case_{tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "class", "dice", "hd95_mm", "asd_mm"])
            w.writeheader()
            for c, v in case_dice.items():
                w.writerow({"case": c, "class": "RV", "dice": v - 0.1, "hd95_mm": 3, "asd_mm": 1})
                w.writerow({"case": c, "class": "LV", "dice": v + 0.1, "hd95_mm": 5, "asd_mm": 1})
    mean = float(np.mean(list(case_dice.values())))
    return {"method": method, "labeled": lab, "seed": seed, "status": "FINISHED", "run_id": f"id-{name}",
            "run_dir": str(d), "labeled_cases": f"c{seed}", "test_dice": mean, "test_hd95_mm": 4.0 + seed,
            "test_last_dice": mean - 0.01, "test_last_hd95_mm": 4.5, "test_dice_LV": mean + 0.1,
            "test_hd95_mm_LV": 5.0}


def fake_records(tmp: Path) -> list[dict]:
    """cctr at 0.5 on every (seed, case); sup differs by 1,-2,3 / 4,5,6 (x0.01) over seeds 0 / 1;
    ct by +1..+6; full is 0.9 (one run per seed)."""
    cases = ["a", "b", "c"]
    recs = []
    for s in (0, 1):
        recs.append(_fake_run(tmp, f"cctr{s}", "cctr", s, {c: 0.5 for c in cases}))
        recs.append(_fake_run(tmp, f"sup{s}", "sup", s,
                              {c: 0.5 + 0.01 * d for c, d in zip(cases, [(1, -2, 3), (4, 5, 6)][s])}))
        recs.append(_fake_run(tmp, f"ct{s}", "ct", s, {c: 0.5 + 0.01 * d for c, d in zip(cases, [(1, 2, 3), (4, 5, 6)][s])}))
        recs.append(_fake_run(tmp, f"full{s}", "full", s, {c: 0.9 for c in cases}))
    return recs


def test_paired_tests_pair_seed_and_case_with_holm(tmp_path):
    recs = fake_records(tmp_path)
    t = paired_tests(recs, ["sup", "ct", "cctr", "full"], [1], "best")
    assert t["sup", 1]["n_pairs"] == 6 and t["sup", 1]["p"] == pytest.approx(6 / 64)
    assert t["ct", 1]["p"] == pytest.approx(2 / 64)
    assert t["full", 1]["p"] == pytest.approx(2 / 64)  # 6 equal positive differences
    # Holm over 3 tests: sorted ct, full (2/64 each), sup (6/64) -> 3*2/64, max(.., 2*2/64), max(.., 6/64)
    assert t["ct", 1]["p_holm"] == pytest.approx(6 / 64)
    assert t["full", 1]["p_holm"] == pytest.approx(6 / 64)
    assert t["sup", 1]["p_holm"] == pytest.approx(6 / 64)
    assert t["sup", 1]["diff"] == pytest.approx(0.01 * (1 - 2 + 3 + 4 + 5 + 6) / 6)


def test_write_table_markdown_csv_latex(tmp_path):
    recs = fake_records(tmp_path)
    recs = [r for r in recs if r["method"] != "full"]
    recs.append(dict(_fake_run(tmp_path, "fullx", "full", 0, {"a": 0.9, "b": 0.9, "c": 0.9}), test_dice=0.53))
    spec = tiny_spec(tmp_path, "table1_fake", methods=["sup", "ct", "cctr", "full"])
    files = write_table(spec, recs, "phantom-cardiac", CLASSES, tmp_path / "results", figures=False)
    md = files["md"].read_text()
    assert "## Best-val checkpoint" in md and "## Last checkpoint" in md
    assert "Wilcoxon signed-rank" in md and "Holm" in md and "2 runs per cell" in md
    assert "labeled_seed" in md and "seed 0: 1: c0" in md
    # sup: mean over seeds of (0.5 + mean diff), sample std; p: raw 6/64, ct 2/64, full (seed 0 only,
    # 3 pairs of +0.4) 2/8; Holm: ct 3*2/64, sup max(.., 2*6/64) = 0.1875, full max(.., 0.25)
    sup_means = [0.5 + 0.01 * 2 / 3, 0.5 + 0.01 * 5]
    line = next(x for x in md.splitlines() if x.startswith("| sup |"))
    assert f"{np.mean(sup_means):.3f} ± {np.std(sup_means, ddof=1):.3f}" in line and "| 0.188 |" in line
    assert "| full | 0.530 (1/2 seeds) |" in md  # one seed: no ±, and the missing seed is said
    assert next(x for x in md.splitlines() if x.startswith("| cctr |")).endswith("| ref. |")
    # full (0.53) is below ct (0.535): flagged, not hidden; sup is below ct but above cctr (0.5): flagged
    assert "`full` (0.530) is at or above every other row: **NO** — `ct` 0.535" in md
    assert "`sup` (" in md and "**NO** — `cctr` 0.500" in md
    rows = list(csv.DictReader(open(files["csv"])))
    assert {r["checkpoint"] for r in rows} == {"best", "last"}
    sup = next(r for r in rows if r["checkpoint"] == "best" and r["method"] == "sup")
    assert float(sup["p_vs_cctr"]) == pytest.approx(6 / 64, abs=1e-6) and sup["n_pairs"] == "6"
    assert "dice_LV_mean" in sup and "hd95_mm_LV_mean" in sup and float(sup["hd95_mm_mean"]) == pytest.approx(4.5)
    last = next(r for r in rows if r["checkpoint"] == "last" and r["method"] == "sup")
    assert float(last["dice_mean"]) == pytest.approx(np.mean(sup_means) - 0.01, abs=1e-5)
    tex = files["tex"].read_text()
    assert tex.count("\\toprule") == 1 and tex.count("\\bottomrule") == 1 and tex.count("\\midrule") == 2
    assert "\\begin{tabular}{lccc}" in tex and "$\\pm$" in tex and "±" not in tex
    body = tex[tex.index("\\toprule"):tex.index("\\bottomrule")]
    for row in body.splitlines():
        if row.startswith(("sup", "ct", "cctr", "full", "Method")):
            assert row.count("&") == 3 and row.endswith("\\\\")
    assert files["png"].exists()
    one = sanity_checks(spec, summarize(spec, recs, CLASSES))
    assert len(one) == 2 and all("**NO**" in x for x in one)


# ----------------------------------------------------------------------------- running cells


CHILD = """
import sys, time
from pathlib import Path
from cctr.table1 import load_table_spec, run_table
t0 = time.time()
run_table(load_table_spec(Path(sys.argv[1])), jobs=2, threads=1, register=True, progress=False,
          log=lambda m: print(f"{time.time() - t0:7.1f} {m}", flush=True))
"""


def _table_outputs(spec, recs, out: Path) -> dict[str, str]:
    files = write_table(spec, recs, "phantom-cardiac", CLASSES, out, figures=False)
    return {k: files[k].read_text() for k in ("md", "csv", "tex")}


def test_parallel_interrupted_table_resumes_to_the_identical_table(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, "table1_par", set=["train.iters=2", "train.val_every=2", "train.ramp_iters=1"])
    # reference: one uninterrupted run, in this process
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "store_a"))
    logs: list[str] = []
    ref = run_table(spec, jobs=1, threads=1, register=True, progress=False, log=logs.append)
    assert all(r["status"] == "FINISHED" for r in ref) and len(ref) == 6
    expect = _table_outputs(spec, ref, tmp_path / "ref")
    figs = write_table(spec, ref, "phantom-cardiac", CLASSES, tmp_path / "ref_figs")
    assert figs["qualitative"].stat().st_size > 0 and figs["pseudo_labels"].stat().st_size > 0
    parent = tracking.find_runs("phantom-cardiac", "tags.table1 = 'table1_par' and tags.role = 'table'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    logged = {Path(a.path).name for a in tracking.client().list_artifacts(parent[0].info.run_id, "table1")}
    assert {"table1_phantom_cardiac.md", "table1_phantom_cardiac_qualitative.png"} <= logged
    assert all(r["run_id"] in {c.info.run_id for c in tracking.find_runs(
        "phantom-cardiac", f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")} for r in ref)  # nested
    # the runs' parameters: seed s is the training seed and the labeled seed, the split seed stays 0
    for r in ref:
        p = tracking.client().get_run(r["run_id"]).data.params
        assert (p["train.seed"], p["data.labeled_seed"], p["data.seed"]) == (str(r["seed"]), str(r["seed"]), "0")
    assert ref[0]["labeled_cases"] != ref[1]["labeled_cases"]  # sup l=1, seeds 0 and 1

    # a second store: two worker processes, killed (SIGTERM) once the first cell has finished
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "store_b"))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "table1_par.yaml")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    out = []
    deadline = time.monotonic() + 240
    for line in child.stdout:
        out.append(line)
        if "finished in" in line or time.monotonic() > deadline:
            break
    child.send_signal(signal.SIGTERM)
    rest, _ = child.communicate(timeout=120)
    text = "".join(out) + rest
    assert any("finished in" in x for x in out), text
    assert child.returncode != 0, text
    runs = tracking.find_runs("phantom-cardiac", "tags.table1 = 'table1_par'")
    status = [r.info.status for r in runs]
    assert "RUNNING" not in status and "FINISHED" in status, (status, text)
    parent = [r for r in runs if r.data.tags.get("role") == "table"]
    assert parent and parent[0].info.status == "KILLED"
    n_done = status.count("FINISHED")

    # re-run: finished cells are not retrained; the rest runs on two worker processes
    logs.clear()
    again = run_table(spec, jobs=2, threads=1, register=True, progress=False, log=logs.append)
    assert sum("done already" in m for m in logs) == n_done
    pids = {m.split("pid ")[1].rstrip(")") for m in logs if "training (worker" in m}
    assert len(pids) == 2 and str(os.getpid()) not in pids, logs
    assert _table_outputs(spec, again, tmp_path / "again") == expect
    assert [r["test_dice"] for r in again] == [r["test_dice"] for r in ref]
    runs = tracking.find_runs("phantom-cardiac", "tags.table1 = 'table1_par' and tags.role = 'cell'")
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    # a third invocation trains nothing
    logs.clear()
    run_table(spec, jobs=2, threads=1, progress=False, log=logs.append)
    assert sum("done already" in m for m in logs) == 6 and not any("training" in m for m in logs)


QUEUED = """
from cctr import table1, workers
def interrupted(*a, **k):
    raise KeyboardInterrupt
workers.spawn = interrupted  # Ctrl-C before any worker took a task
tasks = [{"index": i, "pad": "x" * 8192} for i in range(64)]  # 512 KiB: more than a pipe buffer holds
try:
    table1._run_parallel(tasks, 2, 1, print, [str(i) for i in range(64)])
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_interrupted_parent_exits_with_tasks_still_queued():
    """The table's parent, interrupted while most cells are still queued, exits instead of waiting
    forever for the task queue to drain (it hung after SIGTERM with 60 cells queued)."""
    child = subprocess.Popen([sys.executable, "-c", QUEUED], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        raise AssertionError("the interrupted parent did not exit") from None
    assert "interrupted" in out, out


def test_missing_registration_model_fails_before_any_worker(tmp_path, monkeypatch, session_dirs):
    monkeypatch.setenv("CCTR_CACHE", str(tmp_path / "cache"))  # no registration model in this cache
    spec = tiny_spec(tmp_path, "table1_noreg", methods=["cctr"], seeds=[0])
    from cctr.errors import CctrError

    with pytest.raises(CctrError, match="cctr register train"):
        run_table(spec, jobs=2, progress=False, log=lambda m: None)
    assert not tracking.find_runs("phantom-cardiac", "tags.table1 = 'table1_noreg'")


def test_interrupted_cell_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A cell stopped mid-training (its run KILLED, last.pt on disk) continues in the same MLflow run
    and ends with the metrics of an uninterrupted cell."""
    from cctr.checkpoint import config_hash
    from cctr.config import to_dict
    from cctr.runs import run_dir_for
    from cctr.train import train

    spec = tiny_spec(tmp_path, "table1_resume", methods=["sup"], seeds=[0])
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "store_a"))
    ref = run_table(spec, jobs=1, threads=1, progress=False, log=lambda m: None)
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "store_b"))
    cfg = cell_config(spec, "sup", 1, 0)
    part = train(cfg, run_dir_for(cfg), progress=False, stop_after=2,
                 tags={"table1": spec.name, "role": "cell", "config_hash": config_hash(to_dict(cfg))})
    tracking.end_run(part.run_id, "KILLED", "interrupted (test)")
    assert (run_dir_for(cfg) / "last.pt").is_file()
    logs: list[str] = []
    again = run_table(spec, jobs=1, threads=1, progress=False, log=logs.append)
    assert any("resuming the interrupted run" in m for m in logs), logs
    assert again[0]["run_id"] == part.run_id and again[0]["status"] == "FINISHED"
    for k in ("test_dice", "test_hd95_mm", "test_last_dice"):  # exact resume: the same numbers
        assert again[0][k] == ref[0][k], k


def test_a_grid_reuses_the_cells_another_table_finished(tmp_path, monkeypatch):
    """A cell that a smaller table of the same dataset finished with the same configuration is not
    trained again: the larger grid's record is that run. A changed configuration is trained."""
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "store"))
    small = run_table(tiny_spec(tmp_path, "table1_small", methods=["sup"], seeds=[0]), jobs=1, threads=1,
                      progress=False, log=lambda m: None)
    logs: list[str] = []
    big = run_table(tiny_spec(tmp_path, "table1_big", methods=["sup"], seeds=[0, 1]), jobs=1, threads=1,
                    progress=False, log=logs.append)
    assert any("1 of 2 cells to train" in m for m in logs), logs
    by_seed = {r["seed"]: r for r in big}
    assert by_seed[0]["run_id"] == small[0]["run_id"] and by_seed[0]["test_dice"] == small[0]["test_dice"]
    assert by_seed[1]["status"] == "FINISHED" and by_seed[1]["run_id"] != small[0]["run_id"]
    logs.clear()
    changed = run_table(tiny_spec(tmp_path, "table1_changed", methods=["sup"], seeds=[0],
                                  set={"quick": ["train.lr=0.002"]}), jobs=1, threads=1, progress=False,
                        log=logs.append)
    assert any("1 of 1 cells to train" in m for m in logs), logs
    assert changed[0]["run_id"] not in {r["run_id"] for r in big}


def test_sanity_checks_hold_each_row_to_the_supervision_of_its_nets():
    """A one-net peer is checked against `sup-a` (net A alone), a two-net row against `sup` (both nets'
    ensemble): bcp between the two passes, ct below sup is flagged."""
    spec = Table1Spec("t", "c.yaml", "quick", ["sup", "sup-a", "ct", "bcp"], [1], [0], [])
    dice = {"sup": 0.60, "sup-a": 0.55, "ct": 0.58, "bcp": 0.57}
    rows = [{"method": m, "checkpoint": "best", "labeled": 1, "dice_mean": v} for m, v in dice.items()]
    lines = sanity_checks(spec, rows)
    assert len(lines) == 2
    two = next(x for x in lines if "`sup` (0.600)" in x)
    one = next(x for x in lines if "`sup-a` (0.550)" in x)
    assert "both nets' ensemble (`ct`)" in two and "**NO** — `ct` 0.580" in two
    assert "net A alone (`bcp`)" in one and one.endswith(": yes")
