"""Tests for helpers.train on tiny synthetic problems (32 px, CPU, a few seconds each)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import models as models_mod
from helpers.core import logits_to_probs, pick_device, seed_everything
from helpers.loading import TensorLoader
from helpers.losses import make_criterion
from helpers.models import build_model, freeze_backbone, head_parameters, unfreeze
from helpers.train import (HISTORY_COLUMNS, FitResult, evaluate_loss, extract_features, feature_loader_like, fit,
                           fit_head_only, train_one_epoch)

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


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay over the trainable parameters."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)


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
    model = tiny_cnn()
    result = fit(
        model, loader(x, y, 16, shuffle=True), loader(xv, yv, 16),
        epochs=6, criterion=make_criterion("ce"), optimizer=adamw(model.parameters(), 5e-2), monitor="val_loss",
        progress=False,
    )
    assert isinstance(result, FitResult) and result.monitor == "val_loss" and result.feature_seconds == 0.0
    history = result.history
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["train_accuracy"].iloc[-1] >= 0.9
    best = history.iloc[result.best_epoch - 1]
    assert best["val_balanced_accuracy"] >= 0.9 and best["val_auc"] >= 0.95
    assert best["val_loss"] == result.best_value and not history.attrs
    assert (history["images_per_second"] > 0).all() and (history["seconds"] > 0).all()
    assert result.train_seconds >= history["seconds"].sum() * 0.99 and result.images_per_second > 0


def flipped_problem() -> tuple[DataLoader, DataLoader, torch.Tensor, torch.Tensor]:
    """Validation labels are the opposite of training labels: later epochs get worse on val."""
    x, y = squares(32, seed=2)
    return loader(x, y, 8, shuffle=True), loader(x, 1 - y, 32), x, 1 - y


def test_fit_restores_the_best_checkpoint(tmp_path) -> None:
    seed_everything(0)
    train_dl, val_dl, xv, yv = flipped_problem()
    model = tiny_cnn()
    path = tmp_path / "best.pt"
    result = fit(
        model, train_dl, val_dl, epochs=5, criterion=make_criterion("ce"), optimizer=adamw(model.parameters(), 3e-2),
        monitor="val_loss", checkpoint_path=path, progress=False,
    )
    history, best_epoch = result.history, result.best_epoch
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


def test_fit_monitor_auc_and_plateau() -> None:
    seed_everything(0)
    train_dl, val_dl, _, _ = flipped_problem()
    model = tiny_cnn()
    result = fit(
        model, train_dl, val_dl, epochs=8, criterion=make_criterion("ce"), optimizer=adamw(model.parameters(), 3e-2),
        monitor="val_auc", scheduler="plateau", progress=False,
    )
    history, best_epoch = result.history, result.best_epoch
    assert best_epoch == int(history["val_auc"].idxmax()) + 1 and len(history) == 8
    lrs = history["lr"].to_numpy()
    assert (np.diff(lrs) <= 0).all() and lrs[-1] < lrs[0]  # the plateau schedule lowered the rate


def test_fit_leaves_frozen_batchnorm_alone() -> None:
    """No BatchNorm estimation hidden inside fit: estimate_frozen_batchnorm is an explicit call."""
    seed_everything(0)
    x, y = squares(16, seed=9)
    model = build_model("mobilenet_v2", 2, pretrained=False, freeze="head")
    frozen_bn = model.features[0][1]
    fit(model, loader(x, y, 8), None, epochs=1, criterion=make_criterion("ce"),
        optimizer=adamw(model.parameters(), 1e-3), progress=False)
    assert torch.equal(frozen_bn.running_mean, torch.zeros_like(frozen_bn.running_mean)), \
        "fit must leave frozen BatchNorm statistics alone; helpers.models.estimate_frozen_batchnorm is explicit"
    assert models_mod.estimate_frozen_batchnorm(model, loader(x, y, 8)) > 0  # on the model's device
    assert not torch.equal(frozen_bn.running_mean, torch.zeros_like(frozen_bn.running_mean))


def test_fit_cosine_schedule_and_bce_one_logit() -> None:
    seed_everything(0)
    x, y = squares(16, seed=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 1))
    history = fit(
        model, loader(x, y, 8), loader(x, y, 8), epochs=4, optimizer=adamw(model.parameters(), 1e-2), scheduler="cosine",
        criterion=make_criterion("bce", pos_weight=torch.tensor([2.0])), progress=False,
    ).history
    expected = [1e-2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    np.testing.assert_allclose(history["lr"].to_numpy(), expected, rtol=1e-6)
    assert history["val_auc"].notna().all()


# --------------------------------------------------------------------------- two stages


def _with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm real-looking statistics, as ImageNet weights would (not the
    placeholders mean 0 / var 1 that estimate_frozen_batchnorm replaces in frozen layers)."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def test_train_one_epoch_is_the_plain_loop() -> None:
    """train_one_epoch gives the weights of forward, loss, zero_grad, backward, step written out."""
    x, y = squares(16, seed=4)
    torch.manual_seed(0)
    ours = tiny_cnn()
    theirs = copy.deepcopy(ours)
    criterion = make_criterion("ce")
    opt_a, opt_b = adamw(ours.parameters(), 1e-2), adamw(theirs.parameters(), 1e-2)
    stats = train_one_epoch(ours, loader(x, y, 8), criterion, opt_a)
    theirs.train()
    losses = []
    for xb, yb in loader(x, y, 8):
        loss = criterion(theirs(xb), yb)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
        losses.append(loss.item())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)
    assert stats["loss"] == pytest.approx(np.mean(losses)) and stats["images"] == 16
    val = evaluate_loss(ours, loader(x, y, 8), criterion)
    assert set(val) == {"loss", "accuracy", "balanced_accuracy", "auc"} and not ours.training


def test_two_visible_stages_freeze_then_unfreeze() -> None:
    """Chapter 04's two fit calls: the head with the backbone frozen, then everything."""
    seed_everything(0)
    x, y = squares(16, seed=4)
    model = _with_batchnorm_statistics(build_model("mobilenet_v2", 1, pretrained=False, head="gap_dropout"))
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}
    criterion = make_criterion("bce", pos_weight=torch.tensor([1.5]))
    freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.1.weight", "classifier.1.bias"}
    fit(model, loader(x, y, 8, shuffle=True), loader(x, y, 8), epochs=2, criterion=criterion,
        optimizer=adamw(model.parameters(), 1e-3), progress=False)
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    assert all(torch.equal(backbone_before[k], v) for k, v in backbone.items()), "stage 1 leaves the backbone alone"
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    fit(model, loader(x, y, 8, shuffle=True), loader(x, y, 8), epochs=1, criterion=criterion,
        optimizer=adamw(model.parameters(), 1e-3), monitor="train_loss", progress=False)
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    assert not all(torch.equal(backbone_before[k], v) for k, v in backbone.items()), "stage 2 trains the backbone"


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
    kwargs = dict(epochs=3, criterion=make_criterion("ce"), monitor="val_loss", progress=False)

    seed_everything(0)
    slow = fit_head_only(slow_model, loader(x, y, 4), loader(xv, yv, 4), use_feature_cache=False,
                         optimizer=adamw(head_parameters(slow_model), 1e-2), **kwargs)
    seed_everything(0)
    fast = fit_head_only(fast_model, loader(x, y, 4), loader(xv, yv, 4), use_feature_cache=True,
                         optimizer=adamw(head_parameters(fast_model), 1e-2), **kwargs)

    assert list(fast.history.columns) == list(slow.history.columns) == HISTORY_COLUMNS
    np.testing.assert_allclose(fast.history["train_loss"], slow.history["train_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.history["val_loss"], slow.history["val_loss"], rtol=1e-4, atol=1e-5)
    assert fast.best_epoch == slow.best_epoch
    assert fast.feature_seconds > 0 and slow.feature_seconds == 0
    for name, value in slow_model.state_dict().items():
        if name.startswith("fc."):
            torch.testing.assert_close(fast_model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        else:  # frozen backbone untouched on both paths, BatchNorm statistics included
            assert torch.equal(value, backbone_before[name]), name
            assert torch.equal(fast_model.state_dict()[name], backbone_before[name]), name
    assert not torch.equal(slow_model.fc[1].weight, backbone_before["fc.1.weight"])


def uint8_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`squares` as the uint8 images a TensorLoader holds."""
    x, y = squares(n, seed)
    return ((x + 1.0).clamp(0, 2) * 127).to(torch.uint8), y


def test_tensor_loader_ordered_view_and_augments() -> None:
    images, y = uint8_images(10, seed=8)
    random = TensorLoader(images, y, batch_size=4, shuffle=True, augment="light", sample_weights=torch.ones(10),
                          drop_last=True, seed=0)
    ordered = random.ordered()
    assert random.augments and not ordered.augments
    assert (random.shuffle, random.drop_last, len(random)) == (True, True, 2)  # the original is untouched
    assert random.sample_weights is not None and random.augment != ordered.augment
    batches = list(ordered)
    assert torch.equal(torch.cat([b[1] for b in batches]), y), "every image once, in order"
    plain = TensorLoader(images, y, batch_size=4)
    assert not plain.augments
    for (xa, ya), (xb, yb) in zip(batches, plain):
        assert torch.equal(xa, xb) and torch.equal(ya, yb), "no augmentation in the ordered view"
    assert TensorLoader(images, y, strong_classes=[1]).augments  # strong augmentation for class 1


def test_feature_cache_with_tensor_loaders_and_augmentation_refusal() -> None:
    images, y = uint8_images(10, seed=8)
    train_loader = TensorLoader(images, y, batch_size=4, shuffle=True, sample_weights=torch.ones(10),
                                drop_last=True, seed=0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 5))
    _, labels = extract_features(backbone, train_loader, "cpu", progress=False)
    assert torch.equal(labels, y), "every image once, in order (no sampling, no dropped last batch)"

    features = torch.randn(10, 5)
    served = feature_loader_like(train_loader, features, y)
    assert served.batch_size == 4 and served.drop_last and isinstance(served.sampler, torch.utils.data.WeightedRandomSampler)
    assert not train_loader.augments

    model = build_model("mobilenet_v2", 2, pretrained=False)
    x, _ = squares(10, seed=8)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]  # a plain list works as validation data
    history = fit_head_only(model, train_loader, batches, epochs=2, criterion=make_criterion("ce"),
                            optimizer=adamw(head_parameters(model), 1e-3), progress=False).history
    assert len(history) == 2 and history["val_loss"].notna().all()

    for augmenting in (TensorLoader(images, y, augment="light"), TensorLoader(images, y, strong_classes=[0])):
        assert augmenting.augments
        with pytest.raises(ValueError, match="augment"):
            fit_head_only(model, augmenting, batches, epochs=1, criterion=make_criterion("ce"),
                          optimizer=adamw(head_parameters(model), 1e-3))
