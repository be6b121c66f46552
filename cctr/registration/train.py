"""Unsupervised training of the registration net on random pairs of training cases (DESIGN §4).

A model is identified by a hash of (dataset, registration config, the training cases it sees
and — only when the Dice term is on — the labeled cases), and lives in
`<cache>/<dataset>/registration/<hash>/last.pt`. Training resumes from that file, MLflow run
included; the checkpoint carries its config so `apply` needs nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cctr.checkpoint import config_hash, load_checkpoint, save_checkpoint
from cctr.config import RegistrationConfig, flatten, from_dict, to_dict
from cctr.console import progress_bar
from cctr.data.datasets import Dataset, Split, load_dataset, make_split
from cctr.errors import CctrError
from cctr.paths import cache_root
from cctr.registration.grid import (
    check_grid,
    grid_image,
    grid_label,
    pair_affine,
    sample,
)
from cctr.registration.losses import dice_loss, grad_loss, similarity
from cctr.registration.net import RegNet, register_pair

FORMAT = "cctr-registration"
# used when maps are made, not in training: one model serves every value (and they key the maps, not the model)
APPLY_ONLY = ("refine_iters", "refine_lr", "refine_smooth")


def check_config(cfg: RegistrationConfig) -> None:
    """Reject values the stage cannot run with, before any work or file is made."""
    check_grid(cfg.grid)
    if cfg.similarity not in ("ncc", "mse"):
        raise CctrError(f"registration.similarity must be 'ncc' or 'mse', got '{cfg.similarity}'")
    if cfg.affine not in ("moments", "none"):
        raise CctrError(f"registration.affine must be 'moments' or 'none', got '{cfg.affine}'")
    if len(cfg.fov_mm) != 3 or min(cfg.fov_mm) < 0:
        raise CctrError(f"registration.fov_mm must be three extents >= 0 (mm; 0 = whole volume), got {cfg.fov_mm}")
    if not cfg.channels or min(cfg.channels) < 1:
        raise CctrError(f"registration.channels must be positive widths, got {cfg.channels}")
    for name in ("iters", "batch_size", "ncc_window"):
        if getattr(cfg, name) < 1:
            raise CctrError(f"registration.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.int_steps < 0 or cfg.lr <= 0 or cfg.lambda_smooth < 0 or cfg.dice_weight < 0 or cfg.grad_clip < 0:
        raise CctrError("registration.int_steps, lambda_smooth, dice_weight, grad_clip must be >= 0 and lr > 0")
    if cfg.refine_iters < 0 or cfg.refine_lr <= 0 or cfg.refine_smooth < 0:
        raise CctrError(f"registration.refine_iters must be >= 0, refine_lr > 0 and refine_smooth >= 0, got "
                        f"{cfg.refine_iters}, {cfg.refine_lr}, {cfg.refine_smooth}")
    if cfg.downsize not in (1, 2, 4):
        raise CctrError(f"registration.downsize must be 1, 2 or 4, got {cfg.downsize}")
    if cfg.ncc_window % 2 == 0:
        raise CctrError(f"registration.ncc_window must be odd, got {cfg.ncc_window}")


def model_key(dataset: str, cfg: RegistrationConfig, split: Split) -> str:
    """Hash naming a model: what it was trained with and on."""
    trained = {k: v for k, v in to_dict(cfg).items() if k not in APPLY_ONLY}
    key: dict[str, Any] = {"dataset": dataset, "registration": trained, "train": sorted(split.train)}
    if cfg.dice_weight > 0:
        key["labeled"] = sorted(split.labeled)
    return config_hash(key)


def checkpoint_path(dataset: str, cfg: RegistrationConfig, split: Split) -> Path:
    return cache_root() / dataset / "registration" / model_key(dataset, cfg, split) / "last.pt"


def grid_str(grid: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(int(g)) for g in grid)


def default_split(dataset: str, split: Split | None) -> Split:
    """Training needs only the split's training cases; its seed defaults to 0 like every CLI."""
    return split if split is not None else make_split(load_dataset(dataset), 1, 0)


