"""Tests for helpers.models: every architecture, head and freezing policy at smoke size."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from helpers import gradcam, models
from helpers.models import (
    ARCHITECTURES,
    backbone_and_head,
    build_model,
    count_parameters,
    freeze_backbone,
    set_trainable,
    train_mode,
    unfreeze,
)

SIZE = 32  # smoke size: every architecture (ViT-B/16 included) accepts 32 px

# Parameter-name prefixes that each policy must leave trainable, written out by hand
# (independently of the implementation) from the torchvision module names.
HEAD_PREFIX = {
    "resnet18": ("fc.",), "resnet50": ("fc.",), "resnet101": ("fc.",), "resnet152": ("fc.",),
    "densenet121": ("classifier.",), "mobilenet_v2": ("classifier.",), "vit_b_16": ("heads.",),
}
LAST_BLOCK_PREFIX = {
    "resnet18": ("layer4.",), "resnet50": ("layer4.",), "resnet101": ("layer4.",), "resnet152": ("layer4.",),
    "densenet121": ("features.denseblock4.", "features.norm5."),
    "mobilenet_v2": ("features.17.", "features.18."),
    "vit_b_16": ("encoder.layers.encoder_layer_11.", "encoder.ln."),
}


def expected_trainable(model: nn.Module, arch: str, freeze: str) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    if freeze == "none":
        return set(names)
    prefixes = HEAD_PREFIX[arch] + (LAST_BLOCK_PREFIX[arch] if freeze == "last_block" else ())
    return {n for n in names if n.startswith(prefixes)}


_CACHE: dict[str, nn.Module] = {}


def get_model(arch: str) -> nn.Module:
    """Build each architecture once for the whole module (building ResNet-152 / ViT takes ~0.3 s)."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        _CACHE[arch] = build_model(arch, 3, pretrained=False, head="mlp", image_size=SIZE)
    return _CACHE[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_forward_backward(arch: str) -> None:
    model = get_model(arch)
    set_trainable(model, "none")
    assert model.arch == arch and model.pretrained is False
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 3)
    model.zero_grad(set_to_none=True)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("freeze", ["head", "last_block", "none"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_freezing_policy_trains_exactly_the_claimed_parameters(arch: str, freeze: str) -> None:
    model = get_model(arch)
    set_trainable(model, freeze)
    expected = expected_trainable(model, arch, freeze)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert 0 < len(expected)
    if freeze != "none":
        assert len(expected) < len(list(model.parameters()))

    n_trainable, n_total = count_parameters(model)
    params = dict(model.named_parameters())
    assert n_trainable == sum(params[n].numel() for n in expected)
    assert n_total == sum(p.numel() for p in params.values())

    # After a backward pass only the trainable parameters have gradients.
    model.zero_grad(set_to_none=True)
    train_mode(model)
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    model.zero_grad(set_to_none=True)


def test_build_model_applies_freeze_and_records_attributes() -> None:
    model = build_model("resnet18", 4, pretrained=False, head="gap_dropout", freeze="head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.1.weight", "fc.1.bias"}
    assert model.freeze == "head" and model.head_kind == "gap_dropout"
    assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.5
    assert model.fc[1].in_features == 512 and model.fc[1].out_features == 4


def test_heads_structure() -> None:
    linear = build_model("mobilenet_v2", 1, pretrained=False, head="linear")
    assert isinstance(linear.classifier, nn.Linear) and linear.classifier.out_features == 1
    mlp = build_model("mobilenet_v2", 5, pretrained=False, head="mlp").classifier
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp[0].p, mlp[3].p) == (0.4, 0.3)
    assert (mlp[1].in_features, mlp[1].out_features, mlp[4].out_features) == (1280, 512, 5)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="Unknown architecture 'resnet5'") as info:
        build_model("resnet5", 2, pretrained=False)
    for arch in ARCHITECTURES:
        assert arch in str(info.value)
    with pytest.raises(ValueError, match="Unknown architecture 'alexnet'"):
        build_model("alexnet", 2, pretrained=False)
    with pytest.raises(ValueError, match="Unknown head 'deep'.*linear, gap_dropout, mlp"):
        build_model("resnet18", 2, pretrained=False, head="deep")
    with pytest.raises(ValueError, match="Unknown freeze policy 'all'.*none, head, last_block"):
        build_model("resnet18", 2, pretrained=False, freeze="all")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("vit_b_16", 2, pretrained=False, image_size=40)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_backbone_and_head_compose_to_the_model(arch: str) -> None:
    model = get_model(arch).eval()
    backbone, head = backbone_and_head(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = backbone(x)
        assert features.ndim == 2
        torch.testing.assert_close(head(features), model(x))
    # Shared weights, not copies.
    head_ids = {id(p) for p in head.parameters()}
    assert head_ids == {id(p) for p in models.get_head(model).parameters()}
    assert not head_ids & {id(p) for p in backbone.parameters()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradcam_target_layer_gives_activations_and_gradients(arch: str) -> None:
    model = get_model(arch).eval()
    set_trainable(model, "none")
    layer = gradcam.default_target_layer(model)
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.register_hook(lambda g: seen.__setitem__("grad", g))
        seen["act"] = output

    handle = layer.register_forward_hook(hook)
    try:
        model(torch.randn(2, 3, SIZE, SIZE))[:, 0].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    act = seen["act"]
    if arch == "vit_b_16":
        assert act.shape == (2, 1 + (SIZE // 16) ** 2, 768)
        act = gradcam.vit_tokens_to_map(act)
        assert act.shape == (2, 768, SIZE // 16, SIZE // 16)
    assert act.ndim == 4 and seen["grad"].abs().sum() > 0


def test_freeze_backbone_and_unfreeze() -> None:
    model = build_model("resnet18", 2, pretrained=False)
    freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    train_mode(model)
    assert not model.bn1.training and model.fc.training  # frozen BatchNorm keeps its statistics
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters()) and model.freeze == "none"


def test_train_mode_keeps_frozen_parts_in_eval() -> None:
    model = build_model("resnet18", 2, pretrained=False, head="gap_dropout", freeze="last_block")
    train_mode(model)
    assert not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training  # trainable block: batch statistics
    assert model.fc[0].training  # head dropout active
    running_mean = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, SIZE, SIZE) * 3 + 1)
    torch.testing.assert_close(model.bn1.running_mean, running_mean)


def test_pretrained_unavailable_warns_prints_and_falls_back(monkeypatch, capsys) -> None:
    def offline(arch: str) -> nn.Module:
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(models, "_load_pretrained", offline)
    model = build_model("resnet18", 2, pretrained=True)
    assert model.pretrained is False and model.arch == "resnet18"
    printed = capsys.readouterr().out
    assert "PRETRAINED WEIGHTS NOT AVAILABLE" in printed and "RANDOM initialisation" in printed


def test_a_failed_download_leaves_no_machine_path_in_the_output(monkeypatch, capsys) -> None:
    def offline(arch: str) -> nn.Module:
        sys.stdout.write('Downloading: "https://download.pytorch.org/models/x.pth" to /root/.cache/x.pth\n')
        sys.stderr.write("  0%|          | 0.00/13.6M [00:00<?, ?B/s]\n")
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(models, "_load_pretrained", offline)
    build_model("resnet18", 2, pretrained=True)
    printed = capsys.readouterr()
    assert "Downloading" not in printed.err + printed.out and "0%" not in printed.err + printed.out


def test_pretrained_available_is_recorded(monkeypatch) -> None:
    torch.manual_seed(1)
    fake = torchvision.models.resnet18(weights=None)
    monkeypatch.setattr(models, "_load_pretrained", lambda arch: fake)
    model = build_model("resnet18", 2, pretrained=True)
    assert model.pretrained is True
    torch.testing.assert_close(model.conv1.weight, fake.conv1.weight)


def test_pretrained_vit_at_small_size_interpolates_position_embeddings(monkeypatch) -> None:
    fake = torchvision.models.vit_b_16(weights=None)  # stands in for the 224-px ImageNet model
    monkeypatch.setattr(models, "_load_pretrained", lambda arch: fake)
    with pytest.warns(UserWarning, match="interpolated"):
        model = build_model("vit_b_16", 2, pretrained=True, image_size=64)
    assert model.pretrained is True
    assert model.encoder.pos_embedding.shape == (1, 1 + 4 * 4, 768)
    torch.testing.assert_close(model.conv_proj.weight, fake.conv_proj.weight)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_placeholder_batchnorm_statistics_are_estimated_only_when_frozen_and_unset():
    from helpers.models import estimate_frozen_batchnorm

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, freeze="head")
    backbone = backbone_and_head(model)[0]
    x = torch.randn(8, 3, 32, 32)
    loader = [(x, torch.zeros(8, dtype=torch.long))] * 2
    model.eval()
    with torch.no_grad():
        before = backbone(x).abs().mean().item()
    assert before < 1e-6  # placeholder statistics (mean 0, var 1): the signal vanishes
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert estimate_frozen_batchnorm(model, loader, "cpu") == n_bn
    with torch.no_grad():
        after = backbone(x).abs().mean().item()
    assert 0.05 < after < 10  # features back on a sane scale
    assert estimate_frozen_batchnorm(model, loader, "cpu") == 0  # real statistics: left alone
    trainable = build_model("mobilenet_v2", 2, pretrained=False, freeze="none")
    assert estimate_frozen_batchnorm(trainable, loader, "cpu") == 0  # trainable BN learns its own


def test_a_models_label_names_the_weights_it_really_has() -> None:
    model = build_model("resnet18", 2, weights="random")
    assert models.label(model) == "ResNet-18, random weights"
    model.pretrained = True
    assert models.label(model) == "ResNet-18, ImageNet"
