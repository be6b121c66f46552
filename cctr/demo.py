"""`make demo`: the main job on the built-in default, end to end, then where to look.

Builds the cardiac phantom, trains the registration net, and runs
`cctr sweep --dataset phantom-cardiac --labeled 1,2,4` with a few short trials on the quick preset.
Everything is cached or stored in Optuna/MLflow, so a second `make demo` reuses what is done.
"""

from __future__ import annotations

import sys
import time

from cctr.console import console, out
from cctr.errors import CctrError

DATASET = "phantom-cardiac"
LABELED = [1, 2, 4]
TRIALS = 2
# shorter than the quick preset (registration too: no instance optimisation, which would add minutes
# for the 7 atlases x 40 cases of the three labeled sets) so that three studies fit in ~20 minutes on 2
# CPU cores; validation (val Dice and pseudo-label quality) every 20 iterations, so each curve has 10 points
DEMO_SET = ["data.size=64", "train.iters=200", "train.val_every=20", "train.ramp_iters=200",
            "train.batch_labeled=2", "train.batch_unlabeled=2", "registration.iters=500",
            "registration.refine_iters=0"]


def main() -> int:
    from cctr.cli import quiet_libraries
    from cctr.cli.sweep import print_sweep_table
    from cctr.config import default_config_path, load_config
    from cctr.data.prepare import dataset_stats
    from cctr.registration.train import ensure_registration
    from cctr.sweep import DEFAULT_SPACE, load_space, run_sweep
    from cctr.workers import default_jobs

    quiet_libraries()
    t0 = time.time()
    try:
        console.print(f"[bold]1/3 data[/]: building {DATASET} (cached after the first run)")
        s = dataset_stats(DATASET)
        console.print(f"    {s['cases']} cases, {s['classes']} classes, median spacing {s['spacing']} mm")
        cfg = load_config(default_config_path(DATASET), "quick", DEMO_SET)
        console.print("[bold]2/3 registration[/]: training the registration net (reused when already trained)")
        ensure_registration(DATASET, cfg.registration)
        console.print(f"[bold]3/3 sweep[/]: {TRIALS} trials per labeled count {LABELED}")
        results = run_sweep(cfg, LABELED, load_space(DEFAULT_SPACE), TRIALS,
                            log=lambda m: console.print(m, markup=False), jobs=default_jobs(TRIALS))
    except CctrError as e:
        console.print(f"error: {e}", markup=False)
        return 2
    print_sweep_table(DATASET, results)
    out.print(f"done in {time.time() - t0:.0f} s. Where to look:")
    out.print("  make ui                      # MLflow UI on :5000 (PORT=5001 make ui if taken); prints the runs URL")
    out.print("  mlruns/optuna.db             # the Optuna studies (re-run `make demo` to resume)")
    out.print("  cctr data show phantom-cardiac -o cardiac.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
