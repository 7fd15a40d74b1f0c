"""The reference run kept in assets/: executed copies, their facts, and whether they are stale.

A reference run (``run_all`` writing into the default ``assets/``) keeps each executed notebook
beside its figures and metrics.json, as ``assets/<stem>/<stem>.ipynb``. The website reads them by
default; ``tests/test_reference_run.py`` fails when a copy's code no longer matches its source.
Also here: what a reader of each chapter will see (its key number), which weights it ran with,
its run time, and the Open-in-Colab/Kaggle links built from the notebooks' ``COURSE_REPO``.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat

from coursebuild.layout import NOTEBOOK_PATTERN
from coursebuild.records import copy_problem

INJECTED_TAG = "injected-parameters"  # papermill's cell with the parameters of the run
BRANCH = "main"  # the branch the Open-in links point to
COURSE_REPO_LINE = re.compile(r"""^COURSE_REPO\s*=\s*["']([^"']+)["']""", re.MULTILINE)
README_START, README_END = "<!-- reference-run:start -->", "<!-- reference-run:end -->"
WEIGHT_SOURCES = {"torchvision": "ImageNet (torchvision)", "random": "random init"}


# --------------------------------------------------------------------------- executed copies


def executed_copy(assets_dir: Path | str, stem: str) -> Path:
    """Where a reference run keeps the executed notebook ``stem``: beside its assets."""
    return Path(assets_dir) / stem / f"{stem}.ipynb"


def executed_notebooks(folder: Path | str) -> dict[str, Path]:
    """{stem: path} of executed notebooks in ``folder``: ``NN_*.ipynb`` (a run_all build dir) or
    ``NN_*/NN_*.ipynb`` (assets/, a reference run); the flat file wins when both exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {p.parent.name: p for p in sorted(folder.glob("*/*.ipynb"))
             if NOTEBOOK_PATTERN.match(p.name) and p.stem == p.parent.name}
    found.update({p.stem: p for p in sorted(folder.glob("*.ipynb")) if NOTEBOOK_PATTERN.match(p.name)})
    return dict(sorted(found.items()))


def is_beside_assets(path: Path) -> bool:
    """True for ``<stem>/<stem>.ipynb``: its metrics.json is the one in the same folder."""
    return path.parent.name == path.stem


def code_sources(nb: nbformat.NotebookNode) -> list[str]:
    """The sources of the code cells, papermill's injected-parameters cell left out."""
    return [c.source for c in nb.cells
            if c.cell_type == "code" and INJECTED_TAG not in c.metadata.get("tags", [])]


def code_differences(executed: Path | str, source: Path | str) -> list[str]:
    """How the code of an executed copy differs from its source notebook; [] when it does not."""
    ran = code_sources(nbformat.read(executed, as_version=4))
    now = code_sources(nbformat.read(source, as_version=4))
    problems = []
    for number, (old, new) in enumerate(zip(ran, now), start=1):  # numbered as in notebooks/
        if old == new:
            continue
        if _first_line(old) == _first_line(new):
            problems.append(f"code cell {number} ({_first_line(new)!r}) changed")
        else:
            problems.append(f"code cell {number}: {_first_line(new)!r} was {_first_line(old)!r}")
    if len(ran) != len(now):
        problems.append(f"{len(ran)} code cells ran, the source has {len(now)}")
    return problems


def stale_copies(assets_dir: Path | str, notebooks_dir: Path | str) -> dict[str, list[str]]:
    """{stem: differences} for every executed copy in ``assets_dir`` whose code is not its source's."""
    stale = {}
    for stem, path in executed_notebooks(assets_dir).items():
        source = Path(notebooks_dir) / f"{stem}.ipynb"
        problems = code_differences(path, source) if source.is_file() else [f"no source notebook {source.name}"]
        if problems:
            stale[stem] = problems
    return stale


# What must not reach a page of the course: machine paths, download and housekeeping lines.
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/root/|/home/|/tmp/|/Users/|/private/|[A-Z]:\\\\)")
PAGE_NOISE = ("Downloading: ", ".previous_run", "Warning: ", "warnings.warn(")
CAPTION = re.compile(r"^\*\*Figure \d+\.\*\*")  # a figure's caption cell starts so (site styles it)


