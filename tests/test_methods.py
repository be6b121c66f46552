"""Methods as lists of loss terms: every method trains what it trained before the term structure
(reference values stored from the loop that preceded it), and a method defined outside `cctr` trains
through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cctr import tracking
from cctr.train import METHODS, train
from tests.test_train import registration_ready, tiny_cfg  # noqa: F401  (fixture)

REFERENCE = Path(__file__).parent / "data" / "term_reference.json"
TRAINED = sorted(m for m in METHODS if METHODS[m].train)


def fingerprint(res) -> dict[str, float]:
    """What a 3-iteration run leaves: every logged loss term and weight at both logged steps, and the
    last weights' sum and sum of squares (float64)."""
    c = tracking.client()
    run = c.get_run(res.run_id)
    out = {}
    for k in sorted(run.data.metrics):
        if k == "loss" or k.startswith(("loss_", "w_")):
            for h in c.get_metric_history(res.run_id, k):
                out[f"{k}@{h.step}"] = h.value
    ck = torch.load(res.run_dir / "last.pt", weights_only=True)
    w = torch.cat([t.double().flatten() for net in ("state_a", "state_b") for t in ck[net].values()
                   if t.is_floating_point()])
    out.update(weight_sum=float(w.sum()), weight_sq=float(w.square().sum()))
    return out


@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_what_the_reference_loop_trained(method, registration_ready, tmp_path):
    """The values were written by the training loop before methods became term lists
    (CCTR_WRITE_REFERENCE=1 rewrites them; only do that for an intended change of training)."""
    res = train(tiny_cfg(method=method, iters=3, val_every=3, keep_last=True), tmp_path / method, progress=False)
    got = fingerprint(res)
    if os.environ.get("CCTR_WRITE_REFERENCE"):
        ref = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
        ref[method] = got
        REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    ref = json.loads(REFERENCE.read_text())
    assert method in ref, f"no reference for {method}: write it with CCTR_WRITE_REFERENCE=1"
    want = ref[method]
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
