"""Training loops: `fit`, two-stage fine-tuning, and head-only training on cached features.

A "loader" is anything you can iterate to get `(x, y)` batches: a torch `DataLoader` or the
course's `helpers.loading.TensorLoader`. `x` is a float image batch, `y` int64 class indices.

`fit` trains the model on the device it is on. Per epoch:

1. `train_epoch`: one `train_step` per batch (mixed precision and channels_last on CUDA,
   optional gradient clipping); frozen sub-modules stay in eval mode (`helpers.models.train_mode`);
2. `eval_epoch`: loss, accuracy, balanced accuracy and AUC on the validation split
   (`helpers.evaluate.epoch_metrics`);
3. checkpoint: when the monitored metric beats its best so far, the weights are saved;
4. the learning-rate schedule steps.

At the end the best checkpoint is loaded back into the model. `fit_two_stage` runs `fit` twice
(head, then all layers) and labels the stages; `fit_head_only` trains a head on cached backbone
features. A randomly initialised backbone whose frozen BatchNorm layers hold placeholder
statistics needs `helpers.models.estimate_frozen_batchnorm` before training: the two wrappers
call it, a notebook that calls `fit` on such a model calls it itself.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from torch import nn

from helpers.core import amp_dtype, autocast, check_normalization, logits_to_probs, model_device, progress_bar, to_device
from helpers.evaluate import epoch_metrics
from helpers.feature_cache import augments, extract_features, feature_loader_like
from helpers.models import backbone_and_head, estimate_frozen_batchnorm, set_trainable, train_mode
from helpers.offline_weights import batchnorm_is_folded

HISTORY_COLUMNS: list[str] = [
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "val_balanced_accuracy", "val_auc", "lr", "seconds", "images_per_second",
]
MONITORS: dict[str, str] = {  # metric -> "min" or "max"
    "val_loss": "min",
    "val_auc": "max",
    "val_balanced_accuracy": "max",
    "val_accuracy": "max",
    "train_loss": "min",
}
_NO_VALIDATION = dict.fromkeys(["val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc"], float("nan"))

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- one batch, one pass


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Criterion,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               dtype: torch.dtype | None, grad_clip: float | None) -> tuple[float, int]:
    """One optimisation step on one batch: (loss, number of correct predictions)."""
    with autocast(x.device, dtype):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), int((logits_to_probs(logits).argmax(1) == y).sum().item())


@torch.no_grad()
def eval_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Criterion,
              dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """Loss and class probabilities (N, C) of one batch, without gradients."""
    with autocast(x.device, dtype):
        logits = model(x)
        loss = criterion(logits, y)
    return loss.item(), logits_to_probs(logits)


def train_epoch(model: nn.Module, loader: Loader, criterion: Criterion, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device, dtype: torch.dtype | None,
                grad_clip: float | None, desc: str, progress: bool = True) -> dict[str, float]:
    """One pass over the training data: mean loss, accuracy and the number of images seen."""
    train_mode(model)
    loss_sum, correct, n_images = 0.0, 0, 0
    bar = progress_bar(loader, desc, progress)
    for x, y in bar:
        x, y = to_device(x, y, device)
        loss, right = train_step(model, x, y, criterion, optimizer, scaler, dtype, grad_clip)
        n_images += y.shape[0]
        loss_sum += loss * y.shape[0]
        correct += right
        if not bar.disable:
            bar.set_postfix(loss=f"{loss_sum / n_images:.4f}")
    if n_images == 0:
        raise ValueError("The training loader produced no batches.")
    if not math.isfinite(loss_sum):
        warnings.warn(
            "The training loss is not finite (inf/NaN). Typical causes: a learning rate that is too high, "
            "or a frozen randomly initialised backbone (no ImageNet weights) whose BatchNorm statistics "
            "let activations explode, overflowing float16 on GPUs without bfloat16.",
            RuntimeWarning, stacklevel=3)
    return {"train_loss": loss_sum / n_images, "train_accuracy": correct / n_images, "n_images": n_images}


def eval_epoch(model: nn.Module, loader: Loader, criterion: Criterion, device: torch.device,
               dtype: torch.dtype | None, desc: str, progress: bool = True) -> dict[str, float]:
    """One pass over the validation data (eval mode): val_loss, val_accuracy, val_balanced_accuracy, val_auc."""
    model.eval()
    loss_sum, n_images, probs, labels = 0.0, 0, [], []
    for x, y in progress_bar(loader, desc, progress):
        x, y = to_device(x, y, device)
        loss, p = eval_step(model, x, y, criterion, dtype)
        loss_sum += loss * y.shape[0]
        n_images += y.shape[0]
        probs.append(p.cpu())
        labels.append(y.cpu())
    if n_images == 0:
        raise ValueError("The validation loader produced no batches.")
    scores = epoch_metrics(torch.cat(labels), torch.cat(probs))
    return {"val_loss": loss_sum / n_images, **{f"val_{k}": v for k, v in scores.items()}}


# --------------------------------------------------------------------------- around the loop


def _check_monitor(monitor: str, val_loader: Loader | None) -> str:
    """The metric that picks the best epoch; without validation data only train_loss is left."""
    if monitor not in MONITORS:
        raise ValueError(f"Unknown monitor {monitor!r}. Known: {', '.join(MONITORS)}")
    return "train_loss" if val_loader is None else monitor


def _temporary_file() -> Path:
    """An empty temporary .pt file for the best checkpoint (deleted by `fit` at the end)."""
    handle, name = tempfile.mkstemp(suffix=".pt", prefix="best_")
    os.close(handle)
    return Path(name)


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


def _make_scheduler(
    scheduler: str | Any | None, optimizer: torch.optim.Optimizer, epochs: int, mode: str
) -> Any | None:
    if scheduler is None or not isinstance(scheduler, str):
        return scheduler  # None, or a scheduler object built by the caller (stepped once per epoch)
    if scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.2, patience=2, min_lr=1e-7)
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise ValueError(f"Unknown scheduler {scheduler!r}. Known: None, 'plateau', 'cosine'")


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    val = (
        f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} "
        f"bacc {row['val_balanced_accuracy']:.3f} auc {row['val_auc']:.3f}"
        if not math.isnan(row["val_loss"]) else ""
    )
    return (
        f"epoch {row['epoch']}/{epochs} | train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.3f}{val} | lr {row['lr']:.2e} | "
        f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s{' *' if improved else ''}"
    )


def _step_scheduler(scheduler: Any | None, value: float) -> None:
    """Plateau schedulers look at the monitored value (skipped when it is NaN); others just step."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if not math.isnan(value):
            scheduler.step(value)
    elif scheduler is not None:
        scheduler.step()


