"""Out-of-distribution scores (higher = more like the training X-rays; reject below `threshold_keeping`):
maximum softmax probability, energy, Mahalanobis distance of backbone features."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.core import is_one_logit, model_device
from helpers.loading import normalize
from helpers.models import backbone_and_head


def _two_or_more_columns(logits: Any) -> torch.Tensor:
    """Logits as (N, C) float tensor; one logit z (sigmoid model) becomes [0, z] (same softmax)."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).float()
    return torch.cat([torch.zeros_like(z.reshape(-1, 1)), z.reshape(-1, 1)], dim=1) if is_one_logit(z) else z


def msp_score(logits: Any) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017): confidence of the predicted class."""
    return torch.softmax(_two_or_more_columns(logits), dim=1).max(dim=1).values.numpy().astype(np.float64)


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative energy T * logsumexp(logits / T) (Liu et al. 2020): large logits = familiar input."""
    return (temperature * torch.logsumexp(_two_or_more_columns(logits) / temperature, dim=1)).numpy().astype(np.float64)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small linear algebra on one thread (multi-threaded BLAS on a busy machine can take seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_mahalanobis(features: Any, labels: Any) -> dict[str, torch.Tensor]:
    """Class means and one shared Ledoit-Wolf-shrunk precision matrix of training features (Lee et al. 2018)."""
    from sklearn.covariance import ledoit_wolf_shrinkage
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    classes, index = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    means = torch.stack([x[torch.as_tensor(index == c)].mean(dim=0) for c in range(len(classes))])
    centred = x - means[torch.as_tensor(index)]
    shrink = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    with _one_thread():
        cov = centred.T @ centred / len(centred)
        mu = torch.trace(cov) / cov.shape[0]
        cov = (1 - shrink) * cov + shrink * mu * torch.eye(cov.shape[0], dtype=cov.dtype)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    return {"means": means.float(), "precision": precision.float(), "shrinkage": torch.tensor(shrink)}


def mahalanobis_score(features: Any, params: dict[str, torch.Tensor]) -> np.ndarray:
    """Minus the squared Mahalanobis distance to the closest class mean (higher = closer)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    means, precision = params["means"].double(), params["precision"].double()
    with _one_thread():
        diff = x[:, None, :] - means[None, :, :]  # (N, C, D)
        d2 = ((diff @ precision) * diff).sum(dim=-1)  # (N, C) squared distances
    return (-d2.min(dim=1).values).numpy()


OOD_METHODS: tuple[str, ...] = ("msp", "energy", "mahalanobis")


def ood_score(method: str, logits: Any, features: Any = None, params: dict | None = None) -> np.ndarray:
    """Dispatch to one of `OOD_METHODS` (higher = more in-distribution)."""
    if method in ("msp", "energy"):
        return msp_score(logits) if method == "msp" else energy_score(logits)
    if method == "mahalanobis":
        if features is None or params is None:
            raise ValueError("mahalanobis needs backbone features and the fitted params (fit_mahalanobis)")
        return mahalanobis_score(features, params)
    raise ValueError(f"Unknown OOD method {method!r}. Known: {', '.join(OOD_METHODS)}")


def threshold_keeping(id_scores: Any, keep: float = 0.95) -> float:
    """The score threshold keeping at least a fraction `keep` of these (validation) images (ties keep more)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = np.sort(np.asarray(id_scores, dtype=np.float64).reshape(-1))
    if len(scores) == 0:
        raise ValueError("threshold_keeping needs at least one score")
    k = int(np.floor((1.0 - keep) * len(scores) + 1e-9))
    return float(scores[min(k, len(scores) - 1)])


def logits_and_features(model: nn.Module, images_u8: torch.Tensor,
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and pooled backbone features (N, D) of uint8 images (N, 3, S, S), in one pass."""
    (backbone, head), device = backbone_and_head(model), model_device(model)
    model.eval()
    logits, feats = [], []
    with torch.inference_mode():
        for start in range(0, len(images_u8), batch_size):
            x = normalize(images_u8[start:start + batch_size].to(device), normalization=model)
            f = backbone(x)
            logits.append(head(f).float().cpu())
            feats.append(f.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()
