"""Build the course website from the executed notebooks, offline (Sphinx + myst-nb + book theme).

Usage (from the repository root)::

    uv run python -m coursebuild.site                   # the reference run in assets/ -> _build/site
    uv run python -m coursebuild.site --executed-dir _build/notebooks   # a run_all build instead
    uv run python -m coursebuild.site --executed-dir elsewhere/notebooks --site-dir elsewhere/site

Pages: a landing page made from the README's course description, chapters 00-08 in order (each
the executed notebook with its outputs, under a banner naming the profile, the time it ran and
how long, the weights, what the reader will see, Open-in-Colab/Kaggle links, and whether it
failed, comes from an earlier run than the latest, or ran other code than its source notebook),
each followed by its exercise notebook (as committed, without outputs), a results page and a page
on profiles. A chapter that was never executed shows its notebook without outputs. The Sphinx
sources are written to ``<site-dir>_src/`` (kept for inspection) and rebuilt from scratch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import nbformat
import pandas as pd

from coursebuild.chapters import Chapter, load_chapters, load_exercises
from coursebuild.reference import CAPTION, course_repo, duration, key_line, open_links, reference_table, weights_label
from coursebuild.results import SUMMARY_COLUMNS, course_tables, data_label, markdown_table, profile_note
from helpers.runs import PROFILES

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(__file__).resolve().parent / "sphinx"
README_LINK = re.compile(r"\[([^\]]+)\]\(notebooks/(\d\d_[^)/]+)\.ipynb\)")
CHAPTER_LINK = re.compile(r"\]\(\.\./(\d\d_[^)/]+\.ipynb)\)")
RELATIVE_LINK = re.compile(r"\[([^\]]+)\]\((?![a-z]+:|#)[^)]+\)")
KEY_COLUMNS = ["notebook", "profile", "data", "model", "weights", "image size",
               "balanced accuracy", "AUC [95% CI]"]


# --------------------------------------------------------------------------- small formatting


def _when(stamp: dt.datetime | None) -> str:
    return stamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if stamp else "unknown time"


def _age(seconds: float) -> str:
    """'under a minute', '5 min', '3 h', '2 days'."""
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"{max(seconds, 0) / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _inline(text: str) -> str:
    """Text safe inside a MyST inline literal."""
    return " ".join(text.replace("`", "'").split())


def _admonition(title: str, body: str, kind: str = "note") -> str:
    return f"````{{admonition}} {title}\n:class: {kind} course-run\n\n{body.strip()}\n````\n"


def _doc(chapter: Chapter) -> str:
    return f"{{doc}}`{chapter.stem.replace('_', ' ')} </{_page(chapter)}>`"


def _page(chapter: Chapter) -> str:
    """The page's path in the site without suffix: chapters/<stem> or exercises/<stem>."""
    return f"{'exercises' if chapter.exercises else 'chapters'}/{chapter.stem}"


def open_in(chapter: Chapter) -> str:
    """'Open in Colab · Open in Kaggle' for the chapter's source notebook; '' where there is no
    GitHub COURSE_REPO in its setup cell."""
    if chapter.source is None:
        return ""
    folder = "notebooks/exercises" if chapter.exercises else "notebooks"
    links = open_links(course_repo(chapter.source), f"{folder}/{chapter.stem}.ipynb")
    return " · ".join(f"[Open in {name}]({url})" for name, url in links.items())


# --------------------------------------------------------------------------- chapter pages


def _run_line(chapter: Chapter, built: dt.datetime) -> str:
    took = duration(chapter.seconds)
    took = f" in **{took}**" + (f" on {chapter.machine}" if chapter.machine else "") if took else ""
    line = (f"Profile **{chapter.profile or 'unknown'}**, executed {_when(chapter.finished)}{took}, "
            f"{_age((built - chapter.finished).total_seconds())} before this site was built."
            if chapter.finished else f"Profile **{chapter.profile or 'unknown'}**{took}.")
    metrics = chapter.metrics or {}
    if metrics:
        facts = [f"data: {data_label(metrics.get('data_dir')) or 'n/a'}",
                 f"image size: {metrics.get('image_size') or 'n/a'} px",
                 f"weights: {weights_label(metrics) or 'n/a'}",
                 f"device: {metrics.get('device', 'n/a')}"]
        line += " " + " · ".join(facts) + "."
    see = key_line(metrics)
    if see:
        line += f"\n\n**What you will see:** {see}."
    return line


