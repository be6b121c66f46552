"""`cctr register ...`: train the registration net, apply it (label transfer cache), report its quality."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cctr.cli.common import TRACKING_URI_HELP, emit_json, use_tracking
from cctr.console import console, out

app = typer.Typer(help="Registration stage: train, apply (label transfer + coordinates), report.",
                  no_args_is_help=True)

_PRESET = typer.Option("quick", "--preset", help="Preset in the config file (quick | paper).")
_SET = typer.Option(None, "--set", help="Override, e.g. registration.iters=500 (repeatable).")
_CONFIG = typer.Option(None, "--config", help="Run YAML (default experiments/<dataset>.yaml), the same file "
                       "`cctr train` reads, so both find the same registration model.")
_SEED = typer.Option(0, "--seed", help="Split seed.")
_LSEED = typer.Option(None, "--labeled-seed", help="Which training cases are labeled (Table 1's seeds; "
                      "default: the split seed). The registration net does not depend on it.")
_CKPT = typer.Option(None, "--checkpoint", help="Use this registration checkpoint instead of the trained one.")


def _cfg(dataset: str, config: Optional[Path], preset: str, sets: Optional[list[str]]):
    from cctr.config import default_config_path, load_config

    return load_config(config or default_config_path(dataset), preset, sets or []).registration


def _split(dataset: str, labeled: int, seed: int, labeled_seed: Optional[int] = None):
    from cctr.data.datasets import load_dataset, make_split

    return make_split(load_dataset(dataset), labeled, seed, labeled_seed)


@app.command("train")
def train(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (e.g. phantom-cardiac)."),
    preset: str = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    seed: int = _SEED,
    labeled: int = typer.Option(1, "--labeled", help="Labeled count (used only by the optional Dice term)."),
    as_json: bool = typer.Option(False, "--json"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Train on random pairs of training cases (resumes an interrupted run)."""
    from cctr.registration.train import train_registration

    cfg = _cfg(dataset, config, preset, sets)
    use_tracking(tracking_uri)
    t0 = time.perf_counter()
    path = train_registration(dataset, cfg, _split(dataset, labeled, seed), progress=not as_json)
    res = {"dataset": dataset, "checkpoint": str(path), "seconds": time.perf_counter() - t0}
    if as_json:
        emit_json(res)
    else:
        out.print(f"registration model for [bold]{dataset}[/]: {path} ({res['seconds']:.0f} s)")


@app.command("apply")
def apply(
    dataset: str = typer.Option(..., "--dataset"),
    labeled: int = typer.Option(..., "--labeled", help="Number of labeled cases (atlases)."),
    seed: int = _SEED,
    labeled_seed: Optional[int] = _LSEED,
    preset: str = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    checkpoint: Optional[Path] = _CKPT,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Warp every labeled case to every train/val/test case: y_reg, c_reg, coords (cached)."""
    import numpy as np

    from cctr.registration.apply import registration_maps

    cfg = _cfg(dataset, config, preset, sets)
    maps = registration_maps(dataset, cfg, _split(dataset, labeled, seed, labeled_seed), checkpoint,
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
    dataset: str = typer.Option(..., "--dataset"),
    labeled: int = typer.Option(..., "--labeled"),
    seed: int = _SEED,
    labeled_seed: Optional[int] = _LSEED,
    preset: str = _PRESET,
    sets: Optional[list[str]] = _SET,
    config: Optional[Path] = _CONFIG,
    checkpoint: Optional[Path] = _CKPT,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Dice of y_reg vs identity vs TV-L1 on the validation cases, c_reg calibration; folding; speed."""
    from cctr.registration.report import registration_report

    cfg = _cfg(dataset, config, preset, sets)
    res = registration_report(dataset, cfg, labeled, seed, checkpoint, progress=not as_json,
                              labeled_seed=labeled_seed)
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
