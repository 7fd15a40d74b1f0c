"""What the website needs to know about each chapter: read from the executed notebooks.

Everything comes from the notebooks themselves (papermill's metadata: parameters, start and end
time, whether it raised) plus, where the runner wrote it, ``runs.json`` beside them (which
notebooks the latest run executed) and the notebook's own metrics.json. Executed notebooks are
read from a run_all build folder (``NN_*.ipynb``) or from assets/ (``NN_*/NN_*.ipynb``, the
reference run: its metrics.json is the one beside it). The exercise notebooks are shown as they
are committed (no outputs), after their chapter.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from papermill.execute import ERROR_MARKER_TAG

from coursebuild.layout import NOTEBOOK_PATTERN, RUNS_FILE
from coursebuild.reference import code_differences, executed_notebooks, is_beside_assets
from coursebuild.records import metrics_path, read_fresh_metrics

PROFILE_IN_SOURCE = re.compile(r"""^PROFILE\s*=\s*["'](\w+)["']""", re.MULTILINE)


@dataclass
class Chapter:
    """One notebook as the website shows it."""

    stem: str
    title: str
    notebook: nbformat.NotebookNode
    executed: bool
    profile: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    started: dt.datetime | None = None
    finished: dt.datetime | None = None
    failed: bool = False
    failure: str | None = None  # "code cell 3: ValueError: boom"
    earlier_run: bool = False  # executed before the latest (partial) run
    metrics: dict[str, Any] | None = None
    source: Path | None = None  # the notebook in notebooks/ (or notebooks/exercises/)
    drift: list[str] = field(default_factory=list)  # how the executed code differs from the source
    machine: str | None = None  # recorded by run_all in the executed copy ("Linux x86_64, 2 CPU cores")
    duration: float | None = None  # papermill's own duration, where start/end are missing
    exercises: bool = False  # a companion exercise notebook, not a chapter

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return self.duration
        return (self.finished - self.started).total_seconds()


def _timestamp(text: Any) -> dt.datetime | None:
    """papermill's ISO time (UTC) as an aware datetime; None when absent or unreadable."""
    try:
        stamp = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)


def _title(nb: nbformat.NotebookNode, stem: str) -> str:
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "markdown" and first.source.startswith("# "):
        return first.source.splitlines()[0][2:].strip()
    return stem


def _profile(nb: nbformat.NotebookNode, parameters: dict[str, Any]) -> str | None:
    """The injected PROFILE, else the default in the notebook's parameters cell."""
    if parameters.get("PROFILE"):
        return str(parameters["PROFILE"])
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            match = PROFILE_IN_SOURCE.search(cell.source)
            return match.group(1) if match else None
    return None


def failing_cell(nb: nbformat.NotebookNode) -> str | None:
    """'code cell N: Name: message' for the first cell with an error output, counted as in notebooks/."""
    number = 0
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if cell.cell_type != "code" or ERROR_MARKER_TAG in tags:
            continue
        if "injected-parameters" not in tags:
            number += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                message = " ".join(str(output.get("evalue", "")).split())[:300]
                return f"code cell {number}: {output.get('ename', 'Error')}: {message}"
    return None


def _metrics(path: Path, chapter: Chapter, notebooks_dir: Path) -> dict[str, Any] | None:
    """The chapter's metrics.json when this execution wrote it (same profile, not older): beside
    an executed copy in assets/, else where the run's OUTPUT_DIR (or assets/<stem>) put it."""
    if chapter.started is None:
        return None
    where = (path.parent / "metrics.json" if is_beside_assets(path) else
             metrics_path(path.stem, chapter.parameters.get("OUTPUT_DIR"), root=notebooks_dir.resolve().parent))
    return read_fresh_metrics(where, chapter.started, profile=chapter.profile)


def _drift(path: Path, source: Path | None) -> list[str]:
    if source is None or not source.is_file():
        return []
    try:
        return code_differences(path, source)
    except (OSError, ValueError) as exc:
        return [f"cannot compare with {source.name}: {exc}"]


def load_chapter(path: Path, executed: bool, notebooks_dir: Path, last_run: list[str] | None) -> Chapter:
    """A Chapter from an executed notebook (or, when ``executed`` is False, the stripped source)."""
    nb = nbformat.read(path, as_version=4)
    # papermill's "An Exception was encountered" heading: the page's banner says it instead;
    # its anchor cell right above the failing cell stays, for the banner to link to.
    nb.cells = [c for c in nb.cells if ERROR_MARKER_TAG not in c.metadata.get("tags", [])
                or 'id="papermill-error-cell"' in c.source]
    source = notebooks_dir / path.name
    chapter = Chapter(stem=path.stem, title=_title(nb, path.stem), notebook=nb, executed=executed,
                      source=source if source.is_file() else None)
    if not executed:
        return chapter
    meta = nb.metadata.get("papermill", {})
    duration = meta.get("duration")
    chapter.duration = float(duration) if isinstance(duration, (int, float)) else None
    chapter.machine = (nb.metadata.get("coursebuild") or {}).get("machine")
    chapter.drift = _drift(path, chapter.source)
    chapter.parameters = dict(meta.get("parameters") or {})
    chapter.profile = _profile(nb, chapter.parameters)
    chapter.started = _timestamp(meta.get("start_time"))
    chapter.finished = _timestamp(meta.get("end_time")) or dt.datetime.fromtimestamp(
        path.stat().st_mtime, dt.timezone.utc)
    chapter.failure = failing_cell(nb)
    chapter.failed = bool(meta.get("exception")) or chapter.failure is not None
    chapter.earlier_run = last_run is not None and path.stem not in last_run
    if not chapter.failed:
        chapter.metrics = _metrics(path, chapter, notebooks_dir)
    return chapter


def _notebooks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and NOTEBOOK_PATTERN.match(p.name)}


def load_chapters(executed_dir: Path, notebooks_dir: Path) -> list[Chapter]:
    """Every chapter in order: the executed copy where there is one, else the source notebook."""
    try:
        runs = json.loads((executed_dir / RUNS_FILE).read_text())
        last_run = list(runs["last_run"]["notebooks"])
    except (OSError, ValueError, KeyError, TypeError):
        last_run = None
    executed, sources = executed_notebooks(executed_dir), _notebooks(notebooks_dir)
    chapters = []
    for stem in sorted(set(executed) | set(sources)):
        path = executed.get(stem) or sources[stem]
        chapters.append(load_chapter(path, stem in executed, notebooks_dir, last_run))
    return chapters


def load_exercises(exercises_dir: Path) -> dict[str, Chapter]:
    """{chapter number "04": its exercise notebook} from ``notebooks/exercises/NN_*_exercises.ipynb``."""
    found = {}
    for stem, path in _notebooks(exercises_dir).items():
        if stem.endswith("_exercises"):
            chapter = load_chapter(path, False, exercises_dir, None)
            chapter.exercises = True
            found[stem[:2]] = chapter
    return found
