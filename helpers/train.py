"""Training loops: ``fit``, two-stage fine-tuning and a fast head-only path with cached features.

A "loader" is anything you can iterate to get ``(x, y)`` batches: a torch ``DataLoader``
or the course's ``helpers.data.TensorLoader``. ``x`` is a float image batch, ``y`` int64
class indices.

What ``fit`` does each epoch:

1. a training pass (mixed precision and channels_last on CUDA, optional gradient clipping);
   frozen sub-modules stay in eval mode (see ``helpers.models.train_mode``);
2. a validation pass: loss, accuracy, balanced accuracy, AUC;
3. learning-rate schedule, best-checkpoint saving (by ``monitor``) and early stopping.

At the end the best checkpoint is loaded back into the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler
from tqdm.auto import tqdm

from helpers.models import backbone_and_head, estimate_frozen_batchnorm, set_trainable, train_mode

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

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- basics


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA). ``deterministic`` also fixes cuDNN algorithms."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (e.g. ``"cpu"`` or ``"cuda:0"``) is used when available; otherwise a warning
    is shown and the automatic choice is returned.
    """
    if prefer is not None:
        device = torch.device(prefer)
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available(),
        }.get(device.type, False)
        if available:
            return device
        warnings.warn(f"Device {prefer!r} is not available here; choosing automatically.", stacklevel=2)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, C), float32.

    One logit per image (shape (N,) or (N, 1)) is a binary model: probs = [1 - p, p] with
    p = sigmoid(logit). Otherwise softmax over the classes.
    """
    logits = logits.detach().float()
    if logits.ndim == 1 or logits.shape[1] == 1:
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


class BCEWithIndexTargets(nn.Module):
    """``BCEWithLogitsLoss`` for a 1-logit binary model that takes int64 class indices.

    Targets are turned into floats of the logits' shape; ``label_smoothing`` moves them
    towards 0.5 (0 -> eps/2, 1 -> 1 - eps/2).
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 2 and logits.shape[1] != 1:
            raise ValueError(
                f"BCE expects one logit per image, got logits of shape {tuple(logits.shape)}. "
                "Use make_criterion('ce') for a model with one output per class."
            )
        target = y.to(logits.dtype).reshape(logits.shape)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return self.loss(logits, target)


def make_criterion(
    kind: str = "ce",
    *,
    class_weights: torch.Tensor | None = None,
    pos_weight: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """A loss ``(logits, y_int64) -> scalar``.

    - ``"ce"``: cross-entropy on C logits; ``class_weights`` (C,) weights the classes.
    - ``"bce"``: binary cross-entropy on 1 logit; ``pos_weight`` (e.g. n_neg / n_pos)
      up-weights the positive class (index 1).
    """
    if kind == "ce":
        if pos_weight is not None:
            raise ValueError("pos_weight is for kind='bce'; with 'ce' use class_weights.")
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if kind == "bce":
        if class_weights is not None:
            raise ValueError("class_weights is for kind='ce'; with 'bce' use pos_weight (n_neg / n_pos).")
        pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32).reshape(1)
        return BCEWithIndexTargets(pos_weight=pw, label_smoothing=label_smoothing)
    raise ValueError(f"Unknown criterion kind {kind!r}. Known: ce, bce")


# --------------------------------------------------------------------------- metrics


def _auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC, or macro one-vs-rest AUC; NaN when a class is missing from ``y``."""
    n_classes = probs.shape[1]
    if len(np.unique(y)) < n_classes or not np.isfinite(probs).all():
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y, pred))


# --------------------------------------------------------------------------- one pass


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on GPUs that support it natively, else fp16; None (no autocast) off CUDA."""
    if not amp or device.type != "cuda":
        return None
    try:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        native_bf16 = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float16


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision context on CUDA, a no-op elsewhere."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _show_bars(progress: bool) -> bool:
    """Progress bars in notebooks and terminals; none in CI logs (not a tty)."""
    if not progress:
        return False
    in_notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto chose the widget
    return in_notebook or sys.stderr.isatty()


def _batches(loader: Loader, desc: str, show: bool) -> Iterable:
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, desc=desc, total=total, leave=False, disable=not show, dynamic_ncols=True)


