"""The exercises: `helpers.exercises` itself, every exercise's check, and the exercise notebooks.

Each check is tested in this process: the notebook's code cells (all but the students' answer
cells) run in a namespace, then its reference solution must pass, a blank must say "not attempted
yet", and the typical wrong answers of WRONG must fail with their own message. Then each exercise
notebook is executed in the smoke profile (nbclient, one kernel for all, reset between them): with
its blanks (each check says "not attempted yet"), then with every solution (each must print ✓).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers.exercises import Exercise, ____, is_blank, same

EXERCISE_NOTEBOOKS = sorted((ROOT / "notebooks" / "exercises").glob("[0-9][0-9]_*_exercises.ipynb"))
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GENERIC = "is not what this run's data gives"

# (notebook number, exercise) -> typical wrong answers: (code defining `answer`, a word of the message)
WRONG: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("00", "q1"): [("answer = len(names)", "number of images"),
                   ("answer = len({n.replace('_', '-').split('-')[0] for n in names})", "IM-xxxx")],
    ("00", "q2"): [("answer = int(naive_val['patient_id'].isin(set(naive_train['patient_id'])).sum())", "images"),
                   ("answer = 0", "grouped split")],
    ("00", "q3"): [("c = splits.train['class_name'].value_counts(); answer = c.min() / c.max()", "below 1")],
    ("00", "q4"): [("answer = 'B'", "compare the two bars"), ("answer = 'D'", "choose one of")],
    ("01", "q1"): [("answer = sum(p.numel() for p in model.parameters())", "every parameter"),
                   ("answer = D * C", "biases")],
    ("01", "q2"): [("answer = nn.Linear(D, C + 1)", "wrong shape"), ("answer = nn.Linear(D, C)", "did not fall"),
                   ("answer = 0.5", "not a number")],
    ("02", "q1"): [("answer = sum(p.numel() for p in new_model().parameters())", "nothing was frozen"),
                   ("answer = sum(p.numel() for p in new_model().layer4.parameters())", "fc"),
                   ("answer = sum(p.numel() for p in new_model().fc.parameters())", "head alone")],
    ("02", "q2"): [("answer = torch.optim.AdamW([{'params': [p for n, p in model.named_parameters() if not n.startswith('fc')], 'lr': HEAD_LR},"
                    " {'params': list(model.fc.parameters()), 'lr': BACKBONE_LR}])", "swapped"),
                   ("answer = torch.optim.AdamW([{'params': list(model.layer4.parameters()), 'lr': BACKBONE_LR},"
                    " {'params': list(model.fc.parameters()), 'lr': HEAD_LR}])", "no group"),
                   ("answer = torch.optim.AdamW(model.parameters(), lr=HEAD_LR)", "two parameter groups")],
    ("02", "q3"): [("answer = int(history['val_loss'].idxmin())", "off by one"), ("answer = EPOCHS", "last epoch")],
    ("03", "q1"): [("answer = (IMAGE_SIZE // 16) ** 2", "class token"), ("answer = IMAGE_SIZE // 16", "per side")],
    ("04", "q1"): [("answer = (y_train == 1).sum() / (y_train == 0).sum()", "inverted"),
                   ("answer = (y_test == 0).sum() / (y_test == 1).sum()", "test labels")],
    ("04", "q2"): [("answer = z['test']", "logits"), ("answer = np.ones_like(z['test'])", "softmax over one logit"),
                   ("answer = 1 / (1 + np.exp(z['test']))", "P(NORMAL)")],
    ("04", "q3"): [("answer = evaluate.choose_threshold(y_test, p['test'])", "test split"),
                   ("answer = evaluate.choose_threshold(y_val, z['val'])", "logits")],
    ("04", "q4"): [("lo, hi = bootstrap_auc(y_test, p['test']); answer = (hi, lo)", "low bound comes first"),
                   ("a = roc_auc_score(y_test, p['test']); answer = (a, a)", "width 0")],
    ("05", "q1"): [("answer = (counts / counts.sum()) / (counts / counts.sum()).mean()", "proportional to the counts"),
                   ("w = 1 / counts; answer = (w / w.mean())[::-1]", "wrong class order"), ("answer = 1 / counts", "mean 1")],
    ("05", "q2"): [("answer = 1 / counts", "per class"), ("answer = counts[y_train]", "backwards")],
    ("05", "q3"): [("answer = counts", "without the sampler"), ("answer = np.full(2, 0.5)", "probabilities")],
    ("05", "q4"): [("answer = (0.5, np.mean(y_test == counts.argmax()))", "swapped"),
                   ("answer = (np.mean(y_test == counts.argmin()), 0.5)", "minority")],
    ("06", "q1"): [("answer = four(cm.T)", "transposed"), ("s = four(cm); answer = (s[1], s[0], s[2], s[3])", "swapped")],
    ("06", "q2"): [("answer = four(cm)[2]", "prevalence"), ("answer = four(cm)[0]", "sensitivity")],
    ("06", "q3"): [("answer = evaluate.choose_threshold(y_test, p['test'], method='sensitivity', target=TARGET)", "test split"),
                   ("answer = evaluate.choose_threshold(y_val, p['val'])", "Youden")],
    ("06", "q4"): [("answer = np.mean(p['test'][y_test == 1] >= 0.5)", "at 0.5")],
    ("07", "q1"): [("answer = tta_probs(tta.TTA_FLIPS)", "flip views"), ("answer = tta_probs([tta.identity])", "without"),
                   ("answer = logit_average(tta.TTA_PLAUSIBLE)", "averaged the logits"),
                   ("answer = np.concatenate([tta_probs([v]) for v in tta.TTA_PLAUSIBLE])", "stacked")],
    ("07", "q2"): [("answer = evaluate.fit_temperature(z['test'], y_test)", "test split"),
                   ("answer = evaluate.fit_temperature(evaluate.apply_temperature(z['val'], 1.0), y_val)", "probabilities")],
    ("07", "q3"): [("answer = 'A'", "never changes"), ("answer = 'up'", "choose one of")],
    ("08", "q1"): [("answer = z['val'].max(1)", "largest logit"), ("answer = z['val'].argmax(1)", "argmax")],
    ("08", "q2"): [("answer = np.quantile(msp['val'], KEEP)", "top 5%")],
    ("08", "q3"): [("answer = 1 - np.mean(msp_out < ood.threshold_keeping(msp['val'], KEEP))", "accepted"),
                   ("answer = np.mean(msp['val'] < ood.threshold_keeping(msp['val'], KEEP))", "real X-rays")],
    ("03", "q2"): [("answer = tokens[:, 1:, :].reshape(2, 4, 4, 32)", "axis order"),
                   ("answer = tokens[:, 1:, :].reshape(2, 32, 4, 4)", "transpose")],
}


# --------------------------------------------------------------------------- the module


def _printed(call) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        call()
    return buffer.getvalue()


def test_blanks_are_recognised_everywhere() -> None:
    assert is_blank(____) and is_blank(...) and is_blank(NotImplemented)
    assert is_blank((1.0, ____)) and is_blank([____]) and is_blank({"a": ...})
    assert not is_blank(0) and not is_blank(None) and not is_blank("A") and not is_blank(np.zeros(2))


def test_same_compares_numbers_shapes_tensors_and_strings() -> None:
    assert same(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    assert not same(np.ones(3), np.ones((3, 1)))
    assert same(" b ", "B") and not same("A", "B")
    assert same({1, 2}, {2, 1})


def test_check_prints_a_line_returns_a_bool_and_never_raises() -> None:
    q = Exercise("qx", reference=lambda: np.arange(3.0), hint="count", solution="answer = np.arange(3.0)",
                 mistakes=[(lambda: np.arange(3.0)[::-1], "wrong class order: reversed."),
                           (lambda a: np.max(a) > 100, "far too large.")])
    assert q.check(np.arange(3.0)) is True
    assert "✓ qx: correct." in _printed(lambda: q.check(np.arange(3.0)))
    assert "○ qx: not attempted yet" in _printed(lambda: q.check(____))
    assert "✗ qx: wrong class order" in _printed(lambda: q.check(np.array([2.0, 1.0, 0.0])))
    assert "✗ qx: far too large." in _printed(lambda: q.check(np.array([0.0, 1.0, 1e3])))
    assert "✗ qx: wrong shape: expected (3,), got (2,)" in _printed(lambda: q.check(np.zeros(2)))
    assert GENERIC in _printed(lambda: q.check(np.zeros(3)))
    assert q.check("not a number") is False and q.check(None) is False
    assert "answer = np.arange(3.0)" in _printed(q.solution) and "count" in _printed(q.hint)


def test_multiple_choice_checks_the_letter() -> None:
    q = Exercise("qm", reference=lambda: "B", choices={"A": "x", "B": "y"}, hint="h", solution="answer = 'B'")
    assert q.diagnose(" b ")[0] is True
    assert q.diagnose("C") == (False, "choose one of 'A', 'B', not 'C'.")
    assert q.diagnose("A")[0] is False


# --------------------------------------------------------------------------- every exercise's check


def _exercise_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["exercise"]: c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata}


@pytest.fixture(scope="module", params=EXERCISE_NOTEBOOKS, ids=lambda p: p.name[:2])
def namespace(request, tmp_path_factory) -> tuple[str, dict]:
    """(notebook number, its namespace) after running every code cell but the answer cells, in this process."""
    nb = nbformat.read(request.param, as_version=4)
    ns: dict = {"__name__": "__exercises__"}
    out = tmp_path_factory.mktemp("exercises")
    with contextlib.redirect_stdout(io.StringIO()):
        for cell in nb.cells:
            if cell.cell_type != "code" or "exercise" in cell.metadata:
                continue
            source = cell.source
            if "parameters" in cell.metadata.get("tags", []):
                source += f"\nPROFILE = 'smoke'\nOUTPUT_DIR = {str(out)!r}"
            exec(compile(source, f"{request.param.name}", "exec"), ns)
    return request.param.name[:2], ns


def _answer(ns: dict, source: str):
    scope = dict(ns)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(source, scope)
    return scope["answer"]


def test_every_exercise_passes_its_solution_says_blank_and_knows_wrong_answers(namespace) -> None:
    number, ns = namespace
    exercises = {k: v for k, v in ns.items() if isinstance(v, Exercise)}
    assert exercises, "no exercise defined"
    for name, q in exercises.items():  # the solutions run one after another in the notebook's namespace, as in the kernel
        with contextlib.redirect_stdout(io.StringIO()):
            exec(q.solution_code, ns)
        ok, message = q.diagnose(ns["answer"])
        assert ok is True, f"{number} {name}: the reference solution fails: {message}"
    for name, q in exercises.items():  # and no later solution has changed what an earlier check computes
        assert q.diagnose(_answer(ns, q.solution_code))[0] is True, f"{number} {name}: a later solution broke this check"
        ok, message = q.diagnose(____)
        assert ok is None and "not attempted yet" in message
        wrong = WRONG.get((number, name))
        assert wrong, f"{number} {name}: list at least one typical wrong answer in WRONG"
        tried = 0
        for source, word in wrong:
            ok, message = q.diagnose(_answer(ns, source))
            if ok is True:  # this run's data makes that mistake coincide with the reference
                continue
            tried += 1
            assert ok is False and word in message and GENERIC not in message, (number, name, source, message)
        assert tried, f"{number} {name}: every listed wrong answer equals the reference in this run"


def test_each_chapter_has_its_exercises() -> None:
    """At least 3 exercises per chapter (2 for 01 and 03), 25 or more in all, in a notebook named after it."""
    stems = {p.name.removesuffix("_exercises.ipynb") for p in EXERCISE_NOTEBOOKS}
    assert stems == {p.stem for p in CHAPTERS}, stems ^ {p.stem for p in CHAPTERS}
    counts = {p.name[:2]: len(_exercise_cells(nbformat.read(p, as_version=4))) for p in EXERCISE_NOTEBOOKS}
    assert all(n >= (2 if k in ("01", "03") else 3) for k, n in counts.items()), counts
    assert sum(counts.values()) >= 25, counts


def test_exercise_notebooks_have_the_course_shape() -> None:
    setup = nbformat.read(CHAPTERS[0], as_version=4).cells[1].source
    for path in EXERCISE_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert nb.cells[1].source == setup, f"{path.name}: the setup cell differs from the chapters'"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and all(f"{n} =" in tagged[0].source for n in ("PROFILE", "DATA_DIR", "SEED", "OUTPUT_DIR"))
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        for q, cell in _exercise_cells(nb).items():
            assert "____" in cell.source and f"{q}.check(answer)" in cell.source
            assert f"# {q}.hint()" in cell.source and f"# {q}.solution()" in cell.source
        details = [c.source for c in nb.cells if c.cell_type == "markdown" and "<details>" in c.source]
        assert len(details) == len(_exercise_cells(nb)), f"{path.name}: one folded hint/solution per exercise"


# --------------------------------------------------------------------------- the notebooks, executed


def _with_solutions(path: Path) -> tuple[nbformat.NotebookNode, int]:
    """The notebook as committed, the smoke parameters injected after its parameters cell, then one
    cell per exercise that runs its solution and check: (notebook, number of appended cells)."""
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell('PROFILE = "smoke"'))
    added = [nbformat.v4.new_code_cell(f"exec({q}.solution_code)\n{q}.check(answer)") for q in _exercise_cells(nb)]
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
