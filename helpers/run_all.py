"""Execute every course notebook and build a static report.

Usage (from the repository root)::

    uv run python -m helpers.run_all --profile smoke
    uv run python -m helpers.run_all --profile cpu --only 04 06 --data-dir data/pneumonia
    uv run python -m helpers.run_all --profile smoke --output-dir-root _build/assets

Each notebook ``notebooks/NN_*.ipynb`` is executed with papermill into
``<build-dir>/notebooks/<stem>.ipynb`` (parameters PROFILE, DATA_DIR, OUTPUT_DIR).
Afterwards ``<build-dir>/report/`` holds one HTML page per notebook, ``index.html``
(status table + results table) and ``results.md`` / ``results.csv`` built from every
metrics.json that the run wrote. A failing notebook does not stop the others; the exit
code is non-zero when any notebook failed.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import html
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_.+\.ipynb$")
KERNEL_NAME = "python3"
PROFILES = ("smoke", "cpu", "full")
DEFAULT_TIMEOUT = {"smoke": 900, "cpu": 3 * 3600, "full": 12 * 3600}
# nbconvert template: "lab", "classic" and "basic" all convert a 12-figure notebook in
# ~0.2 s (+0.4 s one-off warm-up); "lab" looks like what students see in JupyterLab.
HTML_TEMPLATE = "lab"
# Silence the kernel's own console logging (e.g. "running over TCP without encryption"),
# which would interleave with the progress lines; notebook errors still reach the outputs.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]
SUMMARY_COLUMNS = [
    "notebook", "profile", "dataset", "model", "run", "pretrained", "image_size",
    "test_accuracy", "test_balanced_accuracy", "test_auc", "test_auc_95ci",
]

PROFILE_NOTES = {
    "smoke": (
        "smoke profile: synthetic data (unless a data folder was given), tiny images, one short "
        "epoch, random initialisation. These numbers only show that the code runs; they say "
        "nothing about the real task."
    ),
    "cpu": (
        "cpu profile: real data at about 128 px, a few epochs, on a laptop-sized budget. "
        "Numbers show trends, not what the full recipe reaches."
    ),
    "full": (
        "full profile: the Kaggle T4 recipe (224 px, ImageNet weights where they could be "
        "downloaded, full epoch counts). Check the pretrained column: a run without ImageNet "
        "weights is not the intended recipe."
    ),
}


@dataclass
class NotebookResult:
    """Outcome of executing one notebook."""

    name: str
    status: str  # "ok" | "failed" | "timeout"
    seconds: float
    error: str | None = None
    metrics_path: Path | None = None
    executed_path: Path | None = None
    warnings: list[str] = field(default_factory=list)


class _ListHandler(logging.Handler):
    """Collects papermill's warnings (e.g. "no cell tagged 'parameters'") for the summary."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------- discovery


def _number(stem_or_token: str) -> int | None:
    """The leading number of ``04_name`` or ``04`` / ``4``; None if there is none."""
    match = re.match(r"^(\d+)", stem_or_token)
    return int(match.group(1)) if match else None


