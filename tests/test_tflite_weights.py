"""Offline ImageNet MobileNetV2: tools/convert_tflite_weights.py and build_model(weights=...).

Tests that need the real TensorFlow Lite file skip where ../shared/weights is absent; the tool runs
once per session (conftest's ``converted_weights``) and everything after loads its ordinary file.
"""

from __future__ import annotations

import copy
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import SHARED_TFLITE, SHARED_WEIGHTS
from helpers import models
from tools import convert_tflite_weights as tool

XRAYS = SHARED_WEIGHTS.parent / "data" / "chest_xray_pneumonia_224"
HALF = (0.5, 0.5, 0.5)


@pytest.fixture(scope="session")
def imagenet(converted_weights) -> nn.Module:
    """The converted network with its ImageNet head (1000 classes), loaded from the tool's file."""
    model, _ = models.load_weights_file("mobilenet_v2", converted_weights)
    return model.eval()


@pytest.fixture(scope="session")
def folded(converted_weights) -> nn.Module:
    """The same weights before their BatchNorm statistics were restored (identity statistics)."""
    return tool.folded_model(tool.read_convolutions(SHARED_TFLITE))


def _xrays(n_per_class: int, size: int, folder: str = "train", start: int = 0) -> torch.Tensor:
    """Real X-rays normalised to [-1, 1] (the converted weights' normalisation)."""
    if not (XRAYS / folder).is_dir():
        pytest.skip(f"real data not present at {XRAYS}")
    files = [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((XRAYS / folder / c).glob("*.jp*g"))[start:start + n_per_class]]
    return tool.normalised(tool.read_images(files, size))


@pytest.fixture(scope="session")
def interpreter():
    return pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (dev dependency) not installed")


# --------------------------------------------------------------------------- the file the tool writes


def test_the_tool_writes_an_ordinary_weights_file(converted_weights):
    payload = torch.load(converted_weights, map_location="cpu", weights_only=True)
    assert payload["normalization"] == {"mean": HALF, "std": HALF} and payload["padding"] == "tf_same"
    stock = torchvision.models.mobilenet_v2(weights=None)
    stock.load_state_dict(payload["state_dict"])  # torchvision's own keys and shapes
    info = payload["info"]
    assert info["source"] == "tflite-converted:mobilenet_v2_1.0_224_quant.tflite"
    assert info["sha256"] == tool.file_sha256(SHARED_TFLITE) and info["calibration_images"] > 0
    assert info["batchnorm"].startswith("restored from")
    if info["agreement"] is not None:  # measured where ai-edge-litert is installed
        assert info["agreement"]["logit_correlation"] >= 0.99, info["agreement"]


@pytest.mark.parametrize("images", ["natural", "xray"])
def test_the_converted_network_agrees_with_tensorflows_interpreter(images, imagenet, interpreter):
    if images == "natural":
        pytest.importorskip("skimage", reason="scikit-image (dev dependency) not installed")
        u8 = tool.natural_images(224)
    else:
        if not (XRAYS / "test").is_dir():
            pytest.skip("real data not present")
        files = [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((XRAYS / "test" / c).glob("*.jp*g"))[:8]]
        u8 = tool.read_images(files, 224)
    result = tool.agreement(tool.torch_logits(imagenet, u8), tool.interpreter_logits(SHARED_TFLITE, u8))
    assert result["logit_correlation"] >= 0.99, result
    assert result["top1_agreement"] >= 0.85, result


def test_the_cat_photo_is_a_cat(imagenet):
    pytest.importorskip("skimage")
    labels = (SHARED_WEIGHTS / "imagenet_labels.txt").read_text().splitlines()[1:]  # 0 is "background"
    logits = tool.torch_logits(imagenet, tool.natural_images(224, ("chelsea",)))
    assert labels[int(logits.argmax())] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


