"""Table 1, stage 1 (plan): the table spec and the grid's cells (method x labeled count x seed).

Seeds: a Table-1 seed `s` sets `train.seed = s` and `data.labeled_seed = s` (which
training cases are labeled); `data.seed` (train/val/test) stays fixed, so every seed is tested on
the same cases and the registration net (trained without labels) is trained once per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cctr.checkpoint import config_hash
from cctr.config import EXPERIMENTS, RunConfig, apply_overrides, load_config, read_yaml, to_dict
from cctr.errors import CctrError


CHECKPOINTS = (("best", "best-val checkpoint"), ("last", "last checkpoint"))


REFERENCE = "cctr"  # every other method is tested against this row


@dataclass
class Table1Spec:
    name: str
    config: str
    preset: str
    methods: list[str]
    labeled: list[int]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)


def load_table_spec(path: Path, preset: str | None = None, seeds: int | None = None) -> Table1Spec:
    raw = read_yaml(path, "table spec")
    from cctr.terms import get_method


    for m in raw.get("methods", []):
        get_method(m)
    preset = preset or raw.get("preset", "quick")
    sets = raw.get("set") or {}  # optional overrides, per preset (a dict) or for every preset (a list)
    config = str(raw["config"])
    if not Path(config).exists() and (EXPERIMENTS.parent / config).exists():  # the repo's specs work from anywhere
        config = str(EXPERIMENTS.parent / config)
    spec = Table1Spec(Path(path).stem, config, preset, list(raw["methods"]),
                      [int(x) for x in raw["labeled"]], [int(x) for x in raw.get("seeds", [0])],
                      list(sets.get(preset, []) if isinstance(sets, dict) else sets))
    if seeds is not None:
        if seeds < 1:
            raise CctrError(f"SEEDS must be >= 1, got {seeds}")
        spec.seeds = list(range(seeds))
    if not spec.methods or not spec.labeled or not spec.seeds:
        raise CctrError(f"{path}: methods, labeled and seeds must be non-empty")
    return spec


def cell_config(spec: Table1Spec, method: str, labeled: int, seed: int) -> RunConfig:
    """Seed `seed` is the training seed and the labeled-set seed; the split seed `data.seed` stays."""
    base = load_config(spec.config, spec.preset, spec.overrides)
    return apply_overrides(base, [f"train.method={method}", f"data.labeled={labeled}", f"train.seed={seed}",
                                  f"data.labeled_seed={seed}"])


def table_dataset(spec: Table1Spec) -> str:
    """The dataset the table's cells train (from its config): its file names, classes and store."""
    return cell_config(spec, *cells(spec)[0]).data.dataset


def cells(spec: Table1Spec) -> list[tuple[str, int, int]]:
    """`full` ignores the labeled count: it is trained once per seed and shown in every column."""
    out = []
    for m in spec.methods:
        for lab in ([spec.labeled[0]] if m == "full" else spec.labeled):
            for s in spec.seeds:
                out.append((m, lab, s))
    return out


def cell_split(cfg: RunConfig):
    from cctr.data.datasets import load_dataset, make_split


    return make_split(load_dataset(cfg.data.dataset), cfg.data.labeled, cfg.data.seed, cfg.data.labeled_seed)


def cell_hashes(spec: Table1Spec) -> dict[tuple[str, int, int], str]:
    """cell -> the hash of its full config: a cell is done when a FINISHED run carries it."""
    return {c: config_hash(to_dict(cell_config(spec, *c))) for c in cells(spec)}


def _cell_name(c: tuple[str, int, int]) -> str:
    return f"{c[0]} l={c[1]} seed={c[2]}"
