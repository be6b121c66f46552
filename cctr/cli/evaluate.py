"""`cctr evaluate` and `cctr predict`: a checkpoint alone is enough (it carries its config)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cctr.cli.common import Convention, Split, emit_json, json_option, value
from cctr.console import out


def evaluate_cmd(
    target: str = typer.Argument(..., help="A checkpoint (.pt) or an MLflow run id."),
    split: Split = typer.Option(Split.test, "--split", help="Which cases of the run's split to evaluate."),
    convention: Convention = typer.Option(Convention.strict, "--convention", help="strict: HD95/ASD in mm; a "
                                          "class empty in both masks is skipped, empty in one scores Dice 0 and "
                                          "the volume's diagonal. ssl4mis (ACDC) / transunet (Synapse): the peers' "
                                          "code, distances in voxels, an empty prediction scores 0, 0, 0. "
                                          "See docs/evaluation.md."),
    as_json: bool = json_option(),
) -> None:
    """Per-case x per-class metrics (CSV), a summary table, and the same logged to the run."""
    from cctr.evaluate import evaluate

    split, convention = value(split), value(convention)
    res = evaluate(target, split, convention)
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
