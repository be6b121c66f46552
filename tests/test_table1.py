"""Table 1: cells run once (resumable from MLflow), then md/csv/png with mean ± std over seeds."""

from __future__ import annotations

import csv

from cctr.registration import ensure_registration
from cctr.table1 import load_table_spec, run_table, write_table
from tests.helpers import TINY, write_yaml
from tests.test_train import tiny_cfg


def test_table1_runs_missing_cells_then_resumes(tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    spec_path = write_yaml(tmp_path / "table1_tiny.yaml", {
        "config": str(cfg), "preset": "quick", "methods": ["sup", "reg-only"], "labeled": [1], "seeds": [0, 1],
        "set": ["train.iters=4", "train.val_every=2"]})
    ensure_registration("phantom-cardiac", tiny_cfg().registration, progress=False)
    spec = load_table_spec(spec_path)
    logs: list[str] = []
    records = run_table(spec, log=logs.append, progress=False)
    assert len(records) == 4 and sum("training" in m for m in logs) == 4
    files = write_table(spec, records, "phantom-cardiac", ("bg", "RV", "Myo", "LV"), tmp_path / "results")
    md = files["md"].read_text()
    assert "| sup |" in md and "| reg-only |" in md and "±" in md
    rows = list(csv.DictReader(open(files["csv"])))
    assert {r["method"] for r in rows} == {"sup", "reg-only"} and all(r["n_seeds"] == "2" for r in rows)
    assert all(0 <= float(r["test_dice_mean"]) <= 1 for r in rows) and "test_dice_LV_mean" in rows[0]
    assert files["png"].exists()
    logs.clear()
    again = run_table(spec, log=logs.append, progress=False)  # every cell already finished: nothing trains
    assert sum("done already" in m for m in logs) == 4
    assert [r["test_dice"] for r in again] == [r["test_dice"] for r in records]
