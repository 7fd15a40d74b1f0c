"""Sphinx settings of the course website; coursebuild.site writes the pages and runs Sphinx.

Everything here works offline: the notebooks are rendered as executed (myst-nb with execution
off), the theme ships its own assets, and search is Sphinx's built-in client-side index.
"""

project = "Medical image classification with transfer learning"
author = "the course authors"
html_title = "Transfer learning for medical images"

extensions = ["myst_nb", "sphinx.ext.githubpages"]  # githubpages: writes .nojekyll
nb_execution_mode = "off"  # render the notebooks as the runner executed them
nb_output_stderr = "show"
nb_merge_streams = True
# $...$ and $$...$$ equations: MathJax, which the page loads from its CDN (offline they show as TeX).
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build", ".doctrees", "**.ipynb_checkpoints"]
# Notebook headings start at H1 in each chapter and the papermill error anchor is raw HTML.
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["course.css"]
html_copy_source = False  # the executed notebooks are large (embedded figures)
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "show_prev_next": True,
    "announcement": "",  # set per build by coursebuild.site: which profiles produced the pages
}
