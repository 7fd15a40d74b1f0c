"""Execute every course notebook with papermill, collect the results, build the website.

Usage (from the repository root)::

    uv run python -m coursebuild.run_all --profile smoke
    uv run python -m coursebuild.run_all --profile cpu --only 04 06 --data-dir data/pneumonia
    uv run python -m coursebuild.run_all --profile smoke --output-dir-root _build/assets
    uv run python -m coursebuild.run_all --collect-only   # rebuild assets/RESULTS.md and .csv, README table

Each notebook ``notebooks/NN_*.ipynb`` is executed with papermill into
``<build-dir>/notebooks/<stem>.ipynb`` (parameters PROFILE, DATA_DIR, OUTPUT_DIR), and its
outcome is merged into ``<build-dir>/notebooks/runs.json``. Afterwards
``<build-dir>/report/results.md`` / ``results.csv`` hold the metrics.json of this run, and
``<build-dir>/site/`` the course website (``coursebuild.site``) made from every executed
notebook in the folder, this run's and earlier ones. A failing notebook does not stop the
others; the exit code is non-zero when any notebook failed.

A run that writes into the course's ``assets/`` (the default: no ``--output-dir-root``) is a reference run: each
executed notebook is also kept beside its figures and metrics.json, as
``assets/<stem>/<stem>.ipynb``, which ``python -m coursebuild.site`` renders by default. Only the
chapters ``notebooks/NN_*.ipynb`` run; the exercise notebooks in ``notebooks/exercises/`` do not
(the website shows them as committed; ``tests/test_exercises.py`` executes them).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coursebuild.layout import NOTEBOOK_PATTERN, RUNS_FILE
from coursebuild.records import PROFILE_TIMEOUT_S, executed_run_id, metrics_path, read_fresh_metrics
from coursebuild.reference import README_END, README_START, executed_copy, reference_rows, reference_table, replace_block
from coursebuild.results import collect_assets, write_results
from helpers.runs import PROFILES, record_outputs

KERNEL_NAME = "python3"
# Silence the kernel's own console logging (e.g. "running over TCP without encryption"),
# which would interleave with the progress lines; notebook errors still reach the outputs.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]


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


def _failure(exc: Exception, out_path: Path, timeout: float | None) -> tuple[str, str]:
    """(status, message) for an exception of papermill: a failed cell, the time budget, or anything else."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return "failed", _describe_execution_error(exc, out_path)
    if isinstance(exc, TimeoutError):  # nbclient's CellTimeoutError
        return "timeout", f"notebook exceeded its {timeout:.0f} s budget: {' '.join(str(exc).split())[:300]}"
    return "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"  # kernel died, missing, ...


def run_notebook(path: Path | str, out_path: Path | str, parameters: dict[str, Any],
                 timeout: float | None) -> NotebookResult:
    """Execute one notebook with papermill (cwd = its folder, kernel python3).

    ``timeout`` (seconds) bounds the whole notebook: each cell gets the time that is left.
    Never raises for notebook errors; they are returned in ``NotebookResult.error``.
    """
    import papermill as pm

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
    except Exception as exc:  # a failed cell, the time budget, a dead or missing kernel, ...
        status, error = _failure(exc, out_path, timeout)
    finally:
        pm_logger.removeHandler(collector)
    seconds = time.perf_counter() - started

    metrics = metrics_path(path.stem, parameters.get("OUTPUT_DIR"), root=path.resolve().parent.parent)
    # Only a metrics.json written by this run counts (not one left from an earlier run).
    since = dt.datetime.fromtimestamp(started_wall, dt.timezone.utc)
    fresh = read_fresh_metrics(metrics, since, profile=parameters.get("PROFILE")) is not None
    return NotebookResult(
        name=path.stem,
        status=status,
        seconds=seconds,
        error=error,
        metrics_path=metrics if fresh and status == "ok" else None,
        executed_path=out_path if out_path.is_file() else None,
        warnings=collector.messages,
    )


# --------------------------------------------------------------------------- the reference run


