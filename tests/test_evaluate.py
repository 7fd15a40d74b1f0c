"""Tests for helpers.evaluate: metrics against scikit-learn, thresholds, bootstrap, calibration, TTA."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from helpers import evaluate as ev
from helpers import tta
from helpers.core import is_one_logit, logits_to_probs, predict_labels


def _random_case(seed: int, n_classes: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative but imperfect probabilities (ties included via rounding)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # create ties, which rank-based AUC must handle like sklearn
    probs = probs / probs.sum(axis=1, keepdims=True)
    return y, probs


# ---------------------------------------------------------------------------------- metrics vs sklearn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_metrics_match_sklearn(seed: int, n_classes: int) -> None:
    y, probs = _random_case(seed, n_classes)
    names = [f"class{c}" for c in range(n_classes)]
    m = ev.compute_metrics(y, probs, names, n_bootstrap=50, seed=seed)
    pred = probs.argmax(1) if n_classes > 2 else (probs[:, 1] >= 0.5).astype(int)

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    if n_classes == 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, probs[:, 1]))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
        assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
        assert m["threshold"] == 0.5
    else:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        onehot = np.eye(n_classes)[y]
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(onehot, probs, average="macro"))
        assert "threshold" not in m and "sensitivity" not in m
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(n_classes)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=range(n_classes), zero_division=0
    )
    for c, name in enumerate(names):
        block = m["per_class"][name]
        assert block["precision"] == pytest.approx(precision[c])
        assert block["recall"] == pytest.approx(recall[c])
        assert block["f1"] == pytest.approx(f1[c])
        assert block["support"] == support[c] and isinstance(block["support"], int)
    assert m["n"] == len(y)
    json.dumps(m, allow_nan=False)  # plain Python numbers only


def test_binary_threshold_changes_predictions() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    default = ev.compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=0)
    strict = ev.compute_metrics(y, probs, ["neg", "pos"], threshold=0.62, n_bootstrap=0)
    assert default["confusion_matrix"] == [[1, 1], [0, 2]]
    assert strict["confusion_matrix"] == [[2, 0], [0, 2]]
    assert strict["threshold"] == 0.62 and strict["specificity"] == 1.0


def test_one_column_probs_are_p_positive() -> None:
    y, probs = _random_case(5, 2)
    assert ev.compute_metrics(y, probs[:, 1], ["a", "b"], n_bootstrap=0)["auc"] == pytest.approx(
        ev.compute_metrics(y, probs, ["a", "b"], n_bootstrap=0)["auc"]
    )


def test_absent_class_is_nan_safe() -> None:
    y = np.zeros(20, dtype=int)
    probs = np.random.default_rng(0).dirichlet([1, 1], size=20)
    m = ev.compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=100)
    assert m["auc"] is None and m["ci95"]["auc"] is None
    assert m["sensitivity"] is None and m["per_class"]["pos"]["recall"] is None
    assert any("AUC" in note for note in m["notes"])
    json.dumps(m, allow_nan=False)

    y4, p4 = _random_case(0, 4)
    keep = y4 != 3  # multi-class with one class missing: macro AUC over the classes present
    m4 = ev.compute_metrics(y4[keep], p4[keep], list("abcd"), n_bootstrap=50)
    expected = np.mean([skm.roc_auc_score(y4[keep] == c, p4[keep, c]) for c in range(3)])
    assert m4["auc"] == pytest.approx(expected)
    assert m4["per_class"]["d"]["support"] == 0 and m4["notes"]


def test_label_and_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="class names"):
        ev.compute_metrics([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        ev.compute_metrics([0, 1, 2], np.full((3, 3), 1 / 3), ["a", "b", "c"], threshold=0.3)


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_estimate_and_narrows() -> None:
    small_y, small_p = _random_case(3, 2, n=100)
    large_y, large_p = _random_case(3, 2, n=3000)
    small = ev.compute_metrics(small_y, small_p, ["a", "b"], n_bootstrap=400, seed=1)
    large = ev.compute_metrics(large_y, large_p, ["a", "b"], n_bootstrap=400, seed=1)
    for m in (small, large):
        for key in ("accuracy", "balanced_accuracy", "auc"):
            lo, hi = m["ci95"][key]
            assert lo < m[key] < hi
    for key in ("accuracy", "balanced_accuracy", "auc"):
        width_small = np.diff(small["ci95"][key])[0]
        width_large = np.diff(large["ci95"][key])[0]
        assert width_large < 0.5 * width_small  # ~ sqrt(100/3000) = 0.18 expected


def test_bootstrap_is_seeded_and_fast() -> None:
    """1000 resamples of a 624-image binary test set (chest X-ray's) take a few seconds at most."""
    y, p = _random_case(0, 2, n=624)
    start = time.perf_counter()
    a = ev.compute_metrics(y, p, list("ab"), n_bootstrap=1000, seed=7)
    elapsed = time.perf_counter() - start
    b = ev.compute_metrics(y, p, list("ab"), n_bootstrap=1000, seed=7)
    c = ev.compute_metrics(y, p, list("ab"), n_bootstrap=1000, seed=8)
    assert a["ci95"] == b["ci95"] and a["ci95"] != c["ci95"]
    assert elapsed < 10.0, f"1000 bootstrap resamples of 624 items took {elapsed:.2f} s"


def test_bootstrap_ci_is_the_percentile_interval_of_the_statistic() -> None:
    values = np.random.default_rng(0).normal(size=200)
    ci = ev.bootstrap_ci(lambda idx: {"mean": values[idx].mean(), "never": math.nan}, 200, n_bootstrap=500)
    rng = np.random.default_rng(0)
    means = [values[rng.integers(0, 200, 200)].mean() for _ in range(500)]
    assert ci["mean"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert ci["never"] is None


def test_paired_difference_sees_a_better_model_and_not_an_equal_one() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, 400), 0, 1)
    poor = np.clip(0.5 + (y - 0.5) * 0.1 + rng.normal(0, 0.2, 400), 0, 1)
    d = ev.paired_difference(y, good, poor, n_bootstrap=300)
    assert set(d) >= {"a", "b", "diff", "ci95"}
    assert d["a"] == pytest.approx(skm.roc_auc_score(y, good)) and d["b"] == pytest.approx(skm.roc_auc_score(y, poor))
    assert d["diff"] == pytest.approx(d["a"] - d["b"]) and 0 < d["ci95"][0] < d["diff"] < d["ci95"][1]
    same = ev.paired_difference(y, good, good, n_bootstrap=50)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    bacc = ev.paired_difference(y, binary(good), binary(poor), metric="balanced_accuracy", n_bootstrap=50)
    assert bacc["a"] == pytest.approx(skm.balanced_accuracy_score(y, good >= 0.5))
    with pytest.raises(ValueError, match="same images"):
        ev.paired_difference(y, good, poor[:-1])