def chapter_banner(chapter: Chapter, built: dt.datetime, newest: dt.datetime | None) -> str:
    """The MyST admonition at the top of a chapter: profile, age, failure, earlier run."""
    links = open_in(chapter)
    if chapter.exercises:
        body = (f"The companion exercises of chapter {chapter.stem[:2]}, shown without outputs: run them to "
                "check your answers (each takes seconds, in any profile). Hints, solutions and the answers to "
                "the questions are folded below each exercise, generated from `helpers.exercises`.")
        return _admonition("Exercises", body + (f"\n\n{links}" if links else ""), "tip")
    if not chapter.executed:
        body = ("This chapter has not been executed for this site: it shows the notebook's text and "
                "code without outputs. `uv run python -m coursebuild.run_all --profile cpu --only "
                f"{chapter.stem[:2]}` (a reference run into assets/) adds them.")
        return _admonition("Not executed", body + (f"\n\n{links}" if links else ""), "warning")
    parts = [_run_line(chapter, built), f"{profile_note(chapter.profile)} ({{doc}}`About profiles </profiles>`)"]
    if links:
        parts.append(links)
    kind = "note"
    if chapter.drift:
        kind = "warning"
        parts.append(f"**The code has changed since this run.** `notebooks/{chapter.stem}.ipynb` differs from "
                     f"the code that produced these outputs ({_inline('; '.join(chapter.drift[:3]))}): "
                     "re-run the notebook before trusting a number here.")
    if chapter.earlier_run and chapter.finished and newest:
        kind = "warning"
        parts.append(f"**From an earlier run.** The latest run did not execute this notebook; this page "
                     f"is {_age((newest - chapter.finished).total_seconds())} older than the newest chapter.")
    if chapter.failed:
        kind = "error"
        where = f" at `{_inline(chapter.failure)}`" if chapter.failure else ""
        parts.append(f"**This notebook failed**{where}. The failing cell and its traceback are "
                     '<a href="#papermill-error-cell">further down</a>, marked in red; the cells after it '
                     "did not run, so their outputs are missing.")
    title = f"Run: {chapter.profile or 'unknown'} profile" + (" (failed)" if chapter.failed else "")
    return _admonition(title, "\n\n".join(parts), kind)


def chapter_notebook(chapter: Chapter, banner: str) -> nbformat.NotebookNode:
    """The notebook with the banner right under its title (the first line of the first cell);
    the setup cell (the first code cell) folded on the page as in the chapters."""
    nb = nbformat.from_dict(chapter.notebook)
    setup = next((c for c in nb.cells if c.cell_type == "code"), None)
    if setup is not None and "hide-input" not in setup.metadata.get("tags", []):
        setup.metadata["tags"] = [*setup.metadata.get("tags", []), "hide-input"]
    if chapter.exercises:  # "../04_x.ipynb" (the chapter beside notebooks/exercises/) is chapters/04_x here
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = CHAPTER_LINK.sub(r"](../chapters/\1)", cell.source)
        nb.cells = exercise_cells_with_answers(nb.cells, chapter.stem[:2])
    for before, cell in zip(nb.cells, nb.cells[1:]):
        if before.cell_type == "code" and cell.cell_type == "markdown" and CAPTION.match(cell.source.lstrip()):
            cell.source = f"`````{{container}} figure-caption\n{cell.source.strip()}\n`````"  # course.css
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "markdown" and first.source.startswith("# "):
        title, _, rest = first.source.partition("\n")
        first.source = f"{title}\n\n{banner}\n{rest}"
    else:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {chapter.title}\n\n{banner}"))
    return nb


def exercise_cells_with_answers(cells: list, number: str) -> list:
    """An exercise notebook's cells for the website: after each exercise its hint and solution, after
    `chNN.questions()` / `chNN.experiments()` the questions with folded answers and the experiments,
    all generated from the chapter's module in `helpers.exercises` (the notebook holds none of it)."""
    import importlib

    try:
        chapter = importlib.import_module(f"helpers.exercises.ch{number}").CHAPTER
    except ModuleNotFoundError:
        return cells
    out = []
    for cell in cells:
        out.append(cell)
        if cell.cell_type != "code":
            continue
        extra = None
        if cell.metadata.get("exercise") in chapter.problems:
            p = chapter.problems[cell.metadata["exercise"]]
            extra = (f"<details><summary>Hint</summary>\n\n{p.hint_text}\n\n</details>\n\n"
                     f"<details><summary>Solution</summary>\n\n```python\n{p.solution_code}\n```\n\n</details>")
        elif cell.source.strip() == f"ch{number}.questions()":
            extra = chapter.questions_markdown()
        elif cell.source.strip() == f"ch{number}.experiments()":
            extra = chapter.experiments_markdown()
        if extra:
            out.append(nbformat.v4.new_markdown_cell(extra))
    return out