def find_checkpoint(dataset: str, cfg: RegistrationConfig, split: Split) -> Path:
    """The finished model for this (dataset, config, split), or a CctrError naming the command to run."""
    check_config(cfg)
    path = checkpoint_path(dataset, cfg, split)
    if not _finished(path, cfg):
        fetch_shared(dataset, cfg, split)  # trained on another machine of a shared store
    done = False
    if path.is_file():
        ck = load_checkpoint(path, FORMAT)
        done = int(ck["iteration"]) >= int(ck["config"]["iters"])
    if not done:
        seed = f" --split-seed {split.seed}" if split.seed else ""
        lab = f" --labeled {len(split.labeled)}" if cfg.dice_weight > 0 else ""
        state = "unfinished" if path.is_file() else "no"
        raise CctrError(
            f"{state} registration model for dataset '{dataset}' (grid {grid_str(cfg.grid)}): "
            f"run `cctr register train --dataset {dataset}{seed}{lab}` with the same --preset/--set"
        )
    return path


def load_model(path: Path, dataset: str | None = None, grid: tuple[int, ...] | None = None
               ) -> tuple[RegNet, dict[str, Any]]:
    """Model from a checkpoint, checked against the dataset and grid it is about to be used on."""
    ck = load_checkpoint(path, FORMAT)
    if dataset is not None and ck["dataset"] != dataset:
        raise CctrError(f"{path}: registration checkpoint is for dataset '{ck['dataset']}', not '{dataset}'")
    if grid is not None and tuple(ck["grid"]) != tuple(grid):
        raise CctrError(
            f"{path}: registration checkpoint uses grid {grid_str(ck['grid'])}, the config asks for {grid_str(grid)}"
        )
    cfg = from_dict(RegistrationConfig, ck["config"])
    model = RegNet(tuple(cfg.channels), cfg.int_steps, cfg.downsize)
    try:
        model.load_state_dict(ck["state"])
    except RuntimeError:
        raise CctrError(f"{path}: registration checkpoint weights do not match its config") from None
    model.eval()
    return model, ck


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _grid_data(ds: Dataset, ids: list[str], cfg: RegistrationConfig, with_labels: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [N,1,Z,H,W] (and one-hot labels [N,C,...]) of `ids` on the registration grid."""
    imgs = torch.stack([grid_image(ds.case(c), cfg.grid, f"{ds.name}:{c}", cfg.fov_mm) for c in ids])
    if not with_labels:
        return imgs, None
    labs = torch.stack([grid_label(ds.case(c), ds.spec.num_classes, cfg.grid, cfg.fov_mm) for c in ids])
    return imgs, labs


def _ensure_run(dataset: str, key: str, cfg: RegistrationConfig, split: Split, run_id: str | None):
    """Start (or, when resuming, reopen) the MLflow run of this model."""
    from cctr import tracking

    if run_id is not None:
        try:
            tracking.client().get_run(run_id)
        except Exception:  # noqa: BLE001 — the store moved or was wiped: start a fresh run
            run_id = None
    params = {f"registration.{k}": v for k, v in flatten(cfg).items()}
    params.update({"data.dataset": dataset, "data.seed": split.seed, "registration.n_train": len(split.train),
                   "registration.key": key})
    return tracking.start_run(experiment=dataset, run_name=f"registration-{key}",
                              tags={"stage": "registration", "registration_key": key}, params=params,
                              run_id=run_id)


def train_registration(dataset: str, cfg: RegistrationConfig, split: Split | None = None,
                       progress: bool = True) -> Path:
    """Train (or resume, or find finished) the model for `cfg`; returns the checkpoint path."""
    check_config(cfg)
    ds = load_dataset(dataset)
    split = default_split(dataset, split)
    if len(split.train) < 2:
        raise CctrError(f"dataset '{dataset}' has {len(split.train)} training case(s); registration needs 2")
    key = model_key(dataset, cfg, split)
    path = checkpoint_path(dataset, cfg, split)
    ck = load_checkpoint(path, FORMAT) if path.is_file() else None
    if ck is not None and int(ck["iteration"]) >= cfg.iters:
        return path

    use_dice = cfg.dice_weight > 0
    labeled = [c for c in split.train if c in set(split.labeled)]
    if use_dice and len(labeled) < 2:
        raise CctrError(
            f"registration.dice_weight > 0 needs >= 2 labeled training cases, got {len(labeled)}; "
            "set registration.dice_weight=0"
        )
    dev = device()
    imgs, _ = _grid_data(ds, split.train, cfg, False)
    labs = _grid_data(ds, labeled, cfg, True)[1] if use_dice else None
    lab_index = [split.train.index(c) for c in labeled]

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RegNet(tuple(cfg.channels), cfg.int_steps, cfg.downsize).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, run_id = 0, None
    if ck is not None:
        model.load_state_dict(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"]["pairs"])
        torch.set_rng_state(ck["rng"]["torch"])
        start, run_id = int(ck["iteration"]), ck.get("run_id")

    affines: dict[tuple[int, int], torch.Tensor] = {}

    def affine(i: int, j: int) -> torch.Tensor:
        if (i, j) not in affines:
            a = pair_affine(cfg.affine, imgs[j], imgs[i])
            affines[(i, j)] = torch.eye(4) if a is None else a
        return affines[(i, j)]

    def save(it: int, rid: str) -> None:
        save_checkpoint(path, {
            "format": FORMAT, "dataset": dataset, "grid": list(cfg.grid), "config": to_dict(cfg),
            "key": key, "split_seed": split.seed, "train": list(split.train),
            "labeled": list(labeled) if use_dice else [],
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "iteration": it, "run_id": rid,
            "rng": {"pairs": gen.get_state(), "torch": torch.get_rng_state()},
        })

    n = len(split.train)
    every = max(25, cfg.iters // 10)
    with _ensure_run(dataset, key, cfg, split, run_id) as run, progress_bar(progress) as bar:
        task = bar.add_task(f"registration {dataset}", total=cfg.iters, completed=start) if bar else None
        it, t0, hist = start, time.perf_counter(), []
        try:
            model.train()
            while it < cfg.iters:
                pairs = []
                for b in range(cfg.batch_size):
                    pool = lab_index if (use_dice and b == 0) else list(range(n))
                    i, j = (pool[k] for k in torch.randperm(len(pool), generator=gen)[:2].tolist())
                    pairs.append((i, j))
                mov = imgs[[i for i, _ in pairs]].to(dev)
                fix = imgs[[j for _, j in pairs]].to(dev)
                aff = torch.stack([affine(i, j) for i, j in pairs]).to(dev) if cfg.affine != "none" else None
                phi, disp, _ = register_pair(model, mov, fix, aff)
                sim, smooth = objective(cfg, mov, fix, phi, disp)
                loss = sim + cfg.lambda_smooth * smooth
                terms = {"loss_sim": sim.item(), "loss_smooth": smooth.item()}
                if use_dice:
                    li, lj = lab_index.index(pairs[0][0]), lab_index.index(pairs[0][1])
                    warped = sample(labs[li:li + 1].to(dev), phi[:1])
                    dl = dice_loss(warped, labs[lj:lj + 1].to(dev))
                    loss = loss + cfg.dice_weight * dl
                    terms["loss_dice"] = dl.item()
                if not torch.isfinite(loss):
                    raise CctrError(f"registration training diverged (loss {loss.item()} at iteration {it + 1}); "
                                    "lower registration.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                it += 1
                hist.append({"loss": loss.item(), **terms})
                if it % 10 == 0 or it == cfg.iters:
                    mean = {k: sum(h[k] for h in hist) / len(hist) for k in hist[0]}
                    run.log_metrics(mean, step=it)
                    hist = []
                if it % every == 0 and it < cfg.iters:
                    save(it, run.run_id)
                if bar:
                    bar.update(task, completed=it, description=f"registration {dataset} loss {loss.item():.4f}")
        except KeyboardInterrupt:
            if it > start:
                save(it, run.run_id)
            raise
        save(it, run.run_id)
        run.log_metrics({"train_seconds": time.perf_counter() - t0}, step=it)
        run.log_artifact(path, "checkpoint", link=True)
    return path


def objective(cfg: RegistrationConfig, moving: torch.Tensor, fixed: torch.Tensor, phi: torch.Tensor,
              disp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image dissimilarity, smoothness) of a pair's map: what training and instance optimisation minimise."""
    return similarity(cfg.similarity, sample(moving, phi), fixed, cfg.ncc_window), grad_loss(disp)


def refine_velocity(model: RegNet, moving: torch.Tensor, fixed: torch.Tensor, affine: torch.Tensor | None,
                    cfg: RegistrationConfig) -> torch.Tensor:
    """One pair's coarse velocity after `cfg.refine_iters` Adam steps (instance optimisation, as in
    Learn2Reg entries: the amortised net gives the start, the pair's own objective the rest); the net's
    weights are not touched. `register_pair(..., velocity=v)` turns it into phi."""
    with torch.no_grad():
        v0 = register_pair(model, moving, fixed, affine)[2]
    if cfg.refine_iters <= 0:
        return v0
    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.refine_lr)
    with torch.enable_grad():
        for _ in range(cfg.refine_iters):
            phi, disp, _ = register_pair(model, moving, fixed, affine, velocity=v)
            sim, smooth = objective(cfg, moving, fixed, phi, disp)
            opt.zero_grad(set_to_none=True)
            (sim + cfg.refine_smooth * cfg.lambda_smooth * smooth).backward()
            opt.step()
    return v.detach()


