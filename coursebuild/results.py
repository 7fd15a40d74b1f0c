"""Results tables built from metrics.json files: for one run, for assets/, and for the website.

Every row keeps the profile, data, image size and weights recorded in its metrics.json, so
numbers from different runs can sit side by side without being mistaken for one another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from coursebuild.records import PROFILE_NOTES, results_table
from helpers.runs import PROFILES

SUMMARY_COLUMNS = [
    "notebook", "profile", "dataset", "model", "run", "pretrained", "weights", "image_size",
    "test_accuracy", "test_balanced_accuracy", "test_auc", "test_auc_95ci", "run_id", "check",
]
MIXED_NOTE = ("**Some rows may mix runs** (column check): a folder whose figures are not all from the "
              "run its metrics.json names, a metrics.json without run id, or one notebook from several "
              "runs. Re-run those notebooks before quoting their rows.")


def profile_note(profile: str | None) -> str:
    """What a number from ``profile`` does and does not mean (one sentence or two)."""
    return PROFILE_NOTES.get(str(profile), f"profile {profile}")


def flagged(table: pd.DataFrame) -> int:
    """How many rows of a results table may mix runs (their "check" is not "ok")."""
    return int((table["check"] != "ok").sum()) if "check" in table.columns else 0


def results_frame(metrics_paths: Sequence[Path], profile: str) -> pd.DataFrame:
    """All given metrics.json in one table (`coursebuild.records.results_table`).

    Every row keeps the profile recorded in its metrics.json; rows without one get ``profile``.
    """
    if not metrics_paths:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    table = results_table(list(metrics_paths))
    if "profile" not in table.columns:
        table.insert(0, "profile", profile)
    table["profile"] = table["profile"].fillna(profile)
    return table


def summary_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The readable subset of the results table: test metrics, AUC as "0.812 [0.770, 0.850]"."""
    table = table.copy()
    if {"test_auc_lo", "test_auc_hi"} <= set(table.columns):
        table["test_auc_95ci"] = [
            "" if pd.isna(lo) or pd.isna(hi) else f"[{lo:.3f}, {hi:.3f}]"
            for lo, hi in zip(table["test_auc_lo"], table["test_auc_hi"])
        ]
    table = table[[c for c in SUMMARY_COLUMNS if c in table.columns]].copy()
    for column in ("dataset", "model", "run", "weights"):  # a missing "run" shows blank, not None
        if column in table.columns:
            table[column] = table[column].fillna("")
    return table


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_results(metrics_paths: Sequence[Path], report_dir: Path, profile: str) -> pd.DataFrame:
    """Write results.csv (all columns) and results.md (summary columns); return the full table."""
    report_dir.mkdir(parents=True, exist_ok=True)
    table = results_frame(metrics_paths, profile)
    table.to_csv(report_dir / "results.csv", index=False)
    body = (
        markdown_table(summary_frame(table))
        + "\nAll columns (val metrics, intervals, per-class recall): results.csv\n"
        if not table.empty
        else "_No metrics.json was written by this run._\n"
    )
    mixed = f"{MIXED_NOTE}\n\n" if flagged(table) else ""
    (report_dir / "results.md").write_text(f"# Results ({profile} profile)\n\n{profile_note(profile)}\n\n{mixed}{body}")
    return table


def data_label(data_dir: Any) -> str:
    """'synthetic', 'real (<folder>)', or both for notebooks that read several datasets."""
    if isinstance(data_dir, dict):
        return "; ".join(f"{k}: {data_label(v)}" for k, v in data_dir.items())
    if data_dir is None or (isinstance(data_dir, float) and math.isnan(data_dir)):
        return ""
    text = str(data_dir)
    return "synthetic" if "synthetic" in text else f"real ({Path(text).name})"


def course_tables(sources: Sequence[dict[str, Any] | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every column, summary with a "data" column) for the metrics.json of several notebooks:
    records, or paths (then "check" also says whether each folder's figures are its run's)."""
    records = [s if isinstance(s, dict) else json.loads(Path(s).read_text()) for s in sources]
    table = results_table(list(sources))
    data_dirs = {r.get("notebook"): r.get("data_dir") for r in records}
    summary = summary_frame(table)
    summary.insert(2, "data", [data_label(data_dirs.get(nb)) for nb in table["notebook"]])
    if "image_size" in summary.columns:
        summary["image_size"] = summary["image_size"].astype("Int64").astype(str).replace("<NA>", "")
    return table, summary


def collect_assets(assets_dir: Path) -> Path:
    """Rebuild RESULTS.md and RESULTS.csv from every assets/*/metrics.json; nothing is executed.

    Each row names the run it comes from (run_id) and whether its folder mixes runs (check).
    """
    paths = sorted(Path(assets_dir).glob("*/metrics.json"))
    if not paths:
        raise FileNotFoundError(f"no */metrics.json under {assets_dir}: run the notebooks first")
    table, summary = course_tables(paths)
    table.to_csv(Path(assets_dir) / "RESULTS.csv", index=False)
    profiles = [p for p in PROFILES if p in set(summary["profile"])]
    notes = "\n".join(f"- {PROFILE_NOTES[p]}" for p in profiles)
    mixed = f"{MIXED_NOTE}\n\n" if flagged(table) else ""
    text = (
        "# Results in assets/\n\n"
        "Generated by `python -m coursebuild.run_all --collect-only` from the metrics.json files next\n"
        "to the figures; every number comes from the run named in its row. Test metrics at each\n"
        "notebook's chosen threshold; all columns in RESULTS.csv.\n\n"
        f"{notes}\n\n{mixed}{markdown_table(summary)}"
    )
    target = Path(assets_dir) / "RESULTS.md"
    target.write_text(text)
    return target