def _check_inputs(model: nn.Module, train_loader: Loader, val_loader: Loader | None) -> None:
    """The loaders normalise as the model's weights need; folded BatchNorm does not train."""
    for loader in (train_loader, val_loader):
        check_normalization(model, loader)
    if batchnorm_is_folded(model) and any(p.requires_grad for m in model.modules()
                                          if isinstance(m, nn.BatchNorm2d) for p in m.parameters()):
        raise ValueError("This model's converted weights still have their BatchNorm folded (no statistics): "
                         "training its BatchNorm layers would collapse. Call "
                         "models.estimate_frozen_batchnorm(model, loaders['train']) before train.fit.")


# --------------------------------------------------------------------------- fit


def fit(model: nn.Module, train_loader: Loader, val_loader: Loader | None, *, epochs: int,
        criterion: Criterion, optimizer: torch.optim.Optimizer, scheduler: str | Any | None = None,
        monitor: str = "val_loss", grad_clip: float | None = None, amp: bool = True,
        checkpoint_path: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Train `model` where it is (`model.to(device)` first) for `epochs` epochs; the history, one row per epoch.

    - `scheduler`: None, `"plateau"` (ReduceLROnPlateau on `monitor`, factor 0.2, patience 2),
      `"cosine"` (cosine annealing over `epochs`) or a scheduler object (stepped once per epoch).
    - `monitor`: the metric that picks the best epoch: `"val_loss"` (lower is better), `"val_auc"`,
      `"val_balanced_accuracy"`, `"val_accuracy"` (`"train_loss"` without validation data).
    - After every epoch that beats the best `monitor` so far, the weights are saved to
      `checkpoint_path` (a temporary file when None); the best ones are loaded back at the end.
    - `amp`: mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler).

    Columns: `HISTORY_COLUMNS` (`seconds`: the whole epoch; `images_per_second`: training only).
    `history.attrs`: `best_epoch`, `best_value`, `monitor`, `train_seconds`.
    """
    device, monitor = model_device(model), _check_monitor(monitor, val_loader)
    _check_inputs(model, train_loader, val_loader)
    mode = MONITORS[monitor]
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    scheduler = _make_scheduler(scheduler, optimizer, epochs, mode)
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    path = Path(checkpoint_path) if checkpoint_path is not None else _temporary_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, best_epoch, best_value, start = [], 0, None, time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train = train_epoch(model, train_loader, criterion, optimizer, scaler, device, dtype, grad_clip,
                                f"epoch {epoch}/{epochs} train", progress)
            train_seconds = time.perf_counter() - t0
            val = (_NO_VALIDATION if val_loader is None else
                   eval_epoch(model, val_loader, criterion, device, dtype, f"epoch {epoch} val", progress))
            row = {"epoch": epoch, "train_loss": train["train_loss"], "train_accuracy": train["train_accuracy"],
                   **val, "lr": lr, "seconds": time.perf_counter() - t0,
                   "images_per_second": train["n_images"] / max(train_seconds, 1e-9)}
            rows.append(row)
            improved = _is_better(row[monitor], best_value, mode)
            if improved:  # checkpoint: the best weights so far
                best_epoch, best_value = epoch, row[monitor]
                torch.save({"model_state_dict": model.state_dict(), "epoch": epoch, "monitor": monitor,
                            "value": best_value}, path)
            print(_epoch_line(row, epochs, improved), flush=True)
            _step_scheduler(scheduler, row[monitor])
        if best_epoch:  # back to the best checkpoint
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model_state_dict"])
            print(f"Restored best epoch {best_epoch} ({monitor} = {best_value:.4f}).", flush=True)
    finally:
        if checkpoint_path is None:
            path.unlink(missing_ok=True)
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    history.attrs.update(best_epoch=best_epoch, best_value=best_value, monitor=monitor,
                         train_seconds=time.perf_counter() - start)
    return history


# --------------------------------------------------------------------------- two stages


def fit_two_stage(
    model: nn.Module,
    train_loader: Loader,
    val_loader: Loader | None,
    *,
    stage1_epochs: int,
    stage2_epochs: int,
    stage1_lr: float = 1e-3,
    stage2_lr: float = 1e-5,
    stage1_freeze: str = "head",
    stage2_freeze: str = "none",
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Stage 1: train the head with the backbone frozen; stage 2: unfreeze and train at a lower lr.

    Each stage is one :func:`fit` with its own AdamW optimizer (over the parameters that stage
    trains) and its own best checkpoint; other keyword arguments (criterion, scheduler, monitor,
    ...) go to both. If stage 2 never beats the best stage-1 value of `monitor`, the stage-1
    weights are restored. The history has a `stage` column (1 or 2) and continuous `epoch`
    numbers; `attrs["best_stage"]` says which stage won.
    """
    for key in ("optimizer", "epochs"):
        if key in fit_kwargs:
            raise TypeError(f"fit_two_stage sets {key!r} itself for each stage; do not pass it.")
    histories = []
    for stage, epochs, lr, freeze in ((1, stage1_epochs, stage1_lr, stage1_freeze),
                                      (2, stage2_epochs, stage2_lr, stage2_freeze)):
        set_trainable(model, freeze)
        estimate_frozen_batchnorm(model, train_loader)  # only for frozen BatchNorm without ImageNet statistics
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        print(f"Stage {stage}: freeze {freeze!r}, lr {lr:g}, {epochs} epoch(s)", flush=True)
        history = fit(model, train_loader, val_loader, epochs=epochs, optimizer=optimizer, **fit_kwargs)
        histories.append(history.assign(stage=stage)[["epoch", "stage", *history.columns[1:]]])
        if stage == 1:
            stage1_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    h1, h2 = histories

    mode = MONITORS[h1.attrs["monitor"]]
    stage2_wins = len(h2) > 0 and _is_better(h2.attrs["best_value"], h1.attrs["best_value"], mode)
    best_stage = 2 if stage2_wins else 1
    if len(h1) and not stage2_wins:
        print("Stage 2 did not beat stage 1 on validation: restoring the stage-1 weights.", flush=True)
        model.load_state_dict(stage1_state)

    history = pd.concat([h1, h2.assign(epoch=h2["epoch"] + len(h1))], ignore_index=True)
    best = h1 if best_stage == 1 else h2
    history.attrs.update(
        best_stage=best_stage,
        best_epoch=int(best.attrs["best_epoch"]) + (len(h1) if best_stage == 2 else 0),
        best_value=best.attrs["best_value"],
        monitor=h1.attrs["monitor"],
        train_seconds=h1.attrs["train_seconds"] + h2.attrs["train_seconds"],
    )
    return history


