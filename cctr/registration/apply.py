"""Label transfer and anatomical coordinates from registration (DESIGN §4), cached on disk.

For every labeled case L and every train/val/test case V, phi_{L->V} maps V's grid voxels into L.
At V's native grid it gives `y_reg` (averaged linearly-warped one-hots of all L, argmax), `c_reg`
(the max averaged probability) and `coords` (mm in the reference labeled case L* = labeled[0]).
The cache is keyed by (checkpoint content, dataset, split, labeled set) and written
write-then-rename, so an interrupted run never leaves a cache that reads as valid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cctr.atomic import atomic_dir
from cctr.checkpoint import config_hash
from cctr.config import RegistrationConfig, from_dict
from cctr.console import progress_bar
from cctr.data.case import Case
from cctr.data.datasets import Dataset, Split, load_dataset
from cctr.errors import CctrError
from cctr.paths import cache_root
from cctr.registration.grid import case_map, grid_image, identity, pair_affine, sample
from cctr.registration.net import RegNet, register_pair
from cctr.registration.train import check_config, device, find_checkpoint, load_model

MAPS_VERSION = 1


@dataclass
class CaseMaps:
    """Registration outputs for one case at its native grid."""

    y_reg: np.ndarray  # uint8 [Z,H,W]
    c_reg: np.ndarray  # float32 [Z,H,W] in [0,1]
    coords: np.ndarray  # float32 [Z,H,W,3], (z,y,x) mm in the reference labeled case


class RegMaps:
    """Cached maps of a split, loaded lazily one case at a time (real volumes are large)."""

    def __init__(self, root: Path, case_ids: list[str], reference: str, reused: bool):
        self.root = root
        self.case_ids = case_ids
        self.reference = reference
        self.reused = reused  # True when this call found the cache instead of computing it

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.case_ids

    def __iter__(self):
        return iter(self.case_ids)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, case_id: str) -> CaseMaps:
        if case_id not in self.case_ids:
            raise CctrError(f"no registration maps for case '{case_id}' in {self.root}")
        path = self.root / f"{case_id}.npz"
        try:
            with np.load(path) as z:
                return CaseMaps(z["y_reg"], z["c_reg"], z["coords"])
        except (OSError, KeyError, ValueError) as e:
            raise CctrError(f"{path}: unreadable registration cache ({e}); delete {self.root}") from None

    def y_reg(self, case_id: str) -> np.ndarray:
        return self[case_id].y_reg

    def c_reg(self, case_id: str) -> np.ndarray:
        return self[case_id].c_reg

    def coords(self, case_id: str) -> np.ndarray:
        return self[case_id].coords


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def maps_dir(dataset: str, checkpoint: Path, split: Split) -> Path:
    key = config_hash({"version": MAPS_VERSION, "checkpoint": file_sha(checkpoint), "dataset": dataset,
                       "split": split.to_json()})
    return cache_root() / dataset / "registration" / "maps" / key


def targets(split: Split) -> list[str]:
    """Every case that gets maps: training (labeled ones included), val and test."""
    return list(dict.fromkeys(split.train + split.val + split.test))


class Registrar:
    """A loaded model plus grid images, computing phi for pairs of a dataset."""

    def __init__(self, ds: Dataset, model: RegNet, cfg: RegistrationConfig):
        self.ds, self.model, self.cfg = ds, model.to(device()), cfg
        self._grid: dict[str, torch.Tensor] = {}

    def image(self, case_id: str) -> torch.Tensor:
        if case_id not in self._grid:
            self._grid[case_id] = grid_image(self.ds.case(case_id), self.cfg.grid, f"{self.ds.name}:{case_id}",
                                             self.cfg.fov_mm)
        return self._grid[case_id]

    def affine(self, moving: str, fixed: str) -> torch.Tensor | None:
        return pair_affine(self.cfg.affine, self.image(fixed), self.image(moving))

    @torch.no_grad()
    def phi(self, moving: str, fixed: str) -> torch.Tensor:
        """[3,Z,H,W] positions on the moving grid of every fixed-grid voxel."""
        dev = device()
        a = self.affine(moving, fixed)
        p, _, _ = register_pair(self.model, self.image(moving)[None].to(dev), self.image(fixed)[None].to(dev),
                                None if a is None else a[None].to(dev))
        return p[0].cpu()


def transfer(phi: torch.Tensor, target: Case, atlas: Case, num_classes: int, fov_mm: tuple[float, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the atlas one-hot to the target's native grid through a grid-level map `phi`.

    Returns (probabilities [C,Z,H,W] on the simplex, atlas native voxel positions [3,Z,H,W]).
    Labels are sampled at the atlas' own native resolution: no label detail is lost to the grid.
    """
    grid = tuple(phi.shape[1:])
    g = case_map(target, grid, fov_mm).to_grid(identity(target.shape))
    pos = case_map(atlas, grid, fov_mm).to_native(sample(phi[None], g[None])[0])
    lab = torch.from_numpy(np.asarray(atlas.label, dtype=np.int64))
    probs = torch.cat([sample((lab == c).float()[None, None], pos[None]) for c in range(num_classes)], dim=1)[0]
    return probs, pos