# ---------------------------------------------------------------------------------- thresholds


def binary(p_pos: np.ndarray) -> np.ndarray:
    """(N,) P(class 1) as the (N, 2) probabilities predict_labels reads."""
    return np.stack([1 - p_pos, p_pos], axis=1)


def test_thresholds_are_read_off_sklearns_roc_curve() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.15), 0, 1), 2)  # ties
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = np.max(tpr - fpr)
    assert ev.choose_threshold(y, p) == max(t for f, s, t in zip(fpr, tpr, thresholds) if s - f == best)
    assert ev.choose_threshold(y, p, "sensitivity", 0.9) == max(t for s, t in zip(tpr, thresholds) if s >= 0.9)


def test_youden_separates_a_separable_case() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.uniform(0.05, 0.4, 50), rng.uniform(0.55, 0.95, 30)
    y = np.r_[np.zeros(50, int), np.ones(30, int)]
    p = np.r_[neg, pos]
    t = ev.choose_threshold(y, p, method="youden")
    assert neg.max() < t <= pos.min()
    assert (predict_labels(binary(p), t) == y).all()


def test_sensitivity_target_is_met_by_the_highest_threshold() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    for target in (0.8, 0.9, 0.95):
        t = ev.choose_threshold(y, p, method="sensitivity", target=target)
        sensitivity = (predict_labels(binary(p), t)[y == 1] == 1).mean()
        assert sensitivity >= target
        # any higher observed score as threshold would miss the target
        higher = np.unique(p[p > t])
        assert all((p[y == 1] >= h).mean() < target for h in higher)
    with pytest.raises(ValueError, match="Unknown method"):
        ev.choose_threshold(y, p, method="f1")


