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
    for net, (out, logits_only), feat_hw in zip((a, b), outs, (size, size // 4)):
        assert out["logits"].shape == (2, 4, size, size)
        assert out["feat"].shape[::2] == (2, feat_hw) and out["feat"].shape[-1] == feat_hw
        assert set(logits_only) == {"logits"}
        feats = out["feat"].permute(0, 2, 3, 1).reshape(-1, out["feat"].shape[1])[:10]
        with torch.no_grad():
            emb = net.embed(feats)
        assert emb.shape == (10, 64)
        assert torch.allclose(emb.norm(dim=1), torch.ones(10), atol=1e-5)


def test_backward_reaches_encoder_and_head(nets: tuple[SegNet, SegNet]) -> None:
    for net in nets:
        net.zero_grad()
        out = net(torch.randn(2, 1, 32, 32))
        emb = net.embed(out["feat"][:, :, 0, :2].permute(0, 2, 1).reshape(4, -1))  # four pixels as anchors
        (out["logits"].mean() + emb[:, 0].mean()).backward()
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


def test_amp_runs_only_the_nets_in_low_precision(nets: tuple[SegNet, SegNet]) -> None:
    """Under `train.amp` the nets run in bf16 (CPU) and hand back fp32 logits close to the fp32
    forward, so every loss is computed in fp32 (the contrast converts the anchors it gathers from the
    bf16 features); without amp (or without native bf16) nothing changes."""
    from cctr.terms import forward_nets
    from cctr.train import amp_dtype

    cpu = torch.device("cpu")
    assert amp_dtype(False, cpu) is None
    assert amp_dtype(True, cpu) in (torch.bfloat16, None)  # None where bf16 would be emulated
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for net in nets:
        net.eval()
    with torch.no_grad():
        ref = forward_nets(nets, x, True, None)
        low = forward_nets(nets, x, True, torch.bfloat16)
    for r, lo in zip(ref, low):
        assert set(lo) == {"logits", "feat"} and lo["logits"].dtype == torch.float32
        assert lo["feat"].dtype == torch.bfloat16 and r["feat"].dtype == torch.float32
        err = (lo["logits"] - r["logits"]).abs().max() / r["logits"].abs().max()
        assert 0 < err < 0.05  # really computed in bf16, and close


def test_split_forward_normalises_each_part_by_its_own_batch(nets: tuple[SegNet, SegNet]) -> None:
    """`train.norm_batches=split`: in training mode the outputs and the running statistics are those of
    two passes, the labeled slices alone and then the rest (BatchNorm sees only each part), unlike the
    joint pass, though the convolutions run once over the whole batch (and likewise by two passes, the
    fallback for norm layers that cannot split); the outputs keep the batch order; in eval mode (running
    statistics) split and joint agree."""
    import copy

    from cctr.terms import forward_nets

    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    x[2:] += 3.0  # another intensity distribution in the "unlabeled" part: batch statistics differ
    copies = [copy.deepcopy(nets) for _ in range(4)]
    for net in copies[3]:
        net._one_pass_split = False
    with torch.no_grad():
        for net in (n for c in copies for n in c):  # BatchNorm trains; stochastic depth off: comparable passes
            for m in net.modules():
                m.training = isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            net.training = True
        split = forward_nets(copies[0], x, True, None, split=2)
        two_passes = forward_nets(copies[3], x, True, None, split=2)
        joint = forward_nets(copies[1], x, True, None)
        alone = forward_nets(copies[2], x[:2], True, None), forward_nets(copies[2], x[2:], True, None)
        for k, (s, j) in enumerate(zip(split, joint)):
            for key in ("logits", "feat"):
                assert s[key].shape == j[key].shape
                torch.testing.assert_close(s[key], torch.cat([alone[0][k][key], alone[1][k][key]]))
                torch.testing.assert_close(two_passes[k][key], s[key])
            assert not torch.allclose(s["logits"][:2], j["logits"][:2], atol=1e-3)
        for k in range(2):
            bn_split, bn_alone, bn_two = (dict(c[k].named_buffers()) for c in (copies[0], copies[2], copies[3]))
            assert any("running_var" in n for n in bn_split)
            for name, buf in bn_split.items():
                torch.testing.assert_close(buf, bn_alone[name])
                torch.testing.assert_close(bn_two[name], bn_alone[name])
        for net in nets:
            net.eval()
        for s, j in zip(forward_nets(nets, x, True, None, split=2), forward_nets(nets, x, True, None)):
            torch.testing.assert_close(s["logits"], j["logits"])


def test_norm_layers_that_cannot_split_send_the_model_to_two_passes() -> None:
    """A BatchNorm subclass (timm's BatchNormAct2d, say) is not swapped: such a model splits by two passes
    (the fallback the test above checks); plain BatchNorm2d layers are swapped in place."""
    from cctr.models import SplitBatchNorm2d, _splittable

    class NormAct(torch.nn.BatchNorm2d):
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), NormAct(3))
    norms, one_pass = _splittable(model)
    assert not one_pass and len(norms) == 1 and isinstance(model[1], SplitBatchNorm2d)
    assert _splittable(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3)))[1]


def test_projection_head_loads_checkpoints_of_the_1x1_conv_layout() -> None:
    """Heads were 1x1 convs on [N,C,1,1]; their weights [out,in,1,1] load into the linear head and give
    the very map the conv head computed."""
    from cctr.models import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 4).eval()
    conv1, conv2 = torch.nn.Conv2d(6, 6, 1, bias=False), torch.nn.Conv2d(6, 4, 1)
    old = {k: v.clone() for k, v in head.state_dict().items()}
    old["net.0.weight"], old["net.3.weight"], old["net.3.bias"] = conv1.weight, conv2.weight, conv2.bias
    old["net.1.running_mean"] = torch.randn(6)
    head.load_state_dict(old)
    x = torch.randn(5, 6)
    bn = head.net[1]
    h = torch.relu((conv1(x[:, :, None, None]).flatten(1) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
                   * bn.weight + bn.bias)
    ref = torch.nn.functional.normalize(conv2(h[:, :, None, None]).flatten(1), dim=1)
    assert torch.allclose(head(x), ref, atol=1e-6)


def test_shallower_unet_encoder() -> None:
    """`model.depth_a=4` stops net A's encoder at 1/16 (a 4 px bottleneck at 64 px, nnU-Net's smallest
    feature map) with one decoder width per stage; a width count that does not match is one clear line."""
    a, _ = build_nets(ModelConfig(depth_a=4, decoder_a=(128, 64, 32, 16)), 4)
    assert a.stride == 16
    out = a(torch.randn(2, 1, 48, 48))  # a multiple of 16, not of 32
    assert out["logits"].shape == (2, 4, 48, 48) and out["feat"].shape == (2, 16, 48, 48)
    with pytest.raises(CctrError, match="depth is 4") as e:
        build_nets(ModelConfig(depth_a=4), 4)
    assert "\n" not in str(e.value)
