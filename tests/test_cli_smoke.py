"""README commands not covered elsewhere, through the real CLI with tiny settings: each one runs,
exits 0 and prints what it promises (registration train/apply/report, table1)."""

from __future__ import annotations

import csv
import json

from tests.helpers import TINY, cli, cli_inprocess, write_yaml

REG = ["--set", "registration.grid=[8,32,32]", "--set", "registration.iters=3", "--set",
       "registration.ncc_window=3", "--set", "registration.refine_iters=2"]


def test_register_train_apply_report(tmp_path, capsys):
    """Registration train, apply and report through the CLI (in this process: a child per call spent
    most of its time importing torch); a second labeled seed reuses the net and the split."""
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    base = ["--dataset", "phantom-cardiac", "--config", str(cfg), *REG]

    def run(*args: str) -> tuple[str, str]:
        code, out, err = cli_inprocess(capsys, *args)
        assert code == 0, err
        return out, err

    ckpt = json.loads(run("register", "train", *base, "--json")[0])["checkpoint"]
    assert ckpt.endswith(".pt")
    maps = json.loads(run("register", "apply", *base, "--labeled", "1", "--json")[0])
    assert maps["cases"] == 12 and 0 < maps["mean_c_reg"] <= 1  # every case of the phantom
    out, err = run("register", "report", *base, "--labeled", "1")
    assert "mean Dice" in out and "TV-L1" in out and ckpt in err.replace("\n", "")
    # another labeled case (Table 1's seeds) with the same registration net and split
    reps = [json.loads(run("register", "report", *base, "--labeled", "1", *ls, "--json")[0])
            for ls in ([], ["--seed", "1"])]
    assert reps[1]["labeled_seed"] == 1 and reps[0]["atlases"] != reps[1]["atlases"]
    assert reps[0]["pairs"] == reps[1]["pairs"] and reps[0]["dice_identity"] != reps[1]["dice_identity"]


def test_table1_tiny(tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", TINY)
    spec = write_yaml(tmp_path / "table1_tiny.yaml", {
        "config": str(cfg), "methods": ["sup"], "labeled": [1], "seeds": [0], "set": ["train.iters=2"]})
    p = cli("table1", "--spec", str(spec), "--out", str(tmp_path / "results"), "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    files = json.loads(p.stdout)["files"]
    rows = [r for r in csv.DictReader(open(files["csv"])) if r.get("checkpoint", "best") == "best"]
    assert [(r["method"], r["labeled"], r["n_seeds"]) for r in rows] == [("sup", "1", "1")]
    assert files["md"].startswith(str(tmp_path / "results")) and "| sup |" in open(files["md"]).read()


def test_bench_smoke_json():
    """`cctr bench` (the README's speed command) runs end to end; the step figures are consistent."""
    p = cli("bench", "--smoke", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["phantom_cases"] == 12 and res["loader_slices_per_s"] > 0
    for k in ("floor_s", "floor_joint_s", "step_ct_s", "step_cctr_s"):
        assert res[k] > 0
    # --smoke times one round: the overhead is that round's cctr step over its ct step
    assert res["step_overhead_rounds"] == [res["step_overhead"]]
    assert res["step_overhead"] == res["step_cctr_s"] / res["step_ct_s"]
    assert res["ct_over_floor"] == res["step_ct_s"] / res["floor_s"]
    assert res["bank_mb"] > 0
    # the same figures on one thread (Table 1's cells), side by side
    assert res["step_overhead_1t"] == res["step_cctr_s_1t"] / res["step_ct_s_1t"] and res["floor_s_1t"] > 0


def test_bench_scale_tiny(tmp_path):
    """`cctr bench --scale` at a token size: every stage runs and reports wall time, peak RSS and disk."""
    p = cli("bench", "--scale", "--cases", "6", "--size", "32", "--slices", "8", "--reg-iters", "2",
            "--refine-iters", "2", "--iters", "2", "--train-size", "32", "--batch", "2",
            "--workdir", str(tmp_path / "sb"), timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(res["stages"]) == {"prepare", "register_train", "register_apply", "train", "evaluate", "predict"}
    for figs in res["stages"].values():
        assert figs["wall_s"] > 0 and figs["peak_rss_mb"] > 0 and figs["disk_mb"] >= 0
    assert res["maps_mb_per_case"] > 0 and res["apply_s_per_case"] > 0 and res["train_first_iter_s"] > 0
    assert cli("bench", "--scale", "--size", "4", timeout=120).returncode == 2


def test_table1_names_its_files_after_the_dataset_its_spec_trains(tmp_path):
    """A spec whose config trains phantom-abdomen writes table1_phantom_abdomen.* with that title, without
    --dataset; a --dataset that contradicts the spec is one line and exit 2."""
    cfg = write_yaml(tmp_path / "cfg.yaml", {**TINY, "data": {**TINY["data"], "dataset": "phantom-abdomen"}})
    spec = write_yaml(tmp_path / "table1_abd.yaml", {
        "config": str(cfg), "methods": ["sup"], "labeled": [1], "seeds": [0], "set": ["train.iters=2"]})
    p = cli("table1", "--spec", str(spec), "--out", str(tmp_path / "results"), "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    md = json.loads(p.stdout)["files"]["md"]
    assert md.endswith("table1_phantom_abdomen.md") and open(md).read().startswith("# Table 1 — phantom-abdomen")
    bad = cli("table1", "--spec", str(spec), "--dataset", "phantom-cardiac", "--collect", timeout=120)
    assert bad.returncode == 2 and "not --dataset phantom-cardiac" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
