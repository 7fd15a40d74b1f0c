"""The first exercise API (notebooks 03-08 until they move to the chapter modules): `Exercise`
with references computed from the notebook's globals, and the `StandIn` model.

Exercises checked in the kernel: a blank for the student, a check, a hint and a solution.

An exercise notebook computes every reference from the data of its own run and hands it (or a
function computing it) to `Exercise`; nothing is hard-coded. Known mistakes are given the same
way, each with the one sentence that says what is wrong::

    q1 = Exercise("q1", reference=lambda: losses.pos_weight(y_train).item(),
                  mistakes=[(lambda: n_pos / n_neg, "inverted: pos_weight is n_negative / n_positive.")],
                  hint="Count the negatives and the positives of the training labels.",
                  solution="answer = (y_train == 0).sum() / (y_train == 1).sum()")
    answer = ____          # the student replaces the blank
    q1.check(answer)       # ✓ / ✗ line, or "not attempted yet"; returns a bool, never raises

A blank (`____`, `...` or `NotImplemented`, also inside a tuple, list or dict) makes `check` say
"not attempted yet" and the notebook goes on, so Run All, papermill and CI never stop on it.
Why not otter-grader, nbautoeval or jupyterquiz: none is in a Kaggle kernel, where the internet may
be off; otter-grader also needs a grading setup, and jupyterquiz checks in JavaScript, not in the kernel.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.core import seed_everything, to_numpy
from helpers.exercises.core import ____, is_blank, same  # noqa: F401 -- the notebooks import ____ from here
from helpers.exercises.core import numeric as _numeric


def _value(source: Any) -> Any:
    return source() if callable(source) else source


def _summary(value: Any) -> str:
    array = _numeric(value)
    if array is not None and array.ndim > 0:
        return f"an array of shape {array.shape}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Mistake = tuple[Any, str]  # (a value, a function computing it, or a test answer -> bool; the message)


class Exercise:
    """One exercise: `check(answer)`, `hint()`, `solution()` (prints the solution code).

    reference: the correct answer, or a function of no arguments computing it (from this run's data).
    mistakes: (value or function, message) pairs for typical wrong answers; a function taking one
        argument is a test `answer -> bool`, one taking none computes the wrong value.
    choices: for a multiple-choice question, {letter: text}; the reference is one of the letters.
    compare: `(answer, reference) -> bool` instead of `same` (with `rtol`, `atol`).
    """

    def __init__(self, name: str, reference: Any, *, hint: str, solution: str,
                 mistakes: Sequence[Mistake] = (), choices: dict[str, str] | None = None,
                 compare: Callable[[Any, Any], bool] | None = None,
                 rtol: float = 1e-4, atol: float = 1e-6) -> None:
        self.name, self._reference, self._hint = name, reference, hint
        self.solution_code = textwrap.dedent(solution).strip()
        self.mistakes, self.choices = list(mistakes), choices
        self._compare = compare or (lambda a, r: same(a, r, rtol, atol))

    def diagnose(self, answer: Any) -> tuple[bool | None, str]:
        """(True, message) when right, (False, what is wrong) when wrong, (None, ...) when blank."""
        return _diagnose(self, answer)

    def check(self, answer: Any) -> bool:
        """Print a ✓ / ✗ line (or "not attempted yet") and return whether the answer is right."""
        ok, message = self.diagnose(answer)
        if ok is None:
            print(f"○ {self.name}: {message}")
            return False
        print(f"{'✓' if ok else '✗'} {self.name}: {message}")
        return ok

    def hint(self) -> None:
        print(f"Hint ({self.name}): {self._hint}")

    def solution(self) -> None:
        print(f"Solution ({self.name}):\n{self.solution_code}")

    def __repr__(self) -> str:
        return f"Exercise({self.name!r}): {self.name}.check(answer), {self.name}.hint(), {self.name}.solution()"


def _matches(compare: Callable[[Any, Any], bool], test: Any, answer: Any) -> bool:
    """Whether `answer` matches `test`: a function answer -> bool, or a value (or a function computing it)."""
    try:
        if callable(test) and getattr(test, "__code__", None) is not None and test.__code__.co_argcount == 1:
            return bool(test(answer))
        return compare(answer, _value(test))
    except Exception:  # a test that cannot even run on this answer does not match it
        return False


def _diagnose(q: Exercise, answer: Any) -> tuple[bool | None, str]:
    if is_blank(answer):
        return None, f"not attempted yet: replace ____ with your answer ({q.name}.hint() helps)."
    if q.choices is not None:
        answer = str(answer).strip().upper()
        if answer not in q.choices:
            return False, f"choose one of {', '.join(map(repr, q.choices))}, not {answer!r}."
    reference = _value(q._reference)
    if _matches(q._compare, lambda a: q._compare(a, reference), answer):
        return True, "correct."
    for test, message in q.mistakes:
        if _matches(q._compare, test, answer):
            return False, message
    a, r = _numeric(answer), _numeric(reference)
    if q.choices is None and a is not None and r is not None and a.shape != r.shape:
        return False, f"wrong shape: expected {r.shape}, got {a.shape}."
    return False, f"{_summary(answer)} is not what this run's data gives; {q.name}.hint() may help."


class StandIn(nn.Module):
    """A tiny linear model on 4x4 grey thumbnails: it stands in for a chapter's network so that
    an exercise runs in seconds. It takes uint8 images (N, 3, S, S) like the tensor cache."""

    def __init__(self, n_outputs: int, side: int = 4) -> None:
        super().__init__()
        self.side = side
        self.linear = nn.Linear(side * side, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.float().mean(1, keepdim=True) / 255.0
        return self.linear(nn.functional.adaptive_avg_pool2d(grey, self.side).flatten(1) - 0.5)


def stand_in_model(images: torch.Tensor, labels: Any, n_outputs: int, *, steps: int = 30,
                   lr: float = 0.05, seed: int = 42) -> StandIn:
    """Train a `StandIn` on (images, labels) with full-batch Adam: 1 output = BCE, more = CE."""
    seed_everything(seed)
    model = StandIn(n_outputs)
    y = torch.as_tensor(np.array(to_numpy(labels), dtype=np.int64))  # a copy: label columns can be read-only
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        z = model(images)
        loss = (nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float()) if n_outputs == 1
                else nn.functional.cross_entropy(z, y))
        loss.backward()
        optimizer.step()
    return model.eval()
