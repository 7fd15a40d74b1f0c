"""Tests for coursebuild.run_all on tiny throwaway notebooks (real papermill + ipykernel runs).

The full run also builds the website from them (one small Sphinx build), so the site's handling
of a failed chapter, of a chapter without metrics and of a partial run is checked here; the
browser test of the site built from the real smoke run is in test_site.py.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from coursebuild import chapters, run_all, site

# A 1x1 red PNG, so the good notebook can write and display an image without matplotlib.
PNG_HEX = (
    "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
    "53de0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082"
)

PARAMETERS = 'PROFILE = "full"\nDATA_DIR = None\nSEED = 42\nOUTPUT_DIR = None'

GOOD_BODY = f"""\
import json, sys
from pathlib import Path
from IPython.display import Image, display

out = Path(OUTPUT_DIR) if OUTPUT_DIR else Path("../assets/01_good")
out.mkdir(parents=True, exist_ok=True)
(out / "dot.png").write_bytes(bytes.fromhex("{PNG_HEX}"))
display(Image(filename=str(out / "dot.png")))
test = {{"accuracy": 0.75, "balanced_accuracy": 0.7, "auc": 0.8, "average_precision": 0.81,
         "per_class": {{}}, "confusion_matrix": [[3, 1], [1, 3]],
         "ci95": {{"accuracy": [0.5, 0.9], "auc": [0.6, 0.95]}}}}
metrics = {{"notebook": "01_good", "profile": PROFILE, "dataset": "pneumonia", "data_dir": DATA_DIR,
           "model": "tinynet_unique", "pretrained": False, "image_size": 64,
           "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "val": test, "test": test,
           "timing": {{"train_seconds": 1.0, "train_images_per_second": 10.0}}, "device": "cpu",
           "kernel_prefix": sys.prefix, "cwd": str(Path.cwd())}}
metrics["val"] = {{**test, "balanced_accuracy": 0.6}}
(out / "metrics.json").write_text(json.dumps(metrics))
"""


def _write_notebook(path: Path, cells: list) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A notebooks/ folder with a good, a broken and a metrics-less notebook."""
    root = tmp_path_factory.mktemp("course")
    nbdir = root / "notebooks"
    nbdir.mkdir()
    params = new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})
    _write_notebook(nbdir / "01_good.ipynb", [new_markdown_cell("# Good"), params, new_code_cell(GOOD_BODY)])
    _write_notebook(
        nbdir / "02_broken.ipynb",
        [
            new_markdown_cell("# Broken"),
            new_code_cell("x = 1"),
            new_code_cell("y = x + 1  # second code cell\nraise ValueError('boom from cell two')"),
            new_code_cell("print('never reached')"),
        ],
    )
    _write_notebook(nbdir / "03_no_metrics.ipynb", [params, new_code_cell("print('no metrics here')")])
    (nbdir / "notes.ipynb").write_text("{}")  # not NN_*: must be ignored
    (nbdir / "exercises").mkdir()  # companion exercises: shown on the site after their chapter, never run
    _write_notebook(nbdir / "exercises" / "01_good_exercises.ipynb", [
        new_markdown_cell("# 01 · Exercises: good\n\nCompanion of chapter [01_good](../01_good.ipynb)."),
        new_code_cell('COURSE_REPO = "https://github.com/someone/course"\nraise RuntimeError("exercises ran")')])
    # A metrics.json left over from an earlier run must not be collected.
    stale = root / "out" / "03_no_metrics" / "metrics.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"notebook": "03_no_metrics", "profile": "full", "model": "stale_model"}))
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    return root


@pytest.fixture(scope="module")
def full_run(course: Path) -> tuple[int, str, Path]:
    """main() over the whole folder, once for all assertions below."""
    build = course / "_build"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = run_all.main(
            [
                "--profile", "smoke",
                "--notebooks-dir", str(course / "notebooks"),
                "--build-dir", str(build),
                "--output-dir-root", str(course / "out"),
                "--timeout", "120",
            ]
        )
    return code, stdout.getvalue(), build


def test_discover_sorted_and_only(course: Path) -> None:
    nbdir = course / "notebooks"
    assert [p.stem for p in run_all.discover_notebooks(nbdir)] == ["01_good", "02_broken", "03_no_metrics"]
    assert [p.stem for p in run_all.discover_notebooks(nbdir, ["03", "1"])] == ["01_good", "03_no_metrics"]
    with pytest.raises(ValueError, match=r"'09'.*Available: 01_good, 02_broken, 03_no_metrics"):
        run_all.discover_notebooks(nbdir, ["09"])