def test_torchvision_padding_would_not_agree(imagenet, interpreter):
    """The SAME padding matters: without it the same weights agree only loosely (README: ~0.8)."""
    pytest.importorskip("skimage", reason="scikit-image (dev dependency) not installed")
    stock = torchvision.models.mobilenet_v2(weights=None).eval()
    stock.load_state_dict(imagenet.state_dict())  # same keys: the padding is not in the state dict
    u8 = tool.natural_images(224, ("chelsea", "coffee", "rocket", "astronaut"))
    loose = tool.agreement(tool.torch_logits(stock, u8), tool.interpreter_logits(SHARED_TFLITE, u8))
    assert loose["logit_correlation"] < 0.97, loose


def test_same_padding_pads_bottom_right_for_even_sizes_only():
    conv = models.use_tf_same_padding(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)))[0]
    assert isinstance(conv, models.TFSamePadConv2d)
    nn.init.ones_(conv.weight)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # even size: no padding top/left, so the first output sums rows 0-2 x cols 0-2
    assert conv(x)[0, 0, 0, 0].item() == x[0, 0, :3, :3].sum().item()
    odd = torch.ones(1, 1, 5, 5)
    assert conv(odd).shape[-1] == 3 and conv(odd)[0, 0, 0, 0].item() == 4.0  # one pixel each side


# --------------------------------------------------------------------------- BatchNorm statistics


def test_restored_batchnorm_statistics_leave_eval_outputs_unchanged(folded, imagenet):
    x = _xrays(4, 96, folder="test")
    with torch.no_grad():
        diff = (folded.eval()(x) - imagenet.eval()(x)).abs().max().item()
    assert diff < 1e-3
    bn = imagenet.features[0][1]
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def _train_mode_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    with torch.no_grad():
        eval_features = backbone.eval()(x)
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0  # batch statistics used, running statistics kept
        train_features = backbone(x)
        model.eval()
    return eval_features, train_features


def test_train_mode_keeps_the_features_only_with_restored_statistics(folded, imagenet):
    """Statistics measured at the profiles' sizes (128/160/224 px): at 160 px train mode's batch
    statistics keep the features (correlation about 0.9); folded ones collapse them."""
    x = _xrays(8, 160, folder="train", start=200)
    for model, expect_close in ((copy.deepcopy(imagenet), True), (copy.deepcopy(folded), False)):
        ev, tr = _train_mode_features(model, x)
        with np.errstate(invalid="ignore"):  # collapsed features are constant: no correlation at all
            corr = float(np.nan_to_num(np.corrcoef(ev.flatten().numpy(), tr.flatten().numpy())[0, 1]))
        assert (corr > 0.85) is expect_close, corr


def test_a_few_train_mode_steps_lower_the_loss(imagenet):
    torch.manual_seed(0)
    model = copy.deepcopy(imagenet)
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 2))
    x = _xrays(12, 96, folder="train", start=300)
    y = torch.tensor([0] * 12 + [1] * 12)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(5):
        optimiser.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = criterion(model.eval()(x), y).item()
    assert losses[-1] < losses[0] and final < 0.6, (losses, final)


# --------------------------------------------------------------------------- bad files


def test_a_truncated_file_gets_a_clear_error(tmp_path):
    if not SHARED_TFLITE.is_file():
        pytest.skip("offline weights not present")
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(SHARED_TFLITE.read_bytes()[: 2_000_000])
    with pytest.raises(tool.TfliteWeightsError, match="truncated or corrupt"):
        tool.read_convolutions(bad)
    assert tool.main(["--tflite", str(bad), "--out", str(tmp_path / "out.pt")]) == 1  # the command says so
    assert not (tmp_path / "out.pt").exists()


