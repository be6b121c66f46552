"""Typed config: YAML + preset + overrides, unknown keys and bad values rejected with one line."""

from __future__ import annotations

import pytest

from cctr.config import RunConfig, apply_overrides, flatten, from_dict, load_config, to_dict
from cctr.errors import CctrError


def test_yaml_preset_and_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(
        "data: {dataset: phantom-abdomen, labeled: 2}\n"
        "train: {w_ct: 0.3}\n"
        "presets:\n  quick: {train: {iters: 7}}\n  paper: {train: {iters: 9}, registration: {grid: [4, 8, 8]}}\n"
    )
    c = load_config(p, "paper", ["train.w_con=0.25", "model.encoder_weights=null", "train.amp=true"])
    assert c.preset == "paper"
    assert c.data.dataset == "phantom-abdomen" and c.data.labeled == 2
    assert c.train.iters == 9 and c.train.w_ct == 0.3 and c.train.w_con == 0.25
    assert c.registration.grid == (4, 8, 8)
    assert c.model.encoder_weights is None and c.train.amp is True
    assert load_config(p, None).train.iters == 7


def test_roundtrip_through_dict():
    c = apply_overrides(RunConfig(), ["train.method=sup", "registration.grid=8,16,16"])
    again = from_dict(RunConfig, to_dict(c))
    assert again == c
    flat = flatten(c)
    assert flat["train.method"] == "sup" and flat["registration.grid"] == [8, 16, 16]


@pytest.mark.parametrize(
    "override,msg",
    [("train.nope=1", "unknown config key"), ("train.iters=abc", "cannot read"), ("nokey", "key=value"),
     ("train.iters=1.5", "cannot read"), ("train.amp=maybe", "cannot read")],
)
def test_bad_overrides(override, msg):
    with pytest.raises(CctrError, match=msg):
        apply_overrides(RunConfig(), [override])


def test_unknown_preset_and_missing_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("presets: {quick: {}}\n")
    with pytest.raises(CctrError, match="unknown preset"):
        load_config(p, "huge")
    with pytest.raises(CctrError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_experiment_files_load():
    for name in ("phantom_cardiac", "phantom_abdomen", "acdc", "synapse"):
        for preset in ("quick", "paper"):
            c = load_config(f"experiments/{name}.yaml", preset)
            assert c.data.size % 32 == 0
