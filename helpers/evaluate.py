"""Evaluation: predictions, metrics with bootstrap intervals, paired comparisons, thresholds and
calibration (AUC, ROC, confusion matrices from scikit-learn). Choose on *validation*, apply to *test* once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import sklearn
from scipy.stats import binomtest
from sklearn.metrics import auc, average_precision_score, confusion_matrix, roc_curve
from torch import nn

from helpers import tta as tta_views
from helpers.core import check_normalization, is_one_logit, logits_to_probs, model_device, predict_labels, to_numpy

# A class with fewer images than this is too few to measure: one NORMAL image gives specificity 0
# or 1 and a zero-width interval, which reads as certainty.
MIN_CLASS_IMAGES = 10


def as_probs(probs: Any) -> np.ndarray:
    """Probabilities as a float64 (N, C) array; a 1-D array is read as P(positive) of a binary task."""
    p = to_numpy(probs).astype(np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C) (or (N,) for binary), got {p.shape}")
    return p


def checked_probs(probs: Any, what: str = "probs") -> np.ndarray:
    """`as_probs`, refusing what is not probabilities: values outside [0, 1] (logits) or NaN, and
    rows of several classes that do not sum to 1 (scores of independent sigmoids, unnormalised)."""
    p = as_probs(probs)
    bad = p[np.isnan(p) | (p < -1e-6) | (p > 1 + 1e-6)]  # float32 rounding is no logit
    if bad.size:
        why = "NaN is no probability (did training diverge?)" if np.isnan(bad).any() else "these look like logits"
        raise ValueError(f"{what} must be probabilities in [0, 1], but it holds {bad.size} value(s) outside, e.g. "
                         f"{bad.flat[0]:.4g}: {why}. Apply the sigmoid (one output: torch.sigmoid(logits)) or the "
                         "softmax (several: torch.softmax(logits, dim=1)) first, as evaluate.predict does.")
    p = np.clip(p, 0.0, 1.0)
    if p.size and not np.allclose(sums := p.sum(axis=1), 1.0, atol=1e-3):
        row = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(f"Each row of {what} must sum to 1 (one probability per class), but row {row} sums to "
                         f"{sums[row]:.4g}. Apply the softmax over the classes (torch.softmax(logits, dim=1)), "
                         "not a sigmoid per class.")
    return p


def _as_labels(y: Any) -> np.ndarray:
    return to_numpy(y).astype(np.int64).reshape(-1)


def predict(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
            tta: None | str | Sequence[Callable] = None, return_logits: bool = False) -> tuple:
    """(probs (N, C), labels (N,)) of `model` over `loader`, in eval mode; `(..., logits)` with
    `return_logits`. `tta` ("flips", "plausible" or a list of x -> x views) averages the views."""
    check_normalization(model, loader)
    device = torch.device(device) if device is not None else model_device(model)
    views = tta_views.resolve(tta)
    model.eval()
    probs, labels, logits = [], [], []
    with torch.inference_mode():
        for x, y, *_ in loader:
            x = x.to(device).float()
            z = [model(view(x)).float() for view in views]
            probs.append(torch.stack([logits_to_probs(v) for v in z]).mean(0).cpu())
            logits.append(torch.stack(z).mean(0).cpu())
            labels.append(torch.as_tensor(y).reshape(-1).cpu())
    if not probs:
        raise ValueError("The loader yielded no batches: nothing to predict.")
    out = (torch.cat(probs).double().numpy(), torch.cat(labels).long().numpy())
    return (*out, torch.cat(logits).double().numpy()) if return_logits else out


def ensemble_probs(list_of_probs: Sequence[Any]) -> np.ndarray:
    """The mean of several models' (N, C) probabilities (a simple ensemble)."""
    arrays = [checked_probs(p) for p in list_of_probs]
    if not arrays:
        raise ValueError("ensemble_probs needs at least one probability array")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"All probability arrays must have the same shape, got {sorted({a.shape for a in arrays})}")
    return np.mean(arrays, axis=0)


