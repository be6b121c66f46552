"""`cctr evaluate` and `cctr predict`: a checkpoint alone is enough (it carries its config)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cctr.cli.common import TRACKING_URI_HELP, Convention, Split, emit_json, json_option, use_tracking, value
from cctr.console import out


def evaluate_cmd(
    target: Optional[str] = typer.Argument(None, help="A checkpoint (.pt), an MLflow run id or runs:/ID/path."),
    split: Split = typer.Option(Split.test, "--split", help="Which cases of the run's split to evaluate."),
    convention: Convention = typer.Option(Convention.strict, "--convention", help="strict: HD95/ASD in mm; a "
                                          "class empty in both masks is skipped, empty in one scores Dice 0 and "
                                          "the volume's diagonal. ssl4mis (ACDC) / transunet (Synapse): the peers' "
                                          "code, distances in voxels, an empty prediction scores 0, 0, 0. "
                                          "See docs/evaluation.md."),
    as_json: bool = json_option(),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="An MLflow run to evaluate, wherever it was "
                                         "trained: its best.pt is downloaded from the tracking store if not here."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
) -> None:
    """Per-case x per-class metrics (CSV), a summary table, and the same logged to the run."""
    from cctr.errors import CctrError
    from cctr.evaluate import evaluate

    if (target is None) == (run_id is None):
        raise CctrError("give a checkpoint or run id, or --run-id ID (one of them)")
    use_tracking(tracking_uri)
    split, convention = value(split), value(convention)
    res = evaluate(target or run_id, split, convention)
    if as_json:
        emit_json(res["summary"] | {"csv": str(res["csv"]), "run_id": res["run_id"]})
        return
    from cctr.evaluate import unit

    cols = ("dice", f"hd95_{unit(convention)}", f"asd_{unit(convention)}")
    t = Table(title=f"{split} ({convention})")
    for col in ("class", *cols):
        t.add_column(col, justify="right")
    for cls, m in res["per_class"].items():
        t.add_row(cls, *(f"{m[c]:.4f}" if c == "dice" else f"{m[c]:.2f}" for c in cols))
    s = res["summary"]
    t.add_row("mean", *(f"{s[c]:.4f}" if c == "dice" else f"{s[c]:.2f}" for c in cols), style="bold")
    out.print(t)
    out.print(f"per-case CSV: {res['csv']}")


def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A segmentation checkpoint (best.pt / last.pt)."),
    input: Path = typer.Argument(..., help="A .nii/.nii.gz file or a folder of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (single input) or folder."),
) -> None:
    """Label NIfTIs on each input's own voxel grid, with its affine and header."""
    from cctr.evaluate import predict

    for p in predict(checkpoint, input, output):
        out.print(f"wrote {p}")