def machine() -> str:
    """'Linux x86_64, 2 CPU cores' (the cores this process may use): where a run time was measured."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return f"{platform.system()} {platform.machine()}, {cores} CPU core{'s' if cores != 1 else ''}"


def keep_executed_copy(executed: Path, stem: str, assets_dir: Path, root: Path) -> Path:
    """Copy the executed notebook ``stem`` to ``assets/<stem>/<stem>.ipynb`` (replacing it atomically),
    recording the machine it ran on; papermill's paths inside the course become relative to it. The copy
    is listed among its run's outputs, so the next run of the notebook moves it aside with them."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    meta = nb.metadata.setdefault("papermill", {})
    for key in ("input_path", "output_path"):
        try:
            meta[key] = Path(meta[key]).resolve().relative_to(root.resolve()).as_posix()
        except (KeyError, TypeError, ValueError):
            pass  # outside the course folder: kept as papermill wrote it
    nb.metadata["coursebuild"] = {"machine": machine(), "python": platform.python_version()}
    target = executed_copy(assets_dir, stem)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    nbformat.write(nb, partial)
    os.replace(partial, target)
    if (run_id := executed_run_id(target)) is not None:
        record_outputs(target.parent, run_id, [target.name])
    return target


def readme_block(readme: Path, assets_dir: Path, notebooks_dir: Path) -> str:
    """Rewrite the reference-run table between the markers in README.md; say what was done."""
    table = reference_table(reference_rows(assets_dir, notebooks_dir))
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    updated = replace_block(text, table)
    if updated is None:
        return (f"{readme.name} has no {README_START} ... {README_END} markers; the table of the "
                f"reference run, to paste between them:\n\n{table}")
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    return f"Reference-run table in {readme}"


# --------------------------------------------------------------------------- run records


def record_run(records_path: Path, results: Sequence[NotebookResult], profile: str, started: str) -> None:
    """Merge this run into runs.json beside the executed notebooks (read by the site builder).

    ``last_run`` names the notebooks of the latest run; ``notebooks`` keeps the latest outcome
    of every notebook ever run into this folder, so a partial run does not forget the others.
    """
    try:
        data = json.loads(records_path.read_text())
    except (OSError, ValueError):
        data = {}
    data["last_run"] = {"started_at": started, "profile": profile, "notebooks": [r.name for r in results]}
    notebooks = data.setdefault("notebooks", {})
    for r in results:
        notebooks[r.name] = {"status": r.status, "seconds": round(r.seconds, 1), "error": r.error,
                             "profile": profile, "run_started_at": started}
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records_path.write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(
        prog="python -m coursebuild.run_all",
        description="Execute the course notebooks with papermill, collect the results, build the website.",
    )
    parser.add_argument("--profile", choices=list(PROFILES), default="smoke", help="notebook profile (default: smoke)")
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
        "--timeout", type=float,
        help="seconds per notebook (default: " + ", ".join(f"{p} {s}" for p, s in PROFILE_TIMEOUT_S.items()) + ")",
    )
    parser.add_argument(
        "--no-site", action="store_true",
        help="do not build the website at the end (python -m coursebuild.site builds it later)",
    )
    parser.add_argument(
        "--collect-only", action="store_true",
        help="run nothing: rebuild assets/RESULTS.md and RESULTS.csv from the metrics.json files there, and the "
             f"README's reference-run table between {README_START} and {README_END} (printed when absent)",
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


def _relative_to(folder: str | Path, cwd: Path) -> str:
    """`folder` as seen from `cwd` (e.g. ../../shared/data), absolute where it has no relative form."""
    try:
        return Path(os.path.relpath(Path(folder).resolve(), cwd.resolve())).as_posix()
    except ValueError:  # another drive
        return str(Path(folder).resolve())


def _parameters(args: argparse.Namespace, stem: str, cwd: Path | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"PROFILE": args.profile}
    if args.data_dir is not None:
        data_dir = args.data_dir
        # Notebooks run with cwd = their folder (`cwd`, default notebooks/): a folder is named from there, so
        # the executed copies show no machine path.
        folder = cwd or args.notebooks_dir
        params["DATA_DIR"] = data_dir if data_dir == "synthetic" else _relative_to(data_dir, folder)
    if args.output_dir_root is not None:
        params["OUTPUT_DIR"] = str((args.output_dir_root / stem).resolve())
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"error: -p expects NAME=VALUE, got {item!r}")
        params[name] = _literal(value)
    return params


