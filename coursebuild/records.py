"""Run records read back: which metrics.json belongs to a run, whether a folder's outputs all come
from that run, and the results tables built from several of them.

The notebooks write these records (`helpers.runs.start_run`, `save_metrics`); the course builder
(`run_all`, `results`, `site`, `chapters`) and the tests read them here. Profiles and output
folders stay defined once, in `helpers.runs`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.runs import METRICS_FILE, assets_dir, weights_label

# What a number from each profile does and does not mean (the results tables and the website).
PROFILE_NOTES: dict[str, str] = {
    "smoke": ("smoke profile: synthetic data (unless a data folder was given), tiny images, one short "
              "epoch, random initialisation. These numbers only show that the code runs; they say "
              "nothing about the real task."),
    "cpu": ("cpu profile: real data at about 128 px, a few epochs, on a laptop-sized budget. "
            "Numbers show trends, not what the full recipe reaches."),
    "full": ("full profile: the Kaggle T4 recipe (224 px, ImageNet weights where they could be "
             "downloaded, full epoch counts). Check the pretrained column: a run without ImageNet "
             "weights is not the intended recipe."),
}
# Seconds one notebook may take in `python -m coursebuild.run_all` (its --timeout default).
PROFILE_TIMEOUT_S: dict[str, int] = {"smoke": 900, "cpu": 3 * 3600, "full": 12 * 3600}


def metrics_path(notebook: str, output_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """The metrics.json of a notebook: in `output_dir`, else `<root>/assets/<notebook>`
    (`helpers.runs.assets_dir`, where `start_run` puts it)."""
    return assets_dir(notebook, output_dir, root) / METRICS_FILE


def _started(record: Mapping) -> dt.datetime | None:
    try:
        stamp = dt.datetime.fromisoformat(str(record.get("started_at")))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)


def read_fresh_metrics(path: str | Path, since: dt.datetime, profile: str | None = None) -> dict | None:
    """The metrics.json at `path` if a run that started at `since` or later wrote it, else None.

    The rule, in one place: the file's `started_at` (its run's start) is not older than `since`
    (one second of slack); a file without `started_at` (written before run ids) counts by its
    modification time. With `profile`, a file of another profile does not count either.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    started = _started(record)
    when = started.timestamp() if started else path.stat().st_mtime
    if when < since.timestamp() - 1.0:
        return None  # left from an earlier run
    if profile is not None and record.get("profile", profile) != profile:
        return None
    return record


RUN_LINE = re.compile(r"\| run (\d{8}T\d{4}Z-[0-9a-f]{6})")  # start_run's printed line names the run


def executed_run_id(notebook: str | Path) -> str | None:
    """The run an executed notebook comes from: the run id its `start_run` line printed; None when it
    printed none (it failed before, or ran before runs had ids) or cannot be read."""
    try:
        cells = json.loads(Path(notebook).read_text()).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return None
    for cell in cells:
        for output in cell.get("outputs", []) if isinstance(cell, dict) else []:
            text = output.get("text", "") if isinstance(output, dict) else ""
            if match := RUN_LINE.search("".join(text) if isinstance(text, list) else str(text)):
                return match.group(1)
    return None


def copy_problem(folder: str | Path, record: Mapping) -> str | None:
    """Why the executed notebook kept in `folder` (`<notebook>.ipynb`) is not the run of its metrics.json
    `record`; None when it is, or when there is no executed copy."""
    copy = Path(folder) / f"{record.get('notebook')}.ipynb"
    if not copy.is_file():
        return None
    ran = executed_run_id(copy)
    if ran is None or ran != record.get("run_id"):
        return (f"executed copy {copy.name} is from run {ran or '(unknown)'}, the numbers from run "
                f"{record.get('run_id') or '(unknown)'}")
    return None


def output_problems(folder: str | Path, record: dict | None = None) -> list[str]:
    """Why the outputs in `folder` might not all come from the run its metrics.json names.

    Empty when they do: the metrics.json names its run (`run_id`), every figure it lists is there,
    no other figure (*.png) sits beside it, and an executed copy beside it printed the same run id. `record` is the folder's metrics.json, read if
    not given.
    """
    folder = Path(folder)
    if record is None:
        try:
            record = json.loads((folder / METRICS_FILE).read_text())
        except (OSError, ValueError):
            return [f"no readable {METRICS_FILE}"]
    problems = [] if record.get("run_id") else ["no run id (written before runs had ids)"]
    listed = {str(n) for n in record.get("figures") or []}
    missing = sorted(n for n in listed if not (folder / n).is_file())
    foreign = sorted(p.name for p in folder.glob("*.png") if p.name not in listed)
    if missing:
        problems.append("listed figures missing: " + ", ".join(missing))
    if foreign:
        problems.append("figures not from this run: " + ", ".join(foreign))
    if copy := copy_problem(folder, record):
        problems.append(copy)
    return problems