# --------------------------------------------------------------------------- the other pages


def readme_sections(readme: str) -> dict[str, str]:
    """{"": intro after the title, "The notebooks": ..., "Profiles": ...} by ## and ### headings."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in readme.splitlines():
        match = re.match(r"^#{2,3} (.+)$", line)
        if match:
            current = match.group(1).strip()
            sections[current] = []
        elif not line.startswith("# "):
            sections[current].append(line)
    return {name: _site_links("\n".join(lines).strip()) for name, lines in sections.items()}


def _site_links(markdown: str) -> str:
    """README links to notebooks become chapter links; other repository links become plain text."""
    markdown = README_LINK.sub(lambda m: f"{{doc}}`{m.group(1)} <chapters/{m.group(2)}>`", markdown)
    return RELATIVE_LINK.sub(r"\1", markdown)


def _build_summary(chapters: Sequence[Chapter], built: dt.datetime) -> str:
    executed = [c for c in chapters if c.executed]
    counts = Counter(c.profile or "unknown" for c in executed)
    profiles = ", ".join(f"{p} ({n})" for p, n in sorted(counts.items()))
    lines = [f"Built {_when(built)} from {len(executed)} of {len(chapters)} executed chapters"
             + (f"; profiles: {profiles}." if executed else ".")]
    lines += [f"- {profile_note(p)}" for p in PROFILES if p in counts]
    for label, group in (("Failed", [c for c in executed if c.failed]),
                         ("From an earlier run", [c for c in executed if c.earlier_run]),
                         ("Not executed", [c for c in chapters if not c.executed])):
        if group:
            lines.append(f"- {label}: " + ", ".join(_doc(c) for c in group) + ".")
    return "\n".join(lines)


def site_reference_table(chapters: Sequence[Chapter]) -> str:
    """Per chapter in this site: what you will see, weights, profile, run time (as in the README)."""
    rows = [{"nb": f"{{doc}}`{c.stem[:2]} </{_page(c)}>`", "see": key_line(c.metrics).replace("|", "/"),
             "weights": weights_label(c.metrics), "profile": (c.profile or "") if c.executed else "",
             "time": duration(c.seconds) if c.executed else ""} for c in chapters if not c.exercises]
    return f"```{{table}}\n:class: course-table\n\n{reference_table(rows)}```\n"


def _in_order(chapters: Sequence[Chapter], exercises: dict[str, Chapter]) -> list[Chapter]:
    """Every page of the book: each chapter, then its exercises; exercises without a chapter last."""
    pages = []
    for chapter in chapters:
        pages += [chapter] + ([exercises[chapter.stem[:2]]] if chapter.stem[:2] in exercises else [])
    return pages + [e for e in exercises.values() if e not in pages]


def index_page(chapters: Sequence[Chapter], readme: str, built: dt.datetime,
               exercises: dict[str, Chapter] | None = None) -> str:
    title = next((line[2:] for line in readme.splitlines() if line.startswith("# ")), "The course")
    sections = readme_sections(readme)
    notebooks = re.sub(r"<!-- reference-run:start -->.*?<!-- reference-run:end -->\n?", "",
                       sections.get("The notebooks", ""), flags=re.S)  # the site computes its own, below
    chapters_toc = "\n".join(_page(c) for c in _in_order(chapters, exercises or {}))
    return (f"# {title}\n\n{_admonition('This build', _build_summary(chapters, built))}\n"
            f"{sections['']}\n\n## The chapters\n\n{notebooks}\n\n"
            f"What each chapter shows in this site's run:\n\n{site_reference_table(chapters)}\n"
            "The {doc}`results` page puts every chapter's numbers side by side; {doc}`profiles` says "
            "what a number from each profile does and does not mean.\n\n"
            f"```{{toctree}}\n:caption: Chapters\n:hidden:\n:maxdepth: 1\n\n{chapters_toc}\n```\n\n"
            "```{toctree}\n:caption: Results\n:hidden:\n:maxdepth: 1\n\nresults\nprofiles\n```\n")


def _status(chapter: Chapter) -> str:
    if not chapter.executed:
        return "not executed"
    status = f"failed: `{_inline(chapter.failure)}`" if chapter.failed and chapter.failure else (
        "failed" if chapter.failed else "ok")
    if chapter.earlier_run:
        status += ", from an earlier run"
    if not chapter.failed and chapter.metrics is None:
        status += ", no metrics.json from this execution"
    return status


def chapters_table(chapters: Sequence[Chapter]) -> str:
    rows = [f"| {_doc(c)} | {c.profile or ''} | {_status(c).replace('|', '/')} | "
            f"{_when(c.finished) if c.executed else ''} | "
            f"{'' if c.seconds is None else f'{c.seconds:.0f}'} |" for c in chapters]
    head = "| chapter | profile | status | executed | seconds |\n|---|---|---|---|---|\n"
    return f"```{{table}}\n:class: course-table\n\n{head}" + "\n".join(rows) + "\n```\n"


def _model_label(model: str, run: str) -> str:
    """'resnet50 · plain_ce'; just the run where its name already says the model."""
    if not run:
        return model
    return run if run.startswith(model) else f"{model} · {run}"


def row_weights(records: Sequence[dict]) -> list[str]:
    """The weights of each row of ``course_tables``: one row per entry of "runs", else per record."""
    return [weights_label(run, record) for record in records for run in (record.get("runs") or [record])]


def key_results(summary: pd.DataFrame, weights: Sequence[str] | None = None) -> str:
    """The course-wide table at a readable width: the key columns only."""
    frame = summary.reindex(columns=[*SUMMARY_COLUMNS, "data"]).fillna({"run": "", "model": ""})
    auc = [
        "" if pd.isna(value) else f"{value:.3f} {interval}".strip()
        for value, interval in zip(frame["test_auc"], frame["test_auc_95ci"].fillna(""))
    ]
    rows = pd.DataFrame({
        "notebook": [f"{{doc}}`{nb[:2]} </chapters/{nb}>`" for nb in frame["notebook"]],
        "profile": frame["profile"],
        "data": frame["data"],
        "model": [_model_label(m, r) for m, r in zip(frame["model"], frame["run"])],
        "weights": (list(weights) if weights is not None and len(weights) == len(frame) else
                    frame["pretrained"].map({True: "ImageNet", False: "random init"}).fillna("")),
        "image size": frame["image_size"].fillna(""),
        "balanced accuracy": frame["test_balanced_accuracy"],
        "AUC [95% CI]": auc,
    })
    return f"```{{table}}\n:class: course-table course-results\n\n{markdown_table(rows)}```\n"


def results_page(chapters: Sequence[Chapter], csv_path: Path) -> str:
    """Key columns of every executed chapter's metrics.json; all columns go to ``csv_path``."""
    records = [{"notebook": c.stem, **c.metrics} for c in chapters if c.metrics]
    # No page contents on the right: the table gets the width (coursebuild/sphinx/_static/course.css).
    text = "---\nhtml_theme.sidebar_secondary.remove: true\n---\n\n# Results\n\n"
    if records:
        table, summary = course_tables(records)
        table.to_csv(csv_path, index=False)
        profiles = sorted(set(summary["profile"].astype(str)))
        note = "\n".join(f"- {profile_note(p)}" for p in profiles)
        mixed = ("\n\n**Rows come from several profiles: compare numbers only within one profile.**"
                 if len(profiles) > 1 else "")
        text += _admonition(f"Profiles in this table: {', '.join(profiles)}",
                            "Each row comes from the metrics.json that the chapter's execution wrote; test "
                            f"metrics at the notebook's chosen threshold.\n\n{note}{mixed}")
        text += "\n" + key_results(summary, row_weights(records))
        text += ("\nAll columns (validation metrics, intervals, per-class recall, thresholds): "
                 f"{{download}}`{csv_path.name} <{csv_path.name}>`.\n")
    else:
        text += _admonition("No results", "No executed chapter in this site wrote a metrics.json.", "warning")
    return text + "\n## Chapters in this site\n\n" + chapters_table(chapters)