def _texts(cell: nbformat.NotebookNode) -> list[str]:
    """The text a reader sees of a code cell: its outputs' text (stream, plain and markdown)."""
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", ""))
        data = output.get("data", {})
        texts += [data.get("text/plain", ""), data.get("text/markdown", ""), data.get("text/html", "")]
    return ["".join(t) if isinstance(t, list) else str(t) for t in texts]


def page_problems(executed: Path | str, *, paths: bool = True) -> list[str]:
    """What an executed notebook would show a reader that a book would not: a figure without a
    caption (a markdown cell starting "**Figure N.**" right after the cell that drew it), a machine
    path (`paths`), a download, warning or housekeeping line, a code line over 100 characters."""
    cells, problems = nbformat.read(executed, as_version=4).cells, []
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        where = f"code cell {i} ({_first_line(cell.source)[:40]!r})"
        after = cells[i + 1] if i + 1 < len(cells) else None
        if any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])) and not (
                after is not None and after.cell_type == "markdown" and CAPTION.match(after.source)):
            problems.append(f"{where}: a figure without a caption")
        shown = _texts(cell) + ([] if INJECTED_TAG in cell.metadata.get("tags", []) else [cell.source])
        for text in shown:
            if paths and (hit := MACHINE_PATH.search(text)):
                problems.append(f"{where}: a machine path ({text[hit.start():hit.start() + 40]!r})")
            problems += [f"{where}: {noise!r} on the page" for noise in PAGE_NOISE if noise in text]
        problems += [f"{where}: a code line of {len(line)} characters" for line in cell.source.splitlines()
                     if len(line) > 100 and INJECTED_TAG not in cell.metadata.get("tags", [])]
    return problems


def _first_line(source: str) -> str:
    return next((line.strip() for line in source.splitlines() if line.strip()), "")[:80]


# --------------------------------------------------------------------------- what a chapter shows


def weights_label(record: Mapping[str, Any] | None, fallback: Mapping[str, Any] | None = None) -> str:
    """The weights a run started from: its ``weights.source`` named for readers, else from
    ``pretrained`` ("ImageNet" / "random init"); "" when neither is recorded."""
    for block in (record or {}, fallback or {}):  # the run's own facts first, then its notebook's
        weights = block.get("weights")
        source = weights.get("source") if isinstance(weights, Mapping) else None
        if source:
            kind, _, detail = str(source).partition(":")
            if kind == "tflite-converted":
                return f"ImageNet (converted from {detail or 'a TFLite file'})"
            return WEIGHT_SOURCES.get(str(source), str(source))
        if isinstance(block.get("pretrained"), bool):
            return "ImageNet" if block["pretrained"] else "random init"
    return ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _interval(ci: Any) -> str:
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        return f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return ""


def _data_tour_line(metrics: Mapping[str, Any]) -> str:
    """Notebook 00 trains nothing: its images per dataset and the leakage of a random split."""
    datasets = metrics.get("datasets") or {}
    counts = [f"{name} {d['n_images']:,}" for name, d in datasets.items()
              if isinstance(d, Mapping) and _number(d.get("n_images")) is not None]
    line = f"{len(counts)} datasets ({', '.join(counts)} images)" if counts else ""
    naive = ((metrics.get("leakage") or {}).get("pneumonia") or {}).get("naive_random_split") or {}
    share = _number(naive.get("val_images_with_patient_in_train"))
    if share is not None:
        line += ("; " if line else "") + (f"a random split puts {share:.0%} of pneumonia validation images "
                                          "beside a training image of the same patient")
    return line


def _scores(test: Mapping[str, Any], macro: str) -> str:
    """'test AUC 0.934 [0.914, 0.952], balanced accuracy 0.788 [...]' of one test block ('' if neither)."""
    auc, balanced = _number(test.get("auc")), _number(test.get("balanced_accuracy"))
    ci = test.get("ci95") or {}
    parts = [f"test {macro}AUC {auc:.3f}{_interval(ci.get('auc'))}"] if auc is not None else []
    if balanced is not None:
        parts.append(f"balanced accuracy {balanced:.3f}{_interval(ci.get('balanced_accuracy'))}")
    return ", ".join(parts)