def _load_metrics(item: str | Path | dict) -> tuple[dict, Path | None]:
    """(the record, its folder or None for a dict)."""
    if isinstance(item, dict):
        return item, None
    path = Path(item)
    if path.is_dir():
        path = path / METRICS_FILE
    return json.loads(path.read_text()), path.parent


_CONTEXT_KEYS = ("notebook", "profile", "dataset", "model", "pretrained", "image_size")
_RUN_KEYS = ("run_id", "started_at")


def _metric_columns(block: dict | None, prefix: str) -> dict[str, Any]:
    """Flatten one val/test block into columns like test_auc, test_auc_lo, test_recall_NORMAL."""
    row: dict[str, Any] = {}
    if not block:
        return row
    ci = block.get("ci95") or {}
    for key in ("accuracy", "balanced_accuracy", "auc", "average_precision", "sensitivity", "specificity", "ece"):
        if key in block:
            row[f"{prefix}_{key}"] = block[key]
        if key in ci:
            lo_hi = ci[key] or [None, None]
            row[f"{prefix}_{key}_lo"], row[f"{prefix}_{key}_hi"] = lo_hi
    for name, stats in (block.get("per_class") or {}).items():
        row[f"{prefix}_recall_{name}"] = stats.get("recall")
    return row


def _row(record: dict, parent: dict, run_name: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {key: record.get(key, parent.get(key)) for key in _CONTEXT_KEYS}
    own = "weights" in record or record.get("pretrained") is False  # a run trained from random weights says so itself
    row["weights"] = weights_label(record.get("weights") if own else parent.get("weights"), row["pretrained"])
    row["run"] = run_name
    block_threshold = (record.get("test") or {}).get("threshold", parent.get("threshold"))
    row["threshold"] = record.get("threshold", block_threshold)
    if "test" in record or "val" in record:
        row.update(_metric_columns(record.get("val"), "val"))
        row.update(_metric_columns(record.get("test"), "test"))
    else:  # a run given as a bare metrics block is a test block
        row.update(_metric_columns(record, "test"))
    row.update({key: parent.get(key, record.get(key)) for key in _RUN_KEYS})
    return row


def _checks(records: list[tuple[dict, Path | None]]) -> list[str]:
    """One "check" text per record: its folder's `output_problems`, and a note when the same
    notebook comes from several runs (rows that would otherwise look alike)."""
    runs_of: dict[Any, set] = {}
    for record, _ in records:
        runs_of.setdefault(record.get("notebook"), set()).add(record.get("run_id") or id(record))
    checks = []
    for record, folder in records:
        problems = output_problems(folder, record) if folder is not None else []
        if len(runs_of[record.get("notebook")]) > 1:
            problems.append(f"{len(runs_of[record.get('notebook')])} runs of this notebook in the table")
        checks.append("; ".join(problems) or "ok")
    return checks


def results_table(paths_or_dicts: str | Path | dict | Sequence[str | Path | dict], *, include_main: bool = False,
                  headline: bool = False):
    """One row per model/run from several metrics.json files (paths, folders or dicts).

    A file with a "runs" list contributes one row per run (named by its "name", "run" or
    "strategy" key); with `include_main=True` its top-level block is added as well, with
    `headline=True` only its top-level block (one row per file: the course table of notebook 07).
    Columns: notebook, profile, dataset, model, pretrained, image_size, weights (`weights_label`), run, threshold, then
    val_* and test_* metrics with *_lo/*_hi 95% intervals and *_recall_<class> columns, then the
    run the row comes from (run_id, started_at) and "check": "ok", or why the row's outputs may
    mix runs (`output_problems`; several runs of one notebook in the same table).
    """
    items = [paths_or_dicts] if isinstance(paths_or_dicts, (str, Path, dict)) else list(paths_or_dicts)
    loaded = [_load_metrics(item) for item in items]
    rows = []
    for (record, _), check in zip(loaded, _checks(loaded)):
        runs = [] if headline else record.get("runs") or []
        if include_main or not runs:
            rows.append({**_row(record, {}, None), "check": check})
        for i, run in enumerate(runs):
            name = run.get("name") or run.get("run") or run.get("strategy") or run.get("model") or f"run{i}"
            rows.append({**_row(run, record, str(name)), "check": check})
    return pd.DataFrame(rows)
