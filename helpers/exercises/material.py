"""What the chapters' exercises work on: small real (or, in the smoke profile, synthetic) splits,
a small real model, and features cached from a pretrained backbone when its weights are here."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from helpers import data, loading
from helpers.core import seed_everything


def small_splits(name: str, profile: str, data_dir: Any, seed: int, max_per_class: int = 30) -> data.DataSplits:
    """The dataset ``name``, at most ``max_per_class`` images per class and split: the synthetic
    one in the smoke profile (unless ``data_dir`` is given), else located as the chapters do."""
    where = data_dir if data_dir is not None else ("synthetic" if profile == "smoke" else None)
    return data.load_splits(name, where, seed=seed, max_per_class=max_per_class, check_images=False)


class SmallCNN(nn.Module):
    """A small real convolutional network: three conv-BN-ReLU stages (``features``), global average
    pooling, and a linear head ``fc``, the layout of the course's ResNets in miniature."""

    def __init__(self, n_outputs: int, width: int = 16) -> None:
        super().__init__()
        stages, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            stages += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


def small_cnn(n_outputs: int, seed: int = 42) -> SmallCNN:
    """A fresh ``SmallCNN`` (seeded)."""
    seed_everything(seed)
    return SmallCNN(n_outputs)


def backbone(seed: int = 42) -> tuple[nn.Module, str]:
    """(a feature extractor giving (N, D), what it is): MobileNetV2 with the converted ImageNet
    weights when they are here (``models.find_offline``), else a seeded ``SmallCNN``'s convolutions."""
    from helpers import models

    offline = models.find_offline("mobilenet_v2")
    if offline is not None:
        model = models.build_model("mobilenet_v2", 2, weights=offline)
        net, _ = models.backbone_and_head(model)
        return net.eval(), f"MobileNetV2 with ImageNet weights ({offline.name})"
    cnn = small_cnn(1, seed)
    net = nn.Sequential(cnn.features, cnn.pool)
    net.input_mean, net.input_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's
    return net.eval(), "a small CNN with random weights (no converted MobileNetV2 weights here)"


@torch.no_grad()
def features(net: nn.Module, frame: Any, image_size: int) -> torch.Tensor:
    """The backbone's features (N, D) of every image of ``frame`` (decoded once, normalised for it)."""
    images = loading.cache_images(frame, image_size)
    return net(loading.normalize(images, normalization=net)).float()


def labels(frame: Any) -> torch.Tensor:
    """The frame's labels as an int64 tensor (a copy)."""
    return torch.as_tensor(np.array(frame["label"], dtype=np.int64))
