"""The TensorFlow Lite MobileNetV2 converter (helpers.tflite_weights) and the weights= parameter.

Tests that need the real file skip where ../shared/weights is absent; the conversion runs once per
session (the BatchNorm statistics from a few real X-rays at small size, where no interpreter is needed).
"""

from __future__ import annotations

import copy
import shutil
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import ROOT, SHARED_PNEUMONIA
from helpers import models, offline_weights, tflite_weights
from helpers.tflite_weights import TfliteWeightsError

WEIGHTS_DIR = ROOT.parent / "shared" / "weights"
TFLITE = WEIGHTS_DIR / "mobilenet_v2_1.0_224_quant.tflite"
LABELS = WEIGHTS_DIR / "imagenet_labels.txt"


@pytest.fixture(scope="session")
def tflite_file():
    if not TFLITE.is_file():
        pytest.skip(f"offline weights not present at {TFLITE}")
    return TFLITE


@pytest.fixture(scope="session")
def folded(tflite_file) -> nn.Module:
    """The converted network with BatchNorm folded (identity statistics)."""
    return tflite_weights.folded_model(tflite_weights.read_convolutions(tflite_file))


def _xray_batch(n_per_class: int, size: int, folder: str = "train", start: int = 0) -> torch.Tensor:
    """Real X-rays normalised to [-1, 1] (the converted weights' normalisation)."""
    if not (SHARED_PNEUMONIA / folder).is_dir():
        pytest.skip(f"real data not present at {SHARED_PNEUMONIA}")
    files = [f for c in ("NORMAL", "PNEUMONIA")
             for f in sorted((SHARED_PNEUMONIA / folder / c).glob("*.jp*g"))[start:start + n_per_class]]
    u8 = np.stack([offline_weights._u8_rgb(__import__("PIL.Image").Image.open(f).convert("RGB"), size)
                   for f in files])
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="session")
def calibration() -> torch.Tensor:
    return _xray_batch(24, 96)


@pytest.fixture(scope="session")
def restored(folded, calibration) -> nn.Module:
    model = copy.deepcopy(folded)
    assert tflite_weights.restore_batchnorm_statistics(model, calibration) == len(calibration)
    model.input_mean, model.input_std = tflite_weights.INPUT_MEAN, tflite_weights.INPUT_STD
    return model


# --------------------------------------------------------------------------- agreement with TensorFlow


@pytest.fixture(scope="session")
def interpreter():
    return pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (dev dependency) not installed")


@pytest.mark.parametrize("images", ["natural", "xray"])
def test_the_converted_network_agrees_with_tensorflows_interpreter(images, restored, tflite_file, interpreter):
    if images == "natural":
        pytest.importorskip("skimage", reason="scikit-image (dev dependency) not installed")
        u8 = offline_weights.natural_images(224)
    else:
        if not (SHARED_PNEUMONIA / "test").is_dir():
            pytest.skip("real data not present")
        u8 = offline_weights.xray_images(SHARED_PNEUMONIA / "test", per_class=8)
    ours = tflite_weights.torch_logits(restored, u8)
    theirs = tflite_weights.interpreter_logits(tflite_file, u8)
    result = tflite_weights.agreement(ours, theirs)
    assert result["logit_correlation"] >= 0.99, result
    assert result["top1_agreement"] >= 0.85, result


def test_the_cat_photo_is_a_cat(restored):
    pytest.importorskip("skimage")
    labels = LABELS.read_text().splitlines()[1:]  # line 0 is "background", dropped like output 0
    logits = tflite_weights.torch_logits(restored, offline_weights.natural_images(224, ("chelsea",)))
    assert labels[int(logits.argmax())] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


def test_torchvision_padding_would_not_agree(folded, tflite_file, interpreter):
    """The SAME padding matters: without it the same weights agree only loosely (README: ~0.8)."""
    pytest.importorskip("skimage", reason="scikit-image (dev dependency) not installed")
    stock = torchvision.models.mobilenet_v2(weights=None).eval()
    stock.load_state_dict(folded.state_dict())  # same keys: the padding is not in the state dict
    u8 = offline_weights.natural_images(224, ("chelsea", "coffee", "rocket", "astronaut"))
    stock.input_mean, stock.input_std = tflite_weights.INPUT_MEAN, tflite_weights.INPUT_STD
    loose = tflite_weights.agreement(tflite_weights.torch_logits(stock, u8), tflite_weights.interpreter_logits(tflite_file, u8))
    assert loose["logit_correlation"] < 0.97, loose