def fuse(phis: dict[str, torch.Tensor], target: Case, ds: Dataset, reference: str, fov_mm: tuple[float, ...]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_reg, c_reg, coords) of a target from the maps phi_{L->target} of every labeled case L."""
    acc, coords = None, None
    for lid, phi in phis.items():
        atlas = ds.case(lid)
        probs, pos = transfer(phi, target, atlas, ds.spec.num_classes, fov_mm)
        acc = probs if acc is None else acc + probs
        if lid == reference:
            sp = torch.tensor(atlas.spacing, dtype=torch.float32)[:, None, None, None]
            coords = (pos * sp).permute(1, 2, 3, 0).numpy().astype(np.float32)
    assert acc is not None and coords is not None
    acc = acc / len(phis)
    c, y = acc.max(0)
    return y.numpy().astype(np.uint8), c.clamp(0, 1).numpy().astype(np.float32), coords


def check_labeled(ds: Dataset, split: Split) -> None:
    for lid in split.labeled:
        if ds.case(lid).label is None:
            raise CctrError(f"{ds.name}:{lid}: labeled case has no label map")


def registration_maps(dataset: str, cfg: RegistrationConfig, split: Split, checkpoint: Path | None = None,
                      progress: bool = False) -> RegMaps:
    """y_reg / c_reg / coords for every case of `split`, from the cache or computed once and cached.

    Raises CctrError when no finished model exists (naming `cctr register train`) or the
    checkpoint belongs to another dataset/grid; nothing is left on disk on failure.
    """
    check_config(cfg)
    ckpt = Path(checkpoint) if checkpoint is not None else find_checkpoint(dataset, cfg, split)
    model, ck = load_model(ckpt, dataset, cfg.grid)
    ds = load_dataset(dataset)
    check_labeled(ds, split)
    ids = targets(split)
    reference = split.labeled[0]
    final = maps_dir(dataset, ckpt, split)
    manifest = final / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("complete") and m.get("cases") == ids:
            return RegMaps(final, ids, m["reference"], reused=True)
    reg = Registrar(ds, model, from_dict(RegistrationConfig, ck["config"]))
    for cid in dict.fromkeys(split.labeled + ids):  # NaN/inf and bad shapes fail before anything is written
        reg.image(cid)
    with atomic_dir(final) as tmp, progress_bar(progress) as bar:
        task = bar.add_task(f"label transfer {dataset}", total=len(ids)) if bar else None
        for vid in ids:
            phis = {lid: reg.phi(lid, vid) for lid in split.labeled}
            y, c, coords = fuse(phis, ds.case(vid), ds, reference, reg.cfg.fov_mm)
            np.savez(tmp / f"{vid}.npz", y_reg=y, c_reg=c, coords=coords)
            if bar:
                bar.advance(task)
        (tmp / "manifest.json").write_text(json.dumps({
            "complete": True, "version": MAPS_VERSION, "dataset": dataset, "checkpoint": str(ckpt),
            "split": split.to_json(), "reference": reference, "cases": ids}, indent=1))
    return RegMaps(final, ids, reference, reused=False)
