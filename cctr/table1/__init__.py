"""Table 1: methods x labeled counts x seeds, each cell one tracked run; resumable, parallel, and
shared by workers on many machines.

Stages, one module each, imported in this order (no module imports a later one):
- `plan`: the table spec and its cells (`load_table_spec`, `cells`, `cell_config`);
- `collect`: one record per cell from the tracking store alone (`collect_records`);
- `stats`: paired Wilcoxon tests against `cctr`, Holm-corrected;
- `render`: md / csv / tex / figures (`write_table`; figures in `cctr.table_figures`);
- `run`: train the missing cells, on this machine (`run_table`), or, with an Optuna storage,
  claimed cell by cell by workers on any number of machines (`distributed`).
"""

from cctr.table1.collect import (
    _finished_by_hash,
    _per_case_csv,
    _table_runs,
    collect_records,
    disk_usage,
    metric,
    per_case_dice,
)
from cctr.table1.plan import (
    CHECKPOINTS,
    REFERENCE,
    Table1Spec,
    _cell_name,
    cell_config,
    cell_hashes,
    cell_split,
    cells,
    load_table_spec,
    table_dataset,
)
from cctr.table1.render import sanity_checks, summarize, write_table
from cctr.table1.run import (
    _end_stale_runs,
    _lock_table,
    _resume_point,
    _run_inprocess,
    _run_parallel,
    _train_cell,
    _worker,
    prepare_shared,
    run_table,
)
from cctr.table1.stats import holm, paired_tests, wilcoxon_p

__all__ = [
    "CHECKPOINTS", "REFERENCE", "Table1Spec", "_cell_name", "_end_stale_runs", "_finished_by_hash", "_lock_table",
    "_per_case_csv", "_resume_point", "_run_inprocess", "_run_parallel", "_table_runs", "_train_cell", "_worker",
    "cell_config", "cell_hashes", "cell_split", "cells", "collect_records", "disk_usage", "holm", "load_table_spec",
    "metric", "paired_tests", "per_case_dice", "prepare_shared", "run_table", "sanity_checks", "summarize",
    "table_dataset", "wilcoxon_p", "write_table",
]
