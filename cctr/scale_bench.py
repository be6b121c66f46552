"""Every stage on a Synapse-sized set, as a user would run it: wall time, peak RSS and disk written.

    python -m cctr.scale_bench [--cases 30 --size 512 --slices 120 --workdir DIR ...]

Builds `--cases` abdomen phantoms resampled to `--slices` x `--size` x `--size` and written in the
BTCV raw layout (`img/imgNNNN.nii.gz` int16 HU + `label/labelNNNN.nii.gz` with BTCV's 13 organ ids),
then runs the real CLI in child processes: data prepare, register train (a few iterations), register
apply, train (a few iterations at the `paper` preset's slice size and batch, including its validation
and test evaluation of both checkpoints), evaluate (best checkpoint, test split) and predict (one
NIfTI). Peak RSS is per stage (the CLI process and anything it starts), disk is the growth of the work folder.
Prints one JSON object on stdout; progress goes to stderr. A benchmark for people, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cctr.errors import CctrError

REPO = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"scale_bench: {msg}", file=sys.stderr, flush=True)


def case_numbers(n: int) -> list[int]:
    """BTCV's training scan numbers; all 30 give the standard 18/12 Synapse split."""
    from cctr.data.readers import BTCV_TRAINING_IDS

    if not 1 <= n <= len(BTCV_TRAINING_IDS):
        raise SystemExit(f"error: --cases must be 1..{len(BTCV_TRAINING_IDS)}, got {n}")
    return list(BTCV_TRAINING_IDS[:n])


def build_btcv(root: Path, n: int, size: int, slices: int) -> None:
    """Phantom-abdomen cases resampled to [slices, size, size], in the BTCV raw layout."""
    import nibabel as nib
    from scipy.ndimage import zoom

    from cctr.data.phantoms import generate_case
    from cctr.data.readers import BTCV_TO_SYNAPSE

    to_btcv = np.zeros(int(BTCV_TO_SYNAPSE.max()) + 1, np.uint8)
    for btcv, ours in enumerate(BTCV_TO_SYNAPSE):
        if ours:
            to_btcv[ours] = btcv
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    for i, num in enumerate(case_numbers(n)):
        img_path, lab_path = root / "img" / f"img{num:04d}.nii.gz", root / "label" / f"label{num:04d}.nii.gz"
        if img_path.exists() and lab_path.exists():
            continue
        c = generate_case("phantom-abdomen", i)
        f = np.array([slices, size, size], float) / np.array(c.shape)
        hu = zoom(c.image * 400.0 - 125.0, f, order=1).astype(np.int16)
        lab = to_btcv[zoom(c.label, f, order=0)]
        sp = np.array(c.spacing) / f  # (z, y, x) mm
        affine = np.diag([sp[2], sp[1], sp[0], 1.0])  # RAS, as the reader expects
        for path, vol in ((img_path, hu), (lab_path, lab)):
            tmp = path.with_name(f".{path.name}")
            nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine), str(tmp))
            tmp.rename(path)
        _log(f"built case {i + 1}/{n} ({img_path.name}, shape {hu.shape})")