def _finished(path: Path, cfg: RegistrationConfig) -> bool:
    try:
        return path.is_file() and int(load_checkpoint(path, FORMAT)["iteration"]) >= int(cfg.iters)
    except CctrError:
        return False


def fetch_shared(dataset: str, cfg: RegistrationConfig, split: Split) -> Path | None:
    """The finished model from a shared tracking store (a server, or a database other machines use):
    another machine trained it and logged its checkpoint; it is downloaded to this machine's cache,
    byte for byte, so the maps made here from it equal theirs. None when the store has none (or is
    this machine's own store, where the cache already is the truth)."""
    from cctr import tracking

    if tracking.is_local():
        return None
    key = model_key(dataset, cfg, split)
    path = checkpoint_path(dataset, cfg, split)
    runs = tracking.find_runs(dataset, f"tags.registration_key = '{key}' and attributes.status = 'FINISHED'")
    for r in sorted(runs, key=lambda r: r.info.start_time):
        tmp = path.parent / f".download-{r.info.run_id}"
        try:
            got = tracking.download_artifact(r.info.run_id, "checkpoint/last.pt", tmp)
            if not _finished(got, cfg):
                continue
            got.replace(path)
            return path
        except Exception:  # noqa: BLE001 — not logged (an older run), or unreadable: try the next
            continue
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return None


