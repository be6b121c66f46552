"""2D slice dataset, two-stream batch sampler and joint augmentation (DESIGN §4, segmentation stage).

Training is 2D: every axial slice of every training volume is one sample. A batch holds B_l labeled
slices followed by B_u unlabeled slices (`TwoStreamBatchSampler`). Each sample carries the image and
any number of per-pixel maps aligned with it (ground-truth `label`, registration label `y_reg`, its
confidence `c_reg`, 3-channel anatomical coordinates `coords`, ...). One random geometry is drawn per
sample and applied to the image and every map in a single resampling step that also resizes to the
training size, so nothing drifts out of alignment and nothing is interpolated twice. Volumes and maps
are read one source slice at a time, never copied: memory-mapped CT volumes, per-slice compressed
registration labels and grid-level fields train a real-size dataset without holding it in RAM.

Resampling rules, by map kind:
- ``"label"``: nearest neighbour, so a label map only ever holds values of its input (never invented
  class ids); pixels sampled outside the source slice get 0 (background).
- ``"linear"``: bilinear, never rounded, with border padding so values stay within the input's
  [min, max].
- ``"field"``: a smooth map kept on a coarse lattice (`GridField`: registration coordinates and
  confidence), read trilinearly at the very source position the image's pixel was read from.
Anatomical coordinates are *carried*, not transformed: rotating or flipping the slice moves where each
coordinate appears, but a pixel's coordinate is a property of the anatomy it shows, so its value is
unchanged. The boolean ``valid`` map marks pixels that came from inside the source slice; consumers of
extrapolated border values (coordinates, confidence) must mask with it.

Augmentation is deterministic in (dataset seed, slice index, draw): `make_loader` numbers every sample it
requests, so results do not depend on the number of worker processes and two workers never repeat each
other's augmentations; plain integer indexing uses the epoch set by `SliceDataset.set_epoch` as the draw.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cctr.errors import CctrError

MapKind = Literal["label", "linear", "field"]
_KINDS: tuple[str, ...] = ("label", "linear", "field")
_RESERVED = {"image", "case_index", "slice_index", "valid"}
_BILINEAR, _BORDER = 0, 1  # ATen grid_sampler interpolation_mode / padding_mode codes


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation; each intensity step is applied with probability `p_intensity`."""

    rotate_deg: float = 20.0
    flip: bool = True
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.05  # fraction of the field of view, each axis
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    noise_std: float = 0.03
    p_intensity: float = 0.5