def test_a_damaged_header_gets_a_clear_error(tmp_path):
    if not SHARED_TFLITE.is_file():
        pytest.skip("offline weights not present")
    data = bytearray(SHARED_TFLITE.read_bytes())
    data[5] ^= 0xFF  # inside the 'TFL3' identifier
    bad = tmp_path / "flipped.tflite"
    bad.write_bytes(bytes(data))
    with pytest.raises(tool.TfliteWeightsError, match="not a TensorFlow Lite file"):
        tool.read_convolutions(bad)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(bytes(data[:4]) + b"TFL3" + bytes(range(256)) * 8)
    with pytest.raises(tool.TfliteWeightsError, match="truncated or corrupt"):
        tool.read_convolutions(garbage)


def test_another_architecture_gets_a_clear_error():
    kinds = ["conv"] * 36 + ["depthwise"] * 17
    tool.check_architecture(kinds)  # MobileNetV2 1.0
    with pytest.raises(tool.TfliteWeightsError, match="MobileNetV2 1.0 has 53"):
        tool.check_architecture(["conv"] * 14 + ["depthwise"] * 13)  # MobileNetV1
    wrong_shape = [dict(kind=k, stride=(1, 1), weight=np.zeros((8, 1, 1, 8), np.float32),
                        bias=np.zeros(8, np.float32)) for k in kinds]
    with pytest.raises(tool.TfliteWeightsError, match="where MobileNetV2 1.0 has"):
        tool.folded_model(wrong_shape)


# --------------------------------------------------------------------------- build_model(weights=...)


def _no_internet(monkeypatch) -> None:
    def offline(arch):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(models, "_load_pretrained", offline)


def test_build_model_from_the_file_carries_its_normalisation_and_padding(converted_weights):
    model = models.build_model("mobilenet_v2", 2, weights=converted_weights, head="gap_dropout")
    assert model.pretrained is True and model.input_mean == HALF and model.input_std == HALF
    info = model.weights_info
    assert info["source"] == "tflite-converted:mobilenet_v2_1.0_224_quant.tflite" and info["padding"] == "tf_same"
    assert info["file"] == converted_weights.name and info["sha256"] == tool.file_sha256(SHARED_TFLITE)
    stock = torchvision.models.mobilenet_v2(weights=None)
    stock.classifier = copy.deepcopy(model.classifier)
    assert list(stock.state_dict()) == list(model.state_dict())  # torchvision's keys
    stock.load_state_dict(model.state_dict())
    models.use_tf_same_padding(stock)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(stock.eval()(x), model.eval()(x))


def test_imagenet_falls_back_to_the_converted_file(offline_weights_dir, converted_weights, monkeypatch):
    _no_internet(monkeypatch)
    assert models.find_offline("mobilenet_v2") == converted_weights
    model = models.build_model("mobilenet_v2", 2, weights="imagenet")
    assert model.pretrained is True and model.weights_info["source"].startswith("tflite-converted")
    assert model.input_mean == HALF and model.weights_info["batchnorm"].startswith("restored from")
    assert models.find_offline("resnet18") is None  # only MobileNetV2 has an offline copy


def test_a_tflite_file_alone_says_which_command_converts_it(tmp_path, monkeypatch, capsys):
    _no_internet(monkeypatch)
    (tmp_path / "mobilenet_v2_1.0_224_quant.tflite").write_bytes(b"not converted")
    monkeypatch.setattr(models, "weights_dirs", lambda: [tmp_path])
    monkeypatch.setattr(models, "_ANNOUNCED", set())
    model = models.build_model("mobilenet_v2", 2, weights="imagenet")
    assert model.pretrained is False and model.weights_info["source"] == "random"
    printed = capsys.readouterr().out
    assert "PRETRAINED WEIGHTS NOT AVAILABLE" in printed and "tools/convert_tflite_weights.py --tflite" in printed
    with pytest.raises(ValueError, match="convert it first"):
        models.build_model("mobilenet_v2", 2, weights=tmp_path / "mobilenet_v2_1.0_224_quant.tflite")


