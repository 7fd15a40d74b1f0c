"""The sentences every conclusion needs, computed from the run so that they stay true: `with_ci`, `scores`,
`recalls`, `versus`, `target_note`, `run_caveats` (what a reduced run cannot show) and `collapse_note` (one class
for every image).
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
    """'1 NORMAL image' when `key` of a `compute_metrics` block rests on a class in its `too_few`."""
    too_few, names = block.get("too_few") or {}, list(block.get("per_class") or {})
    if key in ("specificity", "sensitivity") and names:
        keep = names[0] if key == "specificity" else names[-1]
        too_few = {n: k for n, k in too_few.items() if n == keep}
    elif key != "recall":
        return ""
    return ", ".join(f"{k} {n} image{'s' if k > 1 else ''}" for n, k in too_few.items())


def with_ci(block: dict[str, Any], key: str, digits: int = 3, missing: str = "undefined") -> str:
    """'0.912 [0.890, 0.931]' from a `compute_metrics` block (interval in `ci95`) or a results-table row
    (`test_auc_lo`/`_hi`); `missing` when undefined, a note instead of the interval for too few images."""
    value = block.get(key)
    interval = ((block.get("ci95") or {}).get(key) if "ci95" in block
                else [block.get(f"{key}_lo"), block.get(f"{key}_hi")])
    if _undefined(value):
        return missing
    if few := _too_few(block, key):
        return f"{value:.{digits}f} (too few to measure: {few})"
    if not interval or any(_undefined(v) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "auc": "AUC", "accuracy": "accuracy",
                "sensitivity": "sensitivity", "specificity": "specificity"}


def scores(block: dict[str, Any], keys: Sequence[str] = ("balanced_accuracy", "auc", "accuracy"),
           names: dict[str, str] | None = None) -> str:
    """'balanced accuracy 0.904 [0.864, 0.939], AUC 0.990 [...], ...': `with_ci` of several metrics of a block."""
    names = {**METRIC_NAMES, **(names or {})}
    return ", ".join(f"{names.get(key, key)} {with_ci(block, key)}" for key in keys)


def recalls(block: dict[str, Any], digits: int = 2) -> str:
    """'COVID19 0.95, NORMAL 0.81, ...': the recall of every class of a `compute_metrics` block that has one."""
    return ", ".join(f"{name} {s['recall']:.{digits}f}" for name, s in (block.get("per_class") or {}).items()
                     if not _undefined(s.get("recall")))


def run_caveats(cfg: Config, *, synthetic: bool, pretrained: bool | None,
                task: str = "the task") -> list[str]:
    """What this run's numbers cannot show, as sentences (empty for a full run on real data with ImageNet
    weights); `pretrained`: were ImageNet weights really loaded (None where no network is trained)."""
    data, caveats = "synthetic images" if synthetic else "real images", []
    if cfg.profile == "smoke":
        caveats.append(f"**Smoke profile: these numbers do not reflect the recipe.** A few dozen {data}, "
                       f"{cfg.image_size} px, {cfg.epochs} epoch(s): the run proves that the code works end to "
                       f"end and says nothing about {task}. Do not compare it with published results or a full run.")
    elif cfg.profile == "cpu":
        subset = f"at most {cfg.max_per_class} images per class and split" if cfg.max_per_class else "all images"
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


class Dominant(NamedTuple):
    """The class a run answers for (almost) every image (`dominant_class`)."""
    index: int  # the class, an index into class_names
    share: float  # of all predictions
    true_share: float  # of the true labels
    collapsed: bool  # True: (almost) every image; False: leaning on it


def dominant_class(block: dict[str, Any], *, collapsed: float = 0.95, leaning: float = 0.80,
                   excess: float = 0.15) -> Dominant | None:
    """The class taking at least `collapsed` of the predictions, or `leaning` of them while at least `excess` less
    common among the true labels; None when no class dominates."""
    matrix = np.asarray(block["confusion_matrix"], dtype=int)
    if (total := int(matrix.sum())) == 0:
        return None
    top = int(np.argmax(matrix.sum(axis=0)))
    share, true_share = matrix[:, top].sum() / total, matrix[top].sum() / total
    if share >= collapsed:
        return Dominant(top, float(share), float(true_share), True)
    if share >= leaning and share - true_share >= excess:
        return Dominant(top, float(share), float(true_share), False)
    return None


def collapse_note(block: dict[str, Any], class_names: Sequence[str], **thresholds: float) -> str | None:
    """A sentence for the conclusion when one class dominates the predictions (`dominant_class`), else None."""
    if (dominant := dominant_class(block, **thresholds)) is None:
        return None
    predicted = np.asarray(block["confusion_matrix"], dtype=int).sum(axis=0).tolist()  # per predicted class
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


def interval_columns(block: dict[str, Any], metric: str, prefix: str = "") -> dict[str, float]:
    """One metric of a `compute_metrics` block and its 95% interval as three table columns (NaN if undefined:
    no bar, no whiskers): {prefix+metric, prefix+metric_lo, prefix+metric_hi}."""
    lo, hi = (block.get("ci95") or {}).get(metric) or (None, None)
    return {f"{prefix}{metric}{end}": math.nan if _undefined(v) else float(v)
            for end, v in (("", block.get(metric)), ("_lo", lo), ("_hi", hi))}


def enough_digits(a: float, b: float, start: int = 3, most: int = 8) -> int:
    """The fewest digits (`start` to `most`) at which `a` and `b` print differently; `start` when equal."""
    return start if a == b else next((d for d in range(start, most) if f"{a:.{d}f}" != f"{b:.{d}f}"), most)


def versus(name_a: str, name_b: str, diff: dict[str, Any], digits: int = 3) -> str:
    """"A is higher than B by 0.095 [0.066, 0.122]" when the paired interval of `evaluate.paired_difference`
    excludes 0, else "A and B are not clearly different (difference +0.012 [-0.020, 0.041])"."""
    d, ci = diff.get("diff"), diff.get("ci95")
    if _undefined(d):
        return f"{name_a} and {name_b} cannot be compared (difference undefined)"
    if not ci or any(_undefined(v) for v in ci):
        return f"{name_a} and {name_b} are not clearly different (difference {d:+.{digits}f}, no interval)"
    lo, hi = ci
    if lo > 0 or hi < 0:
        near, far = sorted((abs(lo), abs(hi)))
        n = enough_digits(near, 0.0, digits)  # an interval that excludes 0 never prints as touching it
        return (f"{name_a} is {'higher' if lo > 0 else 'lower'} than {name_b} by {abs(d):.{n}f} "
                f"[{near:.{n}f}, {far:.{n}f}]")
    return f"{name_a} and {name_b} are not clearly different (difference {d:+.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}])"


def target_note(what: str, value: float | None, target: float, *, higher_is_better: bool = True) -> str:
    """"sensitivity: met (0.912 >= 0.900)" / "missed (0.8996 < 0.9000)", with enough digits for the two to differ."""
    if _undefined(value):
        return f"{what}: undefined (target {target})"
    met = value >= target if higher_is_better else value <= target
    op = (">=" if met else "<") if higher_is_better else ("<=" if met else ">")
    n = enough_digits(value, target)
    return f"{what}: {'met' if met else 'missed'} ({value:.{n}f} {op} {target:.{n}f})"
