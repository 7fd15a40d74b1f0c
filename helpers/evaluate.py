"""Evaluation: predictions (with optional test-time augmentation), metrics with bootstrap
intervals, threshold choice and calibration.

Honest evaluation in three rules:
1. choose checkpoints, thresholds, temperatures and strategies on the *validation* split;
2. apply them to the *test* split once, at the end;
3. report balanced accuracy, per-class recall, AUC and a 95% bootstrap interval, not accuracy alone.

Writing the numbers down (metrics.json, results tables, `with_ci`) is `helpers.reporting`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers import tta as tta_views
from helpers.core import check_normalization, is_one_logit, logits_to_probs, model_device, predict_labels, to_numpy
from helpers.measurable import flag_too_few

# --------------------------------------------------------------------------- arrays


def as_probs(probs: Any) -> np.ndarray:
    """Probabilities as a float64 (N, C) array; a 1-D array is read as P(positive) of a binary task."""
    p = to_numpy(probs).astype(np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C) (or (N,) for binary), got {p.shape}")
    return p


def _as_labels(y: Any) -> np.ndarray:
    return to_numpy(y).astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------- prediction


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
    (see `helpers.tta`). With `return_logits=True` the (view-averaged) raw logits come third, e.g. for `fit_temperature`.
    The model is put in eval mode (dropout off, BatchNorm running statistics).
    """
    check_normalization(model, loader)  # a TensorLoader normalises as the model's weights need
    device = torch.device(device) if device is not None else model_device(model)
    transforms = tta_views.resolve(tta)
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


# --------------------------------------------------------------------------- metrics


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
    correct = (predict_labels(p) == y).astype(np.float64)  # top label
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


def _checked(y_true: Any, probs: Any, names: list[str], threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities as arrays, or a ValueError that says what does not fit."""
    y, p = _as_labels(y_true), as_probs(probs)
    n, n_classes = p.shape
    if n_classes != len(names):
        raise ValueError(f"probs has {n_classes} columns but there are {len(names)} class names {names}")
    if len(y) != n:
        raise ValueError(f"y_true has {len(y)} labels but probs has {n} rows")
    if n == 0:
        raise ValueError("compute_metrics needs at least one sample")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    if n_classes != 2 and threshold is not None:
        raise ValueError("threshold only applies to binary tasks; multi-class predictions use argmax")
    return y, p


def _auc_classes(support: np.ndarray, notes: list[str]) -> list[int]:
    """The classes an AUC can average over: binary needs both; macro OvR uses those present."""
    present = [c for c in range(len(support)) if support[c] > 0]
    if len(support) == 2:
        return [1] if len(present) == 2 else []
    if len(present) < len(support) and len(present) >= 2:
        notes.append(f"macro AUC averaged over the {len(present)} classes present in y_true")
    return present if len(present) >= 2 else []


def _average_precision(y: np.ndarray, p: np.ndarray, support: np.ndarray) -> float | None:
    """Binary: AP of class 1; multi-class: mean one-vs-rest AP over the classes present."""
    from sklearn.metrics import average_precision_score

    if p.shape[1] == 2:
        return float(average_precision_score(y == 1, p[:, 1])) if support[1] > 0 else None
    present = [c for c in range(p.shape[1]) if support[c] > 0]
    return float(np.mean([average_precision_score(y == c, p[:, c]) for c in present])) if present else None


def _per_class(cm: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of every class from the confusion matrix."""
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    table: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        precision = float(tp[c] / predicted[c]) if predicted[c] > 0 else 0.0
        recall = float(tp[c] / support[c]) if support[c] > 0 else None
        f1 = None if recall is None else (0.0 if precision + recall == 0 else
                                          2 * precision * recall / (precision + recall))
        table[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[c])}
    return table


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
    recall: {name: [lo, hi]}} (percentile bootstrap, `n_bootstrap` resamples), `too_few` {class:
    images} under `measurable.MIN_CLASS_IMAGES` (intervals None), and `notes` on what was not measured.

    Binary predictions are `probs[:, 1] >= threshold` (default 0.5); multi-class use argmax.
    Values are plain Python numbers; undefined ones are None.
    """
    names = [str(c) for c in class_names]
    y, p = _checked(y_true, probs, names, threshold)
    n, n_classes = p.shape
    binary = n_classes == 2
    if binary:
        threshold = 0.5 if threshold is None else float(threshold)
    y_pred = predict_labels(p, threshold)
    correct = y == y_pred
    cm = _confusion(y, y_pred, n_classes)
    support = cm.sum(axis=1)
    notes: list[str] = []
    if absent := [names[c] for c in range(n_classes) if support[c] == 0]:
        notes.append(f"class(es) absent from y_true: {absent}; their recall is undefined (None)")
    auc_classes = _auc_classes(support, notes)
    auc = _none_if_nan(_macro_auc(y, p, auc_classes)) if auc_classes else None
    if auc is None:
        notes.append("AUC undefined: y_true contains a single class")
    per_class = _per_class(cm, names)
    metrics: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(_balanced_accuracy(y, correct, n_classes)),
        "auc": auc,
        "average_precision": _average_precision(y, p, support),
    }
    if binary:
        metrics.update(sensitivity=per_class[names[1]]["recall"], specificity=per_class[names[0]]["recall"],
                       threshold=threshold)
    metrics.update(ece=expected_calibration_error(y, p), n=int(n), per_class=per_class,
                   confusion_matrix=cm.tolist())
    metrics["ci95"] = (_bootstrap_ci(y, p, y_pred, int(n_bootstrap), seed, auc_classes, names) if n_bootstrap > 0
                       else {"accuracy": None, "balanced_accuracy": None, "auc": None})
    flag_too_few(metrics, names, notes)
    if notes:
        metrics["notes"] = notes
    return metrics


def epoch_metrics(y_true: Any, probs: Any) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUC of the most probable class, without intervals: what
    `helpers.train.fit` reports on the validation split after every epoch.

    The same formulas as `compute_metrics`; NaN where undefined (a class missing from `y_true`,
    or probabilities that are not finite).
    """
    y, p = _as_labels(y_true), as_probs(probs)
    n_classes = p.shape[1]
    correct = y == predict_labels(p)
    every_class = len(np.unique(y)) == n_classes and bool(np.isfinite(p).all())
    auc = _macro_auc(y, p, [1] if n_classes == 2 else list(range(n_classes))) if every_class else math.nan
    return {"accuracy": float(correct.mean()),
            "balanced_accuracy": float(_balanced_accuracy(y, correct, n_classes)),
            "auc": float(auc)}


# --------------------------------------------------------------------------- thresholds


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


# --------------------------------------------------------------------------- temperature scaling


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels under logits / temperature."""
    from scipy.special import log_expit, logsumexp

    z = logits / temperature
    if is_one_logit(z):  # sigmoid: -log sigmoid(z) for positives, -log sigmoid(-z) for negatives
        signed = np.where(labels == 1, z[:, 0], -z[:, 0])
        return float(-log_expit(signed).mean())
    return float((logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]).mean())


def _as_logits(logits: Any) -> np.ndarray:
    z = to_numpy(logits).astype(np.float64)
    return z.reshape(-1, 1) if is_one_logit(z) else z


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