def test_same_padding_pads_bottom_right_for_even_sizes_only():
    conv = tflite_weights.TFSamePadConv2d(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # even size: no padding top/left, so the first output sums rows 0-2 x cols 0-2
    assert conv(x)[0, 0, 0, 0].item() == x[0, 0, :3, :3].sum().item()
    odd = torch.ones(1, 1, 5, 5)
    assert conv(odd).shape[-1] == 3 and conv(odd)[0, 0, 0, 0].item() == 4.0  # one pixel each side


# --------------------------------------------------------------------------- BatchNorm statistics


def test_restoring_batchnorm_statistics_leaves_eval_outputs_unchanged(folded, restored):
    x = _xray_batch(4, 96, folder="test")
    with torch.no_grad():
        diff = (folded.eval()(x) - restored.eval()(x)).abs().max().item()
    assert diff < 1e-3
    bn = restored.features[0][1]
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


def test_train_mode_keeps_the_features_only_with_restored_statistics(folded, restored):
    x = _xray_batch(8, 96, folder="train", start=200)
    for model, expect_close in ((copy.deepcopy(restored), True), (copy.deepcopy(folded), False)):
        ev, tr = _train_mode_features(model, x)
        with np.errstate(invalid="ignore"):  # collapsed features are constant: no correlation at all
            corr = float(np.nan_to_num(np.corrcoef(ev.flatten().numpy(), tr.flatten().numpy())[0, 1]))
        assert (corr > 0.9) is expect_close, corr


def test_a_few_train_mode_steps_lower_the_loss(restored):
    torch.manual_seed(0)
    model = copy.deepcopy(restored)
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 2))
    x = _xray_batch(12, 96, folder="train", start=300)
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


def test_a_truncated_file_gets_a_clear_error(tflite_file, tmp_path):
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(tflite_file.read_bytes()[: 2_000_000])
    with pytest.raises(TfliteWeightsError, match="truncated or corrupt"):
        tflite_weights.read_convolutions(bad)


def test_a_damaged_header_gets_a_clear_error(tflite_file, tmp_path):
    data = bytearray(tflite_file.read_bytes())
    data[5] ^= 0xFF  # inside the 'TFL3' identifier
    bad = tmp_path / "flipped.tflite"
    bad.write_bytes(bytes(data))
    with pytest.raises(TfliteWeightsError, match="not a TensorFlow Lite file"):
        tflite_weights.read_convolutions(bad)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(bytes(data[:4]) + b"TFL3" + bytes(range(256)) * 8)
    with pytest.raises(TfliteWeightsError, match="truncated or corrupt"):
        tflite_weights.read_convolutions(garbage)


def test_another_architecture_gets_a_clear_error():
    kinds = ["conv"] * 36 + ["depthwise"] * 17
    tflite_weights.check_architecture(kinds)  # MobileNetV2 1.0
    with pytest.raises(TfliteWeightsError, match="MobileNetV2 1.0 has 53"):
        tflite_weights.check_architecture(["conv"] * 14 + ["depthwise"] * 13)  # MobileNetV1
    wrong_shape = [dict(kind=k, stride=(1, 1), weight=np.zeros((8, 1, 1, 8), np.float32),
                        bias=np.zeros(8, np.float32)) for k in kinds]
    with pytest.raises(TfliteWeightsError, match="where MobileNetV2 1.0 has"):
        tflite_weights.folded_model(wrong_shape)


# --------------------------------------------------------------------------- cache


def test_the_cache_hits_loads_weights_only_and_is_keyed_by_sha256(tflite_file, tmp_path, monkeypatch):
    calibration = torch.zeros(2, 3, 32, 32)
    local = tmp_path / "m.tflite"
    shutil.copy(tflite_file, local)
    first = tflite_weights.load_tflite_weights(local, calibration, "zeros", cache_dir=tmp_path, agreement_images=0)
    assert first["cache"] == "miss" and first["sha256"] == tflite_weights.file_sha256(tflite_file)
    cached = list(tmp_path.glob("mobilenet_v2-tflite-*.pt"))
    assert len(cached) == 1
    assert torch.load(cached[0], weights_only=True)["input_mean"] == (0.5, 0.5, 0.5)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(tflite_weights, "convert_tflite", no_conversion)
    second = tflite_weights.load_tflite_weights(local, calibration, "zeros", cache_dir=tmp_path)
    assert second["cache"] == "hit"
    assert all(torch.equal(v, second["state_dict"][k]) for k, v in first["state_dict"].items())
    monkeypatch.undo()

    local.write_bytes(local.read_bytes() + b"\0" * 16)  # another file: another sha256, converted again
    third = tflite_weights.load_tflite_weights(local, calibration, "zeros", cache_dir=tmp_path, agreement_images=0)
    assert third["cache"] == "miss" and third["sha256"] != first["sha256"]
    assert len(list(tmp_path.glob("mobilenet_v2-tflite-*.pt"))) == 2


# --------------------------------------------------------------------------- build_model(weights=...)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_home_tflite")


