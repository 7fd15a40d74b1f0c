"""The pretrained path, offline: torchvision weight files served from a temporary TORCH_HOME.

torchvision loads `$TORCH_HOME/hub/checkpoints/<file name of the weight URL>` when it exists instead
of downloading it. The files written here hold the state dicts of randomly initialised torchvision
models (no ImageNet weights can be downloaded in CI), which is enough to run the code path a Kaggle
student takes with internet on: load, replace the head, keep the BatchNorm statistics that came with
the weights, interpolate ViT position embeddings for other image sizes, record "pretrained": true.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import papermill
import pytest
import torch
import torchvision
from torch import nn

from conftest import ROOT
from helpers import models

NOTEBOOK_04 = ROOT / "notebooks" / "04_mobilenetv2_two_stage.ipynb"


def weight_file(arch: str) -> str:
    """The file name torchvision caches `arch`'s DEFAULT weights under."""
    return os.path.basename(urlparse(torchvision.models.get_model_weights(arch).DEFAULT.url).path)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME with a weight file for every architecture (random init; ~1 GB, written once)."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    for arch in models.ARCHITECTURES:
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), checkpoints / weight_file(arch))
    return home


@pytest.fixture
def weights_offline(torch_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home / "hub" / "checkpoints"


def _build(arch: str, **kwargs) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.build_model(arch, 2, pretrained=True, **kwargs)
    return model, [str(w.message) for w in caught]


def _batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_weights_from_the_cache_are_loaded_and_kept(arch, weights_offline, capsys):
    saved = torch.load(weights_offline / weight_file(arch), weights_only=True)
    model, messages = _build(arch, freeze="head", image_size=224)
    assert model.pretrained is True
    assert not any("RANDOM initialisation" in m or "interpolated" in m for m in messages), messages
    head = next(name for name, m in model.named_modules() if m is models.get_head(model)) + "."
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    assert backbone and all(torch.equal(v, saved[k]) for k, v in backbone.items())

    # BatchNorm statistics that came with the weights are not re-estimated (these random-init ones
    # are mean 0 / variance 1, exactly what the placeholder check looks for on random models).
    stats = _batchnorm_stats(model)
    assert (len(stats) > 0) is (arch != "vit_b_16")
    batches = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    assert models.estimate_frozen_batchnorm(model, batches, "cpu") == 0
    assert all(torch.equal(v, _batchnorm_stats(model)[k]) for k, v in stats.items())
    assert "Estimated the statistics" not in capsys.readouterr().out


def test_random_models_still_get_their_placeholder_statistics_estimated():
    model = models.build_model("resnet18", 2, pretrained=False, freeze="head")
    assert model.pretrained is False
    assert models.estimate_frozen_batchnorm(model, [(torch.randn(4, 3, 64, 64), torch.zeros(4))], "cpu") > 0


def test_vit_position_embeddings_are_interpolated_off_224(weights_offline):
    """At 224 px the weights load as they are (checked above, with no interpolation warning)."""
    saved = torch.load(weights_offline / weight_file("vit_b_16"), weights_only=True)
    key = "encoder.pos_embedding"
    at_160, messages = _build("vit_b_16", freeze="head", image_size=160)
    assert at_160.pretrained and any("interpolated" in m for m in messages)
    pos = at_160.state_dict()[key]
    assert pos.shape == (1, 1 + (160 // 16) ** 2, 768)
    assert torch.equal(pos[:, :1], saved[key][:, :1])  # the class token's embedding is kept
    assert torch.equal(at_160.state_dict()["encoder.layers.encoder_layer_0.mlp.0.weight"],
                       saved["encoder.layers.encoder_layer_0.mlp.0.weight"])
    assert at_160(torch.randn(1, 3, 160, 160)).shape == (1, 2)


@pytest.mark.notebook
def test_notebook_04_runs_with_pretrained_weights(weights_offline, tmp_path, monkeypatch):
    """Notebook 04 end to end on the path a Kaggle student takes: ImageNet weights requested and
    found. The cpu profile is the smallest that requests weights; its knobs are cut to smoke size."""
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(  # the kernel inherits TORCH_HOME from this process
        str(NOTEBOOK_04), str(executed), cwd=str(NOTEBOOK_04.parent), kernel_name="python3", progress_bar=False,
        parameters=dict(PROFILE="cpu", DATA_DIR="synthetic", IMAGE_SIZE=64, EPOCHS=2, BATCH_SIZE=16,
                        MAX_PER_CLASS=24, OUTPUT_DIR=str(tmp_path), COMPARE_RANDOM=False))  # no random twin
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pretrained"] is True and metrics["model"] == "mobilenet_v2"
    assert metrics["weights"]["source"] == "torchvision"
    outputs = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells
                      for o in c.get("outputs", []))
    assert "ImageNet weights loaded: True" in outputs
    assert "PRETRAINED WEIGHTS NOT AVAILABLE" not in outputs
    assert "Estimated the statistics" not in outputs  # the weights' BatchNorm statistics were kept