def bootstrap_ci(statistic: Callable[[np.ndarray], dict[str, float]], n: int, *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile bootstrap 95% intervals of every value `statistic(idx)` returns (`idx`: one resample of
    range(n)); NaN values (undefined on that resample) are left out; a key never defined gets None."""
    rng, intervals = np.random.default_rng(seed), {}
    draws = [statistic(rng.integers(0, n, n)) for _ in range(n_bootstrap)]
    for key in (draws[0] if draws else {}):
        values = np.array([d[key] for d in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        intervals[key] = [float(v) for v in np.percentile(values, [2.5, 97.5])] if values.size else None
    return intervals


def _roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from `roc_curve` (`roc_auc_score` without its checks: twice as fast); NaN without both classes."""
    if positive.all() or not positive.any():
        return math.nan
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        fpr, tpr, _ = roc_curve(positive, score)
        return float(auc(fpr, tpr))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary: ROC AUC of class 1; multi-class: mean one-vs-rest AUC over the classes present."""
    if p.shape[1] == 2:
        return _roc_auc(y == 1, p[:, 1])
    present = np.unique(y)
    return float(np.mean([_roc_auc(y == c, p[:, c]) for c in present])) if len(present) > 1 else math.nan


def _summary(y: np.ndarray, p: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC and every class's recall: what the intervals are for."""
    correct = (y == y_pred).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN recall for a class absent from y
        recalls = np.bincount(y, weights=correct, minlength=p.shape[1]) / np.bincount(y, minlength=p.shape[1])
    return {"accuracy": float(correct.mean()), "balanced_accuracy": float(np.nanmean(recalls)),
            "auc": _auc(y, p), **{f"recall{c}": float(r) for c, r in enumerate(recalls)}}


def proportion_ci(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of the proportion k / n (scipy), sane at 0 and n; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def paired_difference(y_true: Any, probs_a: Any, probs_b: Any, *, metric: str = "auc",
                      n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metric(a) - metric(b) on the same images with a paired bootstrap 95% interval: {"metric", "a", "b",
    "diff", "ci95"}. `metric`: "auc", "balanced_accuracy" or "accuracy" (argmax predictions)."""
    y, a, b = _as_labels(y_true), checked_probs(probs_a, "probs_a"), checked_probs(probs_b, "probs_b")
    if not len(y) == len(a) == len(b):
        raise ValueError(f"a paired comparison needs the same images: {len(y)} labels, {len(a)} and {len(b)} rows")
    if metric not in ("auc", "balanced_accuracy", "accuracy"):
        raise ValueError(f"Unknown metric {metric!r}. Known: auc, balanced_accuracy, accuracy")
    if metric == "auc" and len(np.unique(y)) < 2:
        raise ValueError("AUC needs both classes among the images: a paired AUC difference is undefined here.")

    def value(idx: np.ndarray, p: np.ndarray) -> float:
        return _auc(y[idx], p[idx]) if metric == "auc" else _summary(y[idx], p[idx], p[idx].argmax(axis=1))[metric]

    value_a, value_b = value(np.arange(len(y)), a), value(np.arange(len(y)), b)
    ci = bootstrap_ci(lambda idx: {"diff": value(idx, a) - value(idx, b)}, len(y), n_bootstrap=n_bootstrap, seed=seed)
    return {"metric": metric, "a": value_a, "b": value_b, "diff": value_a - value_b, "ci95": ci.get("diff")}


def _per_class(cm: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of every class from the confusion matrix."""
    (support, predicted, tp), table = (cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)), {}
    for c, name in enumerate(names):
        precision = float(tp[c] / predicted[c]) if predicted[c] > 0 else 0.0
        recall = float(tp[c] / support[c]) if support[c] > 0 else None
        f1 = None if recall is None else (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        table[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[c])}
    return table


def _average_precision(y: np.ndarray, p: np.ndarray) -> float | None:
    """Binary: AP of class 1; multi-class: mean one-vs-rest AP over the classes present."""
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    present = [c for c in classes if (y == c).any()]
    return float(np.mean([average_precision_score(y == c, p[:, c]) for c in present])) if present else None


def compute_metrics(y_true: Any, probs: Any, class_names: Sequence[str], *, threshold: float | None = None,
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All the numbers of one evaluation (the `val`/`test` block of metrics.json): accuracy, balanced_accuracy,
    auc (macro one-vs-rest when multi-class), average_precision, [binary: sensitivity, specificity, threshold],
    ece, n, per_class, confusion_matrix (rows = true class), ci95 (`bootstrap_ci`), too_few, notes.
    Binary predictions are `probs[:, 1] >= threshold` (default 0.5), multi-class the argmax; undefined: None."""
    names, y, p = [str(c) for c in class_names], _as_labels(y_true), checked_probs(probs)
    (n, n_classes), binary = p.shape, p.shape[1] == 2
    if n_classes != len(names):
        raise ValueError(f"probs has {n_classes} columns but there are {len(names)} class names {names}")
    if len(y) != n:
        raise ValueError(f"y_true has {len(y)} labels but probs has {n} rows")
    if n == 0:
        raise ValueError("compute_metrics needs at least one sample")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    if not binary and threshold is not None:
        raise ValueError("threshold only applies to binary tasks; multi-class predictions use argmax")
    threshold = (0.5 if threshold is None else float(threshold)) if binary else None
    y_pred = predict_labels(p, threshold)
    cm = confusion_matrix(y, y_pred, labels=list(range(n_classes)))
    per_class, overall, notes = _per_class(cm, names), _summary(y, p, y_pred), []
    if absent := [names[c] for c in range(n_classes) if cm[c].sum() == 0]:
        notes.append(f"class(es) absent from y_true: {absent}; their recall is undefined (None)")
        if not binary and n_classes - len(absent) >= 2:
            notes.append(f"macro AUC averaged over the {n_classes - len(absent)} classes present in y_true")
    if (auc := None if math.isnan(overall["auc"]) else overall["auc"]) is None:
        notes.append("AUC undefined: y_true contains a single class")
    metrics: dict[str, Any] = {"accuracy": overall["accuracy"], "balanced_accuracy": overall["balanced_accuracy"],
                               "auc": auc, "average_precision": _average_precision(y, p)}
    if binary:
        metrics.update(sensitivity=per_class[names[1]]["recall"], specificity=per_class[names[0]]["recall"],
                       threshold=threshold)
    metrics.update(ece=expected_calibration_error(y, p), n=int(n), per_class=per_class, confusion_matrix=cm.tolist())
    ci = bootstrap_ci(lambda idx: _summary(y[idx], p[idx], y_pred[idx]), n, n_bootstrap=int(n_bootstrap), seed=seed)
    metrics["ci95"] = {k: ci.get(k) for k in ("accuracy", "balanced_accuracy", "auc")}  # None without resamples
    if n_bootstrap > 0:
        recall = {name: ci[f"recall{c}"] for c, name in enumerate(names)}
        if binary:
            metrics["ci95"].update(sensitivity=recall[names[1]], specificity=recall[names[0]])
        metrics["ci95"]["recall"] = recall
    if too_few := {name: k for name in names if 0 < (k := per_class[name]["support"]) < MIN_CLASS_IMAGES}:
        metrics["too_few"] = too_few
        for name in too_few:  # their recall loses its interval
            (metrics["ci95"].get("recall") or {})[name] = None
            if binary:
                metrics["ci95"]["specificity" if name == names[0] else "sensitivity"] = None
        notes.append("too few images to measure: " + ", ".join(f"{name} {k}" for name, k in too_few.items())
                     + f" (fewer than {MIN_CLASS_IMAGES}): their recall is given without an interval and "
                     "says little; balanced accuracy and AUC rest on it too")
    if notes:
        metrics["notes"] = notes
    return metrics


def epoch_metrics(y_true: Any, probs: Any) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUC of the argmax, no intervals (`train.fit`'s per epoch); NaN if undefined."""
    y, p = _as_labels(y_true), as_probs(probs)
    finite, p = bool(np.isfinite(p).all()), np.nan_to_num(p)
    summary = _summary(y, p, predict_labels(p))
    auc = summary["auc"] if finite and len(np.unique(y)) == p.shape[1] else math.nan
    return {"accuracy": summary["accuracy"], "balanced_accuracy": summary["balanced_accuracy"], "auc": auc}


def choose_threshold(y_true: Any, p_pos: Any, method: str = "youden", target: float = 0.95) -> float:
    """A threshold on P(positive), chosen on VALIDATION data with `roc_curve`: "youden" maximises sensitivity +
    specificity - 1; "sensitivity": the highest threshold reaching `target` sensitivity. Ties: the higher one."""
    y = _as_labels(y_true)
    p = checked_probs(np.asarray(to_numpy(p_pos), dtype=np.float64).reshape(-1), "p_pos")[:, 1]
    if len(p) != len(y):
        raise ValueError(f"y_true has {len(y)} labels but p_pos has {len(p)} scores")
    if method not in ("youden", "sensitivity"):
        raise ValueError(f"Unknown method {method!r}. Known: 'youden', 'sensitivity'.")
    if not (y == 1).any():
        raise ValueError("choose_threshold needs at least one positive (label 1) sample")
    if method == "youden" and not (y == 0).any():
        raise ValueError("Youden's J needs at least one negative (label 0) sample")
    if method == "sensitivity" and not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    with warnings.catch_warnings():  # one class only: roc_curve warns about the missing FPR
        warnings.simplefilter("ignore")
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first threshold predicts nothing positive
    if method == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])  # thresholds fall: argmax takes the highest
    return float(thresholds[np.flatnonzero(tpr >= target - 1e-12)[0]])


def reliability_bins(y_true: Any, probs: Any, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (mean confidence, accuracy, count); NaN for empty bins."""
    y, p = _as_labels(y_true), checked_probs(probs)
    confidence, correct = p.max(axis=1), (predict_labels(p) == y).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.bincount(bins, weights=confidence, minlength=n_bins) / counts,
                np.bincount(bins, weights=correct, minlength=n_bins) / counts, counts)


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label ECE: the mean |accuracy - confidence| over confidence bins, weighted by their size."""
    confidence, accuracy, counts = reliability_bins(y_true, probs, n_bins)
    keep = counts > 0
    return float(np.sum(counts[keep] / counts.sum() * np.abs(accuracy[keep] - confidence[keep])))


def _as_logits(logits: Any) -> np.ndarray:
    z = to_numpy(logits).astype(np.float64)
    return z.reshape(-1, 1) if is_one_logit(z) else z


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `y` under logits / temperature (sigmoid for one logit)."""
    from scipy.special import log_expit, logsumexp
    z = z / temperature
    if z.shape[1] == 1:
        return float(-log_expit(np.where(y == 1, z[:, 0], -z[:, 0])).mean())
    return float((logsumexp(z, axis=1) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature T > 0 minimising the NLL of `labels` under softmax(logits / T), fit on VALIDATION logits
    (`predict(..., return_logits=True)`); apply with `apply_temperature`. The argmax never changes."""
    from scipy.optimize import minimize_scalar
    z, y = _as_logits(logits), _as_labels(labels)
    if len(y) != len(z):
        raise ValueError(f"{len(z)} logits but {len(y)} labels")
    result = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(math.log(0.05), math.log(20.0)),
                             method="bounded", options={"xatol": 1e-5})  # the NLL is unimodal in log T
    temperature = float(math.exp(result.x))
    if not 0.06 < temperature < 19.0:
        warnings.warn(f"fit_temperature hit the edge of its search range (T = {temperature:.3g}): the logits carry "
                      "almost no information about the labels (an untrained model?), so treat T with suspicion.",
                      stacklevel=2)
    return temperature


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities (N, C) from logits divided by `temperature`."""
    return logits_to_probs(torch.as_tensor(_as_logits(logits)) / float(temperature)).double().numpy()
