"""Typed run configuration: YAML in `experiments/` + preset + `--set key=value` overrides.

One `RunConfig` describes a run; it is logged whole to MLflow and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cctr.errors import CctrError


@dataclass
class DataConfig:
    dataset: str = "phantom-cardiac"
    labeled: int = 1
    seed: int = 0  # split seed: train/val/test
    labeled_seed: int | None = None  # which training cases are labeled (None: the split seed)
    size: int = 96  # 2D training size (square)
    num_workers: int = 0


@dataclass
class RegistrationConfig:
    grid: tuple[int, int, int] = (16, 64, 64)  # (Z,H,W) registration grid
    # physical extent (mm) the grid spans per axis, centred on the volume; 0 = the whole extent.
    # A fixed in-plane FOV gives every case one physical scale on the grid (FOVs and spacings vary).
    fov_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    channels: tuple[int, ...] = (8, 16, 16, 16)  # U-Net encoder widths
    int_steps: int = 7  # scaling-and-squaring steps; 0 = plain displacement
    downsize: int = 2  # velocity predicted + integrated at grid/downsize (CPU speed), then upsampled
    similarity: str = "ncc"  # "ncc" | "mse"
    ncc_window: int = 9
    lambda_smooth: float = 0.2  # 0.5 under-fits the phantom hearts, 0.05 folds (see README figures)
    dice_weight: float = 0.0  # optional supervised Dice term on labeled pairs (off: unsupervised)
    affine: str = "none"  # "moments" | "none": pre-alignment before the deformable net
    # 500 under-trained: 1500 raised y_reg Dice on validation cases for every atlas of both phantoms (README)
    iters: int = 1500
    lr: float = 3e-3
    grad_clip: float = 1.0  # max gradient norm (0: off); keeps Adam from blowing the field up
    batch_size: int = 2
    seed: int = 0
    # instance optimisation when maps are made: each pair's velocity, from the net's prediction, takes
    # this many Adam steps (lr in coarse-grid voxels) on the training objective. The net is fit to all
    # pairs at once; the steps fit it to the one pair (0: the net alone). Not part of the model's key.
    # Its smoothness weight is `refine_smooth` x lambda_smooth: a free field lacks the net's own regularity
    # (a net fit to all pairs cannot follow one pair's noise), so at the training weight it folds (~2 %
    # of voxels). 25x at lr 0.2 raised validation y_reg Dice for every atlas of both phantoms; 100 steps
    # instead of 40 raised it again for all six atlases (+0.01 to +0.18), at 1.8-2x the time per pair
    # (README, "Registration").
    refine_iters: int = 100
    refine_lr: float = 0.2
    refine_smooth: float = 25.0


@dataclass
class ModelConfig:
    arch_a: str = "Unet"
    encoder_a: str = "resnet18"
    arch_b: str = "Segformer"
    encoder_b: str = "mit_b0"
    encoder_weights: str | None = None
    proj_dim: int = 64
    # empty / 0: smp's defaults. Decoder widths: net A's U-Net `decoder_channels`, net B's SegFormer
    # `decoder_segmentation_channels`; net A's encoder stages `encoder_depth` (`decoder_a` then needs as
    # many widths). The presets keep smp's defaults (narrower or shallower nets cost Dice: README)
    decoder_a: tuple[int, ...] = ()
    decoder_b: int = 0
    depth_a: int = 0


@dataclass
class TrainConfig:
    method: str = "cctr"
    iters: int = 1000
    batch_labeled: int = 4
    batch_unlabeled: int = 4
    # "sgd" (SSL4MIS; the paper preset) | "adamw" (the phantoms' quick preset: it converges in fewer iterations)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip: float = 10.0
    # "split": labeled and unlabeled slices go through the nets as two passes, each normalised by its own
    # BatchNorm batch statistics, so the supervised term sees the normalisation `sup` trains with |
    # "joint": one pass over both (SSL4MIS). With one labeled case the joint pass put `ct` and `cct` below
    # `sup` on phantom-abdomen even at w_ct 0; split raised their validation Dice on both phantoms (README)
    norm_batches: str = "split"
    amp: bool = False  # mixed precision for the nets: fp16 on CUDA, bf16 on CPUs with native bf16 (`amp_dtype`)
    seed: int = 0
    ramp_iters: int = 1000  # sigmoid ramp-up of w_ct and w_con; SSL4MIS spans the whole training
    w_ct: float = 0.1  # SSL4MIS cross-teaching weight
    # 0.1 (like w_ct) raised validation Dice on phantom-cardiac but lowered it on phantom-abdomen (README)
    w_rsl: float = 1.0
    # "constant" | "ramp" (up, like w_ct) | "decay" (w_rsl·(1 − ramp): hands over to cross-teaching as it
    # ramps up) | "crossover" (w_rsl until the nets' validation Dice reaches y_reg's, then 0) | "fade" (from
    # that validation on, linearly down to 0 at the last iteration).
    # Registration labels help most early, when pseudo-labels are poor (DESIGN §4); the crossover marks
    # where the nets no longer need them, and "fade" hands over gradually from there (README: validation
    # Dice of cctr above "crossover" on phantom-cardiac, level on phantom-abdomen)
    rsl_schedule: str = "fade"
    # RSL yields where both nets agree on another class than y_reg, each at least this sure (> 1: never)
    rsl_yield_conf: float = 0.9
    # how c_reg selects RSL's pixels: "weight" (every pixel inside the slice, weighted by c_reg: the calibrated
    # chance that y_reg is right there) | "gate" (only those with c_reg >= conf_threshold, as the paper). The gate
    # dropped three quarters of the myocardium's y_reg on phantom-cardiac; "weight" raised cctr's validation
    # Dice there (docs/decisions.md)
    rsl_confidence: str = "weight"
    w_con: float = 0.1
    conf_threshold: float = 0.6
    tau: float = 0.1
    anchors_per_class: int = 32
    memory_size: int = 2048  # per bank; 0 = contrast within the batch only (every contrastive variant alike)
    # each net against its own anchors and bank | "joint": both nets in one space, one bank (measured level
    # on validation for cct+rsl/cctr and lower for cct+reps on phantom-cardiac: README)
    contrast: str = "per_net"
    reps_cap: float = 2.0  # REPS match within this many registration-grid cells, in-plane and through-plane
    reps_weight: float = 1.0  # the REPS term's own weight (not drowned by hundreds of class positives)
    # the REPS term's schedule (weight w_con·reps_weight; same choices as rsl_schedule): its positives come
    # from registration, so unlike the class part it need not wait for the nets' pseudo-labels (DESIGN §4)
    reps_schedule: str = "ramp"
    # which cross-volume pseudo-label positives REPS replaces: "all" (of every other volume, DESIGN §4) or
    # "paired" (only of the volumes where it pairs the anchor; ~70 % of anchors have no partner). "paired"
    # raised validation Dice on phantom-cardiac and lowered it on phantom-abdomen (README)
    reps_replace: str = "all"
    val_every: int = 200
    ckpt_every: int = 200  # resumable last.pt every N iterations (it is as large as two copies of the weights)
    keep_last: bool = False  # keep last.pt once the run is finished and evaluated
    # `bcp` (docs/method.md, "Peers"): the first fraction of train.iters is the labeled-only copy-paste stage
    # the mean teacher starts from (BCP's ACDC code: 10k pre-training + 30k self-training iterations, a quarter)
    bcp_pretrain: float = 0.25
    bcp_box: float = 2 / 3  # `bcp`: side of the copy-paste box, a fraction of the slice side (BCP's `generate_mask`)
    # `bcp`: weight of the pixels that come from the unlabeled slice (teacher pseudo-labels); those from the
    # labeled slice weigh 1 (BCP's alpha: `u_weight` 0.5 in its ACDC code)
    bcp_alpha: float = 0.5
    bcp_ema: float = 0.99  # `bcp`: EMA decay of the mean teacher (BCP's ACDC code: `update_model_ema(..., 0.99)`)
    # `unimatch` (docs/method.md, "Peers"): pixels whose weak-view confidence is below this supervise no
    # strong or feature-perturbed view (UniMatch's paper and ACDC config: 0.95)
    uni_conf: float = 0.95
    uni_feat_drop: float = 0.5  # `unimatch`: channel dropout on the encoder features (UniMatch: Dropout2d(0.5))
    # `unimatch`: probability of each strong view's brightness/contrast jitter (UniMatch's ACDC data
    # pipeline: ColorJitter applied with probability 0.8)
    uni_jitter_p: float = 0.8
    uni_blur_p: float = 0.5  # `unimatch`: probability of each strong view's Gaussian blur (UniMatch: 0.5)
    uni_cutmix_p: float = 0.5  # `unimatch`: probability of each strong view's CutMix box (UniMatch: 0.5)
    # `unimatch`: weight of the feature-perturbed view, the supervised term weighing 1 (UniMatch: the loss is
    # (L_s + L_u)/2 with L_u = 0.5·L_fp + 0.25·(L_s1 + L_s2); the overall ½ is dropped: docs/method.md)
    uni_w_fp: float = 0.5
    uni_w_s: float = 0.25  # `unimatch`: weight of each of the two strong views (UniMatch: 0.25)


@dataclass
class RunConfig:
    preset: str = "quick"
    data: DataConfig = field(default_factory=DataConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated field type, or raise a one-line CctrError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(tp)
        inner = args[0]
        return tuple(_coerce(inner, v, key) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise CctrError(f"config key '{key}': cannot read {value!r} as {tp.__name__}") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) config dataclass; unknown keys are errors, not silently ignored."""
    hints = _hints(cls)
    kwargs = {}
    for k, v in (data or {}).items():
        if k not in hints:
            raise CctrError(f"unknown config key '{prefix}{k}'; known: {', '.join(hints)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(tp, v, prefix + k)
    return cls(**kwargs)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (the CLI's repeated `--set`)."""
    d = to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise CctrError(f"--set expects key=value, got '{ov}'")
        key, value = ov.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise CctrError(f"unknown config key '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise CctrError(f"unknown config key '{key}'")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    return from_dict(RunConfig, d)


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping, or one clear CctrError (missing file, bad syntax, not a mapping)."""
    p = Path(path)
    if not p.exists():
        raise CctrError(f"{what} not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CctrError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CctrError(f"{p}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path | None, preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML base, then `presets.<preset>` from the same file, then overrides."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    presets = raw.pop("presets", {}) or {}
    preset = preset or raw.get("preset", "quick")
    if presets:
        if preset not in presets:
            raise CctrError(f"unknown preset '{preset}'; {path} has: {', '.join(presets)}")
        raw = _deep_merge(raw, presets[preset] or {})
    raw["preset"] = preset
    cfg = from_dict(RunConfig, raw)
    return apply_overrides(cfg, overrides or [])


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def default_config_path(dataset: str) -> Path | None:
    """`experiments/<dataset>.yaml` when the repo ships one (its presets hold every stage's settings)."""
    p = EXPERIMENTS / f"{dataset.replace('-', '_')}.yaml"
    return p if p.exists() else None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(cfg: Any) -> dict[str, Any]:
    """`section.key -> value`, the form logged as MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict, pre: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            else:
                out[f"{pre}{k}"] = v

    walk(to_dict(cfg), "")
    return out
