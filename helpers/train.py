"""Training loops: `fit`, two-stage fine-tuning, and head-only training on cached features.

A "loader" is anything you can iterate to get `(x, y)` batches: a torch `DataLoader` or the
course's `helpers.loading.TensorLoader`. `x` is a float image batch, `y` int64 class indices.

`fit` is an epoch loop over two steps:

1. `train_epoch`: one `train_step` per batch (mixed precision and channels_last on CUDA,
   optional gradient clipping); frozen sub-modules stay in eval mode (`helpers.models.train_mode`);
2. `eval_epoch`: loss, accuracy, balanced accuracy and AUC on the validation split
   (`helpers.evaluate.epoch_metrics`);

then the learning-rate schedule, the best-on-validation checkpoint and early stopping. At the end
the best checkpoint is loaded back into the model.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.core import (
    amp_dtype,
    autocast,
    logits_to_probs,
    pick_device,
    progress_bar,
    to_device,
)
from helpers.evaluate import epoch_metrics
from helpers.feature_cache import augments, extract_features, feature_loader_like
from helpers.models import (
    backbone_and_head,
    estimate_frozen_batchnorm,
    set_trainable,
    train_mode,
)

HISTORY_COLUMNS: list[str] = [
    "epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
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


def _prepare(model: nn.Module, train_loader: Loader, criterion: Criterion, device: torch.device) -> list[nn.Parameter]:
    """Move model and loss to `device`, estimate placeholder BatchNorm statistics; the trainable parameters."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    estimate_frozen_batchnorm(model, train_loader, device)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: check the freezing policy (helpers.models.set_trainable).")
    return params