def _train_one_epoch(
    model: nn.Module,
    loader: Loader,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
    desc: str,
    show: bool,
) -> dict[str, float]:
    train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, correct, n_images = 0.0, 0, 0
    bar = _batches(loader, desc, show)
    for x, y in bar:
        x, y = _to_device(x, y, device)
        with _autocast(device, amp_dtype):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()

        n = y.shape[0]
        n_images += n
        loss_sum += loss.item() * n
        correct += (logits_to_probs(logits).argmax(1) == y).sum().item()
        if show:
            bar.set_postfix(loss=f"{loss_sum / n_images:.4f}")
    if n_images == 0:
        raise ValueError("The training loader produced no batches.")
    if not math.isfinite(loss_sum):
        warnings.warn(
            "The training loss is not finite (inf/NaN). Typical causes: a learning rate that is too high, "
            "or a frozen randomly initialised backbone (no ImageNet weights) whose BatchNorm statistics "
            "let activations explode, overflowing float16 on GPUs without bfloat16.",
            RuntimeWarning,
            stacklevel=3,
        )
    return {"train_loss": loss_sum / n_images, "train_accuracy": correct / n_images, "n_images": n_images}


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: Loader,
    criterion: Criterion,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    desc: str,
    show: bool,
) -> dict[str, float]:
    model.eval()
    loss_sum, n_images, all_probs, all_y = 0.0, 0, [], []
    for x, y in _batches(loader, desc, show):
        x, y = _to_device(x, y, device)
        with _autocast(device, amp_dtype):
            logits = model(x)
            loss = criterion(logits, y)
        loss_sum += loss.item() * y.shape[0]
        n_images += y.shape[0]
        all_probs.append(logits_to_probs(logits).cpu())
        all_y.append(y.cpu())
    if n_images == 0:
        raise ValueError("The validation loader produced no batches.")
    probs = torch.cat(all_probs).numpy()
    y_true = torch.cat(all_y).numpy()
    pred = probs.argmax(1)
    return {
        "val_loss": loss_sum / n_images,
        "val_accuracy": float((pred == y_true).mean()),
        "val_balanced_accuracy": _balanced_accuracy(y_true, pred),
        "val_auc": _auc(y_true, probs),
    }


# --------------------------------------------------------------------------- fit


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


