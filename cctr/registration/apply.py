"""Label transfer, confidence and anatomical coordinates from registration (DESIGN §4), cached on disk.

For every labeled case L and every train/val/test case V, phi_{L->V} maps V's registration-grid voxels
into L. From it:
- `y_reg`: the atlases' one-hots, linearly warped to V's *native* grid and fused by locally weighted
  voting, argmax (labels keep the atlas' native detail). Computed a few slices at a time; stored uint8,
  one zlib blob per slice.
- `c_reg` in [0,1], on V's registration grid: label agreement (max of the atlases' weighted warped
  grid one-hots: soft within a grid cell of a boundary, and below 1 where atlases disagree) times image
  agreement after warping: how plausible V's intensity is for the class the atlas puts there, under
  that atlas' own per-class intensity model (sum_k p_k exp(-z_k^2 / 2), z_k the deviation from class
  k's mean in its standard deviations). A misregistered voxel shows as liver labelled over fat or
  air, which one-hot agreement alone cannot see. Measured on phantom-abdomen validation cases (1
  atlas, threshold 0.6): Dice of y_reg 0.58 where c_reg >= 0.6 (82 % of voxels) vs 0.25 below; local
  NCC of the warped images (windows 5-29 grid voxels) separated far less (e.g. 0.40 vs 0.31 with 22 %
  above) and was left out.
- Several atlases are weighted voxel by voxel by that same image agreement (locally weighted voting,
  as in multi-atlas segmentation). A plain average of two atlases ties wherever they disagree, the tie
  went to class 0, and the confidence there was 1/2 whichever atlas was right: y_reg lost organs and
  c_reg ranked it the wrong way round (validation Dice above the threshold below the Dice under it).
- `coords`: phi_{L*->V} in mm of the reference labeled case L* = labeled[0], on V's registration grid,
  and their gate `c_coord`: L*'s own confidence (its label agreement times its image agreement, as
  `c_reg` with L* alone). The fused `c_reg` says how far y_reg can be trusted; a voxel that L*
  misregisters can still have a high fused confidence where the other atlases agree, and would pass
  with wrong coordinates. With one atlas the two are the same map, stored once.
`c_reg` and `coords` are smooth at the grid's resolution, so they are stored there with V's native<->grid
map and interpolated where a slice is read (`cctr.data.slices.GridField`): interpolating phi on the grid
is exactly how the registration itself defines positions between grid voxels. A real CT case (512 x 512
x 120) takes a few MB instead of ~500.

The cache is keyed by (checkpoint content, dataset, split, labeled set, instance-optimisation settings)
and written write-then-rename, so an interrupted run never leaves a cache that reads as valid.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cctr.atomic import atomic_dir
from cctr.checkpoint import config_hash
from cctr.config import RegistrationConfig, from_dict
from cctr.console import progress_bar
from cctr.data.case import Case
from cctr.data.datasets import Dataset, Split, load_dataset
from cctr.data.slices import GridField, interp_matrix
from cctr.errors import CctrError
from cctr.metrics import class_counts
from cctr.paths import cache_root
from cctr.registration.grid import (
    GridMap,
    case_map,
    corner_weights,
    grid_image,
    grid_label,
    neighbours,
    pair_affine,
    sample,
)
from cctr.registration.net import RegNet, register_pair
from cctr.registration.train import APPLY_ONLY, check_config, device, find_checkpoint, load_model, refine_velocity

MAPS_VERSION = 3  # 3: several atlases are fused by locally weighted voting
FIT_FLOOR = 1e-3  # keeps an atlas' weight positive where no atlas fits the intensity (then: plain average)
CONF_LEVELS = 255  # c_reg is stored as uint8: steps of 1/255 are far below its own uncertainty
NATIVE_CHUNK_VOXELS = 1 << 21  # native voxels warped at once: bounded memory whatever the volume size


class SliceStack:
    """A uint8 [Z,H,W] label volume kept as one zlib blob per axial slice.

    Registration labels of real CT compress ~50x, and a training sample decompresses only the slice
    it reads; `read()` gives the whole volume for evaluation.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray, shape: tuple[int, int, int]):
        self.data, self.offsets = data, offsets
        self.shape: tuple[int, int, int] = tuple(int(n) for n in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(np.uint8)

    @staticmethod
    def pack(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blobs = [zlib.compress(np.ascontiguousarray(s, dtype=np.uint8).tobytes(), 1) for s in vol]
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets

    def __getitem__(self, z: int) -> np.ndarray:
        raw = zlib.decompress(self.data[self.offsets[z]:self.offsets[z + 1]])
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.shape[1:])

    def read(self) -> np.ndarray:
        return np.stack([self[z] for z in range(self.shape[0])])


@dataclass
class CaseMaps:
    """Registration outputs of one case as stored (see the module docstring)."""

    y_reg: SliceStack  # uint8 [Z,H,W] at native resolution, read slice by slice
    c_reg: GridField  # 1 channel in [0,1], on the registration grid
    coords: GridField  # 3 channels (z,y,x) mm in the reference labeled case, on the registration grid
    c_coord: GridField  # the gate of `coords`: the reference atlas' own confidence (`c_reg` with one atlas)


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
                shape = tuple(int(n) for n in z["shape"])
                scale, offset = z["scale"], z["offset"]
                y = SliceStack(z["y_reg_data"], z["y_reg_offsets"], shape)  # type: ignore[arg-type]
                c = GridField(z["c_reg"][None].astype(np.float32) / CONF_LEVELS, scale, offset, shape)
                cc = GridField(z["c_coord"][None].astype(np.float32) / CONF_LEVELS, scale, offset, shape) \
                    if "c_coord" in z.files else c
                return CaseMaps(y, c, GridField(z["coords"], scale, offset, shape), cc)
        except (OSError, KeyError, ValueError, zlib.error) as e:
            raise CctrError(f"{path}: unreadable registration cache ({e}); delete {self.root}") from None

    def y_reg(self, case_id: str) -> np.ndarray:
        """uint8 [Z,H,W] at native resolution."""
        return self[case_id].y_reg.read()

    def c_reg(self, case_id: str) -> np.ndarray:
        """float32 [Z,H,W] at native resolution (monitoring; training reads the grid-level field)."""
        c = self[case_id].c_reg
        return c.slab(0, c.shape[0])[0]


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def applied_config(ck: dict, cfg: RegistrationConfig) -> RegistrationConfig:
    """The checkpoint's own settings (what the model was trained with) plus `cfg`'s apply-time ones."""
    return replace(from_dict(RegistrationConfig, ck["config"]), **{k: getattr(cfg, k) for k in APPLY_ONLY})


def maps_dir(dataset: str, checkpoint: Path, split: Split, cfg: RegistrationConfig) -> Path:
    key = {"version": MAPS_VERSION, "checkpoint": file_sha(checkpoint), "dataset": dataset, "split": split.to_json()}
    if cfg.refine_iters > 0:  # maps of the net alone keep their earlier key
        key["refine"] = [getattr(cfg, k) for k in APPLY_ONLY]
    if len(split.labeled) > 1:  # several atlases: the coordinates' gate is stored (one atlas: c_reg, unchanged)
        key["coord_gate"] = "reference"
    key = config_hash(key)
    return cache_root() / dataset / "registration" / "maps" / key


def targets(split: Split) -> list[str]:
    """Every case that gets maps: training (labeled ones included), val and test."""
    return list(dict.fromkeys(split.train + split.val + split.test))


@dataclass
class Atlas:
    """A labeled case as label transfer needs it: native label in RAM, its grid image and grid one-hot."""

    case_id: str
    label: np.ndarray  # uint8 [Z,H,W]
    spacing: tuple[float, float, float]
    map: GridMap
    image: torch.Tensor  # [1,*grid]
    onehot: torch.Tensor  # [C,*grid]
    class_mean: torch.Tensor  # [C] grid-image intensity of each class in this atlas
    class_std: torch.Tensor  # [C]


def class_intensities(image: torch.Tensor, onehot: torch.Tensor, floor: float = 0.02
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ([C] each, std >= `floor`) of a grid image over each class of its grid one-hot;
    a class absent from the atlas gets the whole image's (it then agrees with nothing in particular)."""
    lab = onehot.argmax(0)
    img = image[0]
    mean, std = [], []
    for k in range(onehot.shape[0]):
        v = img[lab == k]
        v = v if v.numel() > 1 else img.flatten()
        mean.append(v.mean())
        std.append(v.std().clamp(min=floor))
    return torch.stack(mean), torch.stack(std)


class Registrar:
    """A loaded model plus grid images, computing phi for pairs of a dataset.

    Each pair's (refined) coarse velocity is kept in `velocities`, which a caller may own and share:
    nested labeled sets (1 of 2 of 4 in Table 1 and sweeps) then refine each (atlas, case) pair once."""

    def __init__(self, ds: Dataset, model: RegNet, cfg: RegistrationConfig,
                 velocities: dict[tuple[str, str], torch.Tensor] | None = None):
        self.ds, self.model, self.cfg = ds, model.to(device()), cfg
        self._grid: dict[str, torch.Tensor] = {}
        self.velocities = {} if velocities is None else velocities

    def image(self, case_id: str) -> torch.Tensor:
        if case_id not in self._grid:
            self._grid[case_id] = grid_image(self.ds.case(case_id), self.cfg.grid, f"{self.ds.name}:{case_id}",
                                             self.cfg.fov_mm)
        return self._grid[case_id]

    def atlas(self, case_id: str) -> Atlas:
        case = self.ds.case(case_id)
        grid, fov = tuple(self.cfg.grid), self.cfg.fov_mm
        image, onehot = self.image(case_id), grid_label(case, self.ds.spec.num_classes, grid, fov)
        return Atlas(case_id, np.array(case.label, dtype=np.uint8), case.spacing, case_map(case, grid, fov),
                     image, onehot, *class_intensities(image, onehot))

    def affine(self, moving: str, fixed: str) -> torch.Tensor | None:
        return pair_affine(self.cfg.affine, self.image(fixed), self.image(moving))

    def phi(self, moving: str, fixed: str) -> torch.Tensor:
        """[3,Z,H,W] positions on the moving grid of every fixed-grid voxel (instance-optimised when
        `refine_iters` > 0)."""
        dev = device()
        a = self.affine(moving, fixed)
        mov, fix = self.image(moving)[None].to(dev), self.image(fixed)[None].to(dev)
        aff = None if a is None else a[None].to(dev)
        key = (moving, fixed)
        if key not in self.velocities:
            self.velocities[key] = refine_velocity(self.model, mov, fix, aff, self.cfg).cpu()
        with torch.no_grad():
            return register_pair(self.model, mov, fix, aff, velocity=self.velocities[key].to(dev))[0][0].cpu()


def atlas_fits(phis: dict[str, torch.Tensor], target_image: torch.Tensor, atlases: dict[str, Atlas]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per atlas, on the target's grid: its warped one-hot [C,*grid] and how plausible the target's
    intensity is for the class it puts at each voxel [*grid] (module docstring)."""
    out = {}
    t = target_image[0]
    for lid, phi in phis.items():
        a = atlases[lid]
        p = sample(a.onehot[None], phi[None])[0]
        z = (t[None] - a.class_mean.view(-1, 1, 1, 1)) / a.class_std.view(-1, 1, 1, 1)
        out[lid] = (p, (p * torch.exp(-0.5 * z * z)).sum(0))
    return out


def atlas_weights(fits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Locally weighted voting (multi-atlas segmentation): each atlas counts, voxel by voxel, in
    proportion to how well its label fits the target's intensity there, so a misregistered atlas is
    outvoted where it is wrong instead of tying with the right one. Normalised to sum 1 per voxel."""
    w = {lid: f + FIT_FLOOR for lid, (_, f) in fits.items()}
    total = sum(w.values())
    return {lid: v / total for lid, v in w.items()}


def transfer_labels(phis: dict[str, torch.Tensor], target: Case, atlases: dict[str, Atlas], num_classes: int,
                    fov_mm: tuple[float, ...], weights: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """y_reg uint8 [Z,H,W] on the target's native grid: argmax of the atlases' warped one-hots, averaged
    with `weights` (grid maps from `atlas_weights`; equal weights without).

    Labels are sampled at each atlas' own native resolution (no label detail lost to the grid); the
    target is processed a few slices at a time, so memory stays bounded on 512 x 512 CT. phi (and each
    atlas' weight map) is brought to the native grid separably (the grid <-> native map is per axis),
    and the one-hot interpolation is only evaluated where a voxel's neighbouring atlas labels differ.
    """
    z, h, w = target.shape
    grid = tuple(next(iter(phis.values())).shape[1:])
    tmap = case_map(target, grid, fov_mm)  # type: ignore[arg-type]
    mz, my, mx = (interp_matrix(n, g, float(tmap.scale[ax]), float(tmap.offset[ax]))
                  for ax, (n, g) in enumerate(zip((z, h, w), grid)))
    # per atlas, phi (and its weight) at every native slice, still on the grid in-plane: [3,Z,Hg,Wg] (small)
    planes = {lid: torch.einsum("zk,ckhw->czhw", mz, phi) for lid, phi in phis.items()}
    wplanes = {lid: torch.einsum("zk,khw->zhw", mz, wt) for lid, wt in (weights or {}).items()}
    out = np.empty((z, h, w), np.uint8)
    step = max(1, NATIVE_CHUNK_VOXELS // (h * w))
    for z0 in range(0, z, step):
        k = min(step, z - z0)
        corners = []
        for lid, plane in planes.items():
            a = atlases[lid]
            pos = my @ plane[:, z0:z0 + k] @ mx.T  # [3,k,H,W] positions on the atlas' grid
            wt = (my @ wplanes[lid][z0:z0 + k] @ mx.T).reshape(-1) if lid in wplanes else None
            corners.append((*neighbours(a.label, a.map.to_native(pos)), wt))
        first = corners[0][0][0]
        uniform = torch.stack([(lab == first).all(0) for lab, _, _ in corners]).all(0)
        y = first.clone()
        mixed = (~uniform).nonzero().squeeze(1)
        if mixed.numel():
            probs = torch.zeros(num_classes, mixed.numel())
            for lab, frac, wt in corners:
                cw = corner_weights(frac[:, mixed])
                probs.scatter_add_(0, lab[:, mixed].long(), cw if wt is None else cw * wt[mixed])
            y[mixed] = probs.argmax(0).to(torch.uint8)
        out[z0:z0 + k] = y.reshape(k, h, w).numpy()
    return out


def confidence(fits: dict[str, tuple[torch.Tensor, torch.Tensor]], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """c_reg [*grid] in [0,1]: label agreement (max of the weighted one-hots) x image agreement (the
    weighted fits); with one atlas, the max of its warped one-hot times its fit."""
    probs = sum(weights[lid] * p for lid, (p, _) in fits.items())
    fit = sum(weights[lid] * f for lid, (_, f) in fits.items())
    return (probs.max(0).values * fit).clamp(0, 1)


def reference_coords(phi: torch.Tensor, atlas: Atlas) -> torch.Tensor:
    """[3,*grid] mm in the reference atlas of every target grid voxel."""
    sp = torch.tensor(atlas.spacing, dtype=torch.float32)[:, None, None, None]
    return atlas.map.to_native(phi) * sp


def fuse(phis: dict[str, torch.Tensor], target: Case, target_image: torch.Tensor, atlases: dict[str, Atlas],
         reference: str, num_classes: int, cfg: RegistrationConfig) -> dict[str, np.ndarray]:
    """Everything stored for one target, from the maps phi_{L->target} of every labeled case L."""
    grid = tuple(next(iter(phis.values())).shape[1:])
    tmap = case_map(target, grid, cfg.fov_mm)  # type: ignore[arg-type]
    fits = atlas_fits(phis, target_image, atlases)
    weights = atlas_weights(fits)
    y = transfer_labels(phis, target, atlases, num_classes, cfg.fov_mm, weights)
    c = confidence(fits, weights)
    data, offsets = SliceStack.pack(y)
    out = {"y_reg_data": data, "y_reg_offsets": offsets, "shape": np.asarray(target.shape, np.int64),
           "scale": tmap.scale.numpy(), "offset": tmap.offset.numpy(),
           "c_reg": np.round(c.numpy() * CONF_LEVELS).astype(np.uint8),
           "coords": reference_coords(phis[reference], atlases[reference]).numpy().astype(np.float32)}
    if len(phis) > 1:  # the coordinates' own gate (module docstring); with one atlas it is c_reg
        own = confidence({reference: fits[reference]}, {reference: torch.ones(())})
        out["c_coord"] = np.round(own.numpy() * CONF_LEVELS).astype(np.uint8)
    return out


def check_labeled(ds: Dataset, split: Split) -> None:
    for lid in split.labeled:
        if ds.case(lid).label is None:
            raise CctrError(f"{ds.name}:{lid}: labeled case has no label map")


def registration_maps(dataset: str, cfg: RegistrationConfig, split: Split, checkpoint: Path | None = None,
                      progress: bool = False, velocities: dict | None = None) -> RegMaps:
    """y_reg / c_reg / coords for every case of `split`, from the cache or computed once and cached.

    `velocities`: a store the caller keeps across labeled sets (Table 1, sweeps), so a pair shared by
    nested sets is registered once; it holds the pairs of this set's atlases only (bounded memory).

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
    final = maps_dir(dataset, ckpt, split, cfg)
    manifest = final / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("complete") and m.get("cases") == ids:
            return RegMaps(final, ids, m["reference"], reused=True)
    rcfg = applied_config(ck, cfg)
    store = None
    if velocities is not None:  # per model and refinement settings; other atlases' pairs are let go
        store = velocities.setdefault((file_sha(ckpt), *(getattr(rcfg, k) for k in APPLY_ONLY)), {})
        for key in [k for k in store if k[0] not in split.labeled]:
            del store[key]
    reg = Registrar(ds, model, rcfg, store)
    for cid in dict.fromkeys(split.labeled + ids):  # NaN/inf and bad shapes fail before anything is written
        reg.image(cid)
    atlases = {lid: reg.atlas(lid) for lid in split.labeled}
    with atomic_dir(final) as tmp, progress_bar(progress) as bar:
        task = bar.add_task(f"label transfer {dataset}", total=len(ids)) if bar else None
        for vid in ids:
            phis = {lid: reg.phi(lid, vid) for lid in split.labeled}
            arrays = fuse(phis, ds.case(vid), reg.image(vid), atlases, reference, ds.spec.num_classes, reg.cfg)
            np.savez_compressed(tmp / f"{vid}.npz", **arrays)
            if bar:
                bar.advance(task)
        (tmp / "manifest.json").write_text(json.dumps({
            "complete": True, "version": MAPS_VERSION, "dataset": dataset, "checkpoint": str(ckpt),
            "split": split.to_json(), "reference": reference, "cases": ids}, indent=1))
    return RegMaps(final, ids, reference, reused=False)


def confidence_calibration(maps: RegMaps, ds: Dataset, case_ids: list[str], threshold: float) -> dict[str, float]:
    """Is `c_reg` calibrated? Mean foreground Dice of y_reg against the true labels on `case_ids`
    (validation cases), restricted to pixels with c_reg >= threshold and to those below it, and the
    fraction of pixels at or above it. Read slice by slice; labels are read for monitoring only.
    """
    C = ds.spec.num_classes
    dice: dict[str, list[float]] = {"high": [], "low": []}
    above = total = 0
    for cid in case_ids:
        gt = ds.case(cid).label
        if gt is None:
            continue
        m = maps[cid]
        counts = {k: np.zeros((3, C), np.int64) for k in dice}  # |pred|, |gt|, |pred & gt| per class
        for z in range(m.y_reg.shape[0]):
            high = m.c_reg.slice(z)[0] >= threshold
            above += int(high.sum())
            total += high.size
            y, g = m.y_reg[z], np.asarray(gt[z])
            for key, sel in (("high", high), ("low", ~high)):
                counts[key] += class_counts(y[sel], g[sel], C)
        for key, (p, t, inter) in counts.items():
            den = (p + t)[1:]
            if (den > 0).any():
                dice[key].append(float(np.mean(2 * inter[1:][den > 0] / den[den > 0])))
    nan = float("nan")
    return {"reg_dice_conf_high": float(np.mean(dice["high"])) if dice["high"] else nan,
            "reg_dice_conf_low": float(np.mean(dice["low"])) if dice["low"] else nan,
            "reg_conf_frac_high": above / total if total else nan, "reg_conf_threshold": float(threshold)}

