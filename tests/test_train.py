"""The one training loop: every variant runs, resume is exact, bad input never leaves a RUNNING run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cctr import tracking
from cctr.config import RunConfig, apply_overrides, from_dict
from cctr.errors import CctrError
from cctr.train import METHODS, train
from tests.helpers import TINY, cli, write_yaml


def tiny_cfg(**train_overrides) -> RunConfig:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train_overrides)
    return from_dict(RunConfig, d)


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTR_MLRUNS", str(tmp_path / "mlruns"))
    return tmp_path


@pytest.fixture(scope="module")
def registration_ready(session_dirs):
    """Train the tiny registration model once for the variants that need it."""
    import os

    from cctr.registration.train import ensure_registration

    os.environ["CCTR_CACHE"] = str(session_dirs["cache"])
    os.environ["CCTR_MLRUNS"] = str(session_dirs["mlruns"])
    os.environ["CCTR_PHANTOM_CASES"] = "12"
    ensure_registration("phantom-cardiac", tiny_cfg().registration)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_variant_smoke(method, registration_ready, tmp_path):
    cfg = tiny_cfg(method=method, iters=20, val_every=10)
    res = train(cfg, tmp_path / method, progress=False)
    run = tracking.client().get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == method and run.data.params["train.method"] == method
    assert 0.0 <= res.metrics["test_dice"] <= 1.0
    if method != "reg-only":
        assert (tmp_path / method / "best.pt").exists() and (tmp_path / method / "last.pt").exists()
        hist = tracking.client().get_metric_history(res.run_id, "val_dice")
        assert [m.step for m in hist] == [10, 20]
        assert np.isfinite(res.metrics["test_last_dice"])
        losses = {k for k in run.data.metrics if k.startswith("loss_")}
        expect = {"loss_sup"} | ({"loss_ct"} if METHODS[method].ct else set()) \
            | ({"loss_rsl"} if METHODS[method].rsl else set()) | ({"loss_con"} if METHODS[method].con else set())
        assert losses == expect
        if METHODS[method].unlabeled:
            assert "pl_dice_a" in run.data.metrics and "pl_dice_b" in run.data.metrics
        if METHODS[method].rsl:
            assert "pl_dice_reg" in run.data.metrics


def test_resume_is_exact(registration_ready, tmp_path):
    cfg = tiny_cfg(method="cctr", iters=8, val_every=4)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=4)
    assert part.metrics["iteration"] == 4
    assert tracking.client().get_run(part.run_id).info.status == "FINISHED"
    resumed = train(cfg, tmp_path / "part", resume=tmp_path / "part" / "last.pt", progress=False)
    assert resumed.run_id == part.run_id  # the same MLflow run continues
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in a["state_a"]:
        torch.testing.assert_close(a["state_a"][k], b["state_a"][k], rtol=1e-5, atol=1e-6)
    for k in a["state_b"]:
        torch.testing.assert_close(a["state_b"][k], b["state_b"][k], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["test_dice"] == pytest.approx(full.metrics["test_dice"], abs=1e-6)


def test_checkpoints_best_is_weights_only_and_artifacts_are_links(registration_ready, tmp_path):
    """best.pt drops the optimizer (half the bytes); MLflow's copies are hard links, not second copies."""
    import os
    from pathlib import Path
    from urllib.parse import urlparse

    res = train(tiny_cfg(method="sup", iters=4, val_every=2), tmp_path / "run", progress=False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "optimizer" not in best and "rng_torch" not in best and "optimizer" in last
    assert best["state_a"].keys() == last["state_a"].keys() and best["config"] == last["config"]
    art = Path(urlparse(tracking.client().get_run(res.run_id).info.artifact_uri).path) / "checkpoints"
    for name in ("best.pt", "last.pt"):
        assert os.path.samefile(art / name, tmp_path / "run" / name)
    with pytest.raises(CctrError, match="weights only"):
        train(tiny_cfg(method="sup", iters=4, val_every=2), tmp_path / "run", resume=tmp_path / "run" / "best.pt",
              progress=False)


def test_nan_loss_fails_the_run(tmp_path, monkeypatch):
    import cctr.losses as L

    monkeypatch.setattr(L, "dice_ce", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(CctrError, match="non-finite loss"):
        train(tiny_cfg(method="sup", iters=4), tmp_path / "nan", progress=False)
    runs = tracking.find_runs("phantom-cardiac", "tags.method = 'sup'")
    failed = [r for r in runs if r.data.tags.get("checkpoint_dir", "").endswith("nan")]
    assert failed and failed[0].info.status == "FAILED" and "non-finite" in failed[0].data.tags["failure_reason"]


@pytest.mark.parametrize(
    "sets,msg",
    [(["data.labeled=99"], "asked for 99 labeled"), (["train.w_ct=-1"], "w_ct must be >= 0"),
     (["train.method=magic"], "unknown method"), (["model.encoder_a=resnet999"], "resnet999")],
)
def test_bad_input_no_running_run(fresh_store, sets, msg):
    with pytest.raises(CctrError, match=msg):
        cfg = apply_overrides(tiny_cfg(method="sup"), sets)
        train(cfg, fresh_store / "bad", progress=False)
    assert not [r for r in tracking.find_runs("phantom-cardiac") if r.info.status == "RUNNING"]


def test_cli_needs_registration_names_command(fresh_store, monkeypatch):
    monkeypatch.setenv("CCTR_CACHE", str(fresh_store / "cache"))  # no registration trained here
    cfg = write_yaml(fresh_store / "cfg.yaml", TINY)
    p = cli("train", "--config", str(cfg), "--method", "cctr", "--json", timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "cctr register train" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli("train", "--config", str(cfg), "--set", "train.w_con=-0.5", timeout=300)
    assert p.returncode == 2 and "w_con must be >= 0" in p.stderr
    assert not [r for r in tracking.find_runs("phantom-cardiac") if r.info.status == "RUNNING"]
