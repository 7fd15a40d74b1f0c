"""Execute every course notebook top to bottom in the smoke profile (offline, CPU).

Each notebook must write metrics.json with the schema keys of CONTRIBUTING.md ("metrics.json"), naming
its run, and the figures it lists under "figures" (and no other) into its OUTPUT_DIR (here a
temporary folder, so assets/ is never touched).
The smoke runs keep their executed notebooks in one folder per test session (`smoke_run_dir`),
laid out like the runner's `_build/`, so that test_site.py builds the website from them instead
of executing the notebooks again. Notebook 04 runs a second time on the real shared pneumonia
data when it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill
import pytest
from PIL import Image

from conftest import ROOT
from coursebuild import records, reference

# pytest-xdist (pyproject addopts): tests sharing this module's fixtures run on one worker.
pytestmark = pytest.mark.xdist_group("smoke-notebooks")

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCHEMA_KEYS = {"notebook", "profile", "dataset", "data_dir", "model", "pretrained", "image_size",
               "class_names", "threshold", "val", "test", "timing", "device"}
TEST_KEYS = {"accuracy", "balanced_accuracy", "auc", "per_class", "confusion_matrix", "ci95"}


def smoke_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's smoke run: notebooks/<stem>.ipynb executed, assets/<stem>/ their outputs."""
    return tmp_path_factory.getbasetemp() / "smoke-run"


def execute_smoke(notebook: Path, run_dir: Path) -> tuple[dict, Path]:
    """Execute ``notebook`` in the smoke profile into ``run_dir``; (metrics, its output folder)."""
    out_dir = run_dir / "assets" / notebook.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        # Importing streamlit (test_app.py) sets MPLBACKEND=Agg for this process; kernels inherit
        # it and would then show no figure inline, so the executed notebooks (and the website
        # built from them) would lack every figure.
        patch.delenv("MPLBACKEND", raising=False)
        return _execute(notebook, out_dir, run_dir / "notebooks" / notebook.name), out_dir


def _execute(notebook: Path, out_dir: Path, executed: Path | None = None, **parameters) -> dict:
    executed = executed or out_dir / f"executed_{notebook.name}"
    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(executed), cwd=str(notebook.parent), kernel_name="python3",
        progress_bar=False, parameters=dict(PROFILE="smoke", OUTPUT_DIR=str(out_dir), **parameters))
    metrics_path = out_dir / "metrics.json"
    assert metrics_path.exists(), f"{notebook.name} wrote no metrics.json"
    return json.loads(metrics_path.read_text())


def _check_outputs(notebook: Path, metrics: dict, out_dir: Path) -> None:
    assert SCHEMA_KEYS <= set(metrics), SCHEMA_KEYS - set(metrics)
    assert metrics["notebook"] == notebook.stem
    assert metrics["profile"] == "smoke"
    assert isinstance(metrics["pretrained"], bool)
    blocks = [metrics] + list(metrics.get("runs", []))
    assert any(isinstance(b.get("test"), dict) for b in blocks)
    for block in blocks:
        if isinstance(block.get("test"), dict) and "accuracy" in block["test"]:
            assert TEST_KEYS <= set(block["test"]), TEST_KEYS - set(block["test"])
            assert 0.0 <= block["test"]["accuracy"] <= 1.0
    figures = metrics.get("figures", [])
    assert figures, "metrics.json should list the figures the notebook saved"
    for name in figures:
        path = out_dir / name
        assert path.exists() and path.stat().st_size > 1000, f"missing or empty figure {name}"
        Image.open(path).verify()
    assert metrics.get("run_id") and metrics.get("started_at"), "metrics.json should name its run"
    problems = records.output_problems(out_dir, metrics)
    assert not problems, f"{notebook.name}: outputs that do not belong to its run: {problems}"


def test_notebooks_are_committed_clean_and_parameterised():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
        for name in ("PROFILE", "DATA_DIR", "SEED", "OUTPUT_DIR"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameters cell lacks {name}"
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(notebook, tmp_path_factory):
    metrics, out_dir = execute_smoke(notebook, smoke_run_dir(tmp_path_factory))
    _check_outputs(notebook, metrics, out_dir)
    executed = smoke_run_dir(tmp_path_factory) / "notebooks" / notebook.name
    problems = reference.page_problems(executed, paths=False)  # smoke writes to a temporary folder
    assert not problems, f"{notebook.name}: {problems}"


@pytest.mark.notebook
@pytest.mark.realdata
def test_notebook_04_runs_on_real_pneumonia_data(shared_pneumonia, tmp_path):
    notebook = next((p for p in NOTEBOOKS if p.name.startswith("04_")), None)
    if notebook is None:
        pytest.skip("notebook 04 not present")
    metrics = _execute(notebook, tmp_path, DATA_DIR=str(shared_pneumonia))
    _check_outputs(notebook, metrics, tmp_path)
    assert not Path(metrics["data_dir"]).is_absolute()  # portable: relative to the course
    assert (ROOT / metrics["data_dir"]).resolve() == shared_pneumonia.resolve()
    assert metrics["class_names"] == ["NORMAL", "PNEUMONIA"]