class GridField:
    """A smooth per-voxel map kept on a coarse lattice and interpolated where a slice reads it.

    Anatomical coordinates and registration confidence carry information at the registration grid's
    resolution; at the native resolution of real CT (~30 M voxels) they would cost hundreds of MB per
    case for nothing. `values` [C,Zg,Hg,Wg]; along each axis (z, y, x) a native voxel index is
    `scale * lattice index + offset`; `shape` is the native volume covered. Reads are trilinear and
    border-clamped, which is exactly how the registration's own displacement is interpolated.
    """

    def __init__(self, values: np.ndarray, scale: Sequence[float], offset: Sequence[float],
                 shape: Sequence[int]) -> None:
        v = np.asarray(values, dtype=np.float32)
        if v.ndim != 4 or min(v.shape) < 1 or len(scale) != 3 or len(offset) != 3 or len(shape) != 3:
            raise CctrError(f"GridField: expected values [C,Z,H,W] and three scales/offsets/sizes, got {v.shape}")
        if not np.all(np.isfinite(v)) or min(float(s) for s in scale) <= 0:
            raise CctrError("GridField: values must be finite and scales positive")
        self.values = v
        self.scale = tuple(float(s) for s in scale)
        self.offset = tuple(float(o) for o in offset)
        self.shape: tuple[int, int, int] = tuple(int(n) for n in shape)  # type: ignore[assignment]
        self._t = torch.from_numpy(v)[None]
        # [n, g] per axis for whole-slice reads (`slab`): built once, a slab only slices the z matrix
        self._mats = [interp_matrix(n, g, self.scale[ax], self.offset[ax])
                      for ax, (n, g) in enumerate(zip(self.shape, v.shape[1:]))]

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    def sample(self, z: float, y: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """Values [C, *y.shape] at native positions (slice `z`, rows `y`, columns `x`; voxel indices)."""
        norm = []
        for p, ax in ((np.asarray(x, np.float32), 2), (np.asarray(y, np.float32), 1),
                      (np.full(np.shape(y), z, np.float32), 0)):
            n = self.values.shape[ax + 1]
            g = (p - np.float32(self.offset[ax])) / np.float32(self.scale[ax])
            norm.append(2.0 * g / max(n - 1, 1) - 1.0 if n > 1 else np.zeros_like(g))
        grid = torch.from_numpy(np.stack(norm, axis=-1).astype(np.float32))[None, None]
        out = torch.nn.functional.grid_sample(self._t, grid, mode="bilinear", padding_mode="border",
                                              align_corners=True)
        return out[0, :, 0]

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """Values [C,z1-z0,H,W] at every voxel of native slices z0..z1-1 (monitoring; training reads
        `sample`). The lattice is axis-aligned, so this is three small matrix products."""
        mats = self._mats
        v = torch.einsum("zk,ckhw->czhw", mats[0][z0:z1], self._t[0])
        return (mats[1] @ v @ mats[2].T).numpy()

    def slice(self, z: int) -> np.ndarray:
        """Values [C,H,W] at every voxel of native slice `z`."""
        return self.slab(z, z + 1)[:, 0]


def interp_matrix(n: int, g: int, scale: float, offset: float) -> torch.Tensor:
    """[n, g] weights that linearly interpolate g lattice samples at native indices 0..n-1, where native
    index = scale * lattice index + offset (border-clamped, like `GridField.sample`)."""
    p = ((torch.arange(n, dtype=torch.float64) - offset) / scale).clamp(0, g - 1)
    i0 = p.floor().clamp(max=max(g - 2, 0)).long()
    f = p - i0
    m = torch.zeros(n, g, dtype=torch.float64)
    m[torch.arange(n), i0] += 1 - f
    m[torch.arange(n), (i0 + 1).clamp(max=g - 1)] += f
    return m.float()


class SliceDataset(Dataset[dict[str, Any]]):
    """All axial slices of a list of volumes, with aligned per-pixel maps, resized to `size` x `size`.

    `maps[name][i]` is volume i's map, or None when that volume lacks it (e.g. unlabeled volumes'
    `label`); `kinds[name]` says how it is stored and read:
    - "label": integer [Z,H,W], read at the nearest source pixel; out-of-slice pixels read 0;
    - "linear": float [Z,H,W] or [Z,H,W,C] at native resolution, bilinear;
    - "field": a `GridField` (coarse lattice, e.g. coordinates), trilinear at the source position.
    A sample is a dict: `image` [1,S,S] float32; per map `name` ([S,S] int64 for label kind, [C,S,S]
    float32 otherwise; zeros when missing) and `has_<name>` (bool); `valid` [S,S] bool (inside the
    source slice); `case_index`, `slice_index` (int).

    Nothing is copied: volumes and maps are read one source slice at a time, so memory-mapped
    volumes and per-slice compressed label stacks (anything with `.shape`, `.dtype` and `[z]`) train
    real CT without holding every volume in RAM.
    """

    def __init__(
        self,
        volumes: Sequence[Any],
        maps: Mapping[str, Sequence[Any]] | None = None,
        kinds: Mapping[str, MapKind] | None = None,
        size: int = 96,
        augment: bool = False,
        seed: int = 0,
        aug: AugmentConfig | None = None,
    ) -> None:
        maps = dict(maps or {})
        kinds = dict(kinds or {})
        if not volumes:
            raise CctrError("SliceDataset: no volumes given")
        if size < 2:
            raise CctrError(f"SliceDataset: size must be >= 2, got {size}")
        if set(maps) != set(kinds):
            raise CctrError(f"SliceDataset: maps {sorted(maps)} and kinds {sorted(kinds)} name different maps")
        self.shapes: list[tuple[int, int, int]] = []
        for i, v in enumerate(volumes):
            shape = tuple(int(d) for d in getattr(v, "shape", np.shape(v)))
            if len(shape) != 3 or min(shape) < 1:
                raise CctrError(f"SliceDataset: volume {i} must be a non-empty [Z,H,W] array, got shape {shape}")
            self.shapes.append(shape)  # type: ignore[arg-type]
        self._vols = list(volumes)
        self.kinds: dict[str, MapKind] = {}
        self.channels: dict[str, int] = {}
        self._maps = {name: self._check_map(name, kind, maps[name]) for name, kind in kinds.items()}
        self._has = {name: np.array([m is not None for m in self._maps[name]]) for name in self.kinds}
        self.size = int(size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.aug = aug or AugmentConfig()
        self.epoch = 0
        depths = np.array([sh[0] for sh in self.shapes])
        self._case_of = np.repeat(np.arange(len(self.shapes)), depths)
        self._z_of = np.concatenate([np.arange(d) for d in depths])
        self._offsets = np.concatenate([[0], np.cumsum(depths)])

    def _check_map(self, name: str, kind: str, per_volume: Sequence[Any]) -> list[Any]:
        """Validate one map against the volumes; record its kind and channel count."""
        if name in _RESERVED or name.startswith("has_"):
            raise CctrError(f"SliceDataset: map name '{name}' is reserved")
        if kind not in _KINDS:
            raise CctrError(f"SliceDataset: map '{name}' has kind '{kind}', expected one of {_KINDS}")
        if len(per_volume) != len(self.shapes):
            raise CctrError(f"SliceDataset: map '{name}' has {len(per_volume)} entries for {len(self.shapes)} volumes")
        out: list[Any] = []
        channels: set[int] = set()
        for i, m in enumerate(per_volume):
            if m is None:
                out.append(None)
                continue
            if kind == "field":
                if not isinstance(m, GridField) or m.shape != self.shapes[i]:
                    got = m.shape if isinstance(m, GridField) else type(m).__name__
                    raise CctrError(f"SliceDataset: field '{name}' of volume {i} must be a GridField over "
                                    f"{self.shapes[i]}, got {got}")
                channels.add(m.channels)
                out.append(m)
                continue
            if not hasattr(m, "shape") or not hasattr(m, "dtype"):
                m = np.asarray(m)
            shape = tuple(m.shape)
            if shape[:3] != self.shapes[i] or len(shape) not in (3, 4) or (kind == "label" and len(shape) != 3):
                want = "[Z,H,W]" if kind == "label" else "[Z,H,W] or [Z,H,W,C]"
                raise CctrError(
                    f"SliceDataset: map '{name}' of volume {i} has shape {shape}, expected {want} with {self.shapes[i]}"
                )
            if kind == "label" and not (np.issubdtype(m.dtype, np.integer) or m.dtype == bool):
                raise CctrError(f"SliceDataset: label map '{name}' of volume {i} has non-integer dtype {m.dtype}")
            if kind == "linear" and not np.all(np.isfinite(m)):
                raise CctrError(f"SliceDataset: linear map '{name}' of volume {i} holds NaN or inf")
            channels.add(1 if len(shape) == 3 else shape[3])
            out.append(m)
        if len(channels) > 1:
            raise CctrError(f"SliceDataset: map '{name}' has channel counts {sorted(channels)} across volumes")
        if not channels and kind != "label":
            raise CctrError(f"SliceDataset: {kind} map '{name}' is missing for every volume")
        self.kinds[name] = kind  # type: ignore[assignment]
        self.channels[name] = channels.pop() if channels else 1
        return out

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """Draw used by plain integer indexing, so each epoch augments differently yet reproducibly."""
        self.epoch = int(epoch)

    def slices_of(self, case_indices: Iterable[int]) -> list[int]:
        """Global slice indices of the given volumes, in volume then slice order."""
        out: list[int] = []
        for c in case_indices:
            if not 0 <= int(c) < len(self.shapes):
                raise CctrError(f"SliceDataset: case index {c} out of range 0..{len(self.shapes) - 1}")
            out.extend(range(int(self._offsets[c]), int(self._offsets[c + 1])))
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """One sample: tensors without a batch dimension; indices and `has_*` flags as Python values."""
        batch = self.batch([key])
        return {k: (v[0].item() if v.ndim == 1 else v[0]) for k, v in batch.items()}

    def batch(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Render and collate several samples at once; equal to stacking `self[k]` for each key.

        A key is a slice index or (slice index, draw); each sample's random parameters come from its
        own key only. Each source slice is read once per map: bilinear for the image and linear maps,
        trilinear on the lattice for fields, nearest source pixel for label maps.
        """
        with _one_torch_thread():
            return self._render(keys)

    def _render(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        s, n = self.size, len(keys)
        parsed = [(int(k[0]), int(k[1])) if isinstance(k, tuple) else (int(k), self.epoch) for k in keys]
        for index, _ in parsed:
            if not 0 <= index < len(self):
                raise IndexError(f"slice index {index} out of range for {len(self)} slices")
        cases = [int(self._case_of[i]) for i, _ in parsed]
        zs = [int(self._z_of[i]) for i, _ in parsed]
        rngs = [np.random.default_rng([self.seed, i, d]) for i, d in parsed] if self.augment else None
        thetas = np.stack([_theta(r, self.aug) for r in rngs]) if rngs else np.tile(np.eye(2, 3), (n, 1, 1))
        gx, gy = _grid(thetas, s)
        grid = torch.from_numpy(np.stack([gx, gy], axis=-1))

        # Source position of every output pixel as grid_sample(align_corners=False) computes it, in
        # pixel units of the source slice; a location outside the slice is invalid and reads label 0.
        h = np.array([self.shapes[c][1] for c in cases], dtype=np.float32)[:, None, None]
        w = np.array([self.shapes[c][2] for c in cases], dtype=np.float32)[:, None, None]
        fy, fx = (gy + 1.0) * (h / 2.0), (gx + 1.0) * (w / 2.0)
        inside = (fx >= 0) & (fx < w) & (fy >= 0) & (fy < h)
        flat = np.where(inside, fy.astype(np.intp) * w.astype(np.intp) + fx.astype(np.intp), 0).reshape(n, s * s)

        image = torch.empty(n, 1, s, s)
        out = {name: torch.zeros(n, self.channels[name], s, s) if kind != "label" else torch.zeros(n, s, s, dtype=torch.long)
               for name, kind in self.kinds.items()}
        for j, (c, z) in enumerate(zip(cases, zs)):
            g = grid[j : j + 1]
            _bilinear(_plane(self._vols[c][z]), g, out=image[j : j + 1])
            for name, kind in self.kinds.items():
                m = self._maps[name][c]
                if m is None:
                    continue
                if kind == "label":
                    vals = np.asarray(m[z]).reshape(-1).take(flat[j])
                    out[name][j] = torch.from_numpy(np.where(inside[j].reshape(-1), vals, 0).reshape(s, s))
                elif kind == "linear":
                    _bilinear(_plane(m[z]), g, out=out[name][j : j + 1])
                else:  # pixel centres: index = normalised position * size / 2 - 0.5
                    out[name][j] = m.sample(float(z), fy[j] - 0.5, fx[j] - 0.5)
        valid = torch.from_numpy(inside)

        if rngs:
            image *= valid[:, None]  # zero outside the slice, like air around the body
            for x, rng in zip(image.numpy()[:, 0], rngs):
                _jitter(x, rng, self.aug)
        batch: dict[str, torch.Tensor] = {
            "image": image,
            "valid": valid,
            "case_index": torch.tensor(cases),
            "slice_index": torch.tensor(zs),
        }
        batch.update(out)
        for name in self.kinds:
            batch[f"has_{name}"] = torch.from_numpy(self._has[name][cases])
        return batch


def _plane(a: Any) -> np.ndarray:
    """One source slice as a contiguous channel-last float32 [H,W,C] array (C = 1 for [H,W])."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:  # torch refuses to wrap read-only memory without a warning
        a = a.copy()
    return a[..., None] if a.ndim == 2 else a


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops single-threaded, restoring the caller's setting after.

    The ops of one batch are small: splitting them over threads gains nothing and, on a busy
    machine, waiting for the other threads made rendering in the main process 4x slower (measured).
    Workers already run single-threaded (`_worker_init`); this covers `num_workers=0`.
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _bilinear(src: np.ndarray, grid: torch.Tensor, out: torch.Tensor) -> None:
    """Bilinear sample of a channel-last [H,W,C] float32 array at a [1,S,S,2] grid into `out` [1,C,S,S].

    This is `F.grid_sample(mode="bilinear", padding_mode="border", align_corners=False)` (border
    padding: values never leave the source range), called through its ATen `out=` overload so the
    result lands in the batch tensor without a copy.
    """
    src_t = torch.from_numpy(src).permute(2, 0, 1)[None]
    torch.ops.aten.grid_sampler_2d.out(src_t, grid, _BILINEAR, _BORDER, False, out=out)


def _grid(thetas: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised source coordinates (x, y), each [B,S,S] float32, of the output pixel centres.

    Same convention as `F.affine_grid(..., align_corners=False)`; written as broadcasts because the
    batched matmul with an inner size of 3 inside `affine_grid` is slow on CPU.
    """
    xs = ((np.arange(size) * 2 + 1) / size - 1).astype(np.float32)
    t = thetas.astype(np.float32)[:, :, :, None, None]
    gx = t[:, 0, 0] * xs[None, None, :] + t[:, 0, 1] * xs[None, :, None] + t[:, 0, 2]
    gy = t[:, 1, 0] * xs[None, None, :] + t[:, 1, 1] * xs[None, :, None] + t[:, 1, 2]
    return gx, gy


def _theta(rng: np.random.Generator, a: AugmentConfig) -> np.ndarray:
    """Random output->input affine in normalised coordinates.

    The rotation is built in the square output frame, so it is a true rotation of what the network
    sees; the identity part maps the output onto the input's full field of view, i.e. the resize.
    """
    ang = math.radians(rng.uniform(-a.rotate_deg, a.rotate_deg))
    scale = rng.uniform(*a.scale)
    flips = rng.random(2) < 0.5
    tx, ty = rng.uniform(-a.translate, a.translate, size=2) * 2.0  # normalised units span 2 per FOV
    fx = -1.0 if a.flip and flips[0] else 1.0
    fy = -1.0 if a.flip and flips[1] else 1.0
    cos, sin = math.cos(ang) / scale, math.sin(ang) / scale
    return np.array([[fx * cos, -fx * sin, tx], [fy * sin, fy * cos, ty]])


def _jitter(x: np.ndarray, rng: np.random.Generator, a: AugmentConfig) -> None:
    """Intensity augmentation of one image [S,S] in place: gamma, contrast/brightness, Gaussian noise.

    The parameters are drawn whether or not their step runs, so switching a step off (p_intensity)
    leaves the others unchanged.
    """
    use = rng.random(3) < a.p_intensity
    gamma, contrast = rng.uniform(*a.gamma), rng.uniform(*a.contrast)
    bright, noise_std = rng.uniform(-a.brightness, a.brightness), rng.uniform(0.0, a.noise_std)
    if use[0]:  # gamma on the slice's own range, so it is defined whatever the intensity scale
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x -= lo
            x *= 1.0 / (hi - lo)
            np.power(x, np.float32(gamma), out=x)
            x *= hi - lo
            x += lo
    if use[1]:
        mean = float(x.mean())
        x *= contrast
        x += (1.0 - contrast) * mean + bright
    if use[2]:  # last draw: skipping it when unused changes no other parameter
        x += np.float32(noise_std) * rng.standard_normal(x.shape, dtype=np.float32)


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Batches of `batch_primary` primary (labeled) then `batch_secondary` secondary (unlabeled) indices.

    Both streams are reshuffled at every pass over them. Labeled slices are few, so the primary stream
    always cycles; with `num_batches=None` one batch sequence is one pass over the secondary stream (or the
    primary one when there is no secondary stream), otherwise both cycle for exactly `num_batches` batches.
    Every call to `__iter__` starts a new, seed-determined epoch.
    """

    def __init__(
        self,
        primary: Sequence[int],
        secondary: Sequence[int],
        batch_primary: int,
        batch_secondary: int,
        seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if batch_primary < 0 or batch_secondary < 0 or batch_primary + batch_secondary == 0:
            raise CctrError(
                f"TwoStreamBatchSampler: batch sizes must be >= 0 and not both 0, got {batch_primary}+{batch_secondary}"
            )
        if batch_primary > 0 and not primary:
            raise CctrError("TwoStreamBatchSampler: labeled (primary) stream is empty but batch_primary > 0")
        if batch_secondary > 0 and not secondary:
            raise CctrError("TwoStreamBatchSampler: unlabeled (secondary) stream is empty but batch_secondary > 0")
        if num_batches is not None and num_batches < 1:
            raise CctrError(f"TwoStreamBatchSampler: num_batches must be >= 1, got {num_batches}")
        self.primary = [int(i) for i in primary]
        self.secondary = [int(i) for i in secondary]
        self.batch_primary = int(batch_primary)
        self.batch_secondary = int(batch_secondary)
        self.seed = int(seed)
        self.num_batches = num_batches
        self.epoch = 0
        if len(self) == 0:
            raise CctrError(
                f"TwoStreamBatchSampler: {len(self.secondary)} unlabeled slices cannot fill one batch "
                f"of {batch_secondary}"
            )

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        if self.batch_secondary > 0:
            return len(self.secondary) // self.batch_secondary
        return max(1, len(self.primary) // self.batch_primary)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        rng_p, rng_s = rng.spawn(2)
        prim = _cycle_shuffled(self.primary, rng_p)
        sec = _cycle_shuffled(self.secondary, rng_s)
        for _ in range(len(self)):
            yield [next(prim) for _ in range(self.batch_primary)] + [next(sec) for _ in range(self.batch_secondary)]


def _cycle_shuffled(items: list[int], rng: np.random.Generator) -> Iterator[int]:
    """Endless stream over `items`, reshuffled at every pass."""
    if not items:
        return iter(())
    return itertools.chain.from_iterable(rng.permutation(items).tolist() for _ in itertools.count())


class _NumberedBatches(Sampler[list[tuple[int, int]]]):
    """Tags every index with its running sample number: the augmentation draw of `SliceDataset`.

    It lives in the main process, so numbering is independent of how batches are spread over workers.
    """

    def __init__(self, batches: TwoStreamBatchSampler, start: int = 0) -> None:
        self.batches = batches
        self.start = start  # batches to skip: a resumed run continues the exact same sequence
        self.count = 0

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for n, batch in enumerate(self.batches):
            keyed = [(i, self.count + k) for k, i in enumerate(batch)]
            self.count += len(batch)
            if n >= self.start:
                yield keyed


def split_batch(batch: Mapping[str, Any], b_l: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a collated batch into its first `b_l` (labeled) and remaining (unlabeled) samples."""
    return ({k: v[:b_l] for k, v in batch.items()}, {k: v[b_l:] for k, v in batch.items()})


def _worker_init(worker_id: int) -> None:
    """One torch thread per worker: workers are the parallelism, nested threads only oversubscribe."""
    del worker_id
    torch.set_num_threads(1)


@dataclass(frozen=True)
class _Packed:
    """A batch as one byte buffer plus its layout (name, dtype, shape, byte offset) per entry.

    Each tensor a worker returns is passed to the main process as its own shared-memory segment and
    file descriptor, which costs more than rendering the slices; one buffer per batch costs one.
    """

    buffer: torch.Tensor
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]


def _pack(batch: Mapping[str, torch.Tensor]) -> _Packed:
    parts: list[torch.Tensor] = []
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    offset = 0
    for name, t in batch.items():
        raw = t.contiguous().view(-1).view(torch.uint8)
        layout.append((name, t.dtype, tuple(t.shape), offset))
        pad = -raw.numel() % 8  # keep every entry 8-byte aligned so int64 views are valid
        parts += [raw, torch.zeros(pad, dtype=torch.uint8)]
        offset += raw.numel() + pad
    return _Packed(torch.cat(parts), tuple(layout))


def _unpack(packed: _Packed) -> dict[str, torch.Tensor]:
    """Zero-copy views of the packed buffer, one per entry."""
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, offset in packed.layout:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        out[name] = packed.buffer[offset : offset + nbytes].view(dtype).view(shape)
    return out


class _Batches(Dataset[Any]):
    """Batch-level view of a SliceDataset: indexed by a list of keys, returns the collated batch
    (packed into one buffer when rendered in a worker process)."""

    def __init__(self, dataset: SliceDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor] | _Packed:
        batch = self.dataset.batch(keys)
        return _pack(batch) if get_worker_info() is not None else batch


def _as_is(item: Any) -> Any:
    """Collate function of pre-collated batches."""
    return item


class SliceLoader(DataLoader):
    """DataLoader yielding dicts of batched tensors (see `SliceDataset`), unpacking workers' buffers."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        # eager: DataLoader draws its base seed from the global RNG when its iterator starts, which
        # must happen at iter() time so a resumed run can restore the RNG right after it
        items = super().__iter__()
        return (_unpack(item) if isinstance(item, _Packed) else item for item in items)


def make_loader(
    dataset: SliceDataset,
    labeled_slices: Sequence[int],
    unlabeled_slices: Sequence[int],
    b_l: int,
    b_u: int,
    iters: int | None,
    num_workers: int = 0,
    seed: int = 0,
    start: int = 0,
) -> SliceLoader:
    """Loader of collated two-stream batches (first `b_l` labeled) for `iters` iterations.

    `iters=None` gives one pass over the unlabeled slices; `start` skips the first batches (resume). Whole batches are rendered in the workers
    (`SliceDataset.batch`); augmentation depends on (dataset seed, slice, sample number), never on
    which worker renders it.
    """
    if num_workers < 0:
        raise CctrError(f"make_loader: num_workers must be >= 0, got {num_workers}")
    batches = _NumberedBatches(TwoStreamBatchSampler(labeled_slices, unlabeled_slices, b_l, b_u, seed, iters), start)
    return SliceLoader(
        _Batches(dataset),
        sampler=batches,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def synthetic_dataset(
    n_volumes: int = 12, depth: int = 12, hw: int = 128, n_labeled: int = 2, size: int = 96, seed: int = 0
) -> SliceDataset:
    """Volumes shaped like real training input, carrying every map training carries (for the benchmark).

    Maps: `label` (labeled volumes only), `y_reg` (label kind), `c_reg` (confidence) and 3-channel
    `coords`, the last two fields on a lattice of a quarter of the in-plane resolution, as training's.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (depth, hw, hw)), indexing="ij")
    vols, labels, yreg, creg, coords = [], [], [], [], []
    for i in range(n_volumes):
        r = np.sqrt(xx**2 + yy**2 + 0.5 * zz**2) * rng.uniform(0.9, 1.1)
        lab = np.digitize(r, [0.3, 0.5, 0.7]).astype(np.uint8)
        vols.append((lab / 3.0 + 0.05 * rng.standard_normal(lab.shape)).astype(np.float32))
        labels.append(lab if i < n_labeled else None)
        yreg.append(np.roll(lab, 2, axis=2))
        lattice = (slice(None), slice(None, None, 4), slice(None, None, 4))
        scale, shape = (1.0, 4.0, 4.0), lab.shape
        creg.append(GridField(np.clip(1.0 - 0.3 * r, 0, 1)[lattice][None], scale, (0, 0, 0), shape))
        coords.append(GridField(np.stack([zz * 40, yy * 80, xx * 80])[(slice(None), *lattice)], scale, (0, 0, 0),
                                shape))
    return SliceDataset(
        vols,
        {"label": labels, "y_reg": yreg, "c_reg": creg, "coords": coords},
        {"label": "label", "y_reg": "label", "c_reg": "field", "coords": "field"},
        size=size,
        augment=True,
        seed=seed,
    )


def bench_loader(
    num_workers: int = 2, size: int = 96, seconds: float = 5.0, b_l: int = 4, b_u: int = 4, warmup_batches: int = 10
) -> dict[str, float]:
    """Augmented two-stream slices delivered per second after warm-up (`loader_slices_per_s`).

    Synthetic data shaped like training's: 12 volumes of 12x128x128 (2 labeled) carrying `label`,
    `y_reg`, `c_reg` and 3-channel `coords`; batches of the training defaults (4 labeled + 4 unlabeled).
    """
    n_lab = 2
    ds = synthetic_dataset(n_labeled=n_lab, size=size)
    labeled = ds.slices_of(range(n_lab))
    unlabeled = ds.slices_of(range(n_lab, len(ds.shapes)))
    loader = make_loader(ds, labeled, unlabeled, b_l, b_u, iters=1_000_000, num_workers=num_workers, seed=0)
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["image"].shape[0]
    elapsed = time.perf_counter() - t0
    del it, loader  # shuts the persistent workers down
    return {"loader_slices_per_s": n / elapsed}
