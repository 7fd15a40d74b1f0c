"""What a notebook leaves behind: metrics.json, the course's results tables, and the sentences
every conclusion needs.

- `write_metrics` writes `assets/<notebook>/metrics.json` in the schema of DESIGN.md;
  `results_table` reads several of them back into one table (one row per model or run).
- `with_ci` formats a metric with its bootstrap interval: `0.912 [0.890, 0.931]`.
- `run_caveats` says, in the same words in every notebook, what a reduced run cannot show
  (smoke or cpu profile, synthetic images, no ImageNet weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from helpers.config import Config, portable_data_dir
from helpers.measurable import too_few_for


def with_ci(block: dict[str, Any], key: str, digits: int = 3, missing: str = "undefined") -> str:
    """A metric with its bootstrap interval: '0.912 [0.890, 0.931]'.

    `block` is a `compute_metrics` block (`key` = "auc", interval in `block["ci95"]`) or a row of
    `results_table` (`key` = "test_auc", interval in "test_auc_lo" / "test_auc_hi"). An undefined
    metric (e.g. the AUC of a split holding one class) gives `missing`, so a table or a sentence
    says so instead of crashing on None; a metric resting on a class with too few images
    (`block["too_few"]`) says so instead of an interval; one without interval gives the value.
    """
    value = block.get(key)
    if "ci95" in block:
        interval = (block.get("ci95") or {}).get(key)
    else:
        interval = [block.get(f"{key}_lo"), block.get(f"{key}_hi")]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if few := too_few_for(block, key):
        return f"{value:.{digits}f} (too few to measure: {few})"
    if not interval or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def run_caveats(cfg: Config, *, synthetic: bool, pretrained: bool | None,
                task: str = "the task") -> list[str]:
    """What this run's numbers cannot show, as sentences for the conclusion (empty for a full run
    on real data with ImageNet weights).

    `cfg` is the run's `Config` (profile, image size, epochs, subset size); `synthetic`: were the
    images generated; `pretrained`: were ImageNet weights really loaded (`model.pretrained`; None
    where no network is trained). `task` names what the smoke profile says nothing about.
    """
    data = "synthetic images" if synthetic else "real images"
    caveats = []
    if cfg.profile == "smoke":
        caveats.append(f"**Smoke profile: these numbers do not reflect the recipe.** A few dozen {data}, "
                       f"{cfg.image_size} px, {cfg.epochs} epoch(s): the run proves that the code works end to "
                       f"end and says nothing about {task}. Do not compare it with the reference.")
    elif cfg.profile == "cpu":
        subset = (f"at most {cfg.max_per_class} images per class and split" if cfg.max_per_class
                  else "all images")
        caveats.append(f"**CPU profile: not the full recipe** ({subset}, {cfg.image_size} px, "
                       f"{cfg.epochs} epoch(s)). Expect the `full` profile on a "
                       "GPU to differ; compare with the reference only after a full run.")
    if synthetic and cfg.profile != "smoke":
        caveats.append("**Synthetic data** (`DATA_DIR = \"synthetic\"`): generated images, not patients.")
    if pretrained is False:
        caveats.append("**No ImageNet weights"
                       + (" could be loaded" if cfg.pretrained else " (the profile trains from scratch)")
                       + ": this was NOT transfer learning** (random initialisation), and the numbers are "
                       "not comparable with the reference.")
    return caveats


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy/torch values, Paths and tuples to plain JSON types; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "to_dict"):  # pandas objects
        return to_jsonable(value.to_dict())
    return str(value)


def write_metrics(
    out_dir: str | Path,
    *,
    notebook: str,
    profile: str,
    dataset: str,
    data_dir: str | Path | None,
    model: str,
    pretrained: bool,
    image_size: int,
    class_names: Sequence[str],
    threshold: float | None,
    val: dict | None,
    test: dict | None,
    timing: dict | None,
    device: str | torch.device,
    runs: list[dict] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write out_dir/metrics.json in the DESIGN.md schema (that key order, extra keys last); return the dict."""
    record: dict[str, Any] = {
        "notebook": notebook,
        "profile": profile,
        "dataset": dataset,
        "data_dir": portable_data_dir(data_dir),
        "model": model,
        "pretrained": pretrained,
        "image_size": image_size,
        "class_names": list(class_names),
        "threshold": threshold,
        "val": val,
        "test": test,
        "timing": timing,
        "device": device,
    }
    if runs is not None:
        record["runs"] = runs
    record.update(extra)
    record = to_jsonable(record)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return record


def _load_metrics(item: str | Path | dict) -> dict:
    if isinstance(item, dict):
        return item
    path = Path(item)
    if path.is_dir():
        path = path / "metrics.json"
    return json.loads(path.read_text())


_CONTEXT_KEYS = ("notebook", "profile", "dataset", "model", "pretrained", "image_size")


def _metric_columns(block: dict | None, prefix: str) -> dict[str, Any]:
    """Flatten one val/test block into columns like test_auc, test_auc_lo, test_recall_NORMAL."""
    row: dict[str, Any] = {}
    if not block:
        return row
    ci = block.get("ci95") or {}
    for key in ("accuracy", "balanced_accuracy", "auc", "average_precision", "sensitivity", "specificity", "ece"):
        if key in block:
            row[f"{prefix}_{key}"] = block[key]
        if key in ci:
            lo_hi = ci[key] or [None, None]
            row[f"{prefix}_{key}_lo"], row[f"{prefix}_{key}_hi"] = lo_hi
    for name, stats in (block.get("per_class") or {}).items():
        row[f"{prefix}_recall_{name}"] = stats.get("recall")
    return row


def _row(record: dict, parent: dict, run_name: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {key: record.get(key, parent.get(key)) for key in _CONTEXT_KEYS}
    row["run"] = run_name
    block_threshold = (record.get("test") or {}).get("threshold", parent.get("threshold"))
    row["threshold"] = record.get("threshold", block_threshold)
    if "test" in record or "val" in record:
        row.update(_metric_columns(record.get("val"), "val"))
        row.update(_metric_columns(record.get("test"), "test"))
    else:  # a run given as a bare metrics block is a test block
        row.update(_metric_columns(record, "test"))
    return row


def results_table(paths_or_dicts: str | Path | dict | Sequence[str | Path | dict], *, include_main: bool = False):
    """One row per model/run from several metrics.json files (paths, folders or dicts).

    A file with a "runs" list contributes one row per run (named by its "name", "run" or
    "strategy" key); with `include_main=True` its top-level block is added as well.
    Columns: notebook, profile, dataset, model, pretrained, image_size, run, threshold, then
    val_* and test_* metrics with *_lo/*_hi 95% intervals and *_recall_<class> columns.
    """
    items = [paths_or_dicts] if isinstance(paths_or_dicts, (str, Path, dict)) else list(paths_or_dicts)
    rows = []
    for item in items:
        record = _load_metrics(item)
        runs = record.get("runs") or []
        if include_main or not runs:
            rows.append(_row(record, {}, None))
        for i, run in enumerate(runs):
            name = run.get("name") or run.get("run") or run.get("strategy") or run.get("model") or f"run{i}"
            rows.append(_row(run, record, str(name)))
    return pd.DataFrame(rows)