@dataclass
class _Checkpoint:
    """The best-on-validation state, saved to `path` (a temporary file unless one is given)."""

    path: Path
    temporary: bool
    monitor: str
    best_value: float | None = None
    best_epoch: int = 0
    stale: int = 0  # epochs since the last improvement

    @classmethod
    def open(cls, path: str | Path | None, monitor: str) -> "_Checkpoint":
        if path is None:
            handle, name = tempfile.mkstemp(suffix=".pt", prefix="best_")
            os.close(handle)
            return cls(Path(name), True, monitor)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(Path(path), False, monitor)

    def update(self, model: nn.Module, epoch: int, value: float) -> bool:
        """Save the model when `value` beats the best so far; whether it did."""
        if not _is_better(value, self.best_value, MONITORS[self.monitor]):
            self.stale += 1
            return False
        self.best_value, self.best_epoch, self.stale = value, epoch, 0
        torch.save({"model_state_dict": model.state_dict(), "epoch": epoch, "monitor": self.monitor,
                    "value": value}, self.path)
        return True

    def restore(self, model: nn.Module, device: torch.device) -> None:
        state = torch.load(self.path, map_location=device, weights_only=True)
        model.load_state_dict(state["model_state_dict"])
        print(f"Restored best epoch {self.best_epoch} ({self.monitor} = {self.best_value:.4f}).", flush=True)

    def close(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


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
    stage = f"[{row['stage']}] " if row["stage"] is not None else ""
    val = (
        f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} "
        f"bacc {row['val_balanced_accuracy']:.3f} auc {row['val_auc']:.3f}"
        if not math.isnan(row["val_loss"]) else ""
    )
    return (
        f"{stage}epoch {row['epoch']}/{epochs} | train loss {row['train_loss']:.4f} "
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


def _history(rows: list[dict[str, Any]], best: _Checkpoint, seconds: float) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    history.attrs.update(best_epoch=best.best_epoch, best_value=best.best_value, monitor=best.monitor,
                         train_seconds=seconds)
    if not best.temporary:
        history.attrs["checkpoint_path"] = str(best.path)
    return history


# --------------------------------------------------------------------------- fit


def fit(model: nn.Module, train_loader: Loader, val_loader: Loader | None, *, epochs: int,
        criterion: Criterion, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        weight_decay: float = 0.0, scheduler: str | Any | None = None, monitor: str = "val_loss",
        early_stopping: int | None = None, grad_clip: float | None = None, amp: bool = True,
        checkpoint_path: str | Path | None = None, device: str | torch.device | None = None,
        progress: bool = True, stage: Any = None) -> pd.DataFrame:
    """Train `model` for up to `epochs` epochs and return the history (one row per epoch).

    - `optimizer`: default AdamW(lr, weight_decay) over the trainable parameters.
    - `scheduler`: None, `"plateau"` (ReduceLROnPlateau on `monitor`, factor 0.2,
      patience 2) or `"cosine"` (cosine annealing over `epochs`).
    - `monitor`: validation metric that picks the best epoch: `"val_loss"` (lower is
      better), `"val_auc"`, `"val_balanced_accuracy"`, `"val_accuracy"`.
    - `early_stopping`: stop after this many epochs without improvement of `monitor`.
    - `checkpoint_path`: where the best state is saved (a dict with `model_state_dict`,
      `epoch`, `monitor`, `value`); a temporary file when None. The best state is
      loaded back into `model` at the end.
    - `amp`: mixed precision on CUDA (bf16 where supported natively, else fp16 with a
      GradScaler); ignored on CPU/MPS.

    `history.attrs`: `best_epoch`, `best_value`, `monitor`, `train_seconds`.
    Columns: `HISTORY_COLUMNS`; `seconds` is the whole epoch (train + validation),
    `images_per_second` the training pass only.
    """
    monitor = _check_monitor(monitor, val_loader)
    device = pick_device(device)
    params = _prepare(model, train_loader, criterion, device)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _make_scheduler(scheduler, optimizer, epochs, MONITORS[monitor])
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    best, rows, start = _Checkpoint.open(checkpoint_path, monitor), [], time.perf_counter()
    prefix = f"{stage} " if stage is not None else ""
    try:
        for epoch in range(1, epochs + 1):
            t0, current_lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train = train_epoch(model, train_loader, criterion, optimizer, scaler, device, dtype, grad_clip,
                                f"{prefix}epoch {epoch}/{epochs} train", progress)
            train_seconds = time.perf_counter() - t0
            val = (_NO_VALIDATION if val_loader is None else
                   eval_epoch(model, val_loader, criterion, device, dtype, f"{prefix}epoch {epoch} val", progress))
            rows.append({"epoch": epoch, "stage": stage, "train_loss": train["train_loss"],
                         "train_accuracy": train["train_accuracy"], **val, "lr": current_lr,
                         "seconds": time.perf_counter() - t0,
                         "images_per_second": train["n_images"] / max(train_seconds, 1e-9)})
            improved = best.update(model, epoch, rows[-1][monitor])
            print(_epoch_line(rows[-1], epochs, improved), flush=True)
            _step_scheduler(sched, rows[-1][monitor])
            if early_stopping is not None and best.stale >= early_stopping:
                print(f"Early stopping: no improvement of {monitor} for {best.stale} epochs.", flush=True)
                break
        if rows:
            best.restore(model, device)
    finally:
        best.close()
    return _history(rows, best, time.perf_counter() - start)


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

    Each stage runs :func:`fit` with its own optimizer and best-checkpoint; other keyword
    arguments (criterion, scheduler, monitor, ...) go to both. If stage 2 never beats the
    best stage-1 value of `monitor`, the stage-1 weights are restored. The history has
    `stage` 1 or 2 and continuous `epoch` numbers; `attrs["best_stage"]` says which won.
    """
    for key in ("optimizer", "epochs", "lr", "stage"):
        if key in fit_kwargs:
            raise TypeError(f"fit_two_stage sets {key!r} itself for each stage; do not pass it.")

    set_trainable(model, stage1_freeze)
    h1 = fit(model, train_loader, val_loader, epochs=stage1_epochs, lr=stage1_lr, stage=1, **fit_kwargs)
    stage1_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    set_trainable(model, stage2_freeze)
    h2 = fit(model, train_loader, val_loader, epochs=stage2_epochs, lr=stage2_lr, stage=2, **fit_kwargs)

    mode = MONITORS[h1.attrs["monitor"]]
    stage2_wins = len(h2) > 0 and _is_better(h2.attrs["best_value"], h1.attrs["best_value"], mode)
    best_stage = 2 if stage2_wins else 1
    if len(h1) and not stage2_wins:
        print("Stage 2 did not beat stage 1 on validation: restoring the stage-1 weights.", flush=True)
        model.load_state_dict(stage1_state)

    h2 = h2.assign(epoch=h2["epoch"] + len(h1))
    history = pd.concat([h1, h2], ignore_index=True)
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
    """Train only the head of `model` (backbone frozen, in eval mode).

    `use_feature_cache=True`: run the backbone once over the train and val data
    (:func:`extract_features`) and train the head on the stored features: every epoch
    then costs almost nothing. It gives the same head as the slow path (a full forward
    pass per batch) as long as the loader has no random augmentation; a loader whose
    `augment` is not "none" is refused. With a torch DataLoader that has a `generator`
    even the batch order is the same as on the slow path (tested); other loaders get
    the same batch size and shuffling/weighted sampling, with their own random order.
    `use_feature_cache=False` is plain :func:`fit`.
    `history.attrs["feature_seconds"]` is the one-off feature pass, included in
    `attrs["train_seconds"]`.
    """
    set_trainable(model, "head")
    if not use_feature_cache:
        return fit(model, train_loader, val_loader, epochs=epochs, criterion=criterion, **fit_kwargs)
    if augments(train_loader):
        raise ValueError(
            "The training loader augments images; cached features would freeze one random view. "
            "Use a loader with augment='none' or fit_head_only(..., use_feature_cache=False)."
        )

    device = pick_device(fit_kwargs.get("device"))
    amp, progress = fit_kwargs.get("amp", True), fit_kwargs.get("progress", True)
    backbone, head = backbone_and_head(model)
    estimate_frozen_batchnorm(model.to(device), train_loader, device)  # random init only
    t0 = time.perf_counter()
    train_f, train_y = extract_features(backbone, train_loader, device, amp=amp, progress=progress)
    val_data = None
    if val_loader is not None:
        val_f, val_y = extract_features(backbone, val_loader, device, amp=amp, progress=progress)
        val_data = DataLoader(TensorDataset(val_f, val_y), batch_size=getattr(val_loader, "batch_size", None) or 64)
    feature_seconds = time.perf_counter() - t0
    print(f"Feature cache: {len(train_f)} train images -> {tuple(train_f.shape)} in {feature_seconds:.1f}s", flush=True)

    train_data = feature_loader_like(train_loader, train_f, train_y)
    history = fit(head, train_data, val_data, epochs=epochs, criterion=criterion, **fit_kwargs)
    history.attrs["feature_seconds"] = feature_seconds
    history.attrs["train_seconds"] += feature_seconds
    return history
