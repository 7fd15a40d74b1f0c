"""helpers.reporting: the sentences of a conclusion (intervals, A against B, targets, caveats,
collapsed runs), asserted on what they say."""

from __future__ import annotations

import math
import numpy as np
import pytest

from coursebuild import records
from helpers import evaluate as ev
from helpers import reporting
from helpers.runs import apply_profile


def test_with_ci_formats_value_and_interval():
    block = {"auc": 0.91234, "accuracy": 0.5, "sensitivity": None,
             "ci95": {"auc": [0.8901, 0.93149], "accuracy": None}}
    assert reporting.with_ci(block, "auc") == "0.912 [0.890, 0.931]"
    assert reporting.with_ci(block, "accuracy") == "0.500"
    assert reporting.with_ci(block, "sensitivity") == "undefined"


def test_with_ci_says_undefined_for_a_one_class_split():
    """The AUC of a split holding one class is None; formatting it must not crash a notebook."""
    block = ev.compute_metrics([1, 1, 1], [[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]], ["NORMAL", "PNEUMONIA"],
                               n_bootstrap=20)
    assert block["auc"] is None
    assert reporting.with_ci(block, "auc") == "undefined"
    assert reporting.with_ci(block, "specificity") == "undefined"


def test_with_ci_reads_a_results_table_row_too(tmp_path) -> None:
    """A results table row (`coursebuild.records.results_table`) is formatted by the same function."""
    block = ev.compute_metrics([0, 1, 0, 1, 1, 0], [0.2, 0.8, 0.3, 0.6, 0.9, 0.1], ["a", "b"], n_bootstrap=50)
    row = records.results_table([{"notebook": "x", "test": block}]).iloc[0]
    assert reporting.with_ci(row, "test_auc") == reporting.with_ci(block, "auc")
    assert reporting.with_ci({"test_auc": None}, "test_auc", missing="") == ""
    assert reporting.with_ci({"test_auc": float("nan")}, "test_auc") == "undefined"


def test_run_caveats_name_what_a_reduced_run_cannot_show() -> None:
    smoke = reporting.run_caveats(apply_profile("smoke"), synthetic=True, pretrained=False, task="pneumonia")
    assert len(smoke) == 2 and "Smoke profile" in smoke[0] and "synthetic images" in smoke[0]
    assert "pneumonia" in smoke[0] and "NOT transfer learning" in smoke[1] and "from scratch" in smoke[1]
    cpu = reporting.run_caveats(apply_profile("cpu"), synthetic=False, pretrained=False)
    assert "CPU profile" in cpu[0] and "at most 300 images" in cpu[0] and "could be loaded" in cpu[1]
    assert reporting.run_caveats(apply_profile("cpu"), synthetic=True, pretrained=None)[1].startswith("**Synthetic")
    assert reporting.run_caveats(apply_profile("full", recipe_epochs=5), synthetic=False, pretrained=True) == []


def test_collapse_note_fires_on_a_one_class_run_and_not_on_a_balanced_one():
    """A run that calls (almost) every test image one class (02 in the reference run) must be told apart."""
    names = ["COVID19", "NORMAL", "PNEUMONIA", "TB"]
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [45, 105, 300, 48])
    scores = rng.dirichlet(np.ones(4), len(y))
    scores[:, 2] += 2.0  # PNEUMONIA wins everywhere: the argmax is constant
    scores[np.arange(len(y)), y] += 0.3  # ... but the scores still rank the true class higher
    collapsed = ev.compute_metrics(y, scores / scores.sum(1, keepdims=True), names, n_bootstrap=200)
    assert np.asarray(collapsed["confusion_matrix"]).sum(axis=0).tolist() == [0, 0, len(y), 0]
    assert reporting.dominant_class(collapsed) == (2, 1.0, 300 / len(y), True)
    note = reporting.collapse_note(collapsed, names)
    assert note is not None and note.startswith("**Collapsed to one class:**")
    assert f"calls {len(y)} of {len(y)} test images PNEUMONIA" in note
    assert "0.250" in note and "lies above 0.5" in note and "largest class" in note

    skilled = rng.dirichlet(np.ones(4), len(y))
    skilled[np.arange(len(y)), y] += 1.0  # every image's true class wins
    balanced = ev.compute_metrics(y, skilled / skilled.sum(1, keepdims=True), names, n_bootstrap=200)
    assert reporting.collapse_note(balanced, names) is None


def test_collapse_note_calls_a_majority_heavy_run_leaning():
    """89% of predictions on a class that is 60% of the labels (the 01 reference run): leaning, not collapsed."""
    block = {"confusion_matrix": [[5, 1, 39, 0], [6, 6, 93, 0], [15, 2, 283, 0], [13, 5, 30, 0]],
             "accuracy": 0.590, "balanced_accuracy": 0.278, "auc": 0.665, "ci95": {"auc": [0.62, 0.71]}}
    note = reporting.collapse_note(block, ["COVID19", "NORMAL", "PNEUMONIA", "TB"])
    assert note.startswith("**Leaning on one class:**") and "445 of 498" in note and "89%" in note
    assert reporting.dominant_class(block).collapsed is False
    assert reporting.collapse_note(block, ["COVID19", "NORMAL", "PNEUMONIA", "TB"], leaning=0.9) is None
    # The same share on a class that is that common among the labels is no bias.
    fair = {"confusion_matrix": [[4, 6], [5, 85]], "accuracy": 0.89, "balanced_accuracy": 0.67, "auc": None}
    assert reporting.collapse_note(fair, ["NORMAL", "PNEUMONIA"]) is None



