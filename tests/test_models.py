"""The two smp segmentation nets + projection heads: shapes, normalisation, errors, offline build."""

from __future__ import annotations

import socket

import pytest
import segmentation_models_pytorch as smp
import torch

from cctr.config import ModelConfig
from cctr.errors import CctrError
from cctr.models import SegNet, build_nets


@pytest.fixture(scope="module")
def nets() -> tuple[SegNet, SegNet]:
    torch.manual_seed(0)
    return build_nets(ModelConfig(), num_classes=4)


@pytest.mark.parametrize("size", [64, 96])
def test_default_nets_forward_shapes(nets: tuple[SegNet, SegNet], size: int) -> None:
    a, b = nets
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        outs = [(net(x), net(x, with_embed=False)) for net in (a, b)]
    # U-Net decodes at full resolution, SegFormer at 1/4
    for (out, logits_only), embed_hw in zip(outs, (size, size // 4)):
        assert out["logits"].shape == (2, 4, size, size)
        assert out["embed"].shape == (2, 64, embed_hw, embed_hw)
        norms = out["embed"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        assert set(logits_only) == {"logits"}


def test_backward_reaches_encoder_and_head(nets: tuple[SegNet, SegNet]) -> None:
    for net in nets:
        net.zero_grad()
        out = net(torch.randn(2, 1, 32, 32))
        (out["logits"].mean() + out["embed"][:, 0].mean()).backward()
        first = next(net.model.encoder.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0
        assert net.proj.net[0].weight.grad.abs().sum() > 0


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(CctrError, match=r"unknown architecture 'Unett'.*Segformer.*Unet") as e:
        SegNet("Unett", "resnet18", 4, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(CctrError, match=r"unknown encoder 'resnet19'.*mit_b0.*resnet18") as e:
        build_nets(ModelConfig(encoder_b="resnet19"), 4)
    assert "\n" not in str(e.value)
    with pytest.raises(CctrError, match="num_classes"):
        SegNet("Unet", "resnet18", 1, 8)


def test_size_not_multiple_of_32(nets: tuple[SegNet, SegNet]) -> None:
    for net in nets:
        with pytest.raises(CctrError, match=r"80x64 is not a multiple of 32"):
            net(torch.randn(1, 1, 80, 64))
    with pytest.raises(CctrError, match=r"expected input \[B,1,H,W\]"):
        nets[0](torch.randn(1, 3, 64, 64))


def test_builds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    net = SegNet("Segformer", "mit_b0", 3, 16)
    assert net(torch.randn(1, 1, 32, 32))["logits"].shape == (1, 3, 32, 32)


def test_encoder_refusing_one_channel_gets_repeated_input(monkeypatch: pytest.MonkeyPatch) -> None:
    real = smp.create_model

    def three_only(*args: object, in_channels: int = 3, **kwargs: object) -> torch.nn.Module:
        if in_channels != 3:
            raise ValueError("encoder does not support in_channels setting other than 3")
        return real(*args, in_channels=in_channels, **kwargs)

    monkeypatch.setattr(smp, "create_model", three_only)
    net = SegNet("Unet", "resnet18", 2, 8)
    assert net.in_repeat == 3
    assert net.model.encoder.conv1.in_channels == 3
    out = net(torch.randn(2, 1, 32, 32))
    assert out["logits"].shape == (2, 2, 32, 32)