def profiles_page(chapters: Sequence[Chapter], readme: str, built: dt.datetime) -> str:
    notes = "\n".join(f"- **{p}**: {profile_note(p)}" for p in PROFILES)
    return ("# Profiles: what a number means\n\n"
            + _admonition("This site", _build_summary(chapters, built))
            + f"\n{readme_sections(readme).get('Profiles', '')}\n\n"
            f"## What a number from each profile does and does not mean\n\n{notes}\n\n"
            "A number is evidence about the task only under the conditions it was produced with: the "
            "profile, the data (synthetic or real), the image size and whether ImageNet weights were "
            "really loaded. Compare numbers only within one profile.\n\n"
            "## Which profile produced each chapter\n\n" + chapters_table(chapters))


# --------------------------------------------------------------------------- build


def write_sources(chapters: Sequence[Chapter], src: Path, readme: str, built: dt.datetime,
                  exercises: dict[str, Chapter] | None = None) -> None:
    """The Sphinx source folder: index, results, profiles, one notebook per chapter and its exercises."""
    if src.exists():
        shutil.rmtree(src)
    (src / "chapters").mkdir(parents=True)
    (src / "exercises").mkdir()
    finished = [c.finished for c in chapters if c.finished]
    newest = max(finished) if finished else None
    for page in _in_order(chapters, exercises or {}):
        nb = chapter_notebook(page, chapter_banner(page, built, newest))
        nbformat.write(nb, src / f"{_page(page)}.ipynb")
    (src / "index.md").write_text(index_page(chapters, readme, built, exercises))
    (src / "results.md").write_text(results_page(chapters, src / "results.csv"))
    (src / "profiles.md").write_text(profiles_page(chapters, readme, built))