def discover_notebooks(notebooks_dir: Path | str, only: Sequence[str] | None = None) -> list[Path]:
    """Sorted ``NN_*.ipynb`` files in ``notebooks_dir``; ``only`` selects by number ("04", "7")."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise FileNotFoundError(f"Notebook folder not found: {notebooks_dir}")
    found = sorted(p for p in notebooks_dir.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))
    if not only:
        return found
    selected: list[Path] = []
    for token in only:
        matches = [p for p in found if p.stem == token or (token.isdigit() and _number(p.stem) == int(token))]
        if not matches:
            available = ", ".join(p.stem for p in found) or "(none)"
            raise ValueError(f"No notebook numbered {token!r} in {notebooks_dir}. Available: {available}")
        selected.extend(m for m in matches if m not in selected)
    return sorted(selected)


# --------------------------------------------------------------------------- execution


def _first_line(source: str) -> str:
    """First non-empty line of a cell's source."""
    for line in source.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _code_cell_number(executed_path: Path, cell_index: int, source: str) -> int | None:
    """1-based number of the failing code cell in the *original* notebook.

    papermill's ``cell_index`` counts every cell of the executed notebook, including the
    injected parameters cell, and the saved copy has extra error-marker cells on top.
    """
    import nbformat
    from papermill.execute import ERROR_MARKER_TAG

    try:
        nb = nbformat.read(executed_path, as_version=4)
    except (OSError, ValueError):
        return None
    cells = [c for c in nb.cells if ERROR_MARKER_TAG not in c.get("metadata", {}).get("tags", [])]
    if cell_index >= len(cells) or cells[cell_index].source != source:
        return None
    number = 0
    for cell in cells[: cell_index + 1]:
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", []):
            number += 1
    return number