def test_a_plain_state_dict_file_loads_with_imagenet_normalisation(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    model = models.build_model("resnet18", 3, weights=tmp_path / "r18.pt")
    assert model.pretrained is True and model.weights_info["padding"] == "torchvision"
    assert model.input_mean == models.IMAGENET_MEAN and model.weights_info["source"] == "file:r18.pt"


def test_weights_argument_and_pretrained_map_onto_each_other():
    resolve = models._resolve_weights_argument
    assert resolve(None, None) == "imagenet" and resolve(True, None) == "imagenet"
    assert resolve(False, None) == "random" and resolve(None, "random") == "random"
    assert str(resolve(None, "x/m.pt")) == "x/m.pt"
    with pytest.raises(ValueError, match="contradicts"):
        resolve(False, "imagenet")
    with pytest.raises(ValueError, match="'imagenet', 'random' or the path"):
        resolve(None, "ImageNet1k")


def test_random_weights_record_their_source_and_imagenet_normalisation():
    model = models.build_model("mobilenet_v2", 2, weights="random")
    assert model.pretrained is False and model.weights_info["source"] == "random"
    assert model.input_mean == models.IMAGENET_MEAN and model.input_std == models.IMAGENET_STD


def test_without_an_offline_copy_imagenet_falls_back_loudly_to_random(monkeypatch, capsys):
    _no_internet(monkeypatch)
    monkeypatch.setattr(models, "weights_dirs", lambda: [])
    monkeypatch.setattr(models, "_ANNOUNCED", set())  # the full banner, whatever ran before
    model = models.build_model("mobilenet_v2", 2, weights="imagenet")
    assert model.pretrained is False and model.weights_info["source"] == "random"
    printed = capsys.readouterr().out
    assert "PRETRAINED WEIGHTS NOT AVAILABLE" in printed and "COURSE_WEIGHTS_DIR" in printed


def test_torchvision_weights_carry_their_own_normalisation(monkeypatch):
    monkeypatch.setattr(models, "_load_pretrained", lambda arch: torchvision.models.get_model(arch, weights=None))
    model = models.build_model("resnet18", 2, weights="imagenet")
    assert model.pretrained is True and model.weights_info["source"] == "torchvision"
    assert model.input_mean == (0.485, 0.456, 0.406) and model.input_std == (0.229, 0.224, 0.225)


def test_a_missing_weights_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.build_model("mobilenet_v2", 2, weights=tmp_path / "none.pt")


def test_a_rebuilt_model_gets_padding_and_normalisation_back():
    """What a bundle needs: build from random, apply the saved weights_info, load the state dict."""
    torch.manual_seed(0)
    original = models.use_tf_same_padding(torchvision.models.mobilenet_v2(weights=None)).eval()
    info = dict(source="tflite-converted:x.tflite", padding="tf_same", input_mean=HALF, input_std=HALF)
    rebuilt = models.apply_weights_info(torchvision.models.mobilenet_v2(weights=None), info)
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), original(x))
    assert rebuilt.input_mean == HALF and rebuilt.pretrained is True


def test_a_reference_run_converts_the_tflite_file_when_the_weights_file_is_missing(tmp_path, monkeypatch):
    import subprocess

    from coursebuild import run_all

    root = tmp_path / "course"
    (tmp_path / "shared" / "weights").mkdir(parents=True)
    assert run_all.ensure_offline_weights(root) is None  # nothing to convert
    (tmp_path / "shared" / "weights" / "mobilenet_v2_1.0_224_quant.tflite").write_bytes(b"tflite")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append(command))
    out = run_all.ensure_offline_weights(root)
    assert out == root / "data" / "weights" / "mobilenet_v2_imagenet.pt"
    assert calls and calls[0][1].endswith("convert_tflite_weights.py") and calls[0][-1] == str(out)
    out.parent.mkdir(parents=True)
    out.write_bytes(b"converted")
    assert run_all.ensure_offline_weights(root) == out and len(calls) == 1  # not converted again
