"""`cctr data ...`: list, prepare, show, stats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cctr.cli.common import emit_json, json_option
from cctr.console import out

app = typer.Typer(help="Datasets: list, prepare, show, stats.", no_args_is_help=True)


@app.command("list")
def data_list(as_json: bool = json_option()) -> None:
    """Datasets, where each is expected, and whether it is prepared."""
    from cctr.data.datasets import SPECS, data_root, dataset_dir

    rows = []
    for name, spec in SPECS.items():
        prepared = (dataset_dir(name) / "manifest.json").exists()
        where = "built in" if spec.builtin else str(data_root() / spec.expected)
        raw_found = spec.builtin or (data_root() / spec.expected).exists()
        rows.append({"name": name, "classes": spec.num_classes, "modality": spec.modality,
                     "expected": where, "found": raw_found, "prepared": prepared})
    if as_json:
        emit_json({"datasets": rows})
        return
    cols = ("name", "classes", "modality", "expected", "found", "prepared")
    t = Table(title="datasets")
    for col in cols:
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    out.print(t)


@app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="acdc | synapse | phantom-* | a name for a NIfTI folder"),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder holding the dataset as distributed "
                                          "(default: $CCTR_DATA_ROOT/<name>)."),
    as_json: bool = json_option(),
) -> None:
    """Read raw or peer formats into the project's case cache (validated, atomic)."""
    from cctr.data.prepare import prepare

    ds = prepare(dataset, source)
    summary = {"dataset": ds.name, "cases": len(ds.case_ids), "cache": str(ds.root), "source": ds.source}
    if as_json:
        emit_json(summary)
    else:
        out.print(f"prepared [bold]{ds.name}[/]: {len(ds.case_ids)} cases in {ds.root}")


@app.command("stats")
def data_stats(dataset: str = typer.Argument(..., help="Dataset name (see `cctr data list`)."),
               as_json: bool = json_option()) -> None:
    """Cases, classes, spacing, shapes and class frequencies."""
    from cctr.data.prepare import dataset_stats

    s = dataset_stats(dataset)
    if as_json:
        emit_json(s)
        return
    t = Table(title=dataset)
    t.add_column("key")
    t.add_column("value")
    for k, v in s.items():
        t.add_row(k, json.dumps(v, default=float))
    out.print(t)


@app.command("show")
def data_show(
    dataset: str = typer.Argument(..., help="Dataset name (see `cctr data list`)."),
    cases: int = typer.Option(4, "--cases", help="How many cases (rows) to show."),
    output: Path = typer.Option(Path("data_show.png"), "-o", "--output", help="PNG to write."),
) -> None:
    """Montage of slices with the label overlaid."""
    from cctr.data.datasets import load_dataset
    from cctr.viz import case_montage

    ds = load_dataset(dataset)
    case_montage(ds.cases(ds.case_ids[:cases]), ds.spec.num_classes, output, title=dataset,
                 class_names=ds.spec.class_names)
    out.print(f"wrote {output}")
