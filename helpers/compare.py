"""Two training runs on the same images, compared honestly (notebook 04: ImageNet vs random weights).

- `paired_auc_difference`: the difference of two models' AUCs on the *same* test images, with a
  paired bootstrap interval (each resample draws the same images for both models, so the noise
  the two share cancels and the interval is narrower than the two separate ones suggest).
- `linear_probe`: how good frozen features are on their own: logistic regression on the pooled
  backbone features, no fine-tuning.
- `plot_history_comparison`: validation loss and AUC per epoch, one line per run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.evaluate import as_probs
from helpers.feature_cache import extract_features
from helpers.models import backbone_and_head
from helpers.plots import new_figure, save_figure


def _positive_scores(probs: Any) -> np.ndarray:
    probs = as_probs(probs)
    return probs[:, 1] if probs.ndim == 2 else probs


def paired_auc_difference(y_true: Any, probs_a: Any, probs_b: Any, *, n_bootstrap: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """AUC(a) - AUC(b) on the same images, with a paired bootstrap 95% interval.

    Binary tasks: `probs_*` are (N, 2) probabilities (or (N,) scores of the positive class).
    Returns {"auc_a", "auc_b", "difference", "ci95": [lo, hi], "n", "n_bootstrap"}; the interval
    is None when `n_bootstrap` is 0.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(int)
    a, b = _positive_scores(probs_a), _positive_scores(probs_b)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"paired comparison needs the same images: {len(y)} labels, {len(a)} and {len(b)} scores")
    if len(np.unique(y)) != 2:
        raise ValueError("AUC needs both classes among the images: a paired AUC difference is undefined here.")
    auc_a, auc_b = roc_auc_score(y, a), roc_auc_score(y, b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    ci = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))] if diffs else None
    return dict(auc_a=float(auc_a), auc_b=float(auc_b), difference=float(auc_a - auc_b), ci95=ci,
                n=int(len(y)), n_bootstrap=int(n_bootstrap))


def linear_probe(model: nn.Module, train_loader: Any, test_loader: Any, *, seed: int = 0) -> np.ndarray:
    """(N_test, 2) probabilities of a logistic regression on the frozen, pooled features of `model`.

    The backbone runs once over each loader in eval mode (no augmentation, no fine-tuning); the
    features are standardised on train. Binary tasks only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    backbone, _ = backbone_and_head(model)
    with torch.no_grad():
        x_train, y_train = extract_features(backbone, train_loader, progress=False)
        x_test, _ = extract_features(backbone, test_loader, progress=False)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(x_train.numpy(), y_train.numpy())
    return probe.predict_proba(x_test.numpy())


def plot_history_comparison(histories: Mapping[str, pd.DataFrame], out_dir: str | Path,
                            name: str = "history_comparison.png"):
    """Validation loss and validation AUC per epoch, one line per run (dashed: stage boundaries)."""
    fig, axes = new_figure(1, 2, figsize=(11, 3.8))
    for label, history in histories.items():
        x = np.arange(1, len(history) + 1)
        for ax, column in zip(axes, ("val_loss", "val_auc")):
            if column in history:
                ax.plot(x, history[column].astype(float), marker="o", markersize=3, label=label)
        if "stage" in history:
            stages = history["stage"].tolist()
            for i in range(1, len(stages)):
                if stages[i] != stages[i - 1]:
                    for ax in axes:
                        ax.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=1)
    for ax, title in zip(axes, ("validation loss", "validation AUC")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)
