"""The sentences every conclusion needs, computed from the run so that they stay true.

- `with_ci`: a metric with its bootstrap interval, `0.912 [0.890, 0.931]`.
- `versus`: model A against model B with a paired interval (`evaluate.paired_difference`):
  "higher by 0.095 [0.066, 0.122]" or "not clearly different".
- `target_note`: a target met or missed, with enough digits to show why (`0.897 < 0.900`).
- `run_caveats`: what a reduced run cannot show (smoke or cpu profile, synthetic images, no
  ImageNet weights), in the same words in every notebook.
- `dominant_class` / `collapse_note`: a run that answers (almost) one class for every image, and
  what its accuracy and balanced accuracy then mean (`predicted_counts`: images per predicted class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from helpers.runs import Config


def _undefined(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _too_few(block: dict[str, Any], key: str) -> str:
    """'1 NORMAL image' when `key` of a `compute_metrics` block rests on a class with too few images
    (its `too_few` {class: images}): recall, sensitivity (the last class), specificity (the first)."""
    too_few, names = block.get("too_few") or {}, list(block.get("per_class") or {})
    if key in ("specificity", "sensitivity") and names:
        keep = names[0] if key == "specificity" else names[-1]
        too_few = {n: k for n, k in too_few.items() if n == keep}
    elif key != "recall":
        return ""
    return ", ".join(f"{k} {n} image{'s' if k > 1 else ''}" for n, k in too_few.items())


def with_ci(block: dict[str, Any], key: str, digits: int = 3, missing: str = "undefined") -> str:
    """A metric with its bootstrap interval: '0.912 [0.890, 0.931]'.

    `block` is a `compute_metrics` block (`key` = "auc", interval in `block["ci95"]`) or a row of
    `results_table` (`key` = "test_auc", interval in "test_auc_lo" / "test_auc_hi"). An undefined
    metric (e.g. the AUC of a split holding one class) gives `missing`, so a table or a sentence
    says so instead of crashing on None; a metric resting on a class with too few images
    (`block["too_few"]`) says so instead of an interval; one without interval gives the value.
    """
    value = block.get(key)
    if "ci95" in block:
        interval = (block.get("ci95") or {}).get(key)
    else:
        interval = [block.get(f"{key}_lo"), block.get(f"{key}_hi")]
    if _undefined(value):
        return missing
    if few := _too_few(block, key):
        return f"{value:.{digits}f} (too few to measure: {few})"
    if not interval or any(_undefined(v) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def run_caveats(cfg: Config, *, synthetic: bool, pretrained: bool | None,
                task: str = "the task") -> list[str]:
    """What this run's numbers cannot show, as sentences for the conclusion (empty for a full run
    on real data with ImageNet weights).

    `cfg` is the run's `Config` (profile, image size, epochs, subset size); `synthetic`: were the
    images generated; `pretrained`: were ImageNet weights really loaded (`model.pretrained`; None
    where no network is trained). `task` names what the smoke profile says nothing about.
    """
    data = "synthetic images" if synthetic else "real images"
    caveats = []
    if cfg.profile == "smoke":
        caveats.append(f"**Smoke profile: these numbers do not reflect the recipe.** A few dozen {data}, "
                       f"{cfg.image_size} px, {cfg.epochs} epoch(s): the run proves that the code works end to "
                       f"end and says nothing about {task}. Do not compare it with published results or a full run.")
    elif cfg.profile == "cpu":
        subset = (f"at most {cfg.max_per_class} images per class and split" if cfg.max_per_class
                  else "all images")
        caveats.append(f"**CPU profile: not the full recipe** ({subset}, {cfg.image_size} px, "
                       f"{cfg.epochs} epoch(s)). Expect the `full` profile on a "
                       "GPU to differ; compare with published results only after a full run.")
    if synthetic and cfg.profile != "smoke":
        caveats.append("**Synthetic data** (`DATA_DIR = \"synthetic\"`): generated images, not patients.")
    if pretrained is False:
        caveats.append("**No ImageNet weights"
                       + (" could be loaded" if cfg.pretrained else " (the profile trains from scratch)")
                       + ": this was NOT transfer learning** (random initialisation), and the numbers are "
                       "not comparable with published transfer-learning results.")
    return caveats


def predicted_counts(block: dict[str, Any]) -> list[int]:
    """Images predicted as each class: the column sums of `block["confusion_matrix"]` (rows are
    the true classes, columns the predicted ones, as in `compute_metrics`)."""
    return np.asarray(block["confusion_matrix"], dtype=int).sum(axis=0).tolist()


class Dominant(NamedTuple):
    """The class a run answers for (almost) every image (`dominant_class`)."""

    index: int  # the class, an index into class_names
    share: float  # of all predictions
    true_share: float  # of the true labels
    collapsed: bool  # True: (almost) every image; False: leaning on it


def dominant_class(block: dict[str, Any], *, collapsed: float = 0.95, leaning: float = 0.80,
                   excess: float = 0.15) -> Dominant | None:
    """The class that takes at least `collapsed` of a run's predictions (collapsed), or at least
    `leaning` of them while being at least `excess` less common among the true labels (leaning);
    None when no class dominates. `block` is a `compute_metrics` block."""
    matrix = np.asarray(block["confusion_matrix"], dtype=int)
    total = int(matrix.sum())
    if total == 0:
        return None
    top = int(np.argmax(matrix.sum(axis=0)))
    share, true_share = matrix[:, top].sum() / total, matrix[top].sum() / total
    if share >= collapsed:
        return Dominant(top, float(share), float(true_share), True)
    if share >= leaning and share - true_share >= excess:
        return Dominant(top, float(share), float(true_share), False)
    return None


def collapse_note(block: dict[str, Any], class_names: Sequence[str], **thresholds: float) -> str | None:
    """A sentence for the conclusion when one class dominates a run's predictions (`dominant_class`,
    whose thresholds it passes on), else None: the counts, what accuracy and balanced accuracy
    measure in that case, whether the AUC interval says the scores still rank, cause and remedies."""
    dominant = dominant_class(block, **thresholds)
    if dominant is None:
        return None
    predicted = predicted_counts(block)
    total, name, k = sum(predicted), class_names[dominant.index], len(class_names)
    auc_ci = (block.get("ci95") or {}).get("auc")
    if block.get("auc") is None:
        ranking = ""
    elif auc_ci and auc_ci[0] is not None and auc_ci[0] > 0.5:
        ranking = (f" Its AUC {with_ci(block, 'auc')} lies above 0.5: the scores rank the classes better than chance, so "
                   "something was learned; it is the decision (the largest score wins) that does not use it.")
    else:
        ranking = f" Its AUC {with_ci(block, 'auc')} does not clear 0.5: the scores do not even rank the classes."
    if dominant.collapsed:
        head = (f"**Collapsed to one class:** the model calls {predicted[dominant.index]} of {total} test images {name}. "
                f"Its accuracy ({block['accuracy']:.3f}) is then just the share of {name} in the test split "
                f"({dominant.true_share:.3f}), and its balanced accuracy ({block['balanced_accuracy']:.3f}) is the value "
                f"of a constant answer (1/{k} = {1 / k:.3f}), not a measured skill.")
    else:
        head = (f"**Leaning on one class:** the model calls {predicted[dominant.index]} of {total} test images "
                f"({dominant.share:.0%}) {name}, a class that holds only {dominant.true_share:.0%} of them, so the other "
                f"classes are rarely recognised (balanced accuracy {block['balanced_accuracy']:.3f}, chance 1/{k} = "
                f"{1 / k:.3f}).")
    largest = dominant.index == int(np.argmax(np.asarray(block["confusion_matrix"]).sum(axis=1)))
    cause = (f" {name} is the largest class: a network trained briefly on imbalanced classes finds the majority "
             "answer first." if largest else
             f" {name} is not the largest class here: look at the training curves and the learning rate.")
    return (head + ranking + cause + " ImageNet weights (notebook 04), class-balanced sampling or loss weights "
            "(notebook 05) and more epochs (the `full` profile) are the usual ways out.")


def _enough_digits(a: float, b: float, start: int = 3, most: int = 8) -> int:
    """The fewest digits (at least `start`, at most `most`) at which `a` and `b` print differently;
    `start` when they are equal."""
    if a == b:
        return start
    return next((d for d in range(start, most) if f"{a:.{d}f}" != f"{b:.{d}f}"), most)


def versus(name_a: str, name_b: str, diff: dict[str, Any], digits: int = 3) -> str:
    """A against B on the same images, from `evaluate.paired_difference`'s {"a", "b", "diff",
    "ci95": [lo, hi]} (diff = a - b): "A is higher than B by 0.095 [0.066, 0.122]" when the paired
    95% interval excludes 0, else "A and B are not clearly different (difference +0.012 [-0.020,
    0.041])". Without an interval (`ci95` None: no bootstrap) no difference is called clear."""
    d, ci = diff.get("diff"), diff.get("ci95")
    if _undefined(d):
        return f"{name_a} and {name_b} cannot be compared (difference undefined)"
    if not ci or any(_undefined(v) for v in ci):
        return f"{name_a} and {name_b} are not clearly different (difference {d:+.{digits}f}, no interval)"
    lo, hi = ci
    if lo > 0 or hi < 0:
        near, far = sorted((abs(lo), abs(hi)))
        n = _enough_digits(near, 0.0, digits)  # an interval that excludes 0 never prints as touching it
        return (f"{name_a} is {'higher' if lo > 0 else 'lower'} than {name_b} by {abs(d):.{n}f} "
                f"[{near:.{n}f}, {far:.{n}f}]")
    return f"{name_a} and {name_b} are not clearly different (difference {d:+.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}])"


def target_note(what: str, value: float | None, target: float, *, higher_is_better: bool = True) -> str:
    """"sensitivity: met (0.912 >= 0.900)" / "sensitivity: missed (0.897 < 0.900)": whether `value`
    reaches `target`, printed with as many digits as it takes for the two to differ (at least 3),
    so that 0.8996 reads "0.8996 < 0.9000", never "0.900 < 0.900"."""
    if _undefined(value):
        return f"{what}: undefined (target {target})"
    met = value >= target if higher_is_better else value <= target
    op = (">=" if met else "<") if higher_is_better else ("<=" if met else ">")
    n = _enough_digits(value, target)
    return f"{what}: {'met' if met else 'missed'} ({value:.{n}f} {op} {target:.{n}f})"
