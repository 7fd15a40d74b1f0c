"""Names the course builder shares: which files are chapters, and the runner's record beside them.

Profiles, output folders and the rule that tells whether a metrics.json belongs to a run live in
`helpers.config` (one home for the notebooks and the builder alike).
"""

from __future__ import annotations

import re

NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_.+\.ipynb$")
RUNS_FILE = "runs.json"  # beside the executed notebooks: which notebooks the latest run executed