def du(path: Path) -> int:
    """Bytes allocated under `path`."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total


# A fresh parent per stage: its RUSAGE_CHILDREN peak is exactly the stage's (the CLI and any workers).
_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                "rc = subprocess.call(sys.argv[2:])\n"
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                "sys.exit(rc)\n")


def run_stage(name: str, args: list[str], env: dict[str, str], work: Path) -> tuple[dict, str, float]:
    """Run `cctr <args>` in a child; returns (figures, stdout, start time)."""
    _log(f"{name}: cctr {' '.join(args)}")
    before = du(work)
    rss_file = work / f".rss_{name}"
    t0, start = time.perf_counter(), time.time()
    p = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), sys.executable, "-m", "cctr.cli", *args],
                       capture_output=True, env=env, cwd=str(REPO), text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"error: stage {name} failed with exit code {p.returncode}")
    rss_kb = int(rss_file.read_text())
    rss_file.unlink()
    figs = {"wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
            "disk_mb": round((du(work) - before) / 2**20, 1),
            "load_1min": round(os.getloadavg()[0], 2)}  # other work on the machine inflates wall times
    return figs, p.stdout, start


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def first_iteration_s(mlruns: Path, run_id: str, start: float) -> float | None:
    """Seconds from the train process' start to its first logged loss (MLflow stores the time)."""
    try:
        with sqlite3.connect(mlruns / "mlflow.db") as db:
            row = db.execute("SELECT MIN(timestamp) FROM metrics WHERE run_uuid = ? AND key = 'loss'",
                             (run_id,)).fetchone()
    except sqlite3.Error:
        return None
    return round(row[0] / 1000.0 - start, 2) if row and row[0] else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cctr.scale_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--size", type=int, default=512, help="in-plane size of every volume")
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--labeled", type=int, default=1)
    ap.add_argument("--reg-iters", type=int, default=20, help="registration training iterations")
    ap.add_argument("--refine-iters", type=int, default=None,
                    help="instance-optimisation steps per pair when maps are made (default: the config's)")
    ap.add_argument("--iters", type=int, default=20, help="segmentation training iterations")
    ap.add_argument("--train-size", type=int, default=None, help="2D training size (default: the paper preset's)")
    ap.add_argument("--batch", type=int, default=None, help="labeled = unlabeled batch (default: the paper preset's)")
    ap.add_argument("--workdir", type=Path, default=Path("scale_bench"))
    ap.add_argument("--build-only", action="store_true", help="only write the BTCV-layout set (reused later)")
    a = ap.parse_args(argv)
    if min(a.size, a.slices) < 8 or min(a.reg_iters, a.iters, a.labeled) < 1:
        raise CctrError("--size/--slices must be >= 8 and --reg-iters/--iters/--labeled >= 1")

    from cctr.config import load_config

    paper = load_config(REPO / "experiments" / "synapse.yaml", "paper")
    size = a.train_size or paper.data.size
    batch = a.batch or paper.train.batch_labeled
    work = a.workdir.resolve()
    raw = work / "raw"
    build_btcv(raw, a.cases, a.size, a.slices)
    if a.build_only:
        return {}
    env = dict(os.environ, CCTR_CACHE=str(work / "cache"), CCTR_MLRUNS=str(work / "mlruns"),
               CCTR_DATA_ROOT=str(work / "data"))
    reg = ["--set", f"registration.iters={a.reg_iters}"]
    if a.refine_iters is not None:
        reg += ["--set", f"registration.refine_iters={a.refine_iters}"]
    stages: dict[str, dict] = {}
    res: dict = {"cases": a.cases, "shape": [a.slices, a.size, a.size], "train_size": size, "batch": batch,
                 "stages": stages}

    def stage(name: str, args: list[str]) -> tuple[str, float]:
        figs, out, start = run_stage(name, args, env, work)
        stages[name] = figs
        _log(f"{name}: {json.dumps(figs)}")
        return out, start

    stage("prepare", ["data", "prepare", "synapse", "--source", str(raw), "--json"])
    stage("register_train", ["register", "train", "--dataset", "synapse", *reg, "--json"])
    out, _ = stage("register_apply", ["register", "apply", "--dataset", "synapse", "--labeled", str(a.labeled),
                                      *reg, "--json"])
    maps = last_json(out)
    res["mean_c_reg"] = maps.get("mean_c_reg")
    n_maps = int(maps["cases"])
    res["maps_mb_per_case"] = round(du(Path(maps["cache"])) / 2**20 / n_maps, 2)
    res["apply_s_per_case"] = round(stages["register_apply"]["wall_s"] / n_maps, 2)
    out, start = stage("train", ["train", "--config", str(REPO / "experiments" / "synapse.yaml"), "--preset", "quick",
                                 "--method", "cctr", "--labeled", str(a.labeled), *reg,
                                 "--set", f"train.iters={a.iters}", "--set", f"train.val_every={a.iters}",
                                 "--set", f"data.size={size}", "--set", f"train.batch_labeled={batch}",
                                 "--set", f"train.batch_unlabeled={batch}", "--json"])
    trained = last_json(out)
    res["train_first_iter_s"] = first_iteration_s(work / "mlruns", trained["run_id"], start)
    best = Path(trained["run_dir"]) / "best.pt"
    stage("evaluate", ["evaluate", str(best), "--split", "test", "--json"])
    one = sorted((raw / "img").iterdir())[0]
    stage("predict", ["predict", str(best), str(one), "-o", str(work / "predict" / one.name)])
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
