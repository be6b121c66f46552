"""`cctr register ...`: train the registration net, apply it (label transfer cache), report its quality."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cctr.cli.common import (
    SEED_HELP,
    SET_HELP,
    SPLIT_SEED_HELP,
    TRACKING_URI_HELP,
    Preset,
    emit_json,
    json_option,
    use_tracking,
    value,
)
from cctr.console import console, out

app = typer.Typer(help="Registration stage: train, apply (label transfer + coordinates), report.",
                  no_args_is_help=True)

_PRESET = typer.Option(Preset.quick, "--preset", help="Preset of the config file; the registration net is "
                       "trained once per preset (quick: a CPU-sized grid, paper: the GPU one).")
_SET = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP)
_DATASET = typer.Option(..., "--dataset", "-d", help="Dataset name (e.g. phantom-cardiac; `cctr data list`).")
_CONFIG = typer.Option(None, "--config", help="Run YAML (default experiments/<dataset>.yaml), the same file "
                       "`cctr train` reads, so both find the same registration model.")
_SEED = typer.Option(0, "--seed", "-s", help=SEED_HELP + " Here it picks the atlases; the registration net "
                     "does not depend on it.")
_SPLIT_SEED = typer.Option(None, "--split-seed", help=SPLIT_SEED_HELP + " The registration net trains on the "
                           "split's training cases.")
_CKPT = typer.Option(None, "--checkpoint", help="Use this registration checkpoint instead of the trained one.")


def _run_cfg(dataset: str, config: Optional[Path], preset, sets: Optional[list[str]]):
    from cctr.config import default_config_path, load_config

    return load_config(config or default_config_path(dataset), value(preset), sets or [])


def _cfg(dataset: str, config: Optional[Path], preset, sets: Optional[list[str]]):
    return _run_cfg(dataset, config, preset, sets).registration


def _split_seed(dataset: str, config: Optional[Path], preset, sets, split_seed: Optional[int]) -> int:
    """--split-seed, else the config's data.seed (as `cctr train` and `cctr table1` use)."""
    return split_seed if split_seed is not None else _run_cfg(dataset, config, preset, sets).data.seed


def _split(dataset: str, labeled: int, seed: int, labeled_seed: Optional[int] = None):
    from cctr.data.datasets import load_dataset, make_split

    return make_split(load_dataset(dataset), labeled, seed, labeled_seed)


@app.command("train")
def train(
    dataset: str = _DATASET,
    preset: Preset = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    seed: int = _SEED,
    split_seed: Optional[int] = _SPLIT_SEED,
    labeled: int = typer.Option(1, "--labeled", "-l", help="Labeled count (used only by the optional Dice term)."),
    as_json: bool = json_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Train on random pairs of training cases (resumes an interrupted run)."""
    from cctr.registration.train import train_registration

    cfg = _cfg(dataset, config, preset, sets)
    use_tracking(tracking_uri)
    t0 = time.perf_counter()
    split = _split(dataset, labeled, _split_seed(dataset, config, preset, sets, split_seed), seed)
    path = train_registration(dataset, cfg, split, progress=not as_json)
    res = {"dataset": dataset, "checkpoint": str(path), "seconds": time.perf_counter() - t0}
    if as_json:
        emit_json(res)
    else:
        out.print(f"registration model for [bold]{dataset}[/]: {path} ({res['seconds']:.0f} s)")


@app.command("apply")
def apply(
    dataset: str = _DATASET,
    labeled: int = typer.Option(..., "--labeled", "-l", help="Number of labeled cases (atlases)."),
    seed: int = _SEED,
    split_seed: Optional[int] = _SPLIT_SEED,
    preset: Preset = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    checkpoint: Optional[Path] = _CKPT,
    as_json: bool = json_option(),
) -> None:
    """Warp every labeled case to every train/val/test case: y_reg, c_reg, coords (cached)."""
    import numpy as np

    from cctr.registration.apply import registration_maps

    cfg = _cfg(dataset, config, preset, sets)
    split = _split(dataset, labeled, _split_seed(dataset, config, preset, sets, split_seed), seed)
    maps = registration_maps(dataset, cfg, split, checkpoint,
                             progress=not as_json)
    conf = float(np.mean([maps.c_reg(c).mean() for c in maps]))
    res = {"dataset": dataset, "cases": len(maps), "reference": maps.reference, "cache": str(maps.root),
           "reused": maps.reused, "mean_c_reg": conf}
    if as_json:
        emit_json(res)
    else:
        state = "reused" if maps.reused else "computed"
        out.print(f"{state} registration maps for {len(maps)} cases of [bold]{dataset}[/] in {maps.root} "
                  f"(reference {maps.reference}, mean confidence {conf:.3f})")


@app.command("report")
def report(
    dataset: str = _DATASET,
    labeled: int = typer.Option(..., "--labeled", "-l", help="Number of labeled cases (atlases)."),
    seed: int = _SEED,
    split_seed: Optional[int] = _SPLIT_SEED,
    preset: Preset = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    checkpoint: Optional[Path] = _CKPT,
    as_json: bool = json_option(),
) -> None:
    """Dice of y_reg vs identity vs TV-L1 on the validation cases, c_reg calibration; folding; speed."""
    from cctr.registration.report import registration_report

    cfg = _cfg(dataset, config, preset, sets)
    res = registration_report(dataset, cfg, labeled, _split_seed(dataset, config, preset, sets, split_seed),
                              checkpoint, progress=not as_json, labeled_seed=seed)
    if as_json:
        emit_json(res)
        return
    refine = f", {res['refine_iters']} refinement steps" if res["refine_iters"] else ""
    t = Table(title=f"registration: {dataset}, {labeled} labeled, seed {seed}, {res['pairs']} pairs{refine}")
    t.add_column("class")
    for col in ("ours (y_reg)", "identity", "TV-L1"):
        t.add_column(col, justify="right")
    for c in res["dice_reg_per_class"]:
        t.add_row(c, *(f"{res[f'dice_{k}_per_class'][c]:.3f}" for k in ("reg", "identity", "tvl1")))
    t.add_row("[bold]mean Dice", *(f"[bold]{res[f'dice_{k}']:.3f}" for k in ("reg", "identity", "tvl1")))
    t.add_row("s / pair", f"{res['pair_s']:.3f}", "", f"{res['pair_s_tvl1']:.3f}")
    t.add_row("Jacobian <= 0", f"{res['neg_jacobian_frac']:.2e}", "", "")
    out.print(t)
    console.print(f"checkpoint: {res['checkpoint']}")