def _describe_execution_error(exc: Any, executed_path: Path) -> str:
    """One line: failing cell, exception name and message, first line of the cell."""
    number = _code_cell_number(executed_path, exc.cell_index, exc.source)
    where = f"code cell {number}" if number is not None else f"cell index {exc.cell_index}"
    message = " ".join(str(exc.evalue).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{where} (In [{exc.exec_count}]): {exc.ename}: {message} | cell starts: {_first_line(exc.source)}"


def _expected_metrics_path(path: Path, parameters: dict[str, Any]) -> Path:
    """Where the notebook writes metrics.json: OUTPUT_DIR, else <project>/assets/<stem>."""
    output_dir = parameters.get("OUTPUT_DIR")
    folder = Path(output_dir) if output_dir else path.resolve().parent.parent / "assets" / path.stem
    return folder / "metrics.json"


def run_notebook(
    path: Path | str,
    out_path: Path | str,
    parameters: dict[str, Any],
    timeout: float | None,
) -> NotebookResult:
    """Execute one notebook with papermill (cwd = its folder, kernel python3).

    ``timeout`` (seconds) bounds the whole notebook: each cell gets the time that is left.
    Never raises for notebook errors; they are returned in ``NotebookResult.error``.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    path, out_path = Path(path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout if timeout else None

    def time_left(_cell: Any) -> int | None:
        # nbclient treats 0/None as "no limit", so never return less than 1 second.
        return None if deadline is None else max(1, math.ceil(deadline - time.monotonic()))

    collector = _ListHandler()
    pm_logger = logging.getLogger("papermill")
    pm_logger.addHandler(collector)
    started_wall = time.time()
    started = time.perf_counter()
    status, error = "ok", None
    try:
        pm.execute_notebook(
            str(path),
            str(out_path),
            parameters=parameters,
            kernel_name=KERNEL_NAME,
            progress_bar=False,
            cwd=str(path.resolve().parent),
            timeout_func=time_left,
            extra_arguments=KERNEL_ARGUMENTS,
        )
    except PapermillExecutionError as exc:
        status, error = "failed", _describe_execution_error(exc, out_path)
    except TimeoutError as exc:  # nbclient's CellTimeoutError
        status = "timeout"
        error = f"notebook exceeded its {timeout:.0f} s budget: {' '.join(str(exc).split())[:300]}"
    except Exception as exc:  # kernel died, kernel missing, unreadable notebook, ...
        status, error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        pm_logger.removeHandler(collector)
    seconds = time.perf_counter() - started

    metrics = _expected_metrics_path(path, parameters)
    # Only a metrics.json written by this run counts (not one left from an earlier run).
    fresh = metrics.is_file() and metrics.stat().st_mtime >= started_wall - 1.0
    return NotebookResult(
        name=path.stem,
        status=status,
        seconds=seconds,
        error=error,
        metrics_path=metrics if fresh and status == "ok" else None,
        executed_path=out_path if out_path.is_file() else None,
        warnings=collector.messages,
    )


# --------------------------------------------------------------------------- results table


def results_frame(results: Sequence[NotebookResult], profile: str) -> pd.DataFrame:
    """All metrics.json written by this run in one table (helpers.evaluate.results_table).

    Every row keeps the profile recorded in its metrics.json; rows without one get ``profile``.
    """
    from helpers.evaluate import results_table  # imports torch: keep it out of module import

    paths = [r.metrics_path for r in results if r.metrics_path is not None]
    if not paths:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    table = results_table(paths)
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
    for column in ("dataset", "model", "run"):  # a missing "run" shows blank, not None
        if column in table.columns:
            table[column] = table[column].fillna("")
    return table


def _markdown_table(frame: pd.DataFrame) -> str:
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


def write_results(results: Sequence[NotebookResult], report_dir: Path, profile: str) -> pd.DataFrame:
    """Write results.csv (all columns) and results.md (summary columns); return the full table."""
    report_dir.mkdir(parents=True, exist_ok=True)
    table = results_frame(results, profile)
    table.to_csv(report_dir / "results.csv", index=False)
    note = PROFILE_NOTES.get(profile, f"profile {profile}")
    body = (
        _markdown_table(summary_frame(table))
        + "\nAll columns (val metrics, intervals, per-class recall): results.csv\n"
        if not table.empty
        else "_No metrics.json was written by this run._\n"
    )
    (report_dir / "results.md").write_text(f"# Results ({profile} profile)\n\n{note}\n\n{body}")
    return table


def _data_label(data_dir: Any) -> str:
    """'synthetic', 'real (<folder>)', or both for notebooks that read several datasets."""
    if isinstance(data_dir, dict):
        return "; ".join(f"{k}: {_data_label(v)}" for k, v in data_dir.items())
    if data_dir is None or (isinstance(data_dir, float) and math.isnan(data_dir)):
        return ""
    text = str(data_dir)
    return "synthetic" if "synthetic" in text else f"real ({Path(text).name})"


def collect_assets(assets_dir: Path) -> Path:
    """Rebuild RESULTS.md and RESULTS.csv from every assets/*/metrics.json; nothing is executed.

    Each row says which profile, data, image size and weights produced its numbers, so results
    from different runs can sit side by side without being mistaken for one another.
    """
    from helpers.evaluate import results_table  # imports torch: keep it out of module import

    paths = sorted(Path(assets_dir).glob("*/metrics.json"))
    if not paths:
        raise FileNotFoundError(f"no */metrics.json under {assets_dir}: run the notebooks first")
    records = [json.loads(p.read_text()) for p in paths]
    table = results_table(records)
    data_dirs = {r.get("notebook", p.parent.name): r.get("data_dir") for r, p in zip(records, paths)}
    summary = summary_frame(table)
    summary.insert(2, "data", [_data_label(data_dirs.get(nb)) for nb in table["notebook"]])
    if "image_size" in summary.columns:
        summary["image_size"] = summary["image_size"].astype("Int64").astype(str).replace("<NA>", "")
    table.to_csv(Path(assets_dir) / "RESULTS.csv", index=False)
    profiles = [p for p in PROFILES if p in set(summary["profile"])]
    notes = "\n".join(f"- {PROFILE_NOTES[p]}" for p in profiles if p in PROFILE_NOTES)
    text = (
        "# Results in assets/\n\n"
        "Generated by `python -m helpers.run_all --collect-only` from the metrics.json files next to\n"
        "the figures; every number comes from the run named in its row. Test metrics at each\n"
        "notebook's chosen threshold; all columns in RESULTS.csv.\n\n"
        f"{notes}\n\n{_markdown_table(summary)}"
    )
    target = Path(assets_dir) / "RESULTS.md"
    target.write_text(text)
    return target


# --------------------------------------------------------------------------- HTML report


def _convert_to_html(executed_path: Path, html_path: Path, template: str = HTML_TEMPLATE) -> float:
    """Render an executed notebook to a self-contained HTML page; return the seconds it took.

    Output images are base64 data URIs anyway; ``embed_images`` also inlines images that
    markdown cells reference by path (resolved relative to the source notebooks folder).
    """
    import nbformat
    from nbconvert import HTMLExporter

    started = time.perf_counter()
    nb = nbformat.read(executed_path, as_version=4)
    exporter = HTMLExporter(template_name=template, embed_images=True)
    source_dir = nb.metadata.get("papermill", {}).get("input_path")
    base = str(Path(source_dir).resolve().parent) if source_dir else str(executed_path.parent)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": base}})
    html_path.write_text(body, encoding="utf-8")
    return time.perf_counter() - started


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.failed td, tr.timeout td { background: #fdecea; }
.ok { color: #1a7f37; font-weight: 600; } .failed, .timeout { color: #b42318; font-weight: 600; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
.warning { color: #8a6100; font-size: 0.9em; }
.error { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
"""


def _status_rows(results: Sequence[NotebookResult], report_dir: Path) -> str:
    rows = []
    for r in results:
        page = report_dir / f"{r.name}.html"
        name = html.escape(r.name)
        link = f'<a href="{html.escape(page.name)}">{name}</a>' if page.is_file() else name
        notes = [f'<span class="error">{html.escape(r.error)}</span>'] if r.error else []
        notes += [f'<span class="warning">warning: {html.escape(m)}</span>' for m in r.warnings]
        error = "<br>".join(notes)
        rows.append(
            f'<tr class="{r.status}"><td>{link}</td><td class="{r.status}">{r.status}</td>'
            f"<td>{r.seconds:.1f}</td><td>{error}</td></tr>"
        )
    return "\n".join(rows)


def build_report(results: Sequence[NotebookResult], build_dir: Path | str, profile: str) -> Path:
    """Write results.md/.csv, one HTML page per executed notebook and index.html; return its path."""
    report_dir = Path(build_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    table = write_results(results, report_dir, profile)
    for r in results:
        if r.executed_path is not None and r.executed_path.is_file():
            try:
                _convert_to_html(r.executed_path, report_dir / f"{r.name}.html")
            except Exception as exc:  # one unrenderable notebook must not sink the report
                r.warnings.append(f"HTML conversion failed: {type(exc).__name__}: {exc}")

    n_failed = sum(r.status != "ok" for r in results)
    profiles_seen = sorted(set(table["profile"].astype(str))) if not table.empty else []
    mixed = (
        f"<p><strong>Rows come from several profiles ({', '.join(profiles_seen)}); compare numbers "
        f"only within a profile.</strong></p>"
        if len(profiles_seen) > 1
        else ""
    )
    results_html = (
        summary_frame(table).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.3f}", border=0)
        if not table.empty
        else "<p>No metrics.json was written by this run.</p>"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Course notebooks: {html.escape(profile)} run</title>
<style>{CSS}</style></head>
<body>
<h1>Medical image classification with transfer learning: notebook run</h1>
<p>Date: {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} &middot; profile: <strong>{html.escape(profile)}</strong>
&middot; {len(results) - n_failed} of {len(results)} notebooks ran without error
&middot; total {sum(r.seconds for r in results):.1f} s</p>
<h2>Notebooks</h2>
<table><thead><tr><th>notebook</th><th>status</th><th>seconds</th><th>error (failing cell)</th></tr></thead>
<tbody>
{_status_rows(results, report_dir)}
</tbody></table>
<h2>Results</h2>
<p class="note">{html.escape(PROFILE_NOTES.get(profile, f"profile {profile}"))}</p>
{mixed}
{results_html}
<p>All columns (validation metrics, intervals, per-class recall) in <a href="results.csv">results.csv</a>;
also as <a href="results.md">results.md</a>.</p>
</body></html>
"""
    index = report_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(
        prog="python -m helpers.run_all",
        description="Execute the course notebooks with papermill and build an HTML report.",
    )
    parser.add_argument("--profile", choices=PROFILES, default="smoke", help="notebook profile (default: smoke)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers, e.g. --only 04 07")
    parser.add_argument("--data-dir", help='DATA_DIR passed to every notebook ("synthetic" or a folder)')
    parser.add_argument("--build-dir", type=Path, default=Path("_build"), help="output folder (default: _build)")
    parser.add_argument(
        "--output-dir-root",
        type=Path,
        help="write each notebook's assets to OUTPUT_DIR_ROOT/<stem> instead of assets/<stem>",
    )
    parser.add_argument("--notebooks-dir", type=Path, default=root / "notebooks", help="folder of NN_*.ipynb")
    parser.add_argument(
        "--timeout", type=float, help="seconds per notebook (default: smoke 900, cpu 10800, full 43200)"
    )
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report (tables are still written)")
    parser.add_argument(
        "--collect-only", action="store_true",
        help="run nothing: rebuild assets/RESULTS.md and RESULTS.csv from the metrics.json files there",
    )
    parser.add_argument(
        "-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
        help="extra notebook parameter, e.g. -p MAX_PER_CLASS=100 -p EPOCHS=2 (value read as a Python literal)",
    )
    return parser.parse_args(argv)


def _literal(text: str) -> Any:
    """'100' -> 100, 'None' -> None, 'abc' -> 'abc'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parameters(args: argparse.Namespace, stem: str) -> dict[str, Any]:
    params: dict[str, Any] = {"PROFILE": args.profile}
    if args.data_dir is not None:
        data_dir = args.data_dir
        # Notebooks run with cwd = notebooks/, so make folder paths absolute.
        params["DATA_DIR"] = data_dir if data_dir == "synthetic" else str(Path(data_dir).resolve())
    if args.output_dir_root is not None:
        params["OUTPUT_DIR"] = str((args.output_dir_root / stem).resolve())
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"error: -p expects NAME=VALUE, got {item!r}")
        params[name] = _literal(value)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Run the notebooks, print progress and a summary, build the report. Returns the exit code."""
    args = _parse_args(argv)
    if args.collect_only:
        try:
            target = collect_assets(args.notebooks_dir.resolve().parent / "assets")
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Results table: {target}")
        return 0
    try:
        notebooks = discover_notebooks(args.notebooks_dir, args.only)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not notebooks:
        print(f"error: no NN_*.ipynb notebooks in {args.notebooks_dir}", file=sys.stderr)
        return 2

    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT[args.profile]
    # Kernels inherit this: idle OpenMP threads sleep rather than spin, which on a small shared
    # CPU made notebooks 2-3x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    build_dir: Path = args.build_dir
    results: list[NotebookResult] = []
    print(f"Running {len(notebooks)} notebook(s), profile {args.profile}, timeout {timeout:.0f} s each")
    for i, path in enumerate(notebooks, start=1):
        print(f"[{i}/{len(notebooks)}] {path.stem} ...", end=" ", flush=True)
        result = run_notebook(
            path, build_dir / "notebooks" / f"{path.stem}.ipynb", _parameters(args, path.stem), timeout
        )
        results.append(result)
        print(f"{result.status} {result.seconds:.1f} s", flush=True)
        for message in result.warnings:
            print(f"    warning: {message}", flush=True)
        if result.error:
            print(f"    {result.error}", flush=True)

    if args.no_html:
        write_results(results, build_dir / "report", args.profile)
        index = None
    else:
        index = build_report(results, build_dir, args.profile)

    failed = [r for r in results if r.status != "ok"]
    print("\nSummary")
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"  {r.name:<{width}}  {r.status:<7}  {r.seconds:8.1f} s")
    print(f"  {'total':<{width}}  {'':<7}  {sum(r.seconds for r in results):8.1f} s")
    print(f"Results table: {build_dir / 'report' / 'results.md'}")
    if index is not None:
        print(f"Report: {index}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
