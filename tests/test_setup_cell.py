"""The notebooks' setup cell: the same in every notebook, and each of its ways to find `helpers`.

The cell is extracted from the notebooks and executed in a subprocess: with `helpers` installed,
with a course copy above the working folder or attached under a fake /kaggle/input (Python -S, so
the installed package is invisible), and offline or with a failing install, where it must stop with
one message (rendered by IPython as Jupyter would, without a traceback).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KAGGLE_INPUT = "/kaggle/input/"

# Runs the cell in an IPython shell (as a Jupyter kernel does) with the checkout hidden from
# sys.path, so `helpers` is not importable; prints what the user would see.
IPYTHON_RUNNER = """
import sys
from pathlib import Path
root = Path(sys.argv[2]).resolve()
sys.path = [p for p in sys.path if p and Path(p).resolve() != root]
from IPython.core.interactiveshell import InteractiveShell
result = InteractiveShell.instance().run_cell(Path(sys.argv[1]).read_text())
print("ERROR-TYPE:", type(result.error_in_exec).__name__)
"""


def setup_cells() -> list[str]:
    return [next(c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code").source
            for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def cell() -> str:
    return setup_cells()[0]


def _run(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _course_copy(folder: Path) -> Path:
    """A minimal course copy: a folder with helpers/__init__.py (marked, to tell it apart)."""
    (folder / "helpers").mkdir(parents=True)
    (folder / "helpers" / "__init__.py").write_text("COPY = True\n")
    return folder


def test_setup_cell_is_the_same_in_every_notebook():
    cells = setup_cells()
    assert len(cells) == len(NOTEBOOKS) >= 1
    assert all(c == cells[0] for c in cells), "the first code cell differs between notebooks"
    assert "COURSE_REPO = " in cells[0] and "OMP_WAIT_POLICY" in cells[0]


def test_setup_cell_is_short_and_collapsed_on_the_website():
    """A student reads it at a glance; the website (myst-nb) shows it folded ("hide-input")."""
    for path in NOTEBOOKS:
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert len(first.source.splitlines()) <= 15, f"{path.name}: the setup cell grew past 15 lines"
        assert max(map(len, first.source.splitlines())) <= 100, f"{path.name}: a setup line is clipped"
        assert "hide-input" in first.metadata.get("tags", []), f"{path.name}: setup cell not tagged hide-input"


def test_installed_helpers_is_used_and_threads_are_set_before_torch(cell, tmp_path):
    probe = cell + "\nimport os, sys\nprint('OMP', os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)\n"
    done = _run([sys.executable, "-c", probe], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"course package: {os.path.relpath(ROOT / 'helpers', tmp_path)}" in done.stdout
    assert "OMP PASSIVE False" in done.stdout  # set, and torch not imported yet


@pytest.mark.parametrize("layout", ["above", "subfolder"])
def test_course_copy_above_or_cloned_beside_is_put_on_sys_path(cell, tmp_path, layout):
    course = _course_copy(tmp_path / "course")
    cwd = course / "notebooks" if layout == "above" else tmp_path  # checkout / Colab `!git clone`
    cwd.mkdir(exist_ok=True)
    # -S: no site-packages, so the installed `helpers` is invisible.
    done = _run([sys.executable, "-S", "-c", cell + "\nprint('copy', helpers.COPY)"], cwd)
    assert done.returncode == 0, done.stderr
    assert f"course package: {os.path.relpath(course / 'helpers', cwd)}" in done.stdout
    assert "copy True" in done.stdout


def test_course_attached_under_kaggle_input_is_found(cell, tmp_path):
    inputs = tmp_path / "input"
    (inputs / "chest-xray-pneumonia" / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)  # data
    course = _course_copy(inputs / "datasets" / "someone" / "course" / "course-main")  # 4 levels
    assert cell.count(KAGGLE_INPUT) == 1
    code = cell.replace(KAGGLE_INPUT, f"{inputs}/") + "\nprint('copy', helpers.COPY)"
    working = tmp_path / "working"
    working.mkdir()
    done = _run([sys.executable, "-S", "-c", code], working)
    assert done.returncode == 0, done.stderr
    assert f"course package: {os.path.relpath(course / 'helpers', working)}" in done.stdout
    assert "copy True" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closing_server():
    """A local port that accepts connections and closes them at once (a host that is 'online')."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("online", [False, True], ids=["offline", "install-fails"])
def test_without_any_way_the_cell_stops_with_one_message(cell, tmp_path, online, request):
    port = request.getfixturevalue("closing_server") if online else _free_port()
    repo = f"https://127.0.0.1:{port}/course"
    code_file = tmp_path / "cell.py"
    code_file.write_text(cell.replace('COURSE_REPO = "', f'COURSE_REPO = "{repo}"  # "', 1))
    done = _run([sys.executable, "-c", IPYTHON_RUNNER, str(code_file), str(ROOT)], tmp_path)
    shown = done.stdout + done.stderr
    assert "ERROR-TYPE: SystemExit" in shown, shown  # IPython shows SystemExit's message, no traceback
    assert "Traceback" not in shown and "pip._internal" not in shown
    assert "No `helpers`" in shown
    for way in ("uv sync", "clone or attach the course", "internet on"):
        assert way in shown, way
