"""The exercise framework: checked answers, coding tasks, questions and experiments, Kaggle Learn's way.

A chapter module (``ch01.py``) defines everything about its exercises: the material they work on,
each exercise's reference, the typical mistakes with their messages, a hint and a solution, then
the chapter's questions and open experiments. The notebook only shows the task, a blank and::

    ch01.setup(globals(), PROFILE, DATA_DIR, SEED)   # takes the snapshot, defines q1, q2, ... and the data
    n_trainable = ____                               # the student's answer, in a named variable
    q1.check()                                       # reads `n_trainable` from the notebook
    # q1.hint()
    # q1.solution()

References never read the notebook's variables: ``Chapter.setup`` builds the material once, keeps
a private deep copy (the snapshot) and hands the notebook its own copies. A student who unfreezes
``model`` or transposes ``cm`` changes their copy, never what the check compares with.

A blank (``____``, ``...``, ``NotImplemented``, inside a tuple/list/dict too, or a function whose
body still uses ``____``) prints "not attempted yet": Run All never stops. A check never raises.
"""

from __future__ import annotations

import copy
import hashlib
import html
import inspect
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.core import to_numpy

DATA = Path(__file__).resolve().parent / "data"  # the stand-in prediction files shipped with the package


# --------------------------------------------------------------------------- blanks


class Blank:
    """The blank a student replaces: ``answer = ____``."""

    def __repr__(self) -> str:
        return "____"


____ = Blank()


def _uses_blank(code: types.CodeType) -> bool:
    """Whether a function's code (or a function nested in it) still refers to ``____``."""
    return "____" in code.co_names or any(isinstance(c, types.CodeType) and _uses_blank(c) for c in code.co_consts)


def is_blank(answer: Any) -> bool:
    """True for ``____``, ``...``, ``NotImplemented``, a container holding one, or a function whose body uses ``____``."""
    if isinstance(answer, Blank) or answer is Ellipsis or answer is NotImplemented:
        return True
    if isinstance(answer, (tuple, list)):
        return any(is_blank(a) for a in answer)
    if isinstance(answer, dict):
        return any(is_blank(a) for a in answer.values())
    if isinstance(answer, types.FunctionType):
        return _uses_blank(answer.__code__)
    return False


# --------------------------------------------------------------------------- comparing


def numeric(value: Any) -> np.ndarray | None:
    """``value`` as a float array (tensors, Series, DataFrames, lists, numbers), or None when it is not numeric."""
    if isinstance(value, (str, bytes, set, frozenset, dict, bool)) or value is None or callable(value):
        return None
    try:
        array = to_numpy(value) if hasattr(value, "detach") else np.asarray(value)
        return array.astype(np.float64)
    except (TypeError, ValueError):
        return None


