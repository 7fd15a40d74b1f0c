"""The exercises: the framework (`helpers.exercises.core`), every chapter module's exercises, and the
exercise notebooks.

Chapter modules (ch00 ...): each module's material is set up once in the smoke profile; then every
solution must pass, every blank say "not attempted yet", every listed mistake's example get its own
message, an unforeseen wrong answer a "differs in ..." message, and a check must not be fooled by
the notebook's variables being changed. Then every exercise notebook is executed in the smoke profile
(nbclient, one kernel for all, reset between them): with its blanks, then with every solution.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

import helpers.exercises
from conftest import ROOT
from helpers.exercises import ____, differs, is_blank, same
from helpers.exercises.core import Chapter, Problem, load_predictions, probabilities

# pytest-xdist (pyproject addopts): tests sharing this module's fixtures run on one worker.
pytestmark = pytest.mark.xdist_group("exercises")

EXERCISE_NOTEBOOKS = sorted((ROOT / "notebooks" / "exercises").glob("[0-9][0-9]_*_exercises.ipynb"))
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MODULES = sorted(m.name for m in pkgutil.iter_modules(helpers.exercises.__path__) if m.name[:2] == "ch")





# --------------------------------------------------------------------------- the framework


def _printed(call) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        call()
    return buffer.getvalue()


def test_blanks_are_recognised_everywhere() -> None:
    def blank_function(x):
        ____

    def nested_blank(x):
        return [____ for _ in x]

    def done(x):
        return x

    assert is_blank(____) and is_blank(...) and is_blank(NotImplemented)
    assert is_blank((1.0, ____)) and is_blank([____]) and is_blank({"a": ...})
    assert is_blank(blank_function) and is_blank(nested_blank) and not is_blank(done)
    assert not is_blank(0) and not is_blank(None) and not is_blank("A") and not is_blank(np.zeros(2))


def test_same_compares_numbers_shapes_tensors_and_strings() -> None:
    assert same(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    assert not same(np.ones(3), np.ones((3, 1)))
    assert same(" b ", "B") and not same("A", "B")
    assert same({1, 2}, {2, 1})


def test_differs_names_what_an_unforeseen_answer_differs_in() -> None:
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 3, 9]])
    assert differs(cm.T, cm).startswith("transposed")
    assert differs(cm[:2], cm).startswith("shape")
    assert differs(-cm, cm).startswith("sign")
    assert "percentage" in differs(0.7 * 100, 0.7) and "fraction" in differs(0.007, 0.7)
    assert differs(cm / cm.sum(1, keepdims=True), cm).startswith("scale per row")
    assert differs(4, 3).startswith("off by one") and differs(cm + 2, cm).startswith("offset")
    assert differs(0.3, 0.7).startswith("complement") and differs(2.0, 0.5).startswith("inverted")
    assert differs(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])).startswith("order")
    assert differs(0.61, 0.7, {"the validation split": 0.61}) == "it matches the validation split, not what the question asks"
    assert differs("x", 3).startswith("expected a number") and "%" in differs(0.75, 0.7)


def test_a_problem_checks_a_variable_prints_a_line_and_never_raises() -> None:
    q = Problem("qx", "value", expected=lambda m: m.ref, hint="h", solution="value = 2.0")
    chapter = Chapter("xx", lambda profile, data_dir, seed: ({"data": np.arange(3.0)}, {"ref": 2.0}), [q])
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        chapter.setup(ns, quiet=True)
    assert "qx" in ns and "data" in ns
    assert "○ qx: not attempted yet" in _printed(q.check)
    ns["value"] = 2.0
    assert "✓ qx: correct." in _printed(q.check)
    ns["value"], ns["data"] = -2.0, np.zeros(3)
    out = _printed(q.check)
    assert "✗ qx: differs in sign" in out and "`data` changed since the setup cell" in out
    assert q.check("not a number") is False and q.check(None) is False
    assert "value = 2.0" in _printed(q.solution) and "h" in _printed(q.hint)


def test_a_coding_check_reports_a_crash_and_a_non_function_without_raising() -> None:
    from helpers.exercises.core import coding

    q = coding("qc", "double", run=lambda fn, m: [fn(1), fn(2)], hint="h",
               solution="def double(x):\n    return 2 * x")
    Chapter("xx", lambda *a: ({}, {}), [q]).setup({}, quiet=True)
    assert q.diagnose(lambda x: 2 * x)[0] is True
    assert q.diagnose(lambda x: 1 / 0) == (False, "your function raised ZeroDivisionError: division by zero")
    assert "should be a function" in q.diagnose(3)[1]
    assert q.diagnose(lambda x: 3 * x)[1].startswith("differs in")


def test_predictions_come_from_the_reference_run_or_say_they_are_a_stand_in(tmp_path) -> None:
    frame, source = load_predictions("01_resnet152_head_only", "test", "smoke", quiet=True)
    assert "STAND-IN" in source and list(frame.columns[:3]) == ["image", "label", "y_true"]
    p, names = probabilities(frame)
    assert p.shape == (len(frame), len(names)) and np.allclose(p.sum(1), 1, atol=1e-4)
    real = tmp_path / "assets" / "01_resnet152_head_only"
    real.mkdir(parents=True)
    frame.head(5).to_csv(real / "test_predictions.csv", index=False)
    mine, source = load_predictions("01_resnet152_head_only", "test", "cpu", root=tmp_path, quiet=True)
    assert "reference run" in source and len(mine) == 5


# --------------------------------------------------------------------------- the chapter modules


@pytest.fixture(scope="module", params=MODULES)
def chapter(request) -> tuple[Chapter, dict]:
    """(a chapter module's Chapter, the namespace it was set up in, smoke profile) as a notebook has it."""
    module = importlib.import_module(f"helpers.exercises.{request.param}")
    ns = {"np": np, "torch": torch, "nn": nn, "Path": Path, "pd": __import__("pandas"), "____": ____}
    with contextlib.redirect_stdout(io.StringIO()):
        module.CHAPTER.setup(ns, "smoke", None, 42, quiet=True)
    return module.CHAPTER, ns


def _run(ns: dict, source: str, var: str):
    scope = dict(ns)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(source, scope)
    return scope[var]


def test_every_solution_passes_every_blank_is_not_attempted_every_mistake_has_its_message(chapter) -> None:
    ch, ns = chapter
    for name, q in ch.problems.items():  # in order, in the notebook's namespace, as in the kernel
        assert q.diagnose(ns.get(q.var, ____))[0] is None, f"{name}: a blank must say not attempted"
        with contextlib.redirect_stdout(io.StringIO()):
            exec(q.solution_code, ns)
        ok, message = q.diagnose(ns[q.var])
        assert ok is True, f"{ch.notebook} {name}: the solution fails: {message}"
    for name, q in ch.problems.items():
        assert q.mistakes, f"{ch.notebook} {name}: list at least one typical mistake"
        for mistake in q.mistakes:
            assert mistake.example, f"{name}: every mistake needs an example"
            ok, message = q.diagnose(_run(ns, mistake.example, q.var))
            assert ok is False and message == mistake.message, (ch.notebook, name, mistake.example, message)


def test_an_unforeseen_wrong_value_says_what_it_differs_in(chapter) -> None:
    ch, ns = chapter
    for name, q in ch.problems.items():
        if q.coding or q.choices:
            continue
        reference = q.expected(ch.material)
        wrong = np.asarray(reference, dtype=float) * 1.37 + 0.5
        ok, message = q.diagnose(wrong)
        assert ok is False and message.startswith("differs in "), (name, message)


def test_a_coding_exercise_answers_an_unforeseen_function() -> None:
    from helpers.exercises import ch00

    ok, message = ch00.q1.diagnose(lambda name: name[:4])
    assert ok is False and message.startswith("differs in the ids: 'person123_bacteria_456.jpeg' -> ")


def test_changing_the_notebooks_variables_cannot_fool_a_check() -> None:
    from helpers.exercises import ch01, ch02

    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ch01.setup(ns, "smoke", None, 42, quiet=True)
    head = sum(p.numel() for p in ns["model"].fc.parameters())
    for p in ns["model"].parameters():  # the student unfreezes the model ...
        p.requires_grad = True
    unfrozen = sum(p.numel() for p in ns["model"].parameters() if p.requires_grad)
    assert ch01.q1.diagnose(unfrozen)[0] is False and ch01.q1.diagnose(head)[0] is True
    ns["n_trainable"] = unfrozen
    out = _printed(ch01.q1.check)
    assert "every parameter" in out and "`model` changed since the setup cell" in out

    from sklearn.metrics import confusion_matrix

    right = confusion_matrix(ns["test_pred"]["y_true"], ns["test_pred"].filter(like="prob_").to_numpy().argmax(1))
    y_pred = ns["test_pred"].filter(like="prob_").to_numpy().argmax(1)
    ns["test_pred"]["y_true"], swapped = y_pred, ns["test_pred"]["y_true"].to_numpy()  # ... or swaps the columns
    transposed = confusion_matrix(ns["test_pred"]["y_true"], swapped)
    assert ch01.q4.diagnose(transposed)[1].startswith("transposed")
    assert ch01.q4.diagnose(right)[0] is True

    ns2: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ch02.setup(ns2, "smoke", None, 42, quiet=True)
    right = int(ns2["history"].loc[ns2["history"]["val_loss"].idxmin(), "epoch"])
    ns2["history"]["val_loss"] = ns2["history"]["train_loss"]  # ... or overwrites the validation losses
    assert ch02.q5.diagnose(int(ns2["history"]["val_loss"].idxmin()) + 1)[0] is False
    assert ch02.q5.diagnose(right)[0] is True
    del ns2["net"]
    ns2["restored_epoch"] = right + 100
    assert "`net`" in _printed(ch02.q5.check)


def test_the_chapters_have_enough_exercises_questions_and_experiments() -> None:
    checked = coding_tasks = 0
    for name in MODULES:
        ch = importlib.import_module(f"helpers.exercises.{name}").CHAPTER
        checked += len(ch.problems)
        coding_tasks += sum(q.coding for q in ch.problems.values())
        assert 8 <= len(ch.questions_list) <= 15, name
        assert 2 <= len(ch.experiments_list) <= 3, name
        md = ch.questions_markdown()
        assert md.count("<details>") == len(ch.questions_list)
        assert all(q.answer[:20] in md for q in ch.questions_list)
    assert checked >= 15 and coding_tasks >= 5, (checked, coding_tasks)


# --------------------------------------------------------------------------- the notebooks


def test_exercise_notebooks_have_the_course_shape_and_no_solutions() -> None:
    stems = {p.name.removesuffix("_exercises.ipynb") for p in EXERCISE_NOTEBOOKS}
    assert stems == {p.stem for p in CHAPTERS}, stems ^ {p.stem for p in CHAPTERS}
    setup = nbformat.read(CHAPTERS[0], as_version=4).cells[1].source
    for path in EXERCISE_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert nb.cells[1].source == setup, f"{path.name}: the setup cell differs from the chapters'"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and all(f"{n} =" in tagged[0].source for n in ("PROFILE", "DATA_DIR", "SEED", "OUTPUT_DIR"))
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        module = importlib.import_module(f"helpers.exercises.ch{path.name[:2]}")
        cells = _exercise_cells(nb)
        assert list(cells) == list(module.CHAPTER.problems), path.name
        text = path.read_text()
        for q, cell in cells.items():
            problem = module.CHAPTER.problems[q]
            assert "____" in cell.source and f"{q}.check()" in cell.source and f"# {q}.solution()" in cell.source
            solution_lines = [ln.strip() for ln in problem.solution_code.splitlines()
                              if len(ln.strip()) > 25 and not ln.startswith("def ")]  # the def line is the template
            assert not [ln for ln in solution_lines if ln in text or ln.replace('"', '\\"') in text], f"{path.name} {q}: solution text"
            assert not [m.message for m in problem.mistakes if m.message[:40] in text], f"{path.name} {q}: mistake text"
        headings = [c.source for c in nb.cells if c.cell_type == "markdown"]
        assert any(h.startswith("## Questions") for h in headings), path.name


def _exercise_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["exercise"]: c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata}


