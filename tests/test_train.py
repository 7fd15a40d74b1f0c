"""Tests for helpers.train on tiny synthetic problems (32 px, CPU, a few seconds each)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import feature_cache
from helpers import train as train_mod
from helpers.core import logits_to_probs, pick_device, seed_everything
from helpers.feature_cache import extract_features
from helpers.losses import make_criterion
from helpers.models import build_model
from helpers.train import HISTORY_COLUMNS, fit, fit_head_only, fit_two_stage

SIZE = 32


def squares(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1: a bright square somewhere on a noisy dark image; class 0: noise only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3 - 0.5
    y = torch.arange(n) % 2
    for i in torch.nonzero(y).flatten().tolist():
        r, c = torch.randint(0, size - 12, (2,), generator=g).tolist()
        x[i, :, r : r + 12, c : c + 12] += 2.0
    return x, y


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


# --------------------------------------------------------------------------- small pieces


def test_logits_to_probs_one_logit_and_softmax() -> None:
    one = torch.tensor([[0.0], [2.0], [-1.0]])
    probs = logits_to_probs(one)
    assert probs.shape == (3, 2)
    p = torch.sigmoid(one.flatten())
    torch.testing.assert_close(probs, torch.stack([1 - p, p], 1))
    torch.testing.assert_close(logits_to_probs(one.flatten()), probs)
    many = torch.randn(5, 4)
    soft = logits_to_probs(many)
    assert soft.shape == (5, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert torch.equal(soft.argmax(1), many.argmax(1))


def test_make_criterion_bce_shapes_and_pos_weight() -> None:
    logits = torch.tensor([[-1.0], [0.5], [2.0], [-0.3]])
    y = torch.tensor([1, 0, 1, 0])
    bce = make_criterion("bce")
    expected = nn.functional.binary_cross_entropy_with_logits(logits.flatten(), y.float())
    torch.testing.assert_close(bce(logits, y), expected)
    torch.testing.assert_close(bce(logits.flatten(), y), expected)

    weighted = make_criterion("bce", pos_weight=torch.tensor([3.0]))
    pos, neg = y == 1, y == 0
    # pos_weight multiplies the positive examples' loss and leaves negatives alone.
    torch.testing.assert_close(weighted(logits[pos], y[pos]), 3 * bce(logits[pos], y[pos]))
    torch.testing.assert_close(weighted(logits[neg], y[neg]), bce(logits[neg], y[neg]))
    assert weighted(logits, y) > bce(logits, y)

    smooth = make_criterion("bce", label_smoothing=0.2)
    target = y.float() * 0.8 + 0.1
    torch.testing.assert_close(
        smooth(logits, y), nn.functional.binary_cross_entropy_with_logits(logits.flatten(), target)
    )
    with pytest.raises(ValueError, match="one logit"):
        bce(torch.randn(4, 2), y)


def test_make_criterion_ce_and_class_weights() -> None:
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ce = make_criterion("ce")
    loss = ce(logits, y)
    assert loss.shape == ()
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y))
    weights = torch.tensor([1.0, 1.0, 5.0])
    torch.testing.assert_close(
        make_criterion("ce", class_weights=weights)(logits, y), nn.functional.cross_entropy(logits, y, weight=weights)
    )
    with pytest.raises(ValueError, match="pos_weight"):
        make_criterion("ce", pos_weight=2.0)
    with pytest.raises(ValueError, match="class_weights"):
        make_criterion("bce", class_weights=weights)
    with pytest.raises(ValueError, match="Known: ce, bce"):
        make_criterion("focal")


def test_seed_everything_and_pick_device() -> None:
    seed_everything(3)
    a = (torch.rand(2), np.random.rand())
    seed_everything(3)
    b = (torch.rand(2), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="not available"):
            assert pick_device("cuda").type in ("mps", "cpu")


# --------------------------------------------------------------------------- fit


def test_fit_learns_a_simple_problem() -> None:
    seed_everything(0)
    x, y = squares(64, seed=0)
    xv, yv = squares(32, seed=1)
    history = fit(
        tiny_cnn(), loader(x, y, 16, shuffle=True), loader(xv, yv, 16),
        epochs=6, criterion=make_criterion("ce"), lr=5e-2, monitor="val_loss", progress=False,
    )
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["train_accuracy"].iloc[-1] >= 0.9
    best = history.iloc[history.attrs["best_epoch"] - 1]
    assert best["val_balanced_accuracy"] >= 0.9 and best["val_auc"] >= 0.95
    assert (history["images_per_second"] > 0).all() and (history["seconds"] > 0).all()
    assert history.attrs["train_seconds"] >= history["seconds"].sum() * 0.99


def flipped_problem() -> tuple[DataLoader, DataLoader, torch.Tensor, torch.Tensor]:
    """Validation labels are the opposite of training labels: later epochs get worse on val."""
    x, y = squares(32, seed=2)
    return loader(x, y, 8, shuffle=True), loader(x, 1 - y, 32), x, 1 - y


def test_fit_restores_the_best_checkpoint(tmp_path) -> None:
    seed_everything(0)
    train_dl, val_dl, xv, yv = flipped_problem()
    model = tiny_cnn()
    path = tmp_path / "best.pt"
    history = fit(
        model, train_dl, val_dl, epochs=5, criterion=make_criterion("ce"), lr=3e-2,
        monitor="val_loss", checkpoint_path=path, progress=False,
    )
    best_epoch = history.attrs["best_epoch"]
    assert best_epoch == int(history["val_loss"].idxmin()) + 1
    assert best_epoch < len(history), "the construction should make a later epoch worse"
    assert history["val_loss"].iloc[-1] > history["val_loss"].min() + 1e-3

    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == best_epoch
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model_state_dict"][name])
    # The restored weights reproduce the best epoch's validation loss, not the last one's.
    model.eval()
    with torch.no_grad():
        val_loss = nn.functional.cross_entropy(model(xv), yv).item()
    assert val_loss == pytest.approx(history["val_loss"].iloc[best_epoch - 1], rel=1e-5)


def test_fit_monitor_auc_early_stopping_and_plateau() -> None:
    seed_everything(0)
    train_dl, val_dl, _, _ = flipped_problem()
    history = fit(
        tiny_cnn(), train_dl, val_dl, epochs=12, criterion=make_criterion("ce"), lr=3e-2,
        monitor="val_auc", early_stopping=3, scheduler="plateau", progress=False,
    )
    best_epoch = history.attrs["best_epoch"]
    assert best_epoch == int(history["val_auc"].idxmax()) + 1
    assert len(history) == best_epoch + 3 < 12  # stopped 3 epochs after the best
    lrs = history["lr"].to_numpy()
    assert (np.diff(lrs) <= 0).all()


def test_fit_cosine_schedule_and_bce_one_logit() -> None:
    seed_everything(0)
    x, y = squares(16, seed=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 1))
    history = fit(
        model, loader(x, y, 8), loader(x, y, 8), epochs=4, lr=1e-2, scheduler="cosine",
        criterion=make_criterion("bce", pos_weight=torch.tensor([2.0])), progress=False,
    )
    expected = [1e-2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    np.testing.assert_allclose(history["lr"].to_numpy(), expected, rtol=1e-6)
    assert history["val_auc"].notna().all()


# --------------------------------------------------------------------------- two stages


def _with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm real-looking statistics, as ImageNet weights would (not the
    placeholders mean 0 / var 1 that fit() estimates for frozen layers)."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def test_fit_two_stage_changes_trainable_sets(monkeypatch) -> None:
    seed_everything(0)
    x, y = squares(16, seed=4)
    model = _with_batchnorm_statistics(build_model("mobilenet_v2", 1, pretrained=False, head="gap_dropout"))
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}
    calls: list[dict] = []
    real_fit = train_mod.fit

    def spy(model: nn.Module, *args, **kwargs) -> pd.DataFrame:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        history = real_fit(model, *args, **kwargs)
        backbone = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
        unchanged = all(torch.equal(backbone_before[k], v) for k, v in backbone.items())
        calls.append({"trainable": trainable, "lr": kwargs["lr"], "stage": kwargs["stage"], "unchanged": unchanged})
        return history

    monkeypatch.setattr(train_mod, "fit", spy)
    history = fit_two_stage(
        model, loader(x, y, 8, shuffle=True), loader(x, y, 8), stage1_epochs=2, stage2_epochs=1,
        criterion=make_criterion("bce", pos_weight=torch.tensor([1.5])), scheduler="plateau", progress=False,
    )
    all_names = {n for n, _ in model.named_parameters()}
    assert calls[0]["trainable"] == {"classifier.1.weight", "classifier.1.bias"}
    assert calls[0]["lr"] == 1e-3 and calls[0]["stage"] == 1
    assert calls[0]["unchanged"], "stage 1 must not touch the frozen backbone (weights and BN statistics)"
    assert calls[1]["trainable"] == all_names
    assert calls[1]["lr"] == 1e-5 and calls[1]["stage"] == 2
    assert not calls[1]["unchanged"], "stage 2 trains the backbone"
    assert history["stage"].tolist() == [1, 1, 2]
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history.attrs["best_stage"] in (1, 2)
    with pytest.raises(TypeError, match="optimizer"):
        fit_two_stage(model, [], [], stage1_epochs=1, stage2_epochs=1, optimizer=None, criterion=None)


# --------------------------------------------------------------------------- embedding cache


def test_extract_features_reads_a_shuffled_loader_in_order() -> None:
    x, y = squares(10, seed=5)
    model = build_model("resnet18", 2, pretrained=False).eval()
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 7))
    features, labels = extract_features(backbone, loader(x, y, 4, shuffle=True), "cpu", progress=False)
    assert features.shape == (10, 7) and features.dtype == torch.float32
    assert torch.equal(labels, y)
    del model


def test_feature_cache_reaches_the_same_head_as_the_slow_path() -> None:
    torch.manual_seed(0)
    x, y = squares(24, seed=6)
    xv, yv = squares(12, seed=7)
    slow_model = _with_batchnorm_statistics(build_model("resnet18", 2, pretrained=False, head="mlp"))  # mlp: two dropouts
    fast_model = copy.deepcopy(slow_model)
    backbone_before = copy.deepcopy(slow_model.state_dict())
    kwargs = dict(epochs=3, criterion=make_criterion("ce"), lr=1e-2, monitor="val_loss", progress=False)

    seed_everything(0)
    slow = fit_head_only(slow_model, loader(x, y, 4, shuffle=True), loader(xv, yv, 4), use_feature_cache=False, **kwargs)
    seed_everything(0)
    fast = fit_head_only(fast_model, loader(x, y, 4, shuffle=True), loader(xv, yv, 4), use_feature_cache=True, **kwargs)

    assert list(fast.columns) == list(slow.columns) == HISTORY_COLUMNS
    np.testing.assert_allclose(fast["train_loss"], slow["train_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast["val_loss"], slow["val_loss"], rtol=1e-4, atol=1e-5)
    assert fast.attrs["best_epoch"] == slow.attrs["best_epoch"]
    assert fast.attrs["feature_seconds"] > 0
    for name, value in slow_model.state_dict().items():
        if name.startswith("fc."):
            torch.testing.assert_close(fast_model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        else:  # frozen backbone untouched on both paths, BatchNorm statistics included
            assert torch.equal(value, backbone_before[name]), name
            assert torch.equal(fast_model.state_dict()[name], backbone_before[name]), name
    assert not torch.equal(slow_model.fc[1].weight, backbone_before["fc.1.weight"])


class ToyLoader:
    """Duck-typed like the course's TensorLoader: shuffle, sample_weights, augment attributes."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, augment: object = "none") -> None:
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.shuffle, self.sample_weights, self.drop_last = True, torch.ones(len(y)), True

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights, n, replacement=True)
        else:
            order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