def same(answer: Any, reference: Any, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Numbers and arrays: same shape and close; strings: equal but for case and spaces; else ``==``."""
    a, r = numeric(answer), numeric(reference)
    if a is not None and r is not None:
        return a.shape == r.shape and bool(np.allclose(a, r, rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(answer, str) and isinstance(reference, str):
        return answer.strip().lower() == reference.strip().lower()
    try:
        return bool(answer == reference)
    except (TypeError, ValueError):
        return False


def _close(a: np.ndarray, r: np.ndarray, rtol: float = 1e-4) -> bool:
    return a.shape == r.shape and bool(np.allclose(a, r, rtol=rtol, atol=1e-6, equal_nan=True))


def _kind(value: Any) -> str:
    array = numeric(value)
    if array is not None:
        return "a number" if array.ndim == 0 else f"an array of shape {array.shape}"
    return f"a {type(value).__name__}"


def _scale_words(k: float) -> str:
    if np.isclose(k, 100):
        return "100 times too large: a percentage where a fraction (0-1) is expected"
    if np.isclose(k, 0.01):
        return "100 times too small: a fraction where a percentage is expected"
    return f"scale: {k:.3g} times the expected value"


def _differs_same_shape(a: np.ndarray, r: np.ndarray) -> str | None:
    """What one array differs in from another of the same shape, when a simple rule explains it."""
    if a.ndim == 2 and a.shape[0] == a.shape[1] > 1 and _close(a.T, r) and not _close(a, r):
        return "transposed: rows and columns are swapped"
    if _close(-a, r) and np.any(r != 0):
        return "sign: it has the opposite sign"
    if _close(1 - a, r):
        return "complement: it is 1 minus the expected value (the other class, or the other side of the threshold)"
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = a / r
        if _close(1 / a, r):
            return "inverted: it is the reciprocal of the expected value (b/a instead of a/b)"
    finite = ratio[np.isfinite(ratio)]
    if a.size == 1:  # one number: only the rules that are not true of any two numbers
        k, d = (float(finite.flat[0]) if finite.size else np.nan), float((a - r).flat[0])
        if any(np.isclose(k, x) for x in (100, 0.01, 10, 0.1)):
            return _scale_words(k)
        if abs(abs(d) - 1) < 1e-9 and float(r.flat[0]).is_integer():
            return f"off by one ({'too large' if d > 0 else 'too small'})"
        return None
    if finite.size and np.allclose(finite, finite.flat[0], rtol=1e-4) and not np.isclose(finite.flat[0], 1) \
            and np.allclose(a[r == 0], 0):
        return _scale_words(float(finite.flat[0]))
    if a.ndim == 2 and min(a.shape) > 1:
        for axis, words in ((1, "row"), (0, "column")):
            k = np.divide(a.sum(axis, keepdims=True), r.sum(axis, keepdims=True),
                          out=np.ones_like(a.sum(axis, keepdims=True)), where=r.sum(axis, keepdims=True) != 0)
            if _close(a, r * k):
                return f"scale per {words}: each {words} is rescaled (normalised where counts are expected, or the reverse)"
    shift = a - r
    if a.size and np.allclose(shift, shift.flat[0], atol=1e-6) and not np.isclose(shift.flat[0], 0):
        d = float(shift.flat[0])
        return ("off by one" if abs(abs(d) - 1) < 1e-9 else f"offset: off by {d:+.4g}") + f" ({'too large' if d > 0 else 'too small'})"
    if a.ndim >= 1 and a.size > 1:
        if _close(a[::-1], r):
            return "order: the same values in reversed order"
        if _close(np.sort(a, axis=None), np.sort(r, axis=None)):
            return "order: the same values in another order"
    return None


def differs(answer: Any, reference: Any, alternatives: dict[str, Any] | None = None) -> str:
    """One sentence on what ``answer`` differs in from ``reference``: type, shape, transposed, sign,
    scale, offset, order, or which of ``alternatives`` ({"the validation split": value, ...}) it
    matches; else how far it is. Works for mistakes nobody foresaw."""
    for name, value in (alternatives or {}).items():
        if same(answer, value):
            return f"it matches {name}, not what the question asks"
    a, r = numeric(answer), numeric(reference)
    if r is None:
        return f"expected {_kind(reference)} like {_short(reference)}, got {_short(answer)}"
    if a is None:
        return f"expected {_kind(reference)}, got {_kind(answer)}"
    if a.shape != r.shape:
        if a.ndim == 2 and a.T.shape == r.shape and _close(a.T, r):
            return "transposed: rows and columns are swapped"
        if a.size == r.size and _close(a.reshape(r.shape), r):
            return f"shape: the right values, but shaped {a.shape} instead of {r.shape}"
        return f"shape: expected {r.shape}, got {a.shape}"
    words = _differs_same_shape(a, r)
    if words:
        return words
    if a.ndim == 0:
        rel = abs(float(a) - float(r)) / max(abs(float(r)), 1e-12)
        near = " (close: rounded, or a slightly different recipe?)" if rel < 0.02 else ""
        return f"value: {float(a):.4g} where {float(r):.4g} is expected, {rel:.1%} away{near}"
    wrong = ~np.isclose(a, r, rtol=1e-4, atol=1e-6)
    first = tuple(int(i) for i in np.argwhere(wrong)[0])
    return f"values: {int(wrong.sum())} of {a.size} entries differ, the first at index {first}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- snapshots


def snapshot(value: Any) -> Any:
    """A private deep copy of ``value`` (arrays read-only), for references nobody else can move."""
    copied = copy.deepcopy(value)
    if isinstance(copied, np.ndarray):
        copied.flags.writeable = False
    return copied


def fingerprint(value: Any) -> str:
    """A short hash of what ``value`` holds (tensors, arrays, frames, models with their trainable flags)."""
    digest = hashlib.sha1()
    if hasattr(value, "state_dict") and hasattr(value, "parameters"):
        for name, tensor in value.state_dict().items():
            digest.update(name.encode() + to_numpy(tensor).tobytes())
        digest.update(bytes(p.requires_grad for p in value.parameters()))
    elif isinstance(value, pd.DataFrame):
        digest.update(pd.util.hash_pandas_object(value, index=True).values.tobytes() + str(list(value.columns)).encode())
    elif numeric(value) is not None:
        digest.update(np.ascontiguousarray(numeric(value)).tobytes() + str(numeric(value).shape).encode())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------- exercises


@dataclass
class Mistake:
    """A typical wrong answer: ``value(material)`` gives it (compared with the answer's result), or
    ``when(result, material)`` recognises it; ``message`` says what is wrong; ``example`` is code
    that makes this mistake (for the tests, never shown to the student)."""

    message: str
    value: Callable[[Any], Any] | None = None
    when: Callable[[Any, Any], bool] | None = None
    example: str = ""

    def matches(self, result: Any, material: Any, compare: Callable[[Any, Any], bool]) -> bool:
        try:
            if self.when is not None:
                return bool(self.when(result, material))
            return compare(result, self.value(material))
        except Exception:  # a test that cannot run on this answer does not match it
            return False


class NotAttempted(Exception):
    """Raised inside a check when the answer is (still) a blank."""


class Wrong(Exception):
    """Raised by a coding exercise's behaviour test with the message for the student."""


class Problem:
    """One checked exercise: ``check()`` reads ``var`` from the notebook (or takes the answer), and
    compares what it gives with ``expected(material)``.

    expected: material -> the reference (from the chapter's snapshot, never the notebook).
    hint, solution: the texts ``hint()`` and ``solution()`` print (the solution is code defining ``var``).
    result: (answer, material) -> what the answer gives; the answer itself by default. A coding
        exercise runs the student's function on fresh copies of small data here.
    mistakes: typical wrong answers with their messages.
    alternatives: material -> {"the validation split": value, ...}: right-looking answers to other questions.
    compare: (result, reference) -> bool; ``same`` with ``rtol`` by default.
    choices: {letter: text} for a multiple-choice question.
    describe: (result, reference) -> what they differ in, for an unforeseen mistake (``differs`` by default).
    """

    def __init__(self, name: str, var: str, *, expected: Callable[[Any], Any], hint: str, solution: str,
                 mistakes: Sequence[Mistake] = (), result: Callable[[Any, Any], Any] | None = None,
                 alternatives: Callable[[Any], dict[str, Any]] | None = None,
                 compare: Callable[[Any, Any], bool] | None = None, choices: dict[str, str] | None = None,
                 rtol: float = 1e-4, coding: bool = False, describe: Callable[[Any, Any], str] | None = None) -> None:
        self.name, self.var, self.expected, self.result, self.describe = name, var, expected, result, describe
        self.hint_text, self.solution_code = hint, textwrap.dedent(solution).strip()
        self.mistakes, self.alternatives, self.choices = list(mistakes), alternatives, choices
        self.compare, self.rtol, self.coding = compare, rtol, coding
        self.chapter: Chapter | None = None

    def _compare(self, a: Any, r: Any) -> bool:
        return self.compare(a, r) if self.compare is not None else same(a, r, self.rtol)

    def diagnose(self, answer: Any, material: Any = None) -> tuple[bool | None, str]:
        """(True, "correct.") / (False, what is wrong) / (None, "not attempted yet ...")."""
        material = material if material is not None else self.chapter.material
        blank = f"not attempted yet: replace ____ in `{self.var}` ({self.name}.hint() helps)."
        if is_blank(answer):
            return None, blank
        try:
            return self._diagnose(answer, material)
        except NotAttempted:
            return None, blank
        except Wrong as wrong:
            return False, str(wrong)
        except Exception as error:  # noqa: BLE001 -- a student's code may raise anything; the check never does
            where = "your function raised" if self.coding else "checking it raised"
            return False, f"{where} {type(error).__name__}: {error}"

    def _diagnose(self, answer: Any, material: Any) -> tuple[bool, str]:
        if self.choices is not None:
            answer = str(answer).strip().upper()
            if answer not in self.choices:
                return False, f"choose one of {', '.join(map(repr, self.choices))}, not {answer!r}."
        reference = self.expected(material)
        got = self.result(answer, material) if self.result is not None else answer
        if self._compare(got, reference):
            return True, "correct."
        for mistake in self.mistakes:
            if mistake.matches(got, material, self._compare):
                return False, mistake.message
        if self.choices is not None:
            return False, f"not {answer!r}: look again ({self.name}.hint() helps)."
        if self.describe is not None:
            return False, f"differs in {self.describe(got, reference)}."
        others = self.alternatives(material) if self.alternatives is not None else None
        return False, f"differs in {differs(got, reference, others)}."

    def check(self, *answer: Any) -> bool:
        """Print ✓ / ✗ / ○ and what is wrong; return whether it is right. Never raises."""
        if answer:
            value = answer[0]
        elif self.chapter is None or self.chapter.namespace is None:
            print(f"○ {self.name}: run the setup cell first (chNN.setup(globals(), ...)).")
            return False
        else:
            value = self.chapter.namespace.get(self.var, ____)
        ok, message = self.diagnose(value)
        if ok is False and self.chapter is not None:
            message += self.chapter.changed_note()
        print(f"{'○' if ok is None else '✓' if ok else '✗'} {self.name}: {message}")
        return bool(ok)

    def hint(self) -> None:
        print(f"Hint ({self.name}): {self.hint_text}")

    def solution(self) -> None:
        print(f"Solution ({self.name}):\n{self.solution_code}")

    def __repr__(self) -> str:
        return f"{self.name}: set `{self.var}`, then {self.name}.check(); {self.name}.hint(), {self.name}.solution()"


def coding(name: str, var: str, *, run: Callable[[Callable, Any], Any], hint: str, solution: str,
           mistakes: Sequence[Mistake] = (), compare: Callable[[Any, Any], bool] | None = None,
           rtol: float = 1e-4, expected: Callable[[Any], Any] | None = None,
           describe: Callable[[Any, Any], str] | None = None) -> Problem:
    """A coding exercise: the student defines the function ``var``; ``run(fn, material)`` applies it
    to fresh copies of small data and returns what it did (raise ``Wrong(message)`` for a behaviour
    that is wrong in a way no comparison shows). The reference is ``run`` applied to the function
    that ``solution`` defines (or ``expected(material)``), so the solution is written once."""
    problem = Problem(name, var, expected=lambda m: None, hint=hint, solution=solution, mistakes=mistakes,
                      compare=compare, rtol=rtol, coding=True, describe=describe)

    def result(fn: Any, material: Any) -> Any:
        if not callable(fn):
            raise Wrong(f"`{var}` should be a function (def {var}(...): ...), not {_kind(fn)}.")
        return run(fn, material)

    problem.result = result
    problem.expected = expected or (lambda m: run(solved(problem), m))
    return problem


def solved(problem: Problem, namespace: dict | None = None) -> Any:
    """The object the solution's code defines under ``problem.var`` (run in a fresh namespace
    holding the material's public names and the usual imports)."""
    import torch
    from torch import nn

    scope = {"np": np, "pd": pd, "torch": torch, "nn": nn, "Path": Path}
    scope.update(namespace if namespace is not None else problem.chapter.public_copy())
    exec(compile(problem.solution_code, f"<solution {problem.name}>", "exec"), scope)  # noqa: S102 - our own text
    return scope[problem.var]


# --------------------------------------------------------------------------- questions and experiments


@dataclass
class Question:
    """A conceptual question and its answer (folded)."""

    text: str
    answer: str


@dataclass
class Experiment:
    """An open experiment: what to change, and what to look for."""

    title: str
    task: str
    look_for: str


def _markdown(md: str) -> None:
    try:
        from IPython.display import Markdown, display

        display(Markdown(md))
    except ImportError:  # plain Python: print the text
        print(md)


# --------------------------------------------------------------------------- the chapter


class Chapter:
    """A chapter's exercises, questions and experiments, and the material they work on.

    ``prepare(profile, data_dir, seed)`` returns (public, private): the names the notebook gets
    (copies) and what only the checks see; both are kept as a snapshot.
    """

    def __init__(self, notebook: str, prepare: Callable[[str, Any, int], tuple[dict, dict]],
                 problems: Sequence[Problem], questions: Sequence[Question] = (),
                 experiments: Sequence[Experiment] = ()) -> None:
        self.notebook, self.prepare = notebook, prepare
        self.problems = {p.name: p for p in problems}
        self.questions_list, self.experiments_list = list(questions), list(experiments)
        self.material: types.SimpleNamespace | None = None
        self.namespace: dict | None = None
        self._public: dict[str, Any] = {}
        self._prints: dict[str, str] = {}
        for p in problems:
            p.chapter = self

    def setup(self, namespace: dict, profile: str = "smoke", data_dir: Any = None, seed: int = 42,
              *, quiet: bool = False) -> types.SimpleNamespace:
        """Build the material, snapshot it, copy its public names and the exercises into ``namespace``."""
        public, private = self.prepare(profile, data_dir, seed)
        self._public = {k: snapshot(v) for k, v in public.items()}
        self.material = types.SimpleNamespace(**self._public, **{k: snapshot(v) for k, v in private.items()},
                                              profile=profile, seed=seed)
        namespace.update(self.public_copy())
        namespace.update(self.problems)
        self.namespace = namespace
        self._prints = {k: fingerprint(v) for k, v in self._public.items() if not callable(v) or hasattr(v, "parameters")}
        if not quiet:
            names = ", ".join(k for k in public if not k.startswith("_"))
            print(f"exercises {', '.join(self.problems)} ready; your data: {names}")
        return self.material

    def public_copy(self) -> dict[str, Any]:
        """Fresh copies of the names the notebook gets (a check's own runs use these too)."""
        return {k: copy.deepcopy(v) for k, v in self._public.items()}

    def changed_note(self) -> str:
        """' (note: `model` differs from ...)' when the notebook's copies were changed since setup."""
        if self.namespace is None:
            return ""
        changed = []
        for k, fp in self._prints.items():
            try:
                if k not in self.namespace or fingerprint(self.namespace[k]) != fp:
                    changed.append(f"`{k}`")
            except Exception:  # noqa: BLE001 -- replaced by something that cannot be hashed: changed
                changed.append(f"`{k}`")
        if not changed:
            return ""
        return (f" (Note: {', '.join(changed)} changed since the setup cell; the check uses the data as set up."
                " Re-run the setup cell to get it back.)")

    def questions(self) -> None:
        """Show the chapter's questions, answers folded."""
        _markdown(self.questions_markdown())

    def experiments(self) -> None:
        """Show the chapter's open experiments."""
        _markdown(self.experiments_markdown())

    def questions_markdown(self) -> str:
        rows = [f"{i}. {q.text}\n\n   <details><summary>Answer</summary>\n\n   {html.escape(q.answer, quote=False)}\n\n   </details>\n"
                for i, q in enumerate(self.questions_list, 1)]
        return "\n".join(rows)

    def experiments_markdown(self) -> str:
        return "\n".join(f"**{i}. {e.title}.** {e.task}\n\n*What to look for:* {e.look_for}\n"
                         for i, e in enumerate(self.experiments_list, 1))

    def solutions_markdown(self) -> str:
        """Every exercise's hint and solution, folded: for the website."""
        return "\n".join(f"<details><summary>Hint and solution ({p.name})</summary>\n\n{p.hint_text}\n\n"
                         f"```python\n{p.solution_code}\n```\n\n</details>\n" for p in self.problems.values())


# --------------------------------------------------------------------------- predictions


def predictions_path(notebook: str, split: str, root: str | Path | None = None) -> Path:
    """``assets/<notebook>/<split>_predictions.csv`` of the reference run (it may not exist yet)."""
    from helpers.runs import project_root

    return Path(root if root is not None else project_root()) / "assets" / notebook / f"{split}_predictions.csv"


def stand_in_path(notebook: str, split: str) -> Path:
    """The stand-in file shipped with the package: ``helpers/exercises/data/<notebook>/<split>_predictions.csv``."""
    return DATA / notebook / f"{split}_predictions.csv"


def load_predictions(notebook: str, split: str, profile: str = "smoke", *, root: str | Path | None = None,
                     quiet: bool = False) -> tuple[pd.DataFrame, str]:
    """A chapter's saved predictions (columns image, label, y_true, prob_<class>...) and where they
    came from. The reference run's ``assets/<notebook>/<split>_predictions.csv`` (written by
    ``runs.save_predictions``) is used when it exists, except in the smoke profile; otherwise the
    deterministic stand-in shipped in ``helpers/exercises/data/`` (``write_stand_in`` made it).
    Prints which one is used."""
    real = predictions_path(notebook, split, root)
    if profile != "smoke" and real.is_file():
        path, source = real, f"the reference run's predictions ({real.parent.name}/{real.name})"
    else:
        path = stand_in_path(notebook, split)
        why = "the smoke profile" if profile == "smoke" else "no reference run saved them yet"
        source = (f"a STAND-IN ({why}): synthetic predictions shipped in helpers/exercises/data/{notebook}/, "
                  f"not the chapter's model")
    frame = pd.read_csv(path)
    if not quiet:
        print(f"{split} predictions: {source}, {len(frame)} images")
    return frame, source


def probabilities(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(probabilities (N, C), class names) from the prob_<class> columns of a predictions frame."""
    columns = [c for c in frame.columns if c.startswith("prob_")]
    return frame[columns].to_numpy(dtype=float), [c.removeprefix("prob_") for c in columns]


def write_stand_in(notebook: str, class_names: Sequence[str], *, n: dict[str, int] | None = None,
                   skill: float = 1.6, seed: int = 0, folder: Path | None = None) -> list[Path]:
    """Write the stand-in ``{val,test}_predictions.csv`` of a chapter: labels in proportion to a fixed
    class mix, logits = ``skill`` on the true class plus Gaussian noise (a model that is right about
    70-80% of the time). Deterministic: ``seed`` fixes everything. How the shipped files were made."""
    rng = np.random.default_rng(seed)
    n = n or {"val": 60, "test": 80}
    written = []
    k = len(class_names)
    mix = np.linspace(1.0, 2.0, k) / np.linspace(1.0, 2.0, k).sum()
    for split, count in n.items():
        y = np.sort(rng.choice(k, size=count, p=mix))
        logits = rng.normal(0, 1, (count, k)) + skill * np.eye(k)[y]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        table = pd.DataFrame({"image": [f"stand_in/{split}/{class_names[c]}/{i:04d}.png" for i, c in enumerate(y)],
                              "label": [class_names[c] for c in y], "y_true": y})
        for j, name in enumerate(class_names):
            table[f"prob_{name}"] = p[:, j].round(6)
        path = (folder or DATA / notebook) / f"{split}_predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
        written.append(path)
    return written


def signature_of(fn: Callable) -> str:
    """``fn``'s parameters as written (for messages)."""
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"
