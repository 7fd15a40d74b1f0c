"""helpers.ood: direction of the OOD scores, Mahalanobis fit, thresholds; the outside-image generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ood, synthetic


# ----------------------------------------------------------------------------- OOD scores

def test_softmax_scores_prefer_confident_logits():
    confident = np.array([[8.0, -8.0], [-6.0, 6.0]])
    unsure = np.array([[0.1, 0.0], [0.0, 0.05]])
    assert (ood.msp_score(confident) > ood.msp_score(unsure).max()).all()
    assert (ood.energy_score(confident) > ood.energy_score(unsure).max()).all()
    # a 1-logit model is treated as logits [0, z]
    assert np.allclose(ood.msp_score(np.array([[3.0]])), torch.sigmoid(torch.tensor(3.0)).item())


def test_mahalanobis_scores_far_points_lower():
    rng = np.random.default_rng(0)
    dim = 16
    means = np.stack([np.zeros(dim), np.full(dim, 3.0)])
    labels = np.repeat([0, 1], 100)
    train = means[labels] + rng.normal(0, 1, (200, dim))
    params = ood.fit_mahalanobis(train, labels)
    near = means[[0, 1] * 10] + rng.normal(0, 1, (20, dim))
    far = rng.normal(0, 1, (20, dim)) + 12.0
    near_s, far_s = ood.mahalanobis_score(near, params), ood.mahalanobis_score(far, params)
    assert near_s.min() > far_s.max()


def test_threshold_keeps_the_requested_share():
    scores = np.arange(100, dtype=float)
    t = ood.threshold_keeping(scores, 0.95)
    assert np.mean(scores < t) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- outside images (helpers.synthetic)

def test_outside_generators_shapes_and_determinism():
    for make in (synthetic.synthetic_landscapes, synthetic.synthetic_noise, synthetic.synthetic_shapes):
        a, b = make(3, 40, seed=5), make(3, 40, seed=5)
        assert a.dtype == torch.uint8 and a.shape == (3, 3, 40, 40)
        assert torch.equal(a, b) and a.float().std() > 5