# --------------------------------------------------------------------------- the notebooks, executed


def _with_solutions(path: Path) -> tuple[nbformat.NotebookNode, int]:
    """The notebook as committed, the smoke parameters injected after its parameters cell, then one
    cell per exercise that runs its solution and check: (notebook, number of appended cells)."""
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell('PROFILE = "smoke"'))
    added = [nbformat.v4.new_code_cell(f"exec({q}.solution_code)\n{q}.check()") for q in _exercise_cells(nb)]
    nb.cells += added
    return nb, len(added)


@pytest.fixture(scope="module")
def executed() -> dict[str, tuple[str, str] | Exception]:
    """Every exercise notebook executed top to bottom in ONE kernel (nbclient), its namespace reset
    between notebooks: the blanks as committed, then every solution. Sharing the kernel saves each
    notebook the ~10-30 s of importing torch/torchvision on 2 busy cores. Per notebook: (text of its
    own cells, text of the solution cells), or the error that stopped it."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    results: dict[str, tuple[str, str] | Exception] = {}
    first, _ = _with_solutions(EXERCISE_NOTEBOOKS[0])
    client = NotebookClient(first, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(EXERCISE_NOTEBOOKS[0].parent)}})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MPLBACKEND", raising=False)
        with client.setup_kernel():
            for path in EXERCISE_NOTEBOOKS:
                nb, n_added = _with_solutions(path)
                client.nb = nb
                reset = nbformat.v4.new_code_cell("%reset -f")
                client.execute_cell(reset, 0)
                try:
                    for i, cell in enumerate(nb.cells):
                        if cell.cell_type == "code":
                            client.execute_cell(cell, i)
                except CellExecutionError as err:
                    results[path.name] = err
                    continue
                texts = ["\n".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells]
                results[path.name] = ("\n".join(texts[:-n_added]), "\n".join(texts[-n_added:]))
    return results


@pytest.mark.notebook
@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: p.name[:2])
def test_exercise_notebook_runs_with_its_blanks_then_passes_with_its_solutions(path: Path, executed) -> None:
    result = executed[path.name]
    assert not isinstance(result, Exception), f"{path.name} stopped: {result}"
    blank, solved = result
    exercises = _exercise_cells(nbformat.read(path, as_version=4))
    assert blank.count("not attempted yet") == len(exercises), blank
    assert "✗" not in blank and "✓" not in blank
    for q in exercises:
        assert f"✓ {q}: correct." in solved, f"{path.name}: {q} did not pass:\n{solved}"
    assert "✗" not in solved