def test_predict_labels_threshold_is_inclusive_and_binary_only() -> None:
    assert predict_labels(binary(np.array([0.2, 0.5, 0.7])), 0.5).tolist() == [0, 1, 1]
    assert predict_labels(binary(np.array([0.2, 0.5, 0.7])), None).tolist() == [0, 0, 1]  # argmax: ties -> 0
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    assert predict_labels(three, 0.1).tolist() == [0, 2]  # a threshold means nothing for 3 classes
    assert not hasattr(ev, "apply_threshold"), "one home for thresholding: helpers.core.predict_labels"


def test_one_logit_convention_has_one_home() -> None:
    """(N,) and (N, 1) logits are a binary model everywhere: P(class 1) = sigmoid(z)."""
    z = np.array([-2.0, 0.0, 3.0])
    assert is_one_logit(z) and is_one_logit(z[:, None]) and is_one_logit(torch.tensor(z))
    assert not is_one_logit(np.zeros((3, 2))) and not is_one_logit(torch.zeros(3, 4))
    sigmoid = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(logits_to_probs(torch.tensor(z)).numpy()[:, 1], sigmoid, rtol=1e-6)
    np.testing.assert_allclose(ev.apply_temperature(z, 1.0)[:, 1], sigmoid, rtol=1e-6)
    np.testing.assert_allclose(ev.apply_temperature(z[:, None], 2.0)[:, 1], 1 / (1 + np.exp(-z / 2)), rtol=1e-6)


# ---------------------------------------------------------------------------------- calibration


def test_ece_zero_when_calibrated_and_large_when_overconfident() -> None:
    # confidence 0.6, 0.75, 0.9 groups with exactly that fraction correct
    y, rows = [], []
    for conf, n in ((0.6, 20), (0.75, 40), (0.9, 50)):
        n_correct = int(round(conf * n))
        for i in range(n):
            label = 1 if i < n_correct else 0  # prediction is always class 1 with probability conf
            y.append(label)
            rows.append([1 - conf, conf])
    assert ev.expected_calibration_error(np.array(y), np.array(rows)) == pytest.approx(0.0, abs=1e-12)

    y_over = np.array([0, 1] * 50)
    p_over = np.tile([0.01, 0.99], (100, 1))  # 99% confident, 50% right
    assert ev.expected_calibration_error(y_over, p_over) == pytest.approx(0.49, abs=1e-9)


@pytest.mark.parametrize("n_classes", [1, 3])
def test_temperature_scaling_recovers_two(n_classes: int) -> None:
    rng = np.random.default_rng(0)
    n = 6000
    true_logits = rng.normal(scale=2.0, size=(n, n_classes))
    probs = ev.apply_temperature(true_logits, 1.0)
    y = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)  # sample labels from the true model
    t = ev.fit_temperature(true_logits * 2.0, y)  # an over-confident model: logits doubled
    assert t == pytest.approx(2.0, rel=0.1)
    assert ev.fit_temperature(true_logits, y) == pytest.approx(1.0, rel=0.1)
    calibrated = ev.apply_temperature(true_logits * 2.0, t)
    assert calibrated.shape == (n, max(n_classes, 2))
    assert ev.expected_calibration_error(y, calibrated) < ev.expected_calibration_error(
        y, ev.apply_temperature(true_logits * 2.0, 1.0)
    )


# ---------------------------------------------------------------------------------- predict / TTA


def _loader(n: int = 10, size: int = 8, seed: int = 0, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)], x, y


def test_predict_returns_probs_labels_and_logits() -> None:
    torch.manual_seed(0)
    loader, x, y = _loader()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model.train()
    probs, labels, logits = ev.predict(model, loader, return_logits=True)
    assert not model.training  # predict puts the model in eval mode
    assert probs.shape == (10, 3) and labels.tolist() == y.tolist()
    assert np.allclose(probs.sum(1), 1.0)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    assert np.allclose(probs, expected, atol=1e-6)
    assert np.allclose(logits, model(x).detach().numpy(), atol=1e-5)


def test_predict_one_logit_gives_two_columns() -> None:
    loader, x, _ = _loader()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    probs, _ = ev.predict(model, loader)
    with torch.no_grad():
        p1 = torch.sigmoid(model(x))[:, 0].numpy()
    assert probs.shape == (10, 2)
    assert np.allclose(probs[:, 1], p1, atol=1e-6) and np.allclose(probs.sum(1), 1.0)


def test_tta_on_an_invariant_model_changes_nothing() -> None:
    torch.manual_seed(0)
    loader, _, _ = _loader()
    invariant = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))  # mean colour only
    plain, _ = ev.predict(invariant, loader)
    flips, _ = ev.predict(invariant, loader, tta="flips")
    assert np.allclose(plain, flips, atol=1e-6)


