"""Methods as lists of loss terms: every method trains what it trained before the term structure
(reference values stored from the loop that preceded it), and a method defined outside `cctr` trains
through the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cctr import tracking
from cctr.terms import METHODS
from cctr.train import train
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


PLUGIN = """
import torch

from cctr.terms import Method, Term, register_method, register_term


def entropy(ctx):
    \"\"\"Entropy minimisation on the unlabeled slices: a loss cctr does not ship.\"\"\"
    p = torch.softmax(ctx.logits[0][ctx.b_l:], 1)
    return -(p * torch.log(p + 1e-8)).sum(1).mean()


register_term(Term("ent", entropy, lambda t: (0.3, "constant"), frozenset({"unlabeled"})))
register_method(Method("ct+ent", ("sup", "ct", "ent")))
"""


def test_a_method_defined_outside_cctr_trains_through_the_cli(tmp_path):
    """A new term and a method listing it, in a module of the user's own (CCTR_PLUGINS): `cctr train
    --method` accepts it and trains exactly its terms with their weights; nothing in cctr is edited."""
    from tests.helpers import TINY, cli, write_yaml

    (tmp_path / "my_methods.py").write_text(PLUGIN)
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    env = {"CCTR_PLUGINS": "my_methods", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    p = cli("train", "--config", str(cfg), "--method", "ct+ent", "--json", env_extra=env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    run = tracking.client().get_run(res["run_id"])
    assert {k for k in run.data.metrics if k.startswith("loss_")} == {"loss_sup", "loss_ct", "loss_ent"}
    assert run.data.metrics["w_ent"] == 0.3 and run.data.params["train.method"] == "ct+ent"
    assert "pl_dice_a" in run.data.metrics  # a semi-supervised method: pseudo-label quality is monitored
    assert cli("train", "--method", "ct+ent", "--json").returncode == 2  # without the plugin: not a method
    bad = cli("train", "--method", "ct+ent", env_extra={"CCTR_PLUGINS": "no_such_module"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: CCTR_PLUGINS: cannot import 'no_such_module' (ModuleNotFoundError: No module named 'no_such_module')"]


def test_a_method_with_an_unknown_term_is_refused():
    from cctr.errors import CctrError
    from cctr.terms import Method, register_method

    with pytest.raises(CctrError, match="unknown loss terms nope"):
        register_method(Method("bad", ("sup", "nope")))


def test_rsl_confidence_gate_or_weight():
    """RSL's pixels on a hand-built step: "gate" keeps those at c_reg >= conf_threshold, "weight" counts
    every pixel inside the slice by its c_reg; padding (valid False) counts in neither."""
    from cctr import losses as L
    from cctr.terms import METHODS as M
    from cctr.terms import StepContext, _rsl

    g = torch.Generator().manual_seed(0)
    la, lb = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(2))
    y_reg = torch.randint(0, 4, (3, 5, 5), generator=g)
    c_reg = torch.rand(3, 5, 5, generator=g)
    valid = torch.ones(3, 5, 5, dtype=torch.bool)
    valid[1:, 0] = False  # a padding row in each unlabeled slice

    def loss(mode, y=y_reg):
        cfg = tiny_cfg(method="cct+rsl", batch_labeled=1, rsl_confidence=mode, rsl_yield_conf=2.0)
        ctx = StepContext(cfg, M["cct+rsl"], [], {"y_reg": y, "c_reg": c_reg, "valid": valid}, torch.device("cpu"),
                          torch.Generator())
        ctx.__dict__["logits"] = [la, lb]
        return float(_rsl(ctx, cfg.train.rsl_yield_conf, mode == "weight"))

    t = tiny_cfg().train.conf_threshold
    gate_ignore = (c_reg[1:] < t) | ~valid[1:]
    want_gate = sum(float(L.dice_ce(lg[1:], y_reg[1:], 4, gate_ignore)) for lg in (la, lb))
    want_weight = sum(float(L.dice_ce(lg[1:], y_reg[1:], 4, weight=c_reg[1:] * valid[1:])) for lg in (la, lb))
    assert loss("gate") == pytest.approx(want_gate, rel=1e-6)
    assert loss("weight") == pytest.approx(want_weight, rel=1e-6)
    below = (c_reg < t) & valid
    below[0] = False
    moved = torch.where(below, (y_reg + 1) % 4, y_reg)  # y_reg changed only where the gate is shut
    assert loss("gate", moved) == pytest.approx(loss("gate"), rel=1e-6)
    assert abs(loss("weight", moved) - loss("weight")) > 1e-3
    pad = torch.where(~valid, (y_reg + 1) % 4, y_reg)
    assert loss("weight", pad) == pytest.approx(loss("weight"), rel=1e-6)
