"""The course website (coursebuild.site) built from this session's smoke run, seen in Chromium.

The notebooks are not executed a second time: test_notebooks.py keeps its executed smoke-profile
notebooks in `smoke_run_dir`, laid out like the runner's `_build/`. When those tests were
deselected, the one chapter this test needs (notebook 06: figures and metrics) is executed here.
The browser test serves the site on 127.0.0.1, takes screenshots of the landing page and of one
chapter, and reads the rendered pages (sidebar, decoded figures, results table, search) from
the browser's DOM; it is skipped when Chromium is absent.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from coursebuild.site import build_site
from test_notebooks import NOTEBOOKS, execute_smoke, smoke_run_dir

# pytest-xdist (pyproject addopts): tests sharing this module's fixtures run on one worker.
pytestmark = pytest.mark.xdist_group("smoke-notebooks")

FALLBACK_NOTEBOOK = "06_fundus_binary"  # executed here only when no smoke run is there
PREFERRED_CHAPTER = "04_mobilenetv2_two_stage"
# The chapter in a full-window frame, scrolled to its first figure (for the screenshot).
FIGURE_VIEW = """<!DOCTYPE html><html><head><style>html, body { margin: 0; height: 100%; overflow: hidden }
iframe { border: 0; width: 100%; height: 100% }</style></head><body><iframe id="f" src="CHAPTER"></iframe><script>
const frame = document.getElementById("f");
frame.onload = () => {
  const img = frame.contentDocument.querySelector(".cell_output img");
  if (img) { img.loading = "eager"; img.scrollIntoView({block: "center"}); }
};
</script></body></html>
"""
# Loads a chapter, the results page and a search in frames and reports what the browser shows.
CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="out">pending</pre><script>
function load(src) {
  return new Promise(done => {
    const frame = document.createElement("iframe");
    frame.style.width = "1280px"; frame.style.height = "900px";
    frame.onload = () => done(frame.contentDocument);
    frame.src = src; document.body.appendChild(frame);
  });
}
const sleep = ms => new Promise(r => setTimeout(r, ms));
(async () => {
  const chapter = await load("CHAPTER");
  const images = [...chapter.querySelectorAll(".cell_output img")];
  for (const img of images) { img.loading = "eager"; img.scrollIntoView(); }
  for (let i = 0; i < 50 && !images.every(img => img.complete); i++) await sleep(100);
  const results = await load("results.html");
  const table = results.querySelector("table.course-table");
  const search = await load("search.html?q=threshold");
  for (let i = 0; i < 50 && !search.querySelector("#search-results li"); i++) await sleep(100);
  document.getElementById("out").textContent = JSON.stringify({
    sidebar: [...chapter.querySelectorAll(".bd-sidebar-primary .bd-docs-nav a.reference.internal")]
      .map(a => [a.textContent.trim(), a.getAttribute("href")]),
    banner: (chapter.querySelector(".course-run") || {}).textContent || "",
    figures: images.map(img => [img.naturalWidth, img.naturalHeight]),
    headers: table ? [...table.querySelectorAll("th")].map(th => th.textContent.trim()) : [],
    rows: table ? [...table.querySelectorAll("tbody tr")].map(tr => tr.textContent.trim()) : [],
    table_width: table ? table.getBoundingClientRect().width : 0,
    page_width: results.documentElement.clientWidth,
    search_hits: search.querySelectorAll("#search-results li").length,
  });
})();
</script></body></html>
"""


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def smoke_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built from the session's smoke run (executing notebook 06 if there is none)."""
    run_dir = smoke_run_dir(tmp_path_factory)
    if not list((run_dir / "notebooks").glob("*.ipynb")):
        notebook = next((p for p in NOTEBOOKS if p.stem == FALLBACK_NOTEBOOK), None)
        if notebook is None:
            pytest.skip(f"no smoke run in this session and no {FALLBACK_NOTEBOOK} to execute")
        execute_smoke(notebook, run_dir)
    build_site(run_dir / "notebooks", run_dir / "site")
    return run_dir / "site"


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


def _chapter(site: Path) -> str:
    """An executed chapter with figures: 04 when the smoke run has it, else the first one."""
    pages = sorted((site / "chapters").glob("*.html"), key=lambda p: p.stem != PREFERRED_CHAPTER)
    seen = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        seen[page.stem] = ("Run: smoke profile" in text, "(failed)" in text, text.count("<img"))
        if seen[page.stem][0] and not seen[page.stem][1] and seen[page.stem][2]:
            return f"chapters/{page.name}"
    pytest.fail(f"no executed chapter with a figure in the site: (banner, failed, images) {seen}")


def test_the_setup_cell_is_collapsed_on_every_chapter(smoke_site: Path) -> None:
    """The first code cell (tagged hide-input) is folded: myst-nb's "Show code cell source" toggle;
    on the exercise pages too (the site folds their setup cell)."""
    pages = sorted([*(smoke_site / "chapters").glob("*.html"), *(smoke_site / "exercises").glob("*.html")])
    assert len(pages) > len(NOTEBOOKS)
    for page in pages:
        text = page.read_text(encoding="utf-8")
        first_cell = re.search(r'<div class="cell[^"]*"', text)
        assert first_cell and "tag_hide-input" in first_cell.group(0), (page.name, first_cell and first_cell.group(0))
        assert "Show code cell source" in text, page.name


