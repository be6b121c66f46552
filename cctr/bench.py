"""`cctr bench` / `make bench`: speed and memory figures measured side by side in one run.

Targets live in the issues; the benchmark prints figures, tests never time anything.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def bench_phantom() -> dict:
    """Time to build the default dataset (generate + validate + write the cache), in a scratch cache."""
    from cctr.data.datasets import load_dataset

    old = os.environ.get("CCTR_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CCTR_CACHE"] = str(Path(tmp))
        try:
            t = time.perf_counter()
            ds = load_dataset("phantom-cardiac")
            dt = time.perf_counter() - t
        finally:
            if old is None:
                os.environ.pop("CCTR_CACHE", None)
            else:
                os.environ["CCTR_CACHE"] = old
    return {"phantom_gen_s": dt, "phantom_cases": len(ds.case_ids)}


def run_bench(log: Callable[[str], None] = print) -> dict:
    from cctr.data.slices import bench_loader
    from cctr.metrics import bench_hd95

    res: dict = {}
    for name, fn in (("phantom", bench_phantom), ("loader", bench_loader), ("hd95", bench_hd95)):
        log(f"bench: {name} ...")
        res.update(fn())
    return res
