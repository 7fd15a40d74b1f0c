"""The small pieces every other module needs: conversions, the one-logit convention, devices, mixed precision,
seeding, progress bars, input normalisation. Imports nothing from the rest of the course.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def to_numpy(values: Any) -> np.ndarray:
    """A tensor (any device, with or without grad), list or array as a NumPy array."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def as_label_tensor(labels: Any) -> torch.Tensor:
    """Class labels (list, NumPy array, pandas Series or tensor) as a new int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().to("cpu", torch.long).clone()
    return torch.tensor(np.asarray(labels, dtype=np.int64).reshape(-1))


def is_one_logit(logits: Any) -> bool:
    """Is `logits` (N,) or (N, 1): a one-logit binary model, P(class 1) = sigmoid(z)? Else (N, C), softmax."""
    return len(logits.shape) == 1 or logits.shape[1] == 1


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, C), float32: [1 - p, p] with p = sigmoid(z) for one logit, else softmax."""
    logits = torch.as_tensor(logits).detach().float()
    if is_one_logit(logits):
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def predict_labels(probs: Any, threshold: float | None = None) -> np.ndarray:
    """Predicted class (int64) per row of probs (N, C): P(class 1) >= `threshold` if given (binary), else argmax."""
    p = to_numpy(probs)
    if p.ndim == 2 and p.shape[1] == 2 and threshold is not None:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """`prefer` (e.g. "cpu", "cuda:0") when available, else (with a warning if asked) CUDA, MPS or CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if prefer is not None:
        if available.get(torch.device(prefer).type):
            return torch.device(prefer)
        warnings.warn(f"Device {prefer!r} is not available here; choosing automatically.", stacklevel=2)
    return torch.device(next(kind for kind, ok in available.items() if ok))  # the first of CUDA, MPS, CPU


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on GPUs that support it natively, else fp16; None (no autocast) off CUDA."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision context on CUDA (`dtype` from `amp_dtype`), a no-op elsewhere."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def progress_bar(loader: Iterable, desc: str, enabled: bool = True) -> Iterable:
    """`loader` wrapped in a text progress bar, shown only in a terminal (tqdm's `disable=None`)."""
    return tqdm(loader, desc=desc, leave=False, disable=None if enabled else True, dynamic_ncols=True)


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def as_normalization(spec: Any = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) tuples from a model (`input_mean`/`input_std`), a loader, a (mean, std) pair or None (ImageNet's)."""
    if spec is None or (isinstance(spec, nn.Module) and not hasattr(spec, "input_mean")):
        return IMAGENET_MEAN, IMAGENET_STD
    if hasattr(spec, "input_mean"):
        return tuple(map(float, spec.input_mean)), tuple(map(float, spec.input_std))
    if hasattr(spec, "normalization") and not isinstance(spec, (tuple, list)):
        return as_normalization(spec.normalization)
    mean, std = spec
    return tuple(map(float, mean)), tuple(map(float, std))


def check_normalization(model: nn.Module, loader: Any) -> None:
    """Refuse a loader that says how it normalises (a `TensorLoader`) unlike what the model's weights need."""
    given = getattr(loader, "normalization", None)
    if given is None or not hasattr(model, "input_mean"):
        return
    wanted, given = as_normalization(model), as_normalization(given)
    if any(abs(a - b) > 1e-6 for a, b in zip(wanted[0] + wanted[1], given[0] + given[1])):
        source = (getattr(model, "weights_info", None) or {}).get("source")
        raise ValueError(f"The loader normalises images with mean {given[0]}, std {given[1]}, but this model's weights"
                         f"{f' ({source})' if source else ''} need mean {wanted[0]}, std {wanted[1]}. Make the loaders "
                         "with the model's normalisation: loading.make_loaders(..., normalization=model) (or "
                         "TensorLoader(..., normalization=model)), after building the model.")