def ensure_registration(dataset: str, cfg: RegistrationConfig, split: Split | None = None,
                        progress: bool = True, storage: str | None = None, heartbeat_s: int = 30,
                        log=None) -> Path:
    """The finished model for `cfg`: reused when present, trained (or resumed) otherwise.

    With a shared tracking store, a model another machine trained is downloaded instead; with a
    shared Optuna `storage` too, of several workers that start at the same time one trains it (a
    claim through the storage, `cctr.claims`) and the others wait for it and download it; should
    that worker die, another takes over.
    """
    from cctr import tracking

    split = default_split(dataset, split)
    path = checkpoint_path(dataset, cfg, split)
    if _finished(path, cfg) or tracking.is_local():
        return train_registration(dataset, cfg, split, progress)
    if fetch_shared(dataset, cfg, split) is not None:
        (log or (lambda m: None))(f"registration model {model_key(dataset, cfg, split)}: downloaded from the "
                                  "tracking store")
        return path
    if storage is None:
        return train_registration(dataset, cfg, split, progress)
    from cctr.claims import Board

    key = model_key(dataset, cfg, split)
    board = Board(storage, f"registration-{dataset}-{key}", heartbeat_s)
    board.publish({key: None})
    while True:
        claim = board.claim()
        if claim is not None:
            try:
                with board.heartbeat(claim):
                    train_registration(dataset, cfg, split, progress)
            except BaseException:
                board.fail(claim)
                raise
            board.complete(claim)
            return path
        if fetch_shared(dataset, cfg, split) is not None:
            (log or (lambda m: None))(f"registration model {key}: trained by another worker, downloaded")
            return path
        states = board.states().get(key, set())
        if "COMPLETE" in states or board.open_work() == 0:  # finished but not found, or given up: here
            return train_registration(dataset, cfg, split, progress)
        time.sleep(2.0)