def _announcement(chapters: Sequence[Chapter]) -> str:
    counts = Counter(c.profile or "unknown" for c in chapters if c.executed)
    if not counts:
        return "No chapter of this site has been executed yet."
    profiles = ", ".join(f"{p} ({n} chapter{'s' if n > 1 else ''})" for p, n in sorted(counts.items()))
    smoke = " Smoke-profile numbers only show that the code runs." if "smoke" in counts else ""
    return f"Executed in profile {profiles}.{smoke}"


def _clear_site(site_dir: Path) -> None:
    """Remove an earlier build, but only a folder that is one (Sphinx's .buildinfo) or empty."""
    if site_dir.is_dir() and any(site_dir.iterdir()):
        if not (site_dir / ".buildinfo").is_file():
            raise FileExistsError(f"{site_dir} is not empty and holds no earlier site build: not replacing it")
        shutil.rmtree(site_dir)


def build_site(executed_dir: Path | str = ROOT / "assets", site_dir: Path | str = Path("_build/site"),
               notebooks_dir: Path | str = ROOT / "notebooks", readme: Path | str = ROOT / "README.md") -> Path:
    """Build the website from every executed notebook in ``executed_dir`` (assets/: the reference
    run's ``<stem>/<stem>.ipynb``; or a run_all build folder of ``NN_*.ipynb``); return its index.html."""
    from sphinx.application import Sphinx

    executed_dir, site_dir, notebooks_dir = Path(executed_dir), Path(site_dir), Path(notebooks_dir)
    built = dt.datetime.now(dt.timezone.utc)
    chapters = load_chapters(executed_dir, notebooks_dir)
    if not chapters:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {executed_dir} or {notebooks_dir}")
    exercises = load_exercises(notebooks_dir / "exercises")
    src = site_dir.with_name(site_dir.name + "_src")
    write_sources(chapters, src, Path(readme).read_text(encoding="utf-8"), built, exercises)
    _clear_site(site_dir)
    messages = io.StringIO()
    with warnings.catch_warnings():  # the theme's use of APIs deprecated for Sphinx 11: not ours to fix
        warnings.filterwarnings("ignore", message=".*sphinx_book_theme")
        app = Sphinx(str(src), str(CONF_DIR), str(site_dir), str(src / ".doctrees"), "html",
                     confoverrides={"html_theme_options.announcement": _announcement(chapters)},
                     status=None, warning=messages, freshenv=True)
        app.build(force_all=True)
    if messages.getvalue():
        (src / "sphinx-warnings.txt").write_text(messages.getvalue())
    if app.statuscode:
        raise RuntimeError(f"Sphinx failed (status {app.statuscode}); see {src / 'sphinx-warnings.txt'}")
    return site_dir / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coursebuild.site", description=__doc__.splitlines()[0])
    parser.add_argument("--executed-dir", type=Path, default=ROOT / "assets",
                        help="executed notebooks: assets/ with the reference run's NN_x/NN_x.ipynb (default), "
                             "or a folder of NN_*.ipynb such as run_all's _build/notebooks")
    parser.add_argument("--site-dir", type=Path, default=Path("_build/site"), help="output (default: _build/site)")
    parser.add_argument("--notebooks-dir", type=Path, default=ROOT / "notebooks",
                        help="source notebooks, shown without outputs where none was executed")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        index = build_site(args.executed_dir, args.site_dir, args.notebooks_dir)
    except (FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Website built in {time.perf_counter() - started:.1f} s: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
