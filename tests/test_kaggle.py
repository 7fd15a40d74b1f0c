"""What a Kaggle kernel gets: kernel metadata per notebook, a slim `pip install`, ONNX on request.

- every notebook has kaggle/<stem>/kernel-metadata.json naming the datasets it loads;
- kaggle/push.py fills in the user name (and optionally COURSE_REPO and a course dataset);
- `pip install` of the course brings what the notebooks import, not Jupyter or ONNX, and leaves
  an installed torch/torchvision alone (resolved with `uv pip install --dry-run` against a venv
  that holds this lock's torch and torchvision);
- notebook 08's imports say how to install ONNX and ONNX Runtime when they are missing.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from helpers.datasets import DATASETS

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KAGGLE = ROOT / "kaggle"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
NOTEBOOK_TOOLS = {"jupyterlab", "ipykernel", "ipywidgets", "papermill", "nbconvert", "nbformat"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _datasets_used(notebook: Path) -> set[str]:
    """DATASETS keys that a notebook's code names as string literals ("pneumonia", ...)."""
    code = "\n".join(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    return {name for name in DATASETS if re.search(rf"""["']{name}["']""", code)}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_has_kernel_metadata(notebook):
    meta = json.loads((KAGGLE / notebook.stem / "kernel-metadata.json").read_text())
    assert (KAGGLE / notebook.stem / meta["code_file"]).resolve() == notebook
    owner, slug = meta["id"].split("/")
    assert owner == "YOUR_KAGGLE_USERNAME"
    assert slug == re.sub(r"[^a-z0-9]+", "-", meta["title"].lower()).strip("-")  # Kaggle's slug of the title
    assert 5 <= len(meta["title"]) <= 50
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["enable_gpu"] is True and meta["enable_internet"] is True
    assert isinstance(meta["is_private"], bool)
    assert meta["competition_sources"] == [] and meta["kernel_sources"] == []
    used = _datasets_used(notebook)
    assert used, f"{notebook.name} names no dataset of helpers.datasets.DATASETS"
    assert sorted(meta["dataset_sources"]) == sorted(DATASETS[name].handle for name in used)


def test_kernel_folders_match_the_notebooks():
    folders = {p.name for p in KAGGLE.iterdir() if (p / "kernel-metadata.json").exists()}
    assert folders == {p.stem for p in NOTEBOOKS}
    meta = {p: json.loads((KAGGLE / p / "kernel-metadata.json").read_text()) for p in folders}
    assert len(meta["00_data_tour"]["dataset_sources"]) == 3
    assert set(meta["08_model_to_app"]["dataset_sources"]) == {DATASETS["pneumonia"].handle, DATASETS["fundus"].handle}


def test_push_script_fills_in_user_repo_and_course_dataset(tmp_path):
    done = subprocess.run(
        [sys.executable, str(KAGGLE / "push.py"), "jdoe", "--only", "04", "--course-repo",
         "https://github.com/jdoe/course", "--course-dataset", "jdoe/course-copy", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "jdoe/medical-tl-04-mobilenetv2-two-stages"
    assert meta["dataset_sources"] == [DATASETS["pneumonia"].handle, "jdoe/course-copy"]
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'COURSE_REPO = "https://github.com/jdoe/course"' in setup.splitlines()
    original = nbformat.read(ROOT / "notebooks" / meta["code_file"], as_version=4)
    assert [c.source for c in original.cells][2:] == [c.source for c in nb.cells][2:]  # after the setup cell


def test_runtime_dependencies_leave_jupyter_and_onnx_out():
    runtime = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert {"torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "kagglehub"} <= runtime
    assert not runtime & (NOTEBOOK_TOOLS | {"onnx", "onnxruntime", "streamlit", "jupyter"})
    assert {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["deploy"]} == {"onnx", "onnxruntime"}
    # `uv sync` still installs everything: the notebooks group (tools + the deploy extra) via dev.
    groups = PYPROJECT["dependency-groups"]
    assert {_name(r) for r in groups["notebooks"] if isinstance(r, str)} >= NOTEBOOK_TOOLS
    assert "medical-transfer-learning-course[deploy]" in groups["notebooks"]
    assert {"include-group": "notebooks"} in groups["dev"]
    assert "dev" in PYPROJECT["tool"]["uv"]["default-groups"]


def _uninstall(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules, even if already imported) fail as if missing."""
    for name in [m for m in sys.modules if m.startswith(f"{package}.")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def _onnx_imports_of_notebook_08() -> ast.Module:
    """The `try: import onnx ...` statement of notebook 08's import cell, as a module to execute."""
    notebook = nbformat.read(ROOT / "notebooks" / "08_model_to_app.ipynb", as_version=4)
    tries = [node for cell in notebook.cells if cell.cell_type == "code"
             for node in ast.parse(cell.source).body if isinstance(node, ast.Try)
             and any("onnxruntime" in ast.unparse(statement) for statement in node.body)]
    assert len(tries) == 1, "notebook 08 should import ONNX Runtime in one try/except ImportError"
    return ast.Module(body=tries, type_ignores=[])


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_notebook_08_says_how_to_install_onnx(monkeypatch, package):
    code = compile(_onnx_imports_of_notebook_08(), "08_model_to_app.ipynb", "exec")
    exec(code, {})  # installed here: the imports just work
    _uninstall(monkeypatch, package)
    with pytest.raises(ImportError, match=r'pip install "\.\[deploy\]".*pip install onnx onnxruntime'):
        exec(code, {})


def _locked_version(name: str) -> str:
    versions = [p["version"] for p in LOCK["package"] if p["name"] == name]
    ours = __import__(name).__version__.split("+")[0]
    assert ours in versions, (name, ours, versions)
    return ours


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory) -> Path:
    """A venv holding only this lock's torch and torchvision (as a Kaggle kernel holds its own)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    venv = tmp_path_factory.mktemp("kernel") / "venv"
    python = venv / "bin" / "python"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120)
    pins = [f"torch=={_locked_version('torch')}", f"torchvision=={_locked_version('torchvision')}"]
    # Symlinks into uv's cache: seconds and no copy of the CUDA wheels.
    done = subprocess.run([uv, "pip", "install", "-q", "--link-mode", "symlink", "--python", str(python), *pins],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"could not install {pins} from uv's cache or the registry: {done.stderr[-300:]}")
    return python


def test_installing_the_course_keeps_the_kernels_torch(torch_venv):
    done = subprocess.run(["uv", "pip", "install", "--dry-run", "--python", str(torch_venv), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("network" in done.stderr or "offline" in done.stderr):
        pytest.skip(f"no registry to resolve against: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    changes = [line.split()[1] for line in done.stderr.splitlines() if line.startswith((" + ", " - ", " ~ "))]
    names = {re.split(r"==| @ ", c)[0].lower() for c in changes}
    assert "medical-transfer-learning-course" in names  # the resolution really ran
    assert not names & {"torch", "torchvision"}, changes
    assert not names & (NOTEBOOK_TOOLS | {"onnx", "onnxruntime", "jupyter", "notebook"}), changes