def test_build_model_from_a_tflite_path_carries_its_normalisation(tflite_file, calibration, torch_home, monkeypatch):
    tmp_path = torch_home
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    model = models.build_model("mobilenet_v2", 2, weights=tflite_file, head="gap_dropout", calibration_images=calibration)
    assert model.pretrained is True and model.input_mean == (0.5, 0.5, 0.5) and model.input_std == (0.5, 0.5, 0.5)
    info = model.weights_info
    assert info["source"] == "tflite-converted:mobilenet_v2_1.0_224_quant.tflite" and info["padding"] == "tf_same"
    assert info["sha256"] == tflite_weights.file_sha256(tflite_file)
    if info["agreement"] is not None:  # measured at conversion where ai-edge-litert is installed
        assert info["agreement"]["logit_correlation"] >= 0.99 and info["agreement"]["images"] == 24
    stock = torchvision.models.mobilenet_v2(weights=None)
    stock.classifier = copy.deepcopy(model.classifier)
    assert list(stock.state_dict()) == list(model.state_dict())  # torchvision's keys
    stock.load_state_dict(model.state_dict())
    tflite_weights.use_tf_same_padding(stock)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(stock.eval()(x), model.eval()(x))

    converted = next((tmp_path / "hub" / "converted").glob("*.pt"))  # the cached file works as weights=
    again = models.build_model("mobilenet_v2", 2, weights=converted, head="gap_dropout")
    assert again.weights_info["source"] == info["source"] and again.input_mean == (0.5, 0.5, 0.5)


def test_imagenet_falls_back_to_the_offline_copy(tflite_file, calibration, tmp_path, torch_home, monkeypatch):
    def offline(arch):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(models, "_load_pretrained", offline)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / TFLITE.name).symlink_to(tflite_file)
    monkeypatch.setenv(offline_weights.ENV_VAR, str(folder))
    monkeypatch.setattr(offline_weights, "default_calibration", lambda: (calibration, None))  # agreement only
    assert offline_weights.find_offline("mobilenet_v2") == folder / TFLITE.name
    model = models.build_model("mobilenet_v2", 2, weights="imagenet")
    # no calibration images: converted exactly (BatchNorm folded), cached by sha256 alone; the run's
    # training images restore the statistics later (models.estimate_frozen_batchnorm)
    assert model.pretrained is True and model.weights_info["calibration"] == "none"
    assert model.weights_info["batchnorm"] == "folded" and offline_weights.batchnorm_is_folded(model)
    assert model.input_mean == (0.5, 0.5, 0.5)
    again = models.build_model("mobilenet_v2", 2, weights="imagenet")
    assert again.weights_info["cache"] == "hit"
    assert offline_weights.find_offline("resnet18") is None  # only MobileNetV2 has an offline copy


# --------------------------------------------------------------------------- without the shared files


def test_weights_argument_and_pretrained_map_onto_each_other():
    resolve = models._resolve_weights_argument
    assert resolve(None, None) == "imagenet" and resolve(True, None) == "imagenet"
    assert resolve(False, None) == "random" and resolve(None, "random") == "random"
    assert str(resolve(None, "x/m.tflite")) == "x/m.tflite"
    with pytest.raises(ValueError, match="contradicts"):
        resolve(False, "imagenet")
    with pytest.raises(ValueError, match="'imagenet', 'random' or the path"):
        resolve(None, "ImageNet1k")


def test_random_weights_record_their_source_and_imagenet_normalisation():
    model = models.build_model("mobilenet_v2", 2, weights="random")
    assert model.pretrained is False and model.weights_info["source"] == "random"
    assert model.input_mean == offline_weights.IMAGENET_MEAN and model.input_std == offline_weights.IMAGENET_STD


def test_without_an_offline_copy_imagenet_falls_back_loudly_to_random(monkeypatch, capsys):
    def offline(arch):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(models, "_load_pretrained", offline)
    monkeypatch.setattr(offline_weights, "offline_dirs", lambda: [])
    monkeypatch.setattr(models, "_ANNOUNCED", set())  # the full banner, whatever ran before
    with pytest.warns(RuntimeWarning, match="COURSE_WEIGHTS_DIR"):
        model = models.build_model("mobilenet_v2", 2, weights="imagenet")
    assert model.pretrained is False and model.weights_info["source"] == "random"
    assert "PRETRAINED WEIGHTS NOT AVAILABLE" in capsys.readouterr().out


def test_torchvision_weights_carry_their_own_normalisation(monkeypatch):
    monkeypatch.setattr(models, "_load_pretrained", lambda arch: torchvision.models.get_model(arch, weights=None))
    model = models.build_model("resnet18", 2, weights="imagenet")
    assert model.pretrained is True and model.weights_info["source"] == "torchvision"
    assert model.input_mean == (0.485, 0.456, 0.406) and model.input_std == (0.229, 0.224, 0.225)


def test_a_missing_weights_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.build_model("mobilenet_v2", 2, weights=tmp_path / "none.tflite")


def test_a_rebuilt_model_gets_padding_and_normalisation_back(restored):
    """What a bundle needs: build from random, apply the saved weights_info, load the state dict."""
    info = dict(source="tflite-converted:x.tflite", padding="tf_same", input_mean=(0.5,) * 3, input_std=(0.5,) * 3)
    rebuilt = offline_weights.apply_weights_info(torchvision.models.mobilenet_v2(weights=None), info)
    rebuilt.load_state_dict(restored.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), restored.eval()(x))
    assert rebuilt.input_mean == (0.5,) * 3 and rebuilt.pretrained is True