# --------------------------------------------------------------------------- head only, cached features


def fit_head_only(
    model: nn.Module,
    train_loader: Loader,
    val_loader: Loader | None,
    *,
    epochs: int,
    criterion: Criterion,
    use_feature_cache: bool = True,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Train only the head of `model` (backbone frozen, in eval mode), where the model is.

    `use_feature_cache=True`: run the backbone once over the train and val data
    (:func:`extract_features`) and train the head on the stored features: every epoch
    then costs almost nothing. It gives the same head as the slow path (a full forward
    pass per batch) as long as the loader has no random augmentation; a loader that
    augments (`TensorLoader.augments`) is refused. With a torch DataLoader that has a
    `generator` even the batch order is the same as on the slow path (tested); a
    TensorLoader's features get the same batch size and shuffling/weighted sampling, with
    their own random order. `use_feature_cache=False` is plain :func:`fit`.
    `fit_kwargs` go to :func:`fit` (an `optimizer` over the head's parameters, ...).
    `history.attrs["feature_seconds"]` is the one-off feature pass, included in
    `attrs["train_seconds"]`.
    """
    set_trainable(model, "head")
    check_normalization(model, train_loader)
    estimate_frozen_batchnorm(model, train_loader)  # only for frozen BatchNorm without ImageNet statistics
    if not use_feature_cache:
        return fit(model, train_loader, val_loader, epochs=epochs, criterion=criterion, **fit_kwargs)
    if augments(train_loader):
        raise ValueError(
            "The training loader augments images; cached features would freeze one random view. "
            "Use a loader with augment='none' or fit_head_only(..., use_feature_cache=False)."
        )

    device = model_device(model)
    amp, progress = fit_kwargs.get("amp", True), fit_kwargs.get("progress", True)
    backbone, head = backbone_and_head(model)
    t0 = time.perf_counter()
    train_f, train_y = extract_features(backbone, train_loader, device, amp=amp, progress=progress)
    val_data = None
    if val_loader is not None:
        val_data = feature_loader_like(val_loader, *extract_features(backbone, val_loader, device, amp=amp,
                                                                     progress=progress))
    feature_seconds = time.perf_counter() - t0
    print(f"Feature cache: {len(train_f)} train images -> {tuple(train_f.shape)} in {feature_seconds:.1f}s", flush=True)

    train_data = feature_loader_like(train_loader, train_f, train_y)
    history = fit(head, train_data, val_data, epochs=epochs, criterion=criterion, **fit_kwargs)
    history.attrs["feature_seconds"] = feature_seconds
    history.attrs["train_seconds"] += feature_seconds
    return history
