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


def bench_step(repeats: int = 7) -> dict:
    """One training step of `ct` vs `cctr` on the same nets and batch (median), and the bank size.

    The overhead of CCT-R over cross-teaching is the contrastive term, the REPS neighbour search
    and the memory bank; registration maps are precomputed, so they cost nothing per step.
    """
    import statistics

    import torch

    from cctr import losses as L
    from cctr.config import RunConfig, apply_overrides
    from cctr.models import build_nets
    from cctr.train import METHODS, loss_terms

    cfg = RunConfig()
    t = cfg.train
    b, s, C = t.batch_labeled + t.batch_unlabeled, cfg.data.size, 4
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(b, 1, s, s, generator=g),
        "label": torch.randint(0, C, (b, s, s), generator=g),
        "y_reg": torch.randint(0, C, (b, s, s), generator=g),
        "c_reg": torch.rand(b, s, s, generator=g),
        "coords": torch.rand(b, 3, s, s, generator=g) * 100,
        "case_index": torch.arange(b),
    }
    torch.manual_seed(0)
    nets = build_nets(cfg.model, C)
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    res = {}
    for name in ("ct", "cctr"):
        mcfg = apply_overrides(cfg, [f"train.method={name}"])
        bank = L.MemoryBank(t.memory_size, cfg.model.proj_dim) if METHODS[name].reps else None
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            terms = loss_terms(mcfg, METHODS[name], nets, batch, bank, 1000 + i, g, torch.device("cpu"))
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            if i:  # the first step warms allocators and fills the bank
                times.append(time.perf_counter() - t0)
        res[f"step_{name}_s"] = statistics.median(times)
        if bank is not None:
            res["bank_mb"] = bank.nbytes / 2**20
    res["step_overhead"] = res["step_cctr_s"] / res["step_ct_s"]
    return res


def run_bench(log: Callable[[str], None] = print) -> dict:
    from cctr.data.slices import bench_loader
    from cctr.metrics import bench_hd95

    res: dict = {}
    for name, fn in (("phantom", bench_phantom), ("loader", bench_loader), ("training step", bench_step),
                     ("hd95 (medpy side by side: minutes)", bench_hd95)):
        log(f"bench: {name} ...")
        res.update(fn())
    return res