def test_tta_averages_the_given_views() -> None:
    torch.manual_seed(0)
    loader, x, _ = _loader()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))  # position-dependent: flips matter
    views = [lambda t: t, lambda t: torch.flip(t, dims=[-1])]
    probs, _ = ev.predict(model, loader, tta=views)
    with torch.no_grad():
        expected = (torch.softmax(model(x), 1) + torch.softmax(model(torch.flip(x, dims=[-1])), 1)) / 2
    assert np.allclose(probs, expected.numpy(), atol=1e-6)
    assert not np.allclose(probs, ev.predict(model, loader)[0], atol=1e-4)

    flips, _ = ev.predict(model, loader, tta="flips")
    with torch.no_grad():
        manual = sum(torch.softmax(model(f(x)), 1) for f in tta.TTA_FLIPS) / 4
    assert np.allclose(flips, manual.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="Unknown TTA"):
        ev.predict(model, loader, tta="mirror")


def test_tta_sets_are_named_and_plausible_keeps_orientation() -> None:
    assert set(tta.TTA_SETS) >= {"flips", "plausible"}
    names = [f.__name__ for f in tta.TTA_PLAUSIBLE]
    assert "vflip" not in names and "rot90" not in names and names[0] == "identity"
    x = torch.randn(2, 3, 16, 16)
    for f in tta.TTA_PLAUSIBLE:
        out = f(x)
        assert out.shape == x.shape
        # small rotations/shifts stay close to the image (a vertical flip would not)
        assert (out - x).abs().mean() < (torch.flip(x, dims=[-2]) - x).abs().mean()
    assert torch.allclose(tta.shift(0.0, 0.0)(x), x, atol=1e-5)


def test_ensemble_probs_is_the_mean() -> None:
    a, b = np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([[0.4, 0.6], [1.0, 0.0]])
    assert np.allclose(ev.ensemble_probs([a, b]), [[0.3, 0.7], [0.8, 0.2]])
    with pytest.raises(ValueError):
        ev.ensemble_probs([a, np.ones((3, 2))])


def test_fit_temperature_warns_when_logits_are_uninformative() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 3))
    y = rng.integers(0, 3, 500)  # labels independent of the logits: best T is "infinitely soft"
    with pytest.warns(UserWarning, match="edge of its search range"):
        ev.fit_temperature(logits, y)


def test_recall_intervals_contain_the_recall_and_narrow_with_more_data():
    rng = np.random.default_rng(3)

    def case(n):
        y = rng.integers(0, 2, n)
        p1 = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0, 1)
        return ev.compute_metrics(y, np.stack([1 - p1, p1], 1), ["NORMAL", "PNEUMONIA"], n_bootstrap=500)

    small, large = case(60), case(2000)
    for m in (small, large):
        for key, name in (("sensitivity", "PNEUMONIA"), ("specificity", "NORMAL")):
            lo, hi = m["ci95"][key]
            assert lo <= m[key] <= hi
            assert m["ci95"]["recall"][name] == [lo, hi]
    width = lambda m: m["ci95"]["specificity"][1] - m["ci95"]["specificity"][0]  # noqa: E731
    assert width(large) < width(small) / 2


def test_epoch_metrics_are_nan_when_a_class_is_missing_and_match_sklearn() -> None:
    """What `fit` reports after every epoch: the formulas of compute_metrics, NaN where undefined."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    assert math.isnan(ev.epoch_metrics(np.array([0, 1, 1]), probs)["auc"])
    assert ev.epoch_metrics(np.array([0, 1, 2]), probs)["auc"] == 1.0
    assert ev.epoch_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))["auc"] == 1.0
    assert math.isnan(ev.epoch_metrics(np.array([0, 1]), np.array([[np.nan, np.nan], [0.2, 0.8]]))["auc"])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet(np.ones(3), 200)
    scores = ev.epoch_metrics(y, p)
    assert scores["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert scores["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))




def test_proportion_ci_is_wilsons_interval() -> None:
    lo, hi = ev.proportion_ci(8, 10)
    z, p, n = 1.959964, 0.8, 10  # Wilson's formula by hand
    d = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    assert np.isclose(lo, centre - half, atol=1e-5) and np.isclose(hi, centre + half, atol=1e-5)
    assert ev.proportion_ci(0, 10)[0] == 0.0 and all(np.isnan(ev.proportion_ci(0, 0)))