def key_line(metrics: Mapping[str, Any] | None) -> str:
    """What a reader will see: the run's headline test numbers with their 95% interval, then those of
    each single-model comparison run on ImageNet weights (a labelled block of ``runs``, not an ensemble)
    that is not the headline."""
    if not metrics:
        return ""
    test = metrics.get("test") or {}
    macro = "macro " if len(metrics.get("class_names") or []) > 2 else ""
    line = _scores(test, macro)
    if not line:
        return _data_tour_line(metrics)
    chosen = metrics.get("chosen")
    name = (chosen.get("name") if isinstance(chosen, Mapping) else None) or metrics.get("strategy") or metrics.get("model")
    line += f" ({name})" if name else ""
    for run in metrics.get("runs") or []:
        label, block = run.get("label"), run.get("test")
        single = isinstance(label, str) and "ImageNet" in label and "+" not in label  # not an ensemble
        scores = _scores(block, macro) if single and isinstance(block, Mapping) and block != test else ""
        line += f"; {label.replace('|', '/')}: {scores}" if scores else ""  # a table cell: no pipes
    return line


def duration(seconds: float | None) -> str:
    """'48 s', '20 min 36 s', '2 h 05 min'; '' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# --------------------------------------------------------------------------- links and README


def course_repo(notebook: Path | str) -> str | None:
    """The ``COURSE_REPO`` of a notebook's setup cell (the one place the repository is named)."""
    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError):
        return None
    setup = next((c.source for c in nb.cells if c.cell_type == "code"), "")
    match = COURSE_REPO_LINE.search(setup)
    return match.group(1).rstrip("/").removesuffix(".git") if match else None


def open_links(repo: str | None, path_in_repo: str) -> dict[str, str]:
    """{"Colab": url, "Kaggle": url} opening ``path_in_repo`` of a GitHub ``repo``; {} for other hosts."""
    if not repo:
        return {}
    url = urllib.parse.urlparse(repo)
    owner_name = url.path.strip("/")
    if url.hostname != "github.com" or owner_name.count("/") != 1:
        return {}
    blob = f"{owner_name}/blob/{BRANCH}/{path_in_repo}"
    return {"Colab": f"https://colab.research.google.com/github/{blob}",
            "Kaggle": f"https://kaggle.com/kernels/welcome?src=https://github.com/{blob}"}


def reference_table(rows: Sequence[Mapping[str, str]]) -> str:
    """The README's table of the reference run: per notebook what you will see, weights, run time, and
    (when the rows give one) the run its numbers come from."""
    runs = any("run" in r for r in rows)
    head = "| nb | what you will see | weights | profile | run time |" + (" run |" if runs else "")
    head += "\n|---|---|---|---|---|" + ("---|" if runs else "") + "\n"
    body = "".join(f"| {r['nb']} | {r['see'] or 'not run yet'} | {r['weights']} | {r['profile']} | {r['time']} |"
                   + (f" {r.get('run', '')} |" if runs else "") + "\n" for r in rows)
    return head + body


def reference_rows(assets_dir: Path | str, notebooks_dir: Path | str) -> list[dict[str, str]]:
    """One row per source notebook from ``assets/<stem>/metrics.json`` and its executed copy."""
    rows = []
    for source in sorted(Path(notebooks_dir).glob("*.ipynb")):
        if not NOTEBOOK_PATTERN.match(source.name):
            continue
        try:
            metrics = json.loads((Path(assets_dir) / source.stem / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        copy = executed_copy(assets_dir, source.stem)
        seconds, mixed = None, copy_problem(copy.parent, {"notebook": source.stem, **metrics}) if metrics else None
        if copy.is_file() and not mixed:  # the run time of another run is never shown beside these numbers
            seconds = _number(nbformat.read(copy, as_version=4).metadata.get("papermill", {}).get("duration"))
        run = f"mixed: {mixed}" if mixed else str(metrics.get("run_id") or ("unknown" if metrics else ""))
        rows.append({"nb": source.stem[:2], "see": key_line(metrics), "weights": weights_label(metrics),
                     "profile": str(metrics.get("profile") or ""), "time": duration(seconds), "run": run})
    return rows


def replace_block(text: str, block: str) -> str | None:
    """``text`` with the part between the reference-run markers replaced; None without markers."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return None
    return f"{text[:start + len(README_START)]}\n{block.rstrip()}\n{text[end:]}"
