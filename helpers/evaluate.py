"""Evaluation: predictions (with optional test-time augmentation), metrics with bootstrap
intervals, threshold choice, calibration, and the metrics.json file every notebook writes.

Honest evaluation in three rules:
1. choose checkpoints, thresholds, temperatures and strategies on the *validation* split;
2. apply them to the *test* split once, at the end;
3. report balanced accuracy, per-class recall, AUC and a 95% bootstrap interval, not accuracy alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.config import portable_data_dir
from helpers.train import logits_to_probs

# ----------------------------------------------------------------------------------------------
# Probabilities from logits
# ----------------------------------------------------------------------------------------------


def as_probs(probs: Any) -> np.ndarray:
    """Probabilities as a float64 (N, C) array; a 1-D array is read as P(positive) of a binary task."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    p = p.astype(np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C) (or (N,) for binary), got {p.shape}")
    return p


def _as_labels(y: Any) -> np.ndarray:
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return y.astype(np.int64).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Test-time augmentation (TTA): functions on normalised batches x of shape (N, 3, H, W)
# ----------------------------------------------------------------------------------------------


def identity(x: torch.Tensor) -> torch.Tensor:
    """No augmentation."""
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return torch.flip(x, dims=[-1])


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom (an upside-down chest X-ray: anatomically implausible)."""
    return torch.flip(x, dims=[-2])


def rot90(x: torch.Tensor) -> torch.Tensor:
    """Rotate by 90 degrees (anatomically implausible for X-rays)."""
    return torch.rot90(x, k=1, dims=[-2, -1])


def _affine(x: torch.Tensor, degrees: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Rotate by `degrees` and shift by `shift` = (dx, dy) as fractions of the width/height.

    Pixels that come in from outside the image repeat the border (no black corners).
    """
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid works in [-1, 1] coordinates, so a shift of 0.05 of the width is 0.1 there
    matrix = torch.tensor(
        [[cos, -sin, -2 * shift[0]], [sin, cos, -2 * shift[1]]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(matrix.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rotate(degrees: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TTA function that rotates by `degrees` (positive = counter-clockwise)."""

    def _rotate(x: torch.Tensor) -> torch.Tensor:
        return _affine(x, degrees=degrees)

    _rotate.__name__ = f"rotate({degrees:+g})"
    return _rotate


def shift(dx: float, dy: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TTA function that shifts by (dx, dy), fractions of the image width and height."""

    def _shift(x: torch.Tensor) -> torch.Tensor:
        return _affine(x, shift=(dx, dy))

    _shift.__name__ = f"shift({dx:+g},{dy:+g})"
    return _shift


#: The common "reference" TTA set. Flips and rot90 are cheap but produce images that never
#: occur in chest radiography (upside-down, sideways), so they may hurt as often as they help.
TTA_FLIPS: list[Callable[[torch.Tensor], torch.Tensor]] = [identity, hflip, vflip, rot90]

#: Anatomically plausible TTA: small rotations and shifts, like small differences in patient positioning.
TTA_PLAUSIBLE: list[Callable[[torch.Tensor], torch.Tensor]] = [
    identity,
    rotate(-7),
    rotate(7),
    shift(0.04, 0.0),
    shift(-0.04, 0.0),
    shift(0.0, 0.04),
]

#: Named TTA sets, e.g. for a comparison table: {"none": [...], "flips": [...], "plausible": [...]}.
TTA_SETS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [identity],
    "flips": TTA_FLIPS,
    "plausible": TTA_PLAUSIBLE,
}


def _resolve_tta(tta: None | str | Sequence[Callable]) -> list[Callable]:
    if tta is None:
        return [identity]
    if isinstance(tta, str):
        if tta not in TTA_SETS:
            raise ValueError(f"Unknown TTA set {tta!r}. Known: {', '.join(TTA_SETS)} (or a list of functions).")
        return list(TTA_SETS[tta])
    transforms = list(tta)
    if not transforms or not all(callable(t) for t in transforms):
        raise ValueError("tta must be None, 'flips', 'plausible' or a non-empty list of functions x -> x")
    return transforms


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def predict(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    tta: None | str | Sequence[Callable] = None,
    return_logits: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run `model` over `loader` (batches of (x, y)) and return (probs (N, C), labels (N,)).

    A 1-logit binary model gives probs = [1 - sigmoid, sigmoid]. With `tta` ("flips",
    "plausible" or a list of functions x -> x) the probabilities of all views are averaged.
    With `return_logits=True` the (view-averaged) raw logits come third, e.g. for `fit_temperature`.
    The model is put in eval mode (dropout off, BatchNorm running statistics).
    """
    device = torch.device(device) if device is not None else model_device(model)
    transforms = _resolve_tta(tta)
    model.eval()
    all_probs, all_labels, all_logits = [], [], []
    with torch.inference_mode():
        for batch in loader:
            x, y = batch[0], batch[1]
            x = x.to(device, non_blocking=True).float()
            probs_sum, logits_sum = None, None
            for transform in transforms:
                logits = model(transform(x)).float()
                probs = logits_to_probs(logits)
                probs_sum = probs if probs_sum is None else probs_sum + probs
                logits_sum = logits if logits_sum is None else logits_sum + logits
            all_probs.append((probs_sum / len(transforms)).cpu())
            all_logits.append((logits_sum / len(transforms)).cpu())
            all_labels.append(torch.as_tensor(y).reshape(-1).cpu())
    if not all_probs:
        raise ValueError("The loader yielded no batches: nothing to predict.")
    probs = torch.cat(all_probs).numpy().astype(np.float64)
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    if return_logits:
        logits = torch.cat(all_logits).numpy().astype(np.float64)
        return probs, labels, logits
    return probs, labels


def ensemble_probs(list_of_probs: Sequence[Any]) -> np.ndarray:
    """Average the (N, C) probabilities of several models (a simple ensemble)."""
    arrays = [as_probs(p) for p in list_of_probs]
    if not arrays:
        raise ValueError("ensemble_probs needs at least one probability array")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"All probability arrays must have the same shape, got {sorted(shapes)}")
    return np.mean(arrays, axis=0)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _rank_auc(y_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC along the last axis via average ranks (Mann-Whitney U); NaN where a class is missing.

    `y_pos` is boolean (positives), `scores` the same shape; works on (N,) and on (B, N) at once.
    """
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)
    n_pos = y_pos.sum(axis=-1)
    n_neg = y_pos.shape[-1] - n_pos
    rank_sum = np.where(y_pos, ranks, 0.0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _predict_labels(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _balanced_accuracy(y_true: np.ndarray, correct: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean recall over the classes present, along the last axis (works on (N,) and (B, N))."""
    recalls = []
    for c in range(n_classes):
        is_c = y_true == c
        support = is_c.sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recalls.append(np.where(support > 0, (is_c & correct).sum(axis=-1) / support, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def _macro_auc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Binary AUC of class 1, or macro one-vs-rest AUC over `classes` (works on (N,) and (B, N) labels)."""
    if probs.shape[-1] == 2:
        return _rank_auc(y_true == 1, probs[..., 1])
    return np.mean([_rank_auc(y_true == c, probs[..., c]) for c in classes], axis=0)


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error: how far confidence is from accuracy, on average.

    Predictions are grouped into `n_bins` equal-width bins of confidence (the top probability);
    ECE = sum over bins of (fraction of samples in bin) * |accuracy in bin - mean confidence in bin|.
    """
    y = _as_labels(y_true)
    p = as_probs(probs)
    confidence, accuracy, counts = reliability_bins(y, p, n_bins)
    keep = counts > 0
    return float(np.sum(counts[keep] / counts.sum() * np.abs(accuracy[keep] - confidence[keep])))


def reliability_bins(y_true: Any, probs: Any, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (mean confidence, accuracy, count); NaN for empty bins. Used by the plots."""
    y = _as_labels(y_true)
    p = as_probs(probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
    return mean_conf, accuracy, counts


def _percentile_interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, n_bootstrap: int, seed: int, auc_classes: list[int],
    names: Sequence[str],
) -> dict[str, Any]:
    """Percentile bootstrap 95% intervals, vectorised over resamples (in chunks to bound memory)."""
    n, n_classes = probs.shape
    rng = np.random.default_rng(seed)
    correct = y == y_pred
    acc, bal, auc = [], [], []
    recalls: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))
        y_b, correct_b = y[idx], correct[idx]
        acc.append(correct_b.mean(axis=1))
        bal.append(_balanced_accuracy(y_b, correct_b, n_classes))
        for c in range(n_classes):
            in_class = y_b == c
            counts = in_class.sum(axis=1)
            keep = counts > 0  # a resample without class c has no recall for it
            recalls[c].append((correct_b & in_class).sum(axis=1)[keep] / counts[keep])
        if auc_classes:
            # skip resamples that lost a class: their AUC is undefined
            present = np.stack([(y_b == c).any(axis=1) for c in range(n_classes)], axis=1)
            needed = [0, 1] if n_classes == 2 else auc_classes
            ok = present[:, needed].all(axis=1)
            if ok.any():
                auc.append(_macro_auc(y_b[ok], probs[idx[ok]], auc_classes))
    recall = {}
    for c, name in enumerate(names):
        values = np.concatenate(recalls[c])
        recall[name] = _percentile_interval(values) if len(values) else None
    ci = {
        "accuracy": _percentile_interval(np.concatenate(acc)),
        "balanced_accuracy": _percentile_interval(np.concatenate(bal)),
        "auc": _percentile_interval(np.concatenate(auc)) if auc else None,
    }
    if n_classes == 2:
        ci["sensitivity"], ci["specificity"] = recall[names[1]], recall[names[0]]
    ci["recall"] = recall
    return ci


def _none_if_nan(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def compute_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    *,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All the numbers of one evaluation, as the `val`/`test` block of metrics.json.

    Keys: accuracy, balanced_accuracy, auc (binary: ROC AUC of class 1; multi-class: macro
    one-vs-rest), average_precision, [binary: sensitivity, specificity, threshold], ece, n,
    per_class {name: precision, recall, f1, support}, confusion_matrix (rows = true class),
    ci95 {accuracy, balanced_accuracy, auc, [binary: sensitivity, specificity]: [lo, hi],
    recall: {name: [lo, hi]}} (percentile bootstrap, `n_bootstrap` resamples), and `notes`
    when something could not be computed (e.g. a class is absent).

    Binary predictions are `probs[:, 1] >= threshold` (default 0.5); multi-class use argmax.
    Values are plain Python numbers; undefined ones are None.
    """
    y = _as_labels(y_true)
    p = as_probs(probs)
    names = [str(c) for c in class_names]
    n, n_classes = p.shape
    if n_classes != len(names):
        raise ValueError(f"probs has {n_classes} columns but there are {len(names)} class names {names}")
    if len(y) != n:
        raise ValueError(f"y_true has {len(y)} labels but probs has {n} rows")
    if n == 0:
        raise ValueError("compute_metrics needs at least one sample")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    binary = n_classes == 2
    if not binary and threshold is not None:
        raise ValueError("threshold only applies to binary tasks; multi-class predictions use argmax")
    if binary:
        threshold = 0.5 if threshold is None else float(threshold)

    notes: list[str] = []
    y_pred = _predict_labels(p, threshold)
    correct = y == y_pred
    cm = _confusion(y, y_pred, n_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)

    absent = [names[c] for c in range(n_classes) if support[c] == 0]
    if absent:
        notes.append(f"class(es) absent from y_true: {absent}; their recall is undefined (None)")

    # AUC: binary needs both classes; macro OvR averages over the classes that are present
    present = [c for c in range(n_classes) if support[c] > 0]
    if binary:
        auc_classes = [1] if len(present) == 2 else []
    else:
        auc_classes = present if len(present) >= 2 else []
    auc = _none_if_nan(_macro_auc(y, p, auc_classes)) if auc_classes else None
    if auc is None:
        notes.append("AUC undefined: y_true contains a single class")
    elif not binary and len(auc_classes) < n_classes:
        notes.append(f"macro AUC averaged over the {len(auc_classes)} classes present in y_true")

    from sklearn.metrics import average_precision_score

    if binary:
        ap = float(average_precision_score(y == 1, p[:, 1])) if support[1] > 0 else None
    else:
        ap = float(np.mean([average_precision_score(y == c, p[:, c]) for c in present])) if present else None

    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        precision = float(tp[c] / predicted[c]) if predicted[c] > 0 else 0.0
        recall = float(tp[c] / support[c]) if support[c] > 0 else None
        if recall is None:
            f1 = None
        else:
            f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[c])}

    metrics: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(_balanced_accuracy(y, correct, n_classes)),
        "auc": auc,
        "average_precision": ap,
    }
    if binary:
        metrics["sensitivity"] = per_class[names[1]]["recall"]
        metrics["specificity"] = per_class[names[0]]["recall"]
        metrics["threshold"] = threshold
    metrics["ece"] = expected_calibration_error(y, p)
    metrics["n"] = int(n)
    metrics["per_class"] = per_class
    metrics["confusion_matrix"] = cm.tolist()
    if n_bootstrap > 0:
        metrics["ci95"] = _bootstrap_ci(y, p, y_pred, int(n_bootstrap), seed, auc_classes, names)
    else:
        metrics["ci95"] = {"accuracy": None, "balanced_accuracy": None, "auc": None}
    if notes:
        metrics["notes"] = notes
    return metrics


def with_ci(block: dict[str, Any], key: str, digits: int = 3) -> str:
    """A metric of a `compute_metrics` block with its bootstrap interval: '0.912 [0.890, 0.931]'.

    'undefined' when the metric is (e.g. the AUC of a split holding one class: a table or a
    sentence then says so instead of crashing on None); just the value when there is no interval.
    """
    value, interval = block.get(key), (block.get("ci95") or {}).get(key)
    if value is None:
        return "undefined"
    if not interval or None in interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


# ----------------------------------------------------------------------------------------------
# Thresholds (binary tasks)
# ----------------------------------------------------------------------------------------------


def _sensitivity_specificity(y: np.ndarray, p_pos: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of the rule `p_pos >= t` for every t in `thresholds`."""
    pos = np.sort(p_pos[y == 1])
    neg = np.sort(p_pos[y == 0])
    # number of positives with score >= t = len(pos) - (number with score < t)
    sens = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / max(len(pos), 1)
    spec = np.searchsorted(neg, thresholds, side="left") / max(len(neg), 1)
    return sens, spec


def choose_threshold(y_true: Any, p_pos: Any, method: str = "youden", target: float = 0.95) -> float:
    """Pick a decision threshold for a binary task (predict positive when p_pos >= threshold).

    Choose it on the VALIDATION split, then apply it to the test split once; choosing it on
    test makes the test numbers optimistic.

    - method="youden": maximise Youden's J = sensitivity + specificity - 1.
    - method="sensitivity": the highest threshold whose sensitivity still reaches `target`, i.e.
      the best specificity among the thresholds that miss at most (1 - target) of the positives.

    Candidate thresholds are the observed scores; ties are broken towards the higher threshold.
    """
    y = _as_labels(y_true)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {len(y)} labels but p_pos has {len(p)} scores")
    if not (y == 1).any():
        raise ValueError("choose_threshold needs at least one positive (label 1) sample")
    candidates = np.unique(p)[::-1]  # highest first, so argmax breaks ties towards higher thresholds
    sens, spec = _sensitivity_specificity(y, p, candidates)
    if method == "youden":
        if not (y == 0).any():
            raise ValueError("Youden's J needs at least one negative (label 0) sample")
        return float(candidates[np.argmax(sens + spec - 1)])
    if method == "sensitivity":
        if not 0 < target <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
        meets = np.flatnonzero(sens >= target - 1e-12)
        return float(candidates[meets[0]])  # first = highest threshold meeting the target
    raise ValueError(f"Unknown method {method!r}. Known: 'youden', 'sensitivity'.")


def apply_threshold(p_pos: Any, threshold: float) -> np.ndarray:
    """Binary predictions (0/1 int64): 1 where p_pos >= threshold."""
    p = p_pos.detach().cpu().numpy() if isinstance(p_pos, torch.Tensor) else np.asarray(p_pos)
    return (p >= threshold).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels under logits / temperature."""
    from scipy.special import log_expit, logsumexp

    z = logits / temperature
    if z.shape[1] == 1:  # sigmoid: -log sigmoid(z) for positives, -log sigmoid(-z) for negatives
        signed = np.where(labels == 1, z[:, 0], -z[:, 0])
        return float(-log_expit(signed).mean())
    return float((logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]).mean())


def _as_logits(logits: Any) -> np.ndarray:
    z = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    z = z.astype(np.float64)
    return z[:, None] if z.ndim == 1 else z


def fit_temperature(logits: Any, labels: Any) -> float:
    """Temperature T > 0 that minimises the NLL of `labels` under softmax(logits / T).

    Fit on VALIDATION logits (from `predict(..., return_logits=True)`), then use
    `apply_temperature` on test. T > 1 softens an over-confident model; accuracy is unchanged
    because dividing by T never changes the argmax. Works for 1-logit (sigmoid) and C-logit models.
    """
    from scipy.optimize import minimize_scalar

    z = _as_logits(logits)
    y = _as_labels(labels)
    if len(y) != len(z):
        raise ValueError(f"{len(z)} logits but {len(y)} labels")
    # the NLL is unimodal in log T, so a bounded 1-D search is enough
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(math.log(0.05), math.log(20.0)), method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(math.exp(result.x))
    if not 0.06 < temperature < 19.0:
        import warnings

        warnings.warn(
            f"fit_temperature hit the edge of its search range (T = {temperature:.3g}): the logits carry "
            "almost no information about the labels (an untrained model?), so treat T with suspicion.",
            stacklevel=2,
        )
    return temperature


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities (N, C) from logits divided by `temperature`."""
    z = torch.as_tensor(_as_logits(logits)) / float(temperature)
    return logits_to_probs(z).double().numpy()


# ----------------------------------------------------------------------------------------------
# metrics.json and results tables
# ----------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy/torch values, Paths and tuples to plain JSON types; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "to_dict"):  # pandas objects
        return to_jsonable(value.to_dict())
    return str(value)


def write_metrics(
    out_dir: str | Path,
    *,
    notebook: str,
    profile: str,
    dataset: str,
    data_dir: str | Path | None,
    model: str,
    pretrained: bool,
    image_size: int,
    class_names: Sequence[str],
    threshold: float | None,
    val: dict | None,
    test: dict | None,
    timing: dict | None,
    device: str | torch.device,
    runs: list[dict] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write out_dir/metrics.json in the DESIGN.md schema (that key order, extra keys last); return the dict."""
    record: dict[str, Any] = {
        "notebook": notebook,
        "profile": profile,
        "dataset": dataset,
        "data_dir": portable_data_dir(data_dir),
        "model": model,
        "pretrained": pretrained,
        "image_size": image_size,
        "class_names": list(class_names),
        "threshold": threshold,
        "val": val,
        "test": test,
        "timing": timing,
        "device": device,
    }
    if runs is not None:
        record["runs"] = runs
    record.update(extra)
    record = to_jsonable(record)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return record


def _load_metrics(item: str | Path | dict) -> dict:
    if isinstance(item, dict):
        return item
    path = Path(item)
    if path.is_dir():
        path = path / "metrics.json"
    return json.loads(path.read_text())


_CONTEXT_KEYS = ("notebook", "profile", "dataset", "model", "pretrained", "image_size")


def _metric_columns(block: dict | None, prefix: str) -> dict[str, Any]:
    """Flatten one val/test block into columns like test_auc, test_auc_lo, test_recall_NORMAL."""
    row: dict[str, Any] = {}
    if not block:
        return row
    ci = block.get("ci95") or {}
    for key in ("accuracy", "balanced_accuracy", "auc", "average_precision", "sensitivity", "specificity", "ece"):
        if key in block:
            row[f"{prefix}_{key}"] = block[key]
        if key in ci:
            lo_hi = ci[key] or [None, None]
            row[f"{prefix}_{key}_lo"], row[f"{prefix}_{key}_hi"] = lo_hi
    for name, stats in (block.get("per_class") or {}).items():
        row[f"{prefix}_recall_{name}"] = stats.get("recall")
    return row


def _row(record: dict, parent: dict, run_name: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {key: record.get(key, parent.get(key)) for key in _CONTEXT_KEYS}
    row["run"] = run_name
    block_threshold = (record.get("test") or {}).get("threshold", parent.get("threshold"))
    row["threshold"] = record.get("threshold", block_threshold)
    if "test" in record or "val" in record:
        row.update(_metric_columns(record.get("val"), "val"))
        row.update(_metric_columns(record.get("test"), "test"))
    else:  # a run given as a bare metrics block is a test block
        row.update(_metric_columns(record, "test"))
    return row


def results_table(paths_or_dicts: str | Path | dict | Sequence[str | Path | dict], *, include_main: bool = False):
    """One row per model/run from several metrics.json files (paths, folders or dicts).

    A file with a "runs" list contributes one row per run (named by its "name", "run" or
    "strategy" key); with `include_main=True` its top-level block is added as well.
    Columns: notebook, profile, dataset, model, pretrained, image_size, run, threshold, then
    val_* and test_* metrics with *_lo/*_hi 95% intervals and *_recall_<class> columns.
    """
    import pandas as pd

    items = [paths_or_dicts] if isinstance(paths_or_dicts, (str, Path, dict)) else list(paths_or_dicts)
    rows = []
    for item in items:
        record = _load_metrics(item)
        runs = record.get("runs") or []
        if include_main or not runs:
            rows.append(_row(record, {}, None))
        for i, run in enumerate(runs):
            name = run.get("name") or run.get("run") or run.get("strategy") or run.get("model") or f"run{i}"
            rows.append(_row(run, record, str(name)))
    return pd.DataFrame(rows)