def test_every_page_names_its_profile_and_the_chapters_are_in_order(smoke_site: Path) -> None:
    chapters = sorted((smoke_site / "chapters").glob("*.html"))
    assert [p.stem for p in chapters] == [p.stem for p in NOTEBOOKS]
    for page in chapters:
        text = _text(page)
        assert "Run: smoke profile" in text or "Not executed" in text, page.name
    for page in ("index.html", "results.html", "profiles.html", "search.html", *[f"chapters/{p.name}" for p in chapters]):
        assert "Executed in profile smoke" in _text(smoke_site / page), page  # the banner on every page
    index = (smoke_site / "index.html").read_text(encoding="utf-8")
    linked = re.findall(r'href="chapters/(\d\d)_[^"]+\.html"', index)
    assert sorted(set(linked)) == [p.stem[:2] for p in NOTEBOOKS]
    nav = index[index.index("bd-docs-nav"):]
    pages = re.findall(r'href="((?:chapters|exercises)/[^"]+)\.html"', nav[:nav.index("</nav>")])
    exercises = {p.stem[:2]: p.stem for p in (ROOT / "notebooks" / "exercises").glob("[0-9][0-9]_*_exercises.ipynb")}
    expected = [page for p in NOTEBOOKS for page in
                (f"chapters/{p.stem}", *([f"exercises/{exercises[p.stem[:2]]}"] if p.stem[:2] in exercises else []))]
    assert pages == expected  # each chapter, then its exercises
    assert "Medical image classification with transfer learning" in index  # from the README
    assert (smoke_site / "searchindex.js").is_file()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log in the test output
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def served(smoke_site: Path) -> Iterator[str]:
    server, url = _serve(smoke_site)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def _browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args],
        check=True, timeout=90, capture_output=True, text=True)


def _screenshot(browser: str, url: str, shot: Path, size: str) -> np.ndarray:
    _browser(browser, shot.with_suffix(".profile"), "--run-all-compositor-stages-before-draw",
             f"--window-size={size}", f"--screenshot={shot}", url)
    assert shot.exists(), f"Chromium wrote no screenshot of {url}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.std() > 15, f"the screenshot of {url} is (nearly) uniform: the page did not render"
    return pixels


def test_site_in_headless_chromium(smoke_site: Path, served: str, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): site browser test skipped")
    chapter = _chapter(smoke_site)
    helpers = {"_check.html": CHECK_PAGE, "_figure.html": FIGURE_VIEW}
    for name, page in helpers.items():
        (smoke_site / name).write_text(page.replace("CHAPTER", chapter))
    try:
        landing = _screenshot(browser, f"{served}/index.html", tmp_path / "landing.png", "1280,900")
        _screenshot(browser, f"{served}/{chapter}", tmp_path / "chapter.png", "1280,900")
        _screenshot(browser, f"{served}/_figure.html", tmp_path / "chapter_figure.png", "1280,900")
        dom = _browser(browser, tmp_path / "check.profile", "--dump-dom", f"{served}/_check.html").stdout
    finally:
        for name in helpers:
            (smoke_site / name).unlink()
    assert (landing[:, :300].mean(axis=2) < 120).mean() > 0.002, "no dark text at the left: sidebar missing?"
    found = json.loads(html.unescape(re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1)))
    numbers = [text[:2] for text, href in found["sidebar"] if text[:2].isdigit() and "exercises/" not in href]
    assert numbers == [p.stem[:2] for p in NOTEBOOKS], found["sidebar"]
    assert "smoke" in found["banner"]
    assert found["figures"] and all(w > 50 and h > 50 for w, h in found["figures"]), found["figures"]
    for column in ("notebook", "profile", "data", "model", "weights", "balanced accuracy", "AUC [95% CI]"):
        assert column in found["headers"], found["headers"]
    assert found["rows"] and all("smoke" in row for row in found["rows"])
    assert found["table_width"] <= found["page_width"], "the results table is wider than the window"
    assert found["search_hits"] > 0, "the built-in search found nothing for 'threshold'"


def test_exercise_pages_fold_each_solution_and_answer_from_the_package() -> None:
    """The notebooks hold no solutions; the site adds them, folded, from helpers.exercises.chNN."""
    import importlib

    import nbformat

    from coursebuild.site import exercise_cells_with_answers

    for path in sorted((ROOT / "notebooks" / "exercises").glob("[0-9][0-9]_*_exercises.ipynb")):
        number = path.name[:2]
        chapter = importlib.import_module(f"helpers.exercises.ch{number}").CHAPTER
        cells = exercise_cells_with_answers(nbformat.read(path, as_version=4).cells, number)
        for i, cell in enumerate(cells):
            if cell.cell_type == "code" and cell.metadata.get("exercise") in chapter.problems:
                folded = cells[i + 1].source
                assert "<summary>Solution</summary>" in folded
                assert chapter.problems[cell.metadata["exercise"]].solution_code.strip() in folded
        answers = "\n".join(c.source for c in cells if c.cell_type == "markdown")
        assert answers.count("<summary>Answer</summary>") == len(chapter.questions_list), path.name


def test_a_figure_caption_cell_is_wrapped_for_its_style() -> None:
    """A markdown cell starting "**Figure N.**" right after a code cell renders as a caption (course.css)."""
    from types import SimpleNamespace

    import nbformat

    from coursebuild.site import chapter_notebook

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 04 x"), nbformat.v4.new_code_cell("plot()"),
        nbformat.v4.new_markdown_cell("**Figure 1.** Curves.\n\n$$ J = a - 1 $$"),
        nbformat.v4.new_markdown_cell("**Figure 2.** not after a figure")])
    chapter = SimpleNamespace(notebook=nb, exercises=False, title="x", stem="04_x")
    cells = chapter_notebook(chapter, "banner").cells
    assert cells[2].source.startswith("`````{container} figure-caption\n**Figure 1.** Curves.")
    assert cells[3].source == "**Figure 2.** not after a figure"