def test_failure_gives_nonzero_exit_and_others_still_run(full_run: tuple[int, str, Path]) -> None:
    code, out, build = full_run
    assert code == 1
    assert "[1/3] 01_good ... ok" in out
    assert "[2/3] 02_broken ... failed" in out
    assert "[3/3] 03_no_metrics ... ok" in out  # ran after the failure
    assert "warning: Input notebook does not contain a cell with tag 'parameters'" in out  # 02 has none
    assert (build / "notebooks" / "03_no_metrics.ipynb").is_file()


def test_kernel_is_this_venv_with_parameters_and_cwd(course: Path, full_run: tuple[int, str, Path]) -> None:
    metrics = json.loads((course / "out" / "01_good" / "metrics.json").read_text())
    assert metrics["profile"] == "smoke"  # injected; the notebook's default is "full"
    assert metrics["data_dir"] is None  # DATA_DIR not passed when --data-dir is absent
    assert Path(metrics["kernel_prefix"]).resolve() == Path(sys.prefix).resolve()
    assert Path(metrics["cwd"]).resolve() == (course / "notebooks").resolve()
    assert (course / "out" / "01_good" / "dot.png").is_file()


def test_results_table_has_metrics_and_profile(full_run: tuple[int, str, Path]) -> None:
    _, _, build = full_run
    table = pd.read_csv(build / "report" / "results.csv")
    assert "tinynet_unique" in set(table["model"])
    assert "stale_model" not in set(table["model"].astype(str))
    assert set(table["profile"]) == {"smoke"}
    row = table[table["model"] == "tinynet_unique"].iloc[0]
    assert row["notebook"] == "01_good"
    assert row["test_balanced_accuracy"] == pytest.approx(0.7)
    assert row["val_balanced_accuracy"] == pytest.approx(0.6)
    markdown = (build / "report" / "results.md").read_text()
    line = next(line for line in markdown.splitlines() if "tinynet_unique" in line)
    assert "| smoke |" in line and "| 0.700 |" in line and "[0.600, 0.950]" in line


def test_site_shows_each_chapter_with_its_profile_and_the_failing_cell(full_run: tuple[int, str, Path]) -> None:
    code, out, build = full_run
    pages = build / "site"
    assert "Website: " in out and (pages / "index.html").is_file()
    good = (pages / "chapters" / "01_good.html").read_text()
    assert "Run: smoke profile" in good and "<img" in good  # banner and the displayed PNG
    broken = (pages / "chapters" / "02_broken.html").read_text()
    banner = html.unescape(re.sub(r"<[^>]+>", "", broken.split("Run: smoke profile")[1]))
    assert "This notebook failed at code cell 2: ValueError: boom from cell two" in " ".join(banner.split())
    assert 'href="#papermill-error-cell"' in broken and 'id="papermill-error-cell"' in broken
    after_anchor = broken.split('id="papermill-error-cell"')[1]  # the failing cell, then its traceback
    assert after_anchor.index("# second code cell") < after_anchor.index("ValueError")
    results = (pages / "results.html").read_text()
    assert "tinynet_unique" in results and "0.800 [0.600, 0.950]" in results
    assert "no metrics.json from this execution" in results  # 03: the stale file is not used
    assert "stale_model" not in results
    csv = next((pages / "_downloads").rglob("results.csv"))
    assert "val_balanced_accuracy" in csv.read_text()  # all columns live in the CSV
    assert "random init" in results  # the weights column, from "pretrained": false


def test_exercises_are_not_run_and_appear_after_their_chapter(full_run: tuple[int, str, Path]) -> None:
    _, out, build = full_run
    assert "01_good_exercises" not in out and not list((build / "notebooks").rglob("*exercises*"))
    page = (build / "site" / "exercises" / "01_good_exercises.html").read_text()
    assert "exercises ran" in page and "Exercises" in page  # the code, unexecuted, under its banner
    assert 'href="../chapters/01_good.html"' in page  # the link to its chapter works on the site
    assert "colab.research.google.com/github/someone/course/blob/main/notebooks/exercises/01_good_exercises.ipynb" in page
    index = (build / "site" / "index.html").read_text()
    order = [index.index(f'href="{page}"') for page in
             ("chapters/01_good.html", "exercises/01_good_exercises.html", "chapters/02_broken.html")]
    assert order == sorted(order)


