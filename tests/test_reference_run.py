"""The reference run kept in assets/: executed copies true to their source, and what the site reads.

`assets/<stem>/<stem>.ipynb` is the executed copy of a reference run (coursebuild.run_all into the
default assets/). Its code must be the code of `notebooks/<stem>.ipynb` (papermill's injected
parameters aside): otherwise its outputs describe a notebook that no longer exists. Where no copy
is committed yet, the first test has nothing to check and passes.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import ROOT
from coursebuild import reference

SETUP = 'COURSE_REPO = "https://github.com/someone/course"  # or your fork\nimport helpers'


def test_committed_executed_copies_run_the_code_of_their_notebooks() -> None:
    stale = reference.stale_copies(ROOT / "assets", ROOT / "notebooks")
    assert not stale, (
        "executed copies in assets/ whose code differs from notebooks/: "
        + "; ".join(f"{stem}: {', '.join(problems)}" for stem, problems in stale.items())
        + ". Re-run them as a reference run (python -m coursebuild.run_all --profile cpu --only NN)."
    )


def test_committed_executed_copies_read_like_a_book() -> None:
    problems = {stem: reference.page_problems(path)
                for stem, path in reference.executed_notebooks(ROOT / "assets").items()}
    problems = {stem: found for stem, found in problems.items() if found}
    assert not problems, "; ".join(f"{stem}: {', '.join(found[:5])}" for stem, found in problems.items())


def test_page_problems_finds_an_uncaptioned_figure_a_machine_path_and_noise(tmp_path: Path) -> None:
    png = new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    cells = [new_code_cell("plot()", outputs=[png]), new_markdown_cell("**Figure 1.** The curves."),
             new_code_cell("plot()", outputs=[png]), new_markdown_cell("Some text."),
             new_code_cell("print(p)", outputs=[new_output("stream", name="stdout", text="/work/x/data\n")]),
             new_code_cell("w()", outputs=[new_output("stream", name="stderr",
                                                      text='Downloading: "https://x" to ../y\n')]),
             new_code_cell("x = 1  # " + "y" * 100)]
    path = tmp_path / "page.ipynb"
    nbformat.write(new_notebook(cells=cells), path)
    found = reference.page_problems(path)
    assert len(found) == 4 and "cell 2" in found[0] and "caption" in found[0]
    assert "machine path" in found[1] and "Downloading" in found[2] and "characters" in found[3]
    assert len(reference.page_problems(path, paths=False)) == 3


def _source(path: Path, code: list[str]) -> Path:
    cells = [new_markdown_cell("# Title"), new_code_cell(SETUP),
             new_code_cell('PROFILE = "full"', metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(c) for c in code]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells), path)
    return path


def _executed(source: Path, target: Path, edit=None) -> Path:
    """What papermill writes: the injected-parameters cell after the parameters cell, outputs."""
    nb = nbformat.read(source, as_version=4)
    injected = new_code_cell('PROFILE = "cpu"\n', metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(3, injected)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.execution_count = i
            cell.outputs = [new_output("stream", name="stdout", text=f"out {i}\n")]
    if edit:
        edit(nb)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def test_an_executed_copy_is_compared_by_its_code_cells(tmp_path: Path) -> None:
    source = _source(tmp_path / "notebooks" / "04_x.ipynb", ["a = 1", "print(a)"])
    assets = tmp_path / "assets"
    same = _executed(source, reference.executed_copy(assets, "04_x"))
    assert same == assets / "04_x" / "04_x.ipynb"
    assert reference.code_differences(same, source) == []  # injected parameters and outputs aside
    assert reference.stale_copies(assets, tmp_path / "notebooks") == {}

    def changed(nb):
        nb.cells[-1].source = "print(a + 1)"
    stale = _executed(source, reference.executed_copy(assets, "04_x"), changed)
    problems = reference.code_differences(stale, source)
    assert problems and "code cell 4" in problems[0], problems  # setup, parameters, a = 1, print
    assert reference.stale_copies(assets, tmp_path / "notebooks") == {"04_x": problems}

    def extra(nb):
        nb.cells.append(new_code_cell("b = 2"))
    grown = _executed(source, reference.executed_copy(assets, "04_x"), extra)
    assert reference.code_differences(grown, source) == ["5 code cells ran, the source has 4"]

    orphan = _executed(source, reference.executed_copy(assets, "05_gone"))
    assert "no source notebook" in reference.stale_copies(assets, tmp_path / "notebooks")["05_gone"][0]
    assert orphan.is_file()


def test_executed_notebooks_are_found_flat_or_beside_their_assets(tmp_path: Path) -> None:
    source = _source(tmp_path / "notebooks" / "04_x.ipynb", [])
    _executed(source, tmp_path / "assets" / "04_x" / "04_x.ipynb")
    _executed(source, tmp_path / "assets" / "05_y" / "other_name.ipynb")  # not a copy of 05_y
    (tmp_path / "assets" / "04_x" / "metrics.json").write_text("{}")
    assert list(reference.executed_notebooks(tmp_path / "assets")) == ["04_x"]
    _executed(source, tmp_path / "build" / "04_x.ipynb")
    assert reference.executed_notebooks(tmp_path / "build") == {"04_x": tmp_path / "build" / "04_x.ipynb"}
    assert reference.executed_notebooks(tmp_path / "missing") == {}


@pytest.mark.parametrize(("record", "label"), [
    ({"weights": {"source": "tflite-converted:mobilenet_v2_1.0_224_quant.tflite"}, "pretrained": True},
     "ImageNet (converted from mobilenet_v2_1.0_224_quant.tflite)"),
    ({"weights": {"source": "torchvision"}}, "ImageNet (torchvision)"),
    ({"weights": {"source": "random"}, "pretrained": False}, "random init"),
    ({"pretrained": True}, "ImageNet"),  # a metrics.json from before the weights block
    ({"pretrained": False}, "random init"),
    ({}, ""),
])
def test_weights_are_named_from_the_weights_block_or_pretrained(record: dict, label: str) -> None:
    assert reference.weights_label(record) == label


def test_a_run_without_its_own_weights_takes_the_notebooks() -> None:
    notebook = {"weights": {"source": "torchvision"}, "pretrained": True}
    assert reference.weights_label({"model": "resnet50"}, notebook) == "ImageNet (torchvision)"
    assert reference.weights_label({"pretrained": False}, notebook) == "random init"


def test_what_you_will_see_is_the_runs_key_number_with_its_interval() -> None:
    metrics = {"model": "resnet50", "class_names": ["a", "b"],
               "test": {"auc": 0.8798, "balanced_accuracy": 0.8118,
                        "ci95": {"auc": [0.843, 0.9137], "balanced_accuracy": [0.7696, 0.8533]}}}
    assert reference.key_line(metrics) == (
        "test AUC 0.880 [0.843, 0.914], balanced accuracy 0.812 [0.770, 0.853] (resnet50)")
    metrics.update(class_names=list("abcd"), chosen={"name": "densenet121"})
    assert reference.key_line(metrics).startswith("test macro AUC 0.880")
    assert reference.key_line(metrics).endswith("(densenet121)")
    tour = {"test": {}, "datasets": {"pneumonia": {"n_images": 5216}, "fundus": {"n_images": 2607}},
            "leakage": {"pneumonia": {"naive_random_split": {"val_images_with_patient_in_train": 0.645}}}}
    assert reference.key_line(tour) == ("2 datasets (pneumonia 5,216, fundus 2,607 images); a random split puts "
                                        "64% of pneumonia validation images beside a training image of the same patient")
    compared = {**metrics, "runs": [
        {"label": "ResNet-50, random weights", "test": metrics["test"]},
        {"label": "MobileNetV2, ImageNet | TTA none", "test": {"auc": 0.99, "balanced_accuracy": 0.9}},
        {"label": "MobileNetV2, ImageNet + ResNet-50", "test": {"auc": 0.98, "balanced_accuracy": 0.9}}]}
    assert reference.key_line(compared) == reference.key_line(metrics) + (
        "; MobileNetV2, ImageNet / TTA none: test macro AUC 0.990, balanced accuracy 0.900")
    assert reference.key_line(None) == "" and reference.key_line({"test": {"auc": None}}) == ""


def test_durations_read_like_a_clock() -> None:
    assert [reference.duration(s) for s in (None, 48.4, 1236, 7530)] == ["", "48 s", "20 min 36 s", "2 h 05 min"]


def test_open_in_links_come_from_the_notebooks_course_repo(tmp_path: Path) -> None:
    source = _source(tmp_path / "04_x.ipynb", [])
    repo = reference.course_repo(source)
    assert repo == "https://github.com/someone/course"
    links = reference.open_links(repo, "notebooks/04_x.ipynb")
    assert links["Colab"] == "https://colab.research.google.com/github/someone/course/blob/main/notebooks/04_x.ipynb"
    assert links["Kaggle"] == ("https://kaggle.com/kernels/welcome?src="
                               "https://github.com/someone/course/blob/main/notebooks/04_x.ipynb")
    assert reference.open_links("https://gitlab.com/someone/course", "x.ipynb") == {}
    assert reference.open_links(None, "x.ipynb") == {}


def test_the_repository_is_named_once_in_the_notebooks_not_in_coursebuild() -> None:
    repos = {reference.course_repo(p) for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    assert len(repos) == 1 and None not in repos, repos
    (repo,) = repos
    for module in sorted((ROOT / "coursebuild").rglob("*.py")):
        assert repo not in module.read_text(), f"{module.name} hard-codes {repo}: read COURSE_REPO instead"


def test_the_readme_block_is_replaced_between_its_markers_only() -> None:
    text = f"intro\n{reference.README_START}\nold table\n{reference.README_END}\nafter\n"
    rows = [{"nb": "04", "see": "test AUC 0.880", "weights": "ImageNet", "profile": "cpu", "time": "9 min 02 s"}]
    table = reference.reference_table(rows)
    updated = reference.replace_block(text, table)
    assert updated.startswith("intro\n") and updated.endswith(f"{reference.README_END}\nafter\n")
    assert "old table" not in updated and "| 04 | test AUC 0.880 | ImageNet | cpu | 9 min 02 s |" in updated
    assert reference.replace_block(updated, table) == updated
    assert reference.replace_block("no markers", table) is None


def test_the_site_is_built_from_assets_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from coursebuild import site

    calls = []
    monkeypatch.setattr(site, "build_site", lambda *args: calls.append(args) or tmp_path / "index.html")
    assert site.main([]) == 0
    assert calls[0][0] == ROOT / "assets" and calls[0][2] == ROOT / "notebooks"
    assert site.main(["--executed-dir", "_build/notebooks"]) == 0  # a run_all build, as before
    assert calls[1][0] == Path("_build/notebooks")
