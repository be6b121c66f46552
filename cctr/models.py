"""The two 2D segmentation networks of CCT-R (segmentation-models-pytorch) and their projection heads.

Each `SegNet` returns the segmentation logits *and* the decoder features (the tensor smp's
segmentation head consumes), so the contrastive loss shapes the same representation the segmentation
is read from. Anchors are sampled on the features at decoder resolution (full resolution for U-Net,
1/4 for SegFormer; labels read there with `cctr.losses.nearest_index`) and only they go through the
projection head (`SegNet.embed`): the head is pointwise, so this is the same map as projecting every
pixel, except that its BatchNorm statistics come from the anchors. Projecting every pixel cost a
quarter of a `cctr` step at 64 px and ~2.6 GB of activations at 224 px x 24 slices (measured).

Input height and width must be multiples of the encoder's output stride (32 for the defaults).
Weights are never downloaded unless `encoder_weights` is set explicitly.
"""

from __future__ import annotations

import inspect

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cctr.config import ModelConfig
from cctr.errors import CctrError


def arch_names() -> list[str]:
    """smp architecture names accepted by `SegNet` (matched case-insensitively)."""
    return sorted((c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values()), key=str.lower)


def encoder_names() -> list[str]:
    """smp encoder names; any timm encoder is also accepted as `tu-<timm name>`."""
    return sorted(smp.encoders.get_encoder_names())