def test_a_reference_run_keeps_the_executed_notebook_beside_its_assets(course: Path, tmp_path: Path) -> None:
    """Without --output-dir-root the run writes into assets/: the executed copy goes there too,
    and the site reads chapter, metrics, run time and machine from it; changed code is flagged."""
    root = tmp_path / "course"
    shutil.copytree(course / "notebooks", root / "notebooks")
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_all.main(["--profile", "smoke", "--only", "01", "--notebooks-dir", str(root / "notebooks"),
                             "--build-dir", str(tmp_path / "_build"), "--no-site"])
    assert code == 0
    copy = root / "assets" / "01_good" / "01_good.ipynb"
    nb = nbformat.read(copy, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert nb.metadata["papermill"]["input_path"] == "notebooks/01_good.ipynb"  # no machine path
    assert "CPU core" in nb.metadata["coursebuild"]["machine"]
    loaded = {c.stem: c for c in chapters.load_chapters(root / "assets", root / "notebooks")}
    good = loaded["01_good"]
    assert good.executed and good.metrics["model"] == "tinynet_unique" and not good.drift
    assert not loaded["02_broken"].executed
    assert good.seconds and good.seconds > 0
    banner = site.chapter_banner(good, good.finished, good.finished)
    assert "What you will see:** test AUC 0.800 [0.600, 0.950], balanced accuracy 0.700" in banner
    assert "weights: random init" in banner and good.machine in banner
    source = nbformat.read(root / "notebooks" / "01_good.ipynb", as_version=4)
    source.cells[-1].source += "\nprint('new line')"
    nbformat.write(source, root / "notebooks" / "01_good.ipynb")
    changed = chapters.load_chapters(root / "assets", root / "notebooks")[0]
    assert changed.drift == ["code cell 2 ('import json, sys') changed"]
    assert "The code has changed since this run" in site.chapter_banner(changed, good.finished, good.finished)


def test_partial_run_keeps_earlier_chapters_and_marks_them(course: Path, full_run, tmp_path: Path) -> None:
    build = tmp_path / "_build"
    shutil.copytree(full_run[2] / "notebooks", build / "notebooks")  # an earlier run of all three
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_all.main(
            [
                "--profile", "smoke", "--only", "01",
                "--notebooks-dir", str(course / "notebooks"),
                "--build-dir", str(build),
                "--output-dir-root", str(tmp_path / "out"),
                "--no-site",
            ]
        )
    assert code == 0
    assert list(pd.read_csv(build / "report" / "results.csv")["notebook"]) == ["01_good"]
    assert sorted(p.name for p in (build / "notebooks").glob("*.ipynb")) == [
        "01_good.ipynb", "02_broken.ipynb", "03_no_metrics.ipynb"]
    runs = json.loads((build / "notebooks" / "runs.json").read_text())
    assert runs["last_run"]["notebooks"] == ["01_good"]
    assert runs["notebooks"]["02_broken"]["status"] == "failed"  # kept from the earlier run
    loaded = {c.stem: c for c in chapters.load_chapters(build / "notebooks", course / "notebooks")}
    assert not loaded["01_good"].earlier_run and loaded["01_good"].metrics["model"] == "tinynet_unique"
    assert loaded["02_broken"].earlier_run and loaded["02_broken"].failed
    newest = max(c.finished for c in loaded.values())
    banner = site.chapter_banner(loaded["03_no_metrics"], newest, newest)
    assert "From an earlier run" in banner and "smoke" in banner


def test_unknown_number_is_a_clear_error(course: Path, tmp_path: Path) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = run_all.main(
            ["--only", "42", "--notebooks-dir", str(course / "notebooks"), "--build-dir", str(tmp_path)]
        )
    assert code == 2
    assert "42" in stderr.getvalue() and "01_good, 02_broken, 03_no_metrics" in stderr.getvalue()
    assert not (tmp_path / "notebooks").exists()


def test_timeout_bounds_the_whole_notebook(tmp_path: Path) -> None:
    nb = tmp_path / "05_slow.ipynb"
    # Each cell alone is shorter than the budget; together they are not.
    _write_notebook(nb, [new_code_cell(f"import time; time.sleep(1.5); print('cell {i} done')") for i in range(4)])
    result = run_all.run_notebook(nb, tmp_path / "out.ipynb", {"PROFILE": "smoke"}, timeout=2.5)
    assert result.status == "timeout"
    assert "2 s budget" in result.error or "3 s budget" in result.error
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    printed = [o.get("text", "") for c in executed.cells for o in c.get("outputs", [])]
    assert "cell 3 done" not in "".join(printed)  # stopped by the notebook budget, not per cell


def test_extra_parameters_are_parsed_as_literals():
    args = run_all._parse_args(["--profile", "cpu", "-p", "MAX_PER_CLASS=100", "-p", "LABEL=abc",
                                "-p", "EPOCHS=None", "--data-dir", "synthetic"])
    params = run_all._parameters(args, "04_x")
    assert params == {"PROFILE": "cpu", "DATA_DIR": "synthetic", "MAX_PER_CLASS": 100,
                      "LABEL": "abc", "EPOCHS": None}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        run_all._parameters(run_all._parse_args(["-p", "oops"]), "04_x")


def test_a_data_folder_is_injected_relative_to_the_notebooks_folder(tmp_path):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main" / "notebooks").mkdir(parents=True)
    args = run_all._parse_args(["--data-dir", str(tmp_path / "shared" / "data"),
                                "--notebooks-dir", str(tmp_path / "main" / "notebooks")])
    assert run_all._parameters(args, "04_x")["DATA_DIR"] == "../../shared/data"  # papermill's cwd: notebooks/
    nested = tmp_path / "main" / "notebooks" / "exercises"
    assert run_all._parameters(args, "04_x", nested)["DATA_DIR"] == "../../../shared/data"


def test_collect_only_tables_every_metrics_file_with_its_profile_and_data(tmp_path):
    root = tmp_path / "course"
    (root / "notebooks").mkdir(parents=True)
    for stem, profile, data_dir, acc in (("01_a", "smoke", "/x/data/synthetic/chest4-seed42", 0.25),
                                         ("04_b", "cpu", "/shared/chest_xray_pneumonia_224", 0.82)):
        out = root / "assets" / stem
        out.mkdir(parents=True)
        block = {"accuracy": acc, "balanced_accuracy": acc, "auc": 0.9, "ci95": {"auc": [0.8, 0.95]}}
        (out / "metrics.json").write_text(json.dumps({
            "notebook": stem, "profile": profile, "dataset": "d", "data_dir": data_dir, "model": "m",
            "pretrained": False, "image_size": 64, "class_names": ["a", "b"], "threshold": 0.5,
            "val": block, "test": block, "timing": {}, "device": "cpu"}))
    assert run_all.main(["--collect-only", "--notebooks-dir", str(root / "notebooks")]) == 0
    text = (root / "assets" / "RESULTS.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert len(rows) == 2
    assert "| smoke | synthetic |" in rows[0] and "0.250" in rows[0]
    assert "| cpu | real (chest_xray_pneumonia_224) |" in rows[1] and "0.820" in rows[1]
    assert "[0.800, 0.950]" in rows[1]
    assert run_all.main(["--collect-only", "--notebooks-dir", str(tmp_path / "empty" / "notebooks")]) == 2


def test_collect_only_writes_the_readme_table_between_its_markers(tmp_path, capsys):
    root = tmp_path / "course"
    (root / "notebooks").mkdir(parents=True)
    _write_notebook(root / "notebooks" / "04_b.ipynb", [new_code_cell("x = 1")])
    (root / "assets" / "04_b").mkdir(parents=True)
    block = {"accuracy": 0.8, "balanced_accuracy": 0.81, "auc": 0.88, "ci95": {"auc": [0.84, 0.91]}}
    (root / "assets" / "04_b" / "metrics.json").write_text(json.dumps({
        "notebook": "04_b", "profile": "cpu", "dataset": "d", "data_dir": "x", "model": "m",
        "pretrained": True, "weights": {"source": "torchvision"}, "image_size": 128,
        "class_names": ["a", "b"], "threshold": 0.5, "val": block, "test": block, "timing": {}, "device": "cpu"}))
    assert run_all.main(["--collect-only", "--notebooks-dir", str(root / "notebooks")]) == 0
    assert "has no <!-- reference-run:start -->" in capsys.readouterr().out  # printed, README left alone
    readme = root / "README.md"
    readme.write_text("# Course\n\n<!-- reference-run:start -->\n<!-- reference-run:end -->\nrest\n")
    assert run_all.main(["--collect-only", "--notebooks-dir", str(root / "notebooks")]) == 0
    text = readme.read_text()
    assert "| 04 | test AUC 0.880 [0.840, 0.910], balanced accuracy 0.810 (m) | ImageNet (torchvision) | cpu |  |" in text
    assert text.endswith("<!-- reference-run:end -->\nrest\n")