def fit(
    model: nn.Module,
    train_loader: Loader,
    val_loader: Loader | None,
    *,
    epochs: int,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    scheduler: str | Any | None = None,
    monitor: str = "val_loss",
    early_stopping: int | None = None,
    grad_clip: float | None = None,
    amp: bool = True,
    checkpoint_path: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stage: Any = None,
) -> pd.DataFrame:
    """Train ``model`` for up to ``epochs`` epochs and return the history (one row per epoch).

    - ``optimizer``: default AdamW(lr, weight_decay) over the trainable parameters.
    - ``scheduler``: None, ``"plateau"`` (ReduceLROnPlateau on ``monitor``, factor 0.2,
      patience 2) or ``"cosine"`` (cosine annealing over ``epochs``).
    - ``monitor``: validation metric that picks the best epoch: ``"val_loss"`` (lower is
      better), ``"val_auc"``, ``"val_balanced_accuracy"``, ``"val_accuracy"``.
    - ``early_stopping``: stop after this many epochs without improvement of ``monitor``.
    - ``checkpoint_path``: where the best state is saved (a dict with ``model_state_dict``,
      ``epoch``, ``monitor``, ``value``); a temporary file when None. The best state is
      loaded back into ``model`` at the end.
    - ``amp``: mixed precision on CUDA (bf16 where supported natively, else fp16 with a
      GradScaler); ignored on CPU/MPS.

    ``history.attrs``: ``best_epoch``, ``best_value``, ``monitor``, ``train_seconds``.
    Columns: ``HISTORY_COLUMNS``; ``seconds`` is the whole epoch (train + validation),
    ``images_per_second`` the training pass only.
    """
    if monitor not in MONITORS:
        raise ValueError(f"Unknown monitor {monitor!r}. Known: {', '.join(MONITORS)}")
    if val_loader is None and monitor != "train_loss":
        monitor = "train_loss"
    mode = MONITORS[monitor]
    device = pick_device(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    estimate_frozen_batchnorm(model, train_loader, device)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: check the freezing policy (helpers.models.set_trainable).")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _make_scheduler(scheduler, optimizer, epochs, mode)
    amp_dtype = _amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    show = _show_bars(progress)

    temporary = checkpoint_path is None
    if temporary:
        handle, name = tempfile.mkstemp(suffix=".pt", prefix="best_")
        os.close(handle)
        checkpoint_path = Path(name)
    checkpoint_path = Path(checkpoint_path)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    best_value: float | None = None
    best_epoch, stale = 0, 0
    start = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            current_lr = optimizer.param_groups[0]["lr"]
            prefix = f"{stage} " if stage is not None else ""
            train = _train_one_epoch(
                model, train_loader, criterion, optimizer, device, amp_dtype, scaler, grad_clip,
                f"{prefix}epoch {epoch}/{epochs} train", show,
            )
            train_seconds = time.perf_counter() - t0
            if val_loader is not None:
                val = _evaluate(model, val_loader, criterion, device, amp_dtype, f"{prefix}epoch {epoch} val", show)
            else:
                val = dict.fromkeys(["val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc"], float("nan"))
            seconds = time.perf_counter() - t0
            row = {
                "epoch": epoch, "stage": stage,
                "train_loss": train["train_loss"], "train_accuracy": train["train_accuracy"], **val,
                "lr": current_lr, "seconds": seconds,
                "images_per_second": train["n_images"] / max(train_seconds, 1e-9),
            }
            rows.append(row)

            value = row[monitor]
            improved = _is_better(value, best_value, mode)
            if improved:
                best_value, best_epoch, stale = value, epoch, 0
                torch.save(
                    {"model_state_dict": model.state_dict(), "epoch": epoch, "monitor": monitor, "value": value},
                    checkpoint_path,
                )
            else:
                stale += 1
            print(_epoch_line(row, epochs, improved), flush=True)

            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if not math.isnan(value):
                    sched.step(value)
            elif sched is not None:
                sched.step()
            if early_stopping is not None and stale >= early_stopping:
                print(f"Early stopping: no improvement of {monitor} for {stale} epochs.", flush=True)
                break

        if rows:
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model_state_dict"])
            print(f"Restored best epoch {best_epoch} ({monitor} = {best_value:.4f}).", flush=True)
    finally:
        if temporary:
            checkpoint_path.unlink(missing_ok=True)

    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    history.attrs.update(
        best_epoch=best_epoch,
        best_value=best_value,
        monitor=monitor,
        train_seconds=time.perf_counter() - start,
    )
    if not temporary:
        history.attrs["checkpoint_path"] = str(checkpoint_path)
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

    Each stage runs :func:`fit` with its own optimizer and best-checkpoint; other keyword
    arguments (criterion, scheduler, monitor, ...) go to both. If stage 2 never beats the
    best stage-1 value of ``monitor``, the stage-1 weights are restored. The history has
    ``stage`` 1 or 2 and continuous ``epoch`` numbers; ``attrs["best_stage"]`` says which won.
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


# --------------------------------------------------------------------------- embedding cache


def _ordered_loader(loader: Loader) -> Loader:
    """The same data as ``loader``, every image once, in a fixed order, without touching random state.

    Works for a torch DataLoader and for loaders with ``shuffle`` / ``sample_weights`` /
    ``drop_last`` attributes (like ``helpers.data.TensorLoader``); other iterables are used as they are.
    """
    if isinstance(loader, DataLoader):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, generator=torch.Generator(),
        )
    ordered = copy.copy(loader)
    for attr, value in (("shuffle", False), ("sample_weights", None), ("drop_last", False)):
        if hasattr(ordered, attr):
            setattr(ordered, attr, value)
    return ordered


