"""Training: chapter 02's loop (`train_one_epoch`, `evaluate_loss`) saved, and `fit` around it (best-epoch
checkpoint, mixed precision, scheduler); `fit_head_only` trains a head on features computed once.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset, WeightedRandomSampler

from helpers.core import amp_dtype, autocast, check_normalization, logits_to_probs, model_device, progress_bar
from helpers.evaluate import epoch_metrics
from helpers.loading import TensorLoader
from helpers.models import backbone_and_head, estimate_frozen_batchnorm, freeze_backbone, train_mode

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HISTORY_COLUMNS: list[str] = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                              "val_balanced_accuracy", "val_auc", "lr", "seconds", "images_per_second"]
MONITORS: dict[str, str] = {"val_loss": "min", "val_auc": "max", "val_balanced_accuracy": "max",
                            "val_accuracy": "max", "train_loss": "min"}  # lower or higher is better


@dataclass
class FitResult:
    """What `fit` and `fit_head_only` return: the history (one row per epoch) and the best epoch."""

    history: pd.DataFrame
    best_epoch: int  # 1-based; 0 when no epoch ran
    best_value: float | None  # the monitored metric at the best epoch
    monitor: str
    train_seconds: float  # everything, the feature pass of fit_head_only included
    images_per_second: float  # training images per second of training passes
    feature_seconds: float = 0.0  # fit_head_only's one-off backbone pass


def train_one_epoch(model: nn.Module, loader: Loader, criterion: Criterion, optimizer: torch.optim.Optimizer, *,
                    scaler: torch.amp.GradScaler | None = None, dtype: torch.dtype | None = None,
                    grad_clip: float | None = None, progress: bool = False) -> dict[str, float]:
    """One pass over the training data: {"loss", "accuracy", "images"}; frozen parts stay in eval mode
    (`models.train_mode`). `dtype`: mixed precision forward pass (float16 needs a `scaler`)."""
    device, scaler = model_device(model), scaler or torch.amp.GradScaler(enabled=False)
    train_mode(model)
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    total_loss, correct, seen, single = 0.0, 0, 0, 0
    for x, y in progress_bar(loader, "train", progress):
        if batchnorm and len(y) == 1:  # BatchNorm cannot normalise one image: that batch is left out
            single += 1
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)  # forward
            loss = criterion(logits, y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()  # a disabled scaler (no float16) leaves the loss and the step as they are
        scaler.unscale_(optimizer)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(y)
        correct += (logits_to_probs(logits).argmax(1) == y).sum().item()
        seen += len(y)
    if seen == 0:
        raise ValueError("The training loader produced no batches." if not single else
                         f"Every training batch held one image ({single} batch(es)); the model's trainable "
                         "BatchNorm layers need at least 2 images per batch. Set BATCH_SIZE to 2 or more "
                         "(and train on at least 2 images), or freeze the backbone.")
    if single:
        print(f"  left out {single} training batch(es) of one image (BatchNorm needs at least 2 per batch)")
    if not math.isfinite(total_loss):
        warnings.warn("The training loss is not finite (inf/NaN): a learning rate that is too high, or a frozen "
                      "random backbone whose BatchNorm statistics let activations overflow float16.",
                      RuntimeWarning, stacklevel=2)
    return {"loss": total_loss / seen, "accuracy": correct / seen, "images": seen}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Loader, criterion: Criterion, *, dtype: torch.dtype | None = None,
                  progress: bool = False) -> dict[str, float]:
    """The validation pass (eval mode, no gradients): {"loss", "accuracy", "balanced_accuracy", "auc"}."""
    device, total_loss, probs, labels = model_device(model), 0.0, [], []
    model.eval()
    for x, y in progress_bar(loader, "val", progress):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
            total_loss += criterion(logits, y).item() * len(y)
        probs.append(logits_to_probs(logits).cpu())
        labels.append(y.cpu())
    if not labels:
        raise ValueError("The validation loader produced no batches.")
    return {"loss": total_loss / sum(map(len, labels)), **epoch_metrics(torch.cat(labels), torch.cat(probs))}


def _make_scheduler(scheduler: str | Any | None, optimizer: torch.optim.Optimizer, epochs: int, mode: str) -> Any:
    if scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.2, patience=2, min_lr=1e-7)
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if isinstance(scheduler, str):
        raise ValueError(f"Unknown scheduler {scheduler!r}. Known: None, 'plateau', 'cosine'")
    return scheduler  # None, or a scheduler object (stepped once per epoch)


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value < best if mode == "min" else value > best  # False for NaN


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    val = "" if math.isnan(row["val_loss"]) else (
        f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} "
        f"bacc {row['val_balanced_accuracy']:.3f} auc {row['val_auc']:.3f}")
    return (f"epoch {row['epoch']}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}"
            f"{val} | lr {row['lr']:.2e} | {row['seconds']:.1f}s {row['images_per_second']:.0f} img/s"
            f"{' *' if improved else ''}")


def fit(model: nn.Module, train_loader: Loader, val_loader: Loader | None, *, epochs: int, criterion: Criterion,
        optimizer: torch.optim.Optimizer, scheduler: str | Any | None = None, monitor: str = "val_loss",
        grad_clip: float | None = None, amp: bool = True, checkpoint_path: str | Path | None = None,
        progress: bool = True) -> FitResult:
    """`train_one_epoch` + `evaluate_loss` per epoch; the best `monitor` (MONITORS; "train_loss" without val data)
    is saved to `checkpoint_path` (default temporary) and restored. `scheduler`: None, "plateau", "cosine" or one."""
    if monitor not in MONITORS:
        raise ValueError(f"Unknown monitor {monitor!r}. Known: {', '.join(MONITORS)}")
    monitor = monitor if val_loader is not None else "train_loss"
    mode, device = MONITORS[monitor], model_device(model)
    for loader in (train_loader, val_loader):
        check_normalization(model, loader)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    scheduler, dtype = _make_scheduler(scheduler, optimizer, epochs, mode), amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    rows, best_epoch, best_value, start, train_time, train_images = [], 0, None, time.perf_counter(), 0.0, 0
    with tempfile.TemporaryDirectory(prefix="best_") as scratch:  # the default checkpoint goes with it
        path = Path(scratch) / "best.pt" if checkpoint_path is None else Path(checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for epoch in range(1, epochs + 1):
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train = train_one_epoch(model, train_loader, criterion, optimizer, scaler=scaler, dtype=dtype,
                                    grad_clip=grad_clip, progress=progress)
            seconds = time.perf_counter() - t0
            train_time, train_images = train_time + seconds, train_images + train["images"]
            val = (dict.fromkeys(["loss", "accuracy", "balanced_accuracy", "auc"], math.nan) if val_loader is None
                   else evaluate_loss(model, val_loader, criterion, dtype=dtype, progress=progress))
            row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                   **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "seconds": time.perf_counter() - t0,
                   "images_per_second": train["images"] / max(seconds, 1e-9)}
            if improved := _is_better(row[monitor], best_value, mode):
                best_epoch, best_value = epoch, row[monitor]
                torch.save({"model_state_dict": model.state_dict(), "epoch": epoch, "monitor": monitor,
                            "value": best_value}, path)
            rows.append(row)
            print(_epoch_line(row, epochs, improved), flush=True)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if not math.isnan(row[monitor]):
                    scheduler.step(row[monitor])
            elif scheduler is not None:
                scheduler.step()
        if best_epoch:
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model_state_dict"])
            print(f"Restored best epoch {best_epoch} ({monitor} = {best_value:.4f}).", flush=True)
    return FitResult(pd.DataFrame(rows, columns=HISTORY_COLUMNS), best_epoch, best_value, monitor,
                     time.perf_counter() - start, train_images / max(train_time, 1e-9))


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Loader, device: str | torch.device | None = None, *,
                     amp: bool = True, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 CPU, labels (N,)) of a frozen backbone: every image once, in order, unaugmented."""
    check_normalization(backbone, loader)
    device = torch.device(device) if device is not None else model_device(backbone)
    backbone.to(device).eval()
    features, labels, dtype = [], [], amp_dtype(device, amp)
    if isinstance(loader, TensorLoader):  # every image once, in order, unaugmented
        loader = loader.ordered()
    elif isinstance(loader, DataLoader):  # its own generator leaves the global random state alone
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn,
                            generator=torch.Generator())
    for x, y in progress_bar(loader, "features", progress):
        with autocast(device, dtype):
            features.append(backbone(x.to(device)).float().flatten(1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(features), torch.cat(labels).long()


def feature_loader_like(loader: Loader, features: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    """A DataLoader over cached features batched and shuffled (or weighted) like `loader` (else 64, in order)."""
    dataset = TensorDataset(features, labels)
    weights = getattr(loader, "sample_weights", None)
    if isinstance(getattr(loader, "sampler", None), WeightedRandomSampler):
        weights = loader.sampler.weights
    sampler = None if weights is None else WeightedRandomSampler(weights, len(dataset), replacement=True)
    shuffle = sampler is None and (getattr(loader, "shuffle", False) is True
                                   or isinstance(getattr(loader, "sampler", None), RandomSampler))
    return DataLoader(dataset, batch_size=getattr(loader, "batch_size", None) or 64, sampler=sampler,
                      shuffle=shuffle, drop_last=bool(getattr(loader, "drop_last", False)))


def _dataset_augments(loader: Loader, draws: int = 8) -> bool:
    """Does a DataLoader's dataset give its first image differently in `draws` reads? (Random states restored.)"""
    dataset = loader.dataset if isinstance(loader, DataLoader) else None
    if isinstance(dataset, (TensorDataset, IterableDataset)) or not hasattr(dataset, "__len__") or not len(dataset):
        return False
    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            views = [torch.as_tensor(dataset[0][0]) for _ in range(draws)]
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
    return any(v.shape != views[0].shape or not torch.equal(v, views[0]) for v in views[1:])


def fit_head_only(model: nn.Module, train_loader: Loader, val_loader: Loader | None, *, epochs: int,
                  criterion: Criterion, use_feature_cache: bool = True, **fit_kwargs: Any) -> FitResult:
    """Train only the head (`models.freeze_backbone`); `fit_kwargs` go to `fit`. With `use_feature_cache` the
    backbone runs once (`extract_features`) and the head trains on the features (augmenting loaders refused)."""
    freeze_backbone(model)
    check_normalization(model, train_loader)
    estimate_frozen_batchnorm(model, train_loader)  # only frozen BatchNorm without statistics
    if not use_feature_cache:
        return fit(model, train_loader, val_loader, epochs=epochs, criterion=criterion, **fit_kwargs)
    if (isinstance(train_loader, TensorLoader) and train_loader.augments) or _dataset_augments(train_loader):
        raise ValueError("The training loader augments images (the same image comes back different on each read); "
                         "cached features would freeze one random view. Use a loader without augmentation "
                         "(make_loaders(augment='none'), or a transform without random steps) or "
                         "fit_head_only(..., use_feature_cache=False).")
    amp, progress = fit_kwargs.get("amp", True), fit_kwargs.get("progress", True)
    backbone, head = backbone_and_head(model)
    t0 = time.perf_counter()
    train_data, val_data = (None if loader is None else feature_loader_like(
        loader, *extract_features(backbone, loader, amp=amp, progress=progress)) for loader in (train_loader, val_loader))
    feature_seconds = time.perf_counter() - t0
    print(f"Feature cache: {len(train_data.dataset)} train images in {feature_seconds:.1f}s", flush=True)
    result = fit(head, train_data, val_data, epochs=epochs, criterion=criterion, **fit_kwargs)
    return replace(result, feature_seconds=feature_seconds, train_seconds=result.train_seconds + feature_seconds)
