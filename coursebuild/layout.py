"""Names the course builder shares: which files are chapters, and the runner's record beside them.

Profiles and output folders live in `helpers.runs` (one home for the notebooks and the builder
alike); reading run records back (freshness, results tables) in `coursebuild.records`.
"""

from __future__ import annotations

import re

NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_.+\.ipynb$")
RUNS_FILE = "runs.json"  # beside the executed notebooks: which notebooks the latest run executed
