"""When a split holds too few images of a class to measure anything about it.

`flag_too_few` marks a `compute_metrics` block (`too_few` {class: images}, intervals removed, a
note); `too_few_for` tells `helpers.reporting.with_ci` which printed metric rests on such a class,
so a report says "too few to measure" instead of quoting a zero-width interval.
"""

from __future__ import annotations

from typing import Any

# A class with fewer test images than this is too few to measure: one NORMAL image gives specificity
# 0 or 1 and a bootstrap interval of zero width ([1.000, 1.000]), which reads as certainty. Below 10
# images a recall moves by 10 points or more per image, wider than any difference the course compares.
MIN_CLASS_IMAGES = 10


def flag_too_few(metrics: dict[str, Any], names: list[str], notes: list[str]) -> None:
    """Mark classes with 0 < support < MIN_CLASS_IMAGES: `too_few` {class: images}; their recall
    (sensitivity, specificity) loses its interval, which would read as certainty."""
    support = {n: metrics["per_class"][n]["support"] for n in names}
    too_few = {n: k for n, k in support.items() if 0 < k < MIN_CLASS_IMAGES}
    if not too_few:
        return
    metrics["too_few"] = too_few
    ci = metrics["ci95"]
    for name in too_few:
        (ci.get("recall") or {})[name] = None
        if len(names) == 2:
            ci["specificity" if name == names[0] else "sensitivity"] = None
    notes.append("too few images to measure: " + ", ".join(f"{n} {k}" for n, k in too_few.items())
                 + f" (fewer than {MIN_CLASS_IMAGES}): their recall is given without an interval and "
                 "says little; balanced accuracy and AUC rest on it too")


def too_few_for(block: dict[str, Any], key: str) -> str:
    """'1 NORMAL image' when `key` of a `compute_metrics` block rests on a class with too few images."""
    too_few, names = block.get("too_few") or {}, list(block.get("per_class") or {})
    if key == "specificity" and names:
        too_few = {n: k for n, k in too_few.items() if n == names[0]}
    elif key == "sensitivity" and names:
        too_few = {n: k for n, k in too_few.items() if n == names[-1]}
    elif key != "recall":
        return ""
    return ", ".join(f"{k} {n} image{'s' if k > 1 else ''}" for n, k in too_few.items())
