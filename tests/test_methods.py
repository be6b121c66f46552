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
from tests.helpers import tiny_cfg

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


def _entropy(ctx) -> torch.Tensor:
    """Entropy minimisation on the unlabeled slices: a loss cctr does not ship, defined here."""
    p = torch.softmax(ctx.logits[0][ctx.b_l:], 1)
    return -(p * torch.log(p + 1e-8)).sum(1).mean()


def test_a_method_defined_outside_cctr_trains_through_the_cli(monkeypatch, capsys, tmp_path):
    """A new term and a method listing it, registered from this file: `cctr train --method` trains it and
    logs exactly its terms with their weights; train.py is not touched."""
    from cctr import terms
    from tests.helpers import TINY, cli_inprocess, write_yaml

    monkeypatch.setattr(terms, "TERMS", dict(terms.TERMS))
    monkeypatch.setattr(terms, "METHODS", dict(terms.METHODS))
    monkeypatch.setattr("cctr.train.TERMS", terms.TERMS)
    monkeypatch.setattr("cctr.train.METHODS", terms.METHODS)
    terms.register_term(terms.Term("ent", _entropy, lambda t: (0.3, "constant"), frozenset({"unlabeled"})))
    terms.register_method(terms.Method("ct+ent", ("sup", "ct", "ent")))
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    code, out, err = cli_inprocess(capsys, "train", "--config", str(cfg), "--method", "ct+ent", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    run = tracking.client().get_run(res["run_id"])
    assert {k for k in run.data.metrics if k.startswith("loss_")} == {"loss_sup", "loss_ct", "loss_ent"}
    assert run.data.metrics["w_ent"] == 0.3 and run.data.params["train.method"] == "ct+ent"
    assert "pl_dice_a" in run.data.metrics  # a semi-supervised method: pseudo-label quality is monitored
    with pytest.raises(Exception, match="unknown loss terms nope"):
        terms.register_method(terms.Method("bad", ("sup", "nope")))