def test_feature_cache_with_duck_typed_loaders_and_augmentation_refusal() -> None:
    x, y = squares(10, seed=8)
    toy = ToyLoader(x, y, 4)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 5))
    _, labels = extract_features(backbone, toy, "cpu", progress=False)
    assert torch.equal(labels, y), "every image once, in order (no sampling, no dropped last batch)"
    assert toy.shuffle and toy.sample_weights is not None and toy.drop_last  # the original is untouched

    model = build_model("mobilenet_v2", 2, pretrained=False)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]  # a plain list works too
    history = fit_head_only(model, toy, batches, epochs=2, criterion=make_criterion("ce"), progress=False)
    assert len(history) == 2 and history["val_loss"].notna().all()

    with pytest.raises(ValueError, match="augment"):
        fit_head_only(model, ToyLoader(x, y, 4, augment="light"), batches, epochs=1, criterion=make_criterion("ce"))

    @dataclasses.dataclass
    class Augment:
        rotate: float = 10.0

        @staticmethod
        def preset(name: str) -> "Augment":
            return Augment(0.0) if name == "none" else Augment()

    assert not feature_cache.augments(ToyLoader(x, y, 4, augment=Augment.preset("none")))
    assert feature_cache.augments(ToyLoader(x, y, 4, augment=Augment.preset("light")))