def _execute_all(notebooks: Sequence[Path], args: argparse.Namespace, timeout: float) -> list[NotebookResult]:
    """Run each notebook into <build-dir>/notebooks/, printing one progress line per notebook;
    in a reference run (into the default assets/) keep each executed notebook there too."""
    results: list[NotebookResult] = []
    root = args.notebooks_dir.resolve().parent
    # A reference run: the notebooks write into the course's own assets/ (the default).
    reference = args.output_dir_root is None or args.output_dir_root.resolve() == (root / "assets").resolve()
    print(f"Running {len(notebooks)} notebook(s), profile {args.profile}, timeout {timeout:.0f} s each"
          + (f"; executed copies kept in {root / 'assets'}" if reference else ""))
    for i, path in enumerate(notebooks, start=1):
        print(f"[{i}/{len(notebooks)}] {path.stem} ...", end=" ", flush=True)
        result = run_notebook(
            path, args.build_dir / "notebooks" / f"{path.stem}.ipynb", _parameters(args, path.stem, path.parent),
            timeout)
        results.append(result)
        if reference and result.executed_path is not None:
            keep_executed_copy(result.executed_path, result.name, root / "assets", root)
        print(f"{result.status} {result.seconds:.1f} s", flush=True)
        for message in result.warnings:
            print(f"    warning: {message}", flush=True)
        if result.error:
            print(f"    {result.error}", flush=True)
    return results


def _print_summary(results: Sequence[NotebookResult]) -> None:
    print("\nSummary")
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"  {r.name:<{width}}  {r.status:<7}  {r.seconds:8.1f} s")
    print(f"  {'total':<{width}}  {'':<7}  {sum(r.seconds for r in results):8.1f} s")


def _build_site(args: argparse.Namespace) -> bool:
    """Build <build-dir>/site from every executed notebook there; False when Sphinx failed."""
    from coursebuild.site import build_site

    try:
        index = build_site(args.build_dir / "notebooks", args.build_dir / "site", notebooks_dir=args.notebooks_dir)
    except Exception as exc:  # the run's notebooks and tables are kept whatever happens here
        print(f"error: the website could not be built: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    print(f"Website: {index}")
    return True


def ensure_offline_weights(root: Path) -> Path | None:
    """Before a reference run: where ../shared/weights holds TensorFlow Lite's MobileNetV2 and
    data/weights/ no converted file, convert it (tools/convert_tflite_weights.py); returns the file."""
    import subprocess

    from helpers.models import OFFLINE_FILES, TFLITE_FILES

    tflite = root.parent / "shared" / "weights" / TFLITE_FILES["mobilenet_v2"]
    out = root / "data" / "weights" / OFFLINE_FILES["mobilenet_v2"]
    if out.is_file() or not tflite.is_file():
        return out if out.is_file() else None
    print(f"Converting {tflite} -> {out} (tools/convert_tflite_weights.py)", flush=True)
    subprocess.run([sys.executable, str(root / "tools" / "convert_tflite_weights.py"), "--tflite", str(tflite),
                    "--out", str(out)], check=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the notebooks, print progress and a summary, build the website. Returns the exit code."""
    args = _parse_args(argv)
    if args.collect_only:
        root = args.notebooks_dir.resolve().parent
        try:
            target = collect_assets(root / "assets")
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Results table: {target}")
        print(readme_block(root / "README.md", root / "assets", args.notebooks_dir))
        return 0
    try:
        notebooks = discover_notebooks(args.notebooks_dir, args.only)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not notebooks:
        print(f"error: no NN_*.ipynb notebooks in {args.notebooks_dir}", file=sys.stderr)
        return 2

    timeout = args.timeout if args.timeout is not None else PROFILE_TIMEOUT_S[args.profile]
    # Kernels inherit this: idle OpenMP threads sleep rather than spin, which on a small shared
    # CPU made notebooks 2-3x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.output_dir_root is None:  # a reference run: ImageNet MobileNetV2 where only the .tflite is here
        ensure_offline_weights(args.notebooks_dir.resolve().parent)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results = _execute_all(notebooks, args, timeout)
    record_run(args.build_dir / "notebooks" / RUNS_FILE, results, args.profile, started)
    write_results([r.metrics_path for r in results if r.metrics_path], args.build_dir / "report", args.profile)
    _print_summary(results)
    print(f"Results table: {args.build_dir / 'report' / 'results.md'}")
    site_ok = args.no_site or _build_site(args)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
    return 1 if failed or not site_ok else 0


if __name__ == "__main__":
    sys.exit(main())
