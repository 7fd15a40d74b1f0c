"""The website a reader of a fresh clone gets: built from the reference run kept in assets/.

`python -m coursebuild.site` builds from `assets/<stem>/<stem>.ipynb` by default. Every chapter
must be there, executed in the cpu profile, with its outputs and figures: the static checks read
the built HTML, the browser test opens every chapter page in headless Chromium and asks the DOM
whether its cell outputs are there and its figures decode (skipped when Chromium is absent).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from coursebuild import reference
from coursebuild.site import build_site
from test_notebooks import NOTEBOOKS
from test_site import _browser, _chromium, _serve

# pytest-xdist (pyproject addopts): tests sharing this module's fixtures run on one worker.
pytestmark = pytest.mark.xdist_group("reference-site")

# Opens every chapter in a frame, one after another, and reports what the browser shows.
EVERY_CHAPTER = """<!DOCTYPE html><html><body><pre id="out">pending</pre><script>
const sleep = ms => new Promise(r => setTimeout(r, ms));
function load(src) {
  return new Promise(done => {
    const frame = document.createElement("iframe");
    frame.style.width = "1280px"; frame.style.height = "900px";
    frame.onload = () => done(frame.contentDocument);
    frame.src = src; document.body.appendChild(frame);
  });
}
(async () => {
  const seen = {};
  for (const stem of STEMS) {
    const page = await load("chapters/" + stem + ".html");
    const images = [...page.querySelectorAll(".cell_output img")];
    for (const img of images) { img.loading = "eager"; img.scrollIntoView(); }
    for (let i = 0; i < 100 && !images.every(img => img.complete); i++) await sleep(100);
    seen[stem] = {
      banner: (page.querySelector(".course-run") || {}).textContent || "",
      outputs: page.querySelectorAll(".cell_output").length,
      figures: images.map(img => [img.naturalWidth, img.naturalHeight]),
      tracebacks: page.querySelectorAll(".cell_output .output.traceback, .cell_output .ansi-red-fg").length,
    };
  }
  document.getElementById("out").textContent = JSON.stringify(seen);
})();
</script></body></html>
"""
STEMS = [p.stem for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def reference_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site exactly as `python -m coursebuild.site` builds it on a fresh clone."""
    missing = [stem for stem in STEMS if not reference.executed_copy(ROOT / "assets", stem).is_file()]
    assert not missing, (f"no executed copy of the reference run for {missing} in assets/: run "
                         "`uv run python -m coursebuild.run_all --profile cpu --only NN --data-dir "
                         "../shared/data --no-site` for each")
    site = tmp_path_factory.mktemp("reference") / "site"
    build_site(ROOT / "assets", site, ROOT / "notebooks")
    return site


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


def test_every_chapter_is_built_from_its_cpu_run_with_outputs(reference_site: Path) -> None:
    index = _text(reference_site / "index.html")
    assert f"Executed in profile cpu ({len(STEMS)} chapters)" in index
    for stem in STEMS:
        page = reference_site / "chapters" / f"{stem}.html"
        text, raw = _text(page), page.read_text(encoding="utf-8")
        assert "Not executed" not in text and "(failed)" not in text, stem
        assert "The code has changed since this run" not in text, stem
        assert re.search(r"Profile\s+cpu\s*, executed", text), (stem, text[:400])
        assert "What you will see:" in text, stem
        assert raw.count('class="cell_output') >= 3, stem
        images = re.findall(r'<img[^>]+src="([^"]+)"', raw[raw.index("cell_output"):])
        assert images, f"{stem}: no figure among its outputs"
        for src in images:
            if not src.startswith("data:"):
                assert (page.parent / src).resolve().is_file(), (stem, src)


def test_every_chapter_page_shows_its_outputs_and_figures_in_chromium(reference_site: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): reference-site browser test skipped")
    (reference_site / "_every_chapter.html").write_text(EVERY_CHAPTER.replace("STEMS", json.dumps(STEMS)))
    server, url = _serve(reference_site)
    try:
        dom = _browser(browser, tmp_path / "profile", "--dump-dom",
                       f"{url}/_every_chapter.html").stdout
    finally:
        server.shutdown()
        server.server_close()
        (reference_site / "_every_chapter.html").unlink()
    seen = json.loads(html.unescape(re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1)))
    assert sorted(seen) == sorted(STEMS)
    for stem, page in seen.items():
        assert "cpu" in page["banner"] and "Not executed" not in page["banner"], (stem, page["banner"][:200])
        assert page["outputs"] >= 3, (stem, page)
        assert page["figures"], f"{stem}: the browser shows no figure"
        assert all(w > 50 and h > 50 for w, h in page["figures"]), (stem, page["figures"])
        assert page["tracebacks"] == 0, (stem, page)