def test_with_ci_says_too_few_instead_of_a_zero_width_interval():
    block = {"specificity": 1.0, "sensitivity": 0.9, "recall": 0.5, "auc": 0.8,
             "per_class": {"NORMAL": {}, "PNEUMONIA": {}}, "too_few": {"NORMAL": 1},
             "ci95": {"specificity": None, "sensitivity": [0.8, 0.95], "auc": [0.7, 0.9]}}
    assert reporting.with_ci(block, "specificity") == "1.000 (too few to measure: 1 NORMAL image)"
    assert reporting.with_ci(block, "sensitivity") == "0.900 [0.800, 0.950]"  # rests on PNEUMONIA
    assert reporting.with_ci(block, "auc") == "0.800 [0.700, 0.900]"


@pytest.mark.parametrize("diff, expected", [
    ({"a": 0.9, "b": 0.805, "diff": 0.095, "ci95": [0.066, 0.122]},
     "A is higher than B by 0.095 [0.066, 0.122]"),
    ({"a": 0.8, "b": 0.895, "diff": -0.095, "ci95": [-0.122, -0.066]},
     "A is lower than B by 0.095 [0.066, 0.122]"),
    ({"a": 0.9, "b": 0.888, "diff": 0.012, "ci95": [-0.020, 0.041]},
     "A and B are not clearly different (difference +0.012 [-0.020, 0.041])"),
    ({"a": 0.9, "b": 0.888, "diff": 0.012, "ci95": None},
     "A and B are not clearly different (difference +0.012, no interval)"),
    ({"a": None, "b": 0.888, "diff": None, "ci95": None}, "A and B cannot be compared (difference undefined)"),
])
def test_versus_says_higher_or_lower_only_when_the_paired_interval_excludes_zero(diff, expected):
    assert reporting.versus("A", "B", diff) == expected


def test_versus_never_prints_an_interval_that_excludes_zero_as_touching_it():
    text = reporting.versus("A", "B", {"a": 0.9, "b": 0.897, "diff": 0.003, "ci95": [0.0002, 0.006]})
    assert text == "A is higher than B by 0.0030 [0.0002, 0.0060]"


def test_target_note_prints_enough_digits_to_show_why():
    assert reporting.target_note("sensitivity", 0.8974, 0.9) == "sensitivity: missed (0.897 < 0.900)"
    assert reporting.target_note("sensitivity", 0.8996, 0.9) == "sensitivity: missed (0.8996 < 0.9000)"
    assert reporting.target_note("sensitivity", 0.9012, 0.9) == "sensitivity: met (0.901 >= 0.900)"
    assert reporting.target_note("sensitivity", 0.9, 0.9) == "sensitivity: met (0.900 >= 0.900)"
    assert reporting.target_note("ECE", 0.049, 0.05, higher_is_better=False) == "ECE: met (0.049 <= 0.050)"
    assert reporting.target_note("ECE", 0.0504, 0.05, higher_is_better=False) == "ECE: missed (0.0504 > 0.0500)"
    assert reporting.target_note("AUC", None, 0.8) == "AUC: undefined (target 0.8)"
    assert reporting.target_note("AUC", float("nan"), 0.8) == "AUC: undefined (target 0.8)"


def test_interval_columns_are_three_numbers_and_nan_where_undefined() -> None:
    block = {"auc": 0.9, "recall": None, "ci95": {"auc": [0.8, 0.95]}}
    assert reporting.interval_columns(block, "auc", "test_") == {"test_auc": 0.9, "test_auc_lo": 0.8,
                                                                 "test_auc_hi": 0.95}
    assert all(math.isnan(v) for v in reporting.interval_columns(block, "recall").values())


def test_enough_digits_tells_two_close_numbers_apart() -> None:
    assert reporting.enough_digits(0.8996, 0.9) == 4 and reporting.enough_digits(0.5, 0.5) == 3


def test_scores_and_recalls_read_the_metrics_block_they_are_given() -> None:
    """`scores` joins `with_ci` of each metric under its name; `recalls` lists each class's recall."""
    block = ev.compute_metrics([0, 1, 0, 1, 1, 0, 1, 1], [0.2, 0.8, 0.6, 0.7, 0.9, 0.1, 0.3, 0.6],
                               ["NORMAL", "PNEUMONIA"], n_bootstrap=50)
    text = reporting.scores(block, ("auc", "accuracy"), names={"auc": "macro AUC"})
    assert text == f"macro AUC {reporting.with_ci(block, 'auc')}, accuracy {reporting.with_ci(block, 'accuracy')}"
    assert reporting.recalls(block) == "NORMAL 0.67, PNEUMONIA 0.80"  # 2 of 3 NORMAL, 4 of 5 PNEUMONIA
    assert reporting.recalls({"per_class": {"a": {"recall": None}, "b": {"recall": 0.5}}}) == "b 0.50"