class ProjectionHead(nn.Module):
    """Two linear layers (BN/ReLU between) to `dim` channels, L2-normalised; fed [N,C] anchor features.

    Linear rather than 1x1 convs on [N,C,1,1]: the same map, at less than half the cost of oneDNN's
    convolution backward on 1x1 inputs (measured on CPU).
    """

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        hidden = max(in_channels, dim)  # never a bottleneck narrower than the output
        self.net = nn.Sequential(
            nn.Linear(in_channels, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the head was linear hold 1x1 conv weights [out,in,1,1]."""
        for i in (0, 3):
            w = state_dict.get(f"{prefix}net.{i}.weight")
            if w is not None and w.ndim == 4:
                state_dict[f"{prefix}net.{i}.weight"] = w.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises the first `split` images and the rest each by its own
    batch statistics (`train.norm_batches=split`) while the convolutions see the whole batch at once: two
    passes of 4 slices cost 22 % more than one of 8 on a CPU (README). Running statistics are updated as
    two passes update them, first part first. Same parameters and state-dict keys as nn.BatchNorm2d."""

    split = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.split
        if self.training and 0 < s < x.shape[0]:
            return torch.cat([super().forward(x[:s]), super().forward(x[s:])])
        return super().forward(x)


def _splittable(model: nn.Module) -> tuple[list[SplitBatchNorm2d], bool]:
    """Swap `model`'s plain BatchNorm2d layers for SplitBatchNorm2d in place; return them and whether
    every batch-normalising layer is now one (a subclass such as timm's BatchNormAct2d is left as it is,
    and such a model splits by two passes instead)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                new = SplitBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    norms = [m for m in model.modules() if isinstance(m, SplitBatchNorm2d)]
    return norms, all(isinstance(m, SplitBatchNorm2d) for m in model.modules() if isinstance(m, _BatchNorm))


class SegNet(nn.Module):
    """smp model + projection head; `forward(x [B,1,H,W])` -> {"logits" [B,C,H,W], "feat" [B,F,h,w]};
    `embed(feat gathered at anchors [N,F])` -> [N,D]."""

    def __init__(
        self, arch: str, encoder: str, num_classes: int, proj_dim: int, encoder_weights: str | None = None,
        **arch_kwargs,
    ) -> None:
        super().__init__()
        _check_names(arch, encoder)
        if num_classes < 2:
            raise CctrError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        if proj_dim < 1:
            raise CctrError(f"model.proj_dim must be >= 1, got {proj_dim}")
        self.arch, self.encoder_name = arch, encoder
        self.num_classes, self.proj_dim = num_classes, proj_dim
        self.model, self.in_repeat = _create(arch, encoder, num_classes, encoder_weights, arch_kwargs)
        self._norms, self._one_pass_split = _splittable(self.model)
        head_conv = next(m for m in self.model.segmentation_head.modules() if isinstance(m, nn.Conv2d))
        self.proj = ProjectionHead(head_conv.in_channels, proj_dim)
        self.stride = int(getattr(self.model.encoder, "output_stride", 32))
        # smp < 0.5 decoders take `*features`, later ones a list.
        params = inspect.signature(self.model.decoder.forward).parameters.values()
        self._decoder_star = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line CctrError for a wrong rank/channel count or a size the encoder cannot take."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise CctrError(f"{self.arch}/{self.encoder_name}: expected input [B,1,H,W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise CctrError(
                f"{self.arch}/{self.encoder_name}: input size {h}x{w} is not a multiple of {self.stride}; "
                f"use data.size divisible by {self.stride}"
            )

    def forward(self, x: torch.Tensor, with_embed: bool | None = None, split: int = 0) -> dict[str, torch.Tensor]:
        """`with_embed` (decoder features for the contrast) defaults to the training mode: validation and
        prediction need only logits. `split` > 0 normalises the first `split` images and the rest each by
        its own batch statistics (training mode), in one pass where every norm layer can split."""
        if self.training and 0 < split < x.shape[0]:
            if not self._one_pass_split:
                first, rest = self.forward(x[:split], with_embed), self.forward(x[split:], with_embed)
                return {k: torch.cat([first[k], rest[k]]) for k in first}
            for m in self._norms:
                m.split = split
            try:
                return self.forward(x, with_embed)
            finally:
                for m in self._norms:
                    m.split = 0
        self.check_input(x)
        if self.in_repeat > 1:
            x = x.expand(-1, self.in_repeat, -1, -1)
        feats = self.model.encoder(x)
        dec = self.model.decoder(*feats) if self._decoder_star else self.model.decoder(feats)
        out = {"logits": self.model.segmentation_head(dec)}
        if self.training if with_embed is None else with_embed:
            out["feat"] = dec
        return out

    def forward_fp(self, x: torch.Tensor, drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits [B,C,H,W] under UniMatch's feature perturbation: channel dropout (rate `drop`, one draw
        per image and channel from `generator`, kept channels scaled by 1/(1 − drop)) on every encoder
        stage's features before the decoder. smp's first feature is the input image itself and is left as
        it is (UniMatch's U-Net perturbs its encoder blocks' outputs). `drop` 0: the plain forward's logits."""
        self.check_input(x)
        if self.in_repeat > 1:
            x = x.expand(-1, self.in_repeat, -1, -1)
        feats = self.model.encoder(x)
        feats = [feats[0]] + [channel_dropout(f, drop, generator) for f in feats[1:]]
        dec = self.model.decoder(*feats) if self._decoder_star else self.model.decoder(feats)
        return self.model.segmentation_head(dec)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """L2-normalised projections [N,D] of decoder features gathered at N anchors [N,F]."""
        if self.training and feats.shape[0] < 2:  # BatchNorm's batch statistics need two anchors
            return feats.new_zeros(feats.shape[0], self.proj_dim) + 0 * feats.sum()
        return self.proj(feats)


def channel_dropout(f: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.Dropout2d's map (whole channels zeroed with probability `p`, the rest scaled by 1/(1 − p)), its
    draws from `generator` so a step is reproducible from its seed; `p` 0 returns `f` itself."""
    if p <= 0:
        return f
    dev = generator.device if generator is not None else f.device
    keep = torch.rand(f.shape[0], f.shape[1], 1, 1, generator=generator, device=dev) >= p
    return f * keep.to(device=f.device, dtype=f.dtype) / (1.0 - p)


def _check_names(arch: str, encoder: str) -> None:
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise CctrError(f"unknown architecture '{arch}'; valid: {', '.join(arch_names())}")
    if not encoder.startswith("tu-") and encoder not in smp.encoders.get_encoder_names():
        raise CctrError(f"unknown encoder '{encoder}'; valid: {', '.join(encoder_names())} (or tu-<timm model>)")


def _create(arch: str, encoder: str, num_classes: int, weights: str | None, kwargs: dict | None = None
            ) -> tuple[nn.Module, int]:
    """Build the smp model for grayscale input; returns (model, channels to repeat the input to).

    Encoders that refuse `in_channels=1` (MiT in smp < 0.5) are built for 3 channels and fed the
    grayscale channel repeated, which is also what ImageNet weights expect.
    """

    def make(in_ch: int) -> nn.Module:
        return smp.create_model(
            arch, encoder_name=encoder, encoder_weights=weights, in_channels=in_ch, classes=num_classes,
            **(kwargs or {}),
        )

    try:
        try:
            return make(1), 1
        except ValueError:
            return make(3), 3
    except (KeyError, ValueError, RuntimeError, OSError, AssertionError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CctrError(f"cannot build {arch}/{encoder} (weights={weights}): {first}") from None


def build_nets(cfg: ModelConfig, num_classes: int) -> tuple[SegNet, SegNet]:
    """Net A (default CNN U-Net/resnet18) and net B (default SegFormer/mit_b0), as the config says."""
    ka = {"decoder_channels": tuple(cfg.decoder_a)} if cfg.decoder_a else {}
    if cfg.depth_a:
        ka["encoder_depth"] = cfg.depth_a
    kb = {"decoder_segmentation_channels": cfg.decoder_b} if cfg.decoder_b else {}
    a = SegNet(cfg.arch_a, cfg.encoder_a, num_classes, cfg.proj_dim, cfg.encoder_weights, **ka)
    b = SegNet(cfg.arch_b, cfg.encoder_b, num_classes, cfg.proj_dim, cfg.encoder_weights, **kb)
    return a, b
