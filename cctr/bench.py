"""`cctr bench` / `make bench`: speed and memory figures measured side by side in one run.

Targets live in the issues; the benchmark prints figures, tests never time anything.
"""

from __future__ import annotations

import itertools
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


def bench_step(repeats: int = 7, size: int | None = None) -> dict:
    """Quick-preset training steps of `ct` and `cctr` beside the floor (seconds per step).

    The floor is what no method can avoid: both nets' forward + backward + optimizer step on the batch.
    `step_overhead` (cctr/ct) is what contrast, REPS, the memory banks and RSL add on top of
    cross-teaching; registration maps are precomputed, so they cost nothing per step.
    """
    import statistics

    import torch

    from cctr import losses as L
    from cctr.config import EXPERIMENTS, apply_overrides, load_config
    from cctr.models import build_nets
    from cctr.terms import METHODS, Contrast, StepContext, forward_nets, norm_split, step_terms
    from cctr.train import LOG_EVERY, amp_dtype, make_optimizer

    cfg = load_config(EXPERIMENTS / "phantom_cardiac.yaml", "quick")
    if size is not None:
        cfg = apply_overrides(cfg, [f"data.size={size}"])
    t = cfg.train
    b, s, C = t.batch_labeled + t.batch_unlabeled, cfg.data.size, 4
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(b, 1, s, s, generator=g),
        "label": torch.randint(0, C, (b, s, s), generator=g),
        "label_mon": torch.randint(0, C, (b, s, s), generator=g),
        "y_reg": torch.randint(0, C, (b, s, s), generator=g),
        "c_reg": torch.rand(b, 1, s, s, generator=g),
        "coords": torch.rand(b, 3, s, s, generator=g) * 100,
        "valid": torch.rand(b, s, s, generator=g) > 0.05,
        "case_index": torch.arange(b),
    }
    torch.manual_seed(0)
    nets = build_nets(cfg.model, C)
    params = [p for n in nets for p in n.parameters()]
    opt = make_optimizer(t, params)  # the quick preset's optimizer, fused as in training
    cpu = torch.device("cpu")
    amp = amp_dtype(t.amp, cpu)

    def timed(loss_fn: Callable[[], torch.Tensor]) -> float:
        t0 = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    y = batch["label"]

    def floor(split: int) -> Callable[[], torch.Tensor]:
        return lambda: sum(L.ce_loss(o["logits"], y) for o in forward_nets(nets, batch["image"], False, amp, split))

    # the floor normalises the batch as training does; the joint floor beside it shows what the split costs
    split = norm_split(t)
    steps = {"floor_s": floor(split)} | ({"floor_joint_s": floor(0)} if split else {})
    res: dict = {"amp": str(amp).replace("torch.", "") if amp else "fp32"}

    def method_step(name: str) -> tuple[Callable[[], torch.Tensor], Contrast | None]:
        m = METHODS[name]
        mcfg = apply_overrides(cfg, [f"train.method={name}"])
        con = Contrast([L.MemoryBank(t.memory_size, cfg.model.proj_dim) for _ in nets], 10.0, 20.0) if m.has("con") else None
        calls = itertools.count()  # the pair monitor runs on every LOG_EVERY-th step, as in training

        def step() -> torch.Tensor:
            monitor = next(calls) % LOG_EVERY == 0
            ctx = StepContext(mcfg, m, nets, batch, cpu, g, amp, {"con": con} if con else {}, monitor=monitor)
            return sum(step_terms(ctx).values())
        return step, con

    steps["step_ct_s"], _ = method_step("ct")
    steps["step_cctr_s"], con = method_step("cctr")
    res["bank_mb"] = sum(bk.nbytes for bk in con.banks) / 2**20
    # Warm-up: allocators, and the memory banks filled as in training's steady state (a partly empty bank
    # makes the contrast cheaper: 16 steps of 128 anchors fill 2048 slots; every step pushes anchors)
    for step in steps.values():
        timed(step)
    while any(len(bk) < bk.size for bk in con.banks):
        timed(steps["step_cctr_s"])
    # Interleaved rounds, so a change in the machine's load during the bench hits every figure alike
    # (measured one after another, `step_overhead` moved between 0.93 and 1.27 on a loaded machine).
    # A block is LOG_EVERY rounds (one monitored cctr step, as in training): each figure is the median
    # over blocks of the block's mean step.
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats * LOG_EVERY):
        for k, step in steps.items():
            times[k].append(timed(step))
    blocks = {k: [statistics.fmean(v[i:i + LOG_EVERY]) for i in range(0, len(v), LOG_EVERY)] for k, v in times.items()}
    res.update({k: statistics.median(v) for k, v in blocks.items()})
    res.setdefault("floor_joint_s", res["floor_s"])
    # cctr over ct within each block (the two steps run back to back), then the median over blocks
    res["step_overhead_rounds"] = [c / t for c, t in zip(blocks["step_cctr_s"], blocks["step_ct_s"])]
    res["step_overhead"] = statistics.median(res["step_overhead_rounds"])
    res["ct_over_floor"] = res["step_ct_s"] / res["floor_s"]
    return res


def bench_step_threads(threads: int, **kw) -> dict:
    """`bench_step` on `threads` CPU threads, its figures suffixed `_<threads>t`. Table 1 and sweeps run
    one cell per core (`--jobs`), so a cell's steps take one thread: the contrast's small [N,M] passes
    gain less from a second thread than the convolutions do, and the overhead differs between the two."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = bench_step(**kw)
    finally:
        torch.set_num_threads(old)
    return {f"{k}_{threads}t": v for k, v in res.items() if k not in ("amp", "bank_mb")}


def run_bench(log: Callable[[str], None] = print, smoke: bool = False) -> dict:
    """Every figure, side by side in one run. `smoke` runs each stage at a token size (seconds, for
    tests of the command itself; its figures mean nothing) and leaves out the minutes-long medpy stage."""
    from functools import partial

    from cctr.data.slices import bench_loader
    from cctr.metrics import bench_hd95

    stages = [("phantom", bench_phantom), ("loader", bench_loader), ("training step", bench_step),
              ("training step, 1 thread (as Table 1 runs its cells)", partial(bench_step_threads, 1)),
              ("hd95 (medpy side by side: minutes)", bench_hd95)]
    if smoke:
        stages = [("phantom", bench_phantom), ("loader", partial(bench_loader, num_workers=0, size=32, seconds=0.5,
                                                                  warmup_batches=1)),
                  ("training step", partial(bench_step, repeats=1, size=32)),
                  ("training step, 1 thread", partial(bench_step_threads, 1, repeats=1, size=32))]
    res: dict = {}
    for name, fn in stages:
        log(f"bench: {name} ...")
        res.update(fn())
    return res