def _augments(loader: Loader) -> bool:
    """Does the loader apply random augmentation? (``augment`` attribute: a name or a preset object.)"""
    augment = getattr(loader, "augment", None)
    if isinstance(augment, str):
        return augment != "none"
    if augment is None or augment is False:
        return False
    preset = getattr(type(augment), "preset", None)  # helpers.data's BatchAugment.preset("none")
    if callable(preset) and augment == preset("none"):
        return bool(len(getattr(loader, "strong_classes", ())))
    return True


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Loader,
    device: str | torch.device | None = None,
    *,
    amp: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a (frozen) backbone once over ``loader``: (features (N, D) float32 CPU, labels (N,) int64).

    The backbone runs in eval mode (BatchNorm uses its running statistics). The loader is
    read once in order, every image once (shuffling and weighted sampling are switched off
    for a torch DataLoader or a loader with ``shuffle``/``sample_weights`` attributes).
    Do not use loaders with random augmentation: the cache would freeze one random view.
    """
    device = pick_device(device)
    backbone.to(device).eval()
    amp_dtype = _amp_dtype(device, amp)
    feats, labels = [], []
    for x, y in _batches(_ordered_loader(loader), "features", _show_bars(progress)):
        x, y = _to_device(x, y, device)
        with _autocast(device, amp_dtype):
            f = backbone(x)
        feats.append(f.float().flatten(1).cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels).long()


def _feature_loader_like(loader: Loader, features: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    """A DataLoader over cached features that mimics ``loader`` (batch size, shuffling/sampler).

    For a torch DataLoader with a ``generator`` the batch order is identical to the original's.
    """
    dataset = TensorDataset(features, labels)
    if not isinstance(loader, DataLoader):
        weights = getattr(loader, "sample_weights", None)
        sampler = None if weights is None else WeightedRandomSampler(weights, len(dataset), replacement=True)
        return DataLoader(
            dataset, batch_size=getattr(loader, "batch_size", None) or 64, sampler=sampler,
            shuffle=sampler is None and bool(getattr(loader, "shuffle", True)),
            drop_last=bool(getattr(loader, "drop_last", False)),
        )
    generator = None
    if loader.generator is not None:  # same random state -> same batch order as the slow path
        generator = torch.Generator()
        generator.set_state(loader.generator.get_state())
    sampler = loader.sampler
    if isinstance(sampler, WeightedRandomSampler):
        sampler = WeightedRandomSampler(sampler.weights, sampler.num_samples, sampler.replacement, generator=generator)
    elif isinstance(sampler, RandomSampler):
        sampler = RandomSampler(dataset, sampler.replacement, sampler._num_samples, generator=generator)
    else:
        sampler = None
    return DataLoader(
        dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, generator=generator
    )


def fit_head_on_features(
    head: nn.Module,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    *,
    epochs: int,
    criterion: Criterion,
    batch_size: int = 64,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Train a head on cached backbone features with :func:`fit` (same history columns)."""
    train = DataLoader(
        TensorDataset(train_features, train_labels), batch_size=batch_size, shuffle=shuffle, generator=generator
    )
    val = None
    if val_features is not None:
        val = DataLoader(TensorDataset(val_features, val_labels), batch_size=batch_size, shuffle=False)
    return fit(head, train, val, epochs=epochs, criterion=criterion, **fit_kwargs)


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
    """Train only the head of ``model`` (backbone frozen, in eval mode).

    ``use_feature_cache=True``: run the backbone once over the train and val data
    (:func:`extract_features`) and train the head on the stored features: every epoch
    then costs almost nothing. It gives the same head as the slow path (a full forward
    pass per batch) as long as the loader has no random augmentation; a loader whose
    ``augment`` is not "none" is refused. With a torch DataLoader that has a ``generator``
    even the batch order is the same as on the slow path (tested); other loaders get
    the same batch size and shuffling/weighted sampling, with their own random order. ``use_feature_cache=False`` is plain :func:`fit`.
    ``history.attrs["feature_seconds"]`` is the one-off feature pass, included in
    ``attrs["train_seconds"]``.
    """
    set_trainable(model, "head")
    if not use_feature_cache:
        return fit(model, train_loader, val_loader, epochs=epochs, criterion=criterion, **fit_kwargs)
    if _augments(train_loader):
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

    train_data = _feature_loader_like(train_loader, train_f, train_y)
    history = fit(head, train_data, val_data, epochs=epochs, criterion=criterion, **fit_kwargs)
    history.attrs["feature_seconds"] = feature_seconds
    history.attrs["train_seconds"] += feature_seconds
    return history


__all__: list[str] = [
    "HISTORY_COLUMNS",
    "seed_everything",
    "pick_device",
    "logits_to_probs",
    "make_criterion",
    "BCEWithIndexTargets",
    "fit",
    "fit_two_stage",
    "extract_features",
    "fit_head_on_features",
    "fit_head_only",
]
