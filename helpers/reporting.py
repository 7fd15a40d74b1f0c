"""What a notebook leaves behind: metrics.json, the course's results tables, and the sentences
every conclusion needs.

- `write_metrics` (`metrics_record`, written) writes `assets/<notebook>/metrics.json` in the schema of CONTRIBUTING.md;
  `results_table` reads several of them back into one table (one row per model or run), with
  the run each row comes from; `output_problems` says when a folder's figures are not all from
  the run its metrics.json names.
- `with_ci` formats a metric with its bootstrap interval: `0.912 [0.890, 0.931]`.
- `run_caveats` says, in the same words in every notebook, what a reduced run cannot show
  (smoke or cpu profile, synthetic images, no ImageNet weights).
- `dominant_class` notices a run that answers (almost) one class for every image, and
  `collapse_note` explains what its accuracy and balanced accuracy then mean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from helpers.config import METRICS_FILE, Config, Run, now_iso, portable_data_dir
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
                       f"end and says nothing about {task}. Do not compare it with published results or a full run.")
    elif cfg.profile == "cpu":
        subset = (f"at most {cfg.max_per_class} images per class and split" if cfg.max_per_class
                  else "all images")
        caveats.append(f"**CPU profile: not the full recipe** ({subset}, {cfg.image_size} px, "
                       f"{cfg.epochs} epoch(s)). Expect the `full` profile on a "
                       "GPU to differ; compare with published results only after a full run.")
    if synthetic and cfg.profile != "smoke":
        caveats.append("**Synthetic data** (`DATA_DIR = \"synthetic\"`): generated images, not patients.")
    if pretrained is False:
        caveats.append("**No ImageNet weights"
                       + (" could be loaded" if cfg.pretrained else " (the profile trains from scratch)")
                       + ": this was NOT transfer learning** (random initialisation), and the numbers are "
                       "not comparable with published transfer-learning results.")
    return caveats


def predicted_counts(block: dict[str, Any]) -> list[int]:
    """Images predicted as each class: the column sums of `block["confusion_matrix"]` (rows are
    the true classes, columns the predicted ones, as in `compute_metrics`)."""
    return np.asarray(block["confusion_matrix"], dtype=int).sum(axis=0).tolist()


class Dominant(NamedTuple):
    """The class a run answers for (almost) every image (`dominant_class`)."""

    index: int  # the class, an index into class_names
    share: float  # of all predictions
    true_share: float  # of the true labels
    collapsed: bool  # True: (almost) every image; False: leaning on it


def dominant_class(block: dict[str, Any], *, collapsed: float = 0.95, leaning: float = 0.80,
                   excess: float = 0.15) -> Dominant | None:
    """The class that takes at least `collapsed` of a run's predictions (collapsed), or at least
    `leaning` of them while being at least `excess` less common among the true labels (leaning);
    None when no class dominates. `block` is a `compute_metrics` block."""
    matrix = np.asarray(block["confusion_matrix"], dtype=int)
    total = int(matrix.sum())
    if total == 0:
        return None
    top = int(np.argmax(matrix.sum(axis=0)))
    share, true_share = matrix[:, top].sum() / total, matrix[top].sum() / total
    if share >= collapsed:
        return Dominant(top, float(share), float(true_share), True)
    if share >= leaning and share - true_share >= excess:
        return Dominant(top, float(share), float(true_share), False)
    return None


def collapse_note(block: dict[str, Any], class_names: Sequence[str], **thresholds: float) -> str | None:
    """A sentence for the conclusion when one class dominates a run's predictions (`dominant_class`,
    whose thresholds it passes on), else None: the counts, what accuracy and balanced accuracy
    measure in that case, whether the AUC interval says the scores still rank, cause and remedies."""
    dominant = dominant_class(block, **thresholds)
    if dominant is None:
        return None
    predicted = predicted_counts(block)
    total, name, k = sum(predicted), class_names[dominant.index], len(class_names)
    auc_ci = (block.get("ci95") or {}).get("auc")
    if block.get("auc") is None:
        ranking = ""
    elif auc_ci and auc_ci[0] is not None and auc_ci[0] > 0.5:
        ranking = (f" Its AUC {with_ci(block, 'auc')} lies above 0.5: the scores rank the classes better than chance, so "
                   "something was learned; it is the decision (the largest score wins) that does not use it.")
    else:
        ranking = f" Its AUC {with_ci(block, 'auc')} does not clear 0.5: the scores do not even rank the classes."
    if dominant.collapsed:
        head = (f"**Collapsed to one class:** the model calls {predicted[dominant.index]} of {total} test images {name}. "
                f"Its accuracy ({block['accuracy']:.3f}) is then just the share of {name} in the test split "
                f"({dominant.true_share:.3f}), and its balanced accuracy ({block['balanced_accuracy']:.3f}) is the value "
                f"of a constant answer (1/{k} = {1 / k:.3f}), not a measured skill.")
    else:
        head = (f"**Leaning on one class:** the model calls {predicted[dominant.index]} of {total} test images "
                f"({dominant.share:.0%}) {name}, a class that holds only {dominant.true_share:.0%} of them, so the other "
                f"classes are rarely recognised (balanced accuracy {block['balanced_accuracy']:.3f}, chance 1/{k} = "
                f"{1 / k:.3f}).")
    largest = dominant.index == int(np.argmax(np.asarray(block["confusion_matrix"]).sum(axis=1)))
    cause = (f" {name} is the largest class: a network trained briefly on imbalanced classes finds the majority "
             "answer first." if largest else
             f" {name} is not the largest class here: look at the training curves and the learning rate.")
    return (head + ranking + cause + " ImageNet weights (notebook 04), class-balanced sampling or loss weights "
            "(notebook 05) and more epochs (the `full` profile) are the usual ways out.")


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


def _data_dir(run: Run, splits: Any) -> Any:
    """The data folder(s) a run read: `splits.root`, one root per dataset for a mapping of splits
    (notebook 00), else the run's DATA_DIR."""
    if isinstance(splits, Mapping):
        return {str(name): s.root for name, s in splits.items()}
    return run.data_dir if splits is None else splits.root


WEIGHTS_KEYS = ("source", "file", "sha256", "padding", "input_mean", "input_std", "agreement", "batchnorm")


def weights_block(info: dict | None) -> dict | None:
    """The `weights` block of metrics.json from a model's `weights_info`: where the weights came
    from (source, file, sha256), how they were converted (padding, agreement with TensorFlow's
    interpreter, BatchNorm statistics) and the input normalisation they need."""
    return None if not info else {k: info.get(k) for k in WEIGHTS_KEYS if k in info}


def weights_label(block: dict | None, pretrained: bool | None = None) -> str:
    """A few words for a table: "ImageNet (TFLite, converted)", "torchvision ImageNet", "random"..."""
    source = str((block or {}).get("source") or "")
    if source.startswith("tflite-converted"):
        return "ImageNet (TFLite, converted)"
    if source == "torchvision":
        return "torchvision ImageNet"
    if source.startswith("file:"):
        return f"file {source[5:]}"
    if source == "random" or pretrained is False:
        return "random"
    return "ImageNet" if pretrained else ""


def figure_stamp(run: Run, splits: Any = None, model: Any = None, weights: dict | None = None) -> str:
    """"profile cpu | data <folder> | weights ImageNet (TFLite, converted)": the footer of a run's
    figures (`plots.set_stamp`), so a figure can be told apart from another run's. The weights come
    from `model` (built by `models.build_model`) or from a `weights_info` dict."""
    data = portable_data_dir(_data_dir(run, splits))
    folders = data.values() if isinstance(data, Mapping) else [data]
    parts = [f"profile {run.cfg.profile}", "data " + ", ".join(Path(str(f)).name for f in folders)]
    if model is not None or weights is not None:
        _, pretrained, block = _model_fields(model, None, weights)
        parts.append(f"weights {weights_label(block, pretrained) or 'unknown'}")
    return " | ".join(parts)


def _model_fields(model: Any, pretrained: bool | None, weights: dict | None) -> tuple[Any, Any, Any]:
    """(name, pretrained, weights block): a built model gives all three itself."""
    if isinstance(model, torch.nn.Module):
        name = getattr(model, "arch", type(model).__name__)
        pretrained = getattr(model, "pretrained", None) if pretrained is None else pretrained
        return name, pretrained, weights_block(weights or getattr(model, "weights_info", None))
    return model, pretrained, weights_block(weights)


def metrics_record(run: Run, splits: Any, *, dataset: str, model: Any, pretrained: bool | None = None,
                   weights: dict | None = None, class_names: Sequence[str] | None = None, threshold: float | None = None,
                   val: dict | None = None, test: dict | None = None, timing: dict | None = None,
                   figures: Sequence[str] = (), runs: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """This run's metrics.json as a dict, in the schema of CONTRIBUTING.md ("metrics.json").

    The run's own facts come from `run` and `splits` (a `data.Splits`, a mapping of them, or None):
    notebook, profile, data folder (made portable), image size, class names (unless given),
    device, run id and start time. Keyword `extra` keys follow the schema keys; one that names a
    schema key replaces it (notebook 00 gives `image_size=None`). `figures` lists the files this
    run saved beside its metrics.json: any other figure in that folder is not this run's.
    `model`: the architecture name, or the model itself (built by `models.build_model`): then its
    `arch`, `pretrained` and `weights_info` give "model", "pretrained" and the "weights" block
    (`weights_block`; or pass `weights=model.weights_info` with a name).
    """
    model, pretrained, weights = _model_fields(model, pretrained, weights)
    if class_names is None:
        class_names = getattr(splits, "class_names", [])
    record: dict[str, Any] = {
        "notebook": run.notebook, "profile": run.cfg.profile, "dataset": dataset,
        "data_dir": portable_data_dir(_data_dir(run, splits)), "model": model, "pretrained": pretrained,
        "image_size": run.cfg.image_size, "class_names": list(class_names), "threshold": threshold,
        "val": val, "test": test, "timing": timing, "device": str(run.device),
    }
    if weights is not None:  # the weights block (`weights_block`): only when the weights are known
        record["weights"] = weights
    if runs is not None:
        record["runs"] = runs
    record.update(extra)
    record.update(figures=list(figures), run_id=run.run_id, started_at=run.started_at, written_at=now_iso(),
                  n_bootstrap=run.cfg.n_bootstrap)
    return to_jsonable(record)


def write_metrics(run: Run, splits: Any, *, dataset: str, model: Any, pretrained: bool | None = None,
                  **fields: Any) -> dict[str, Any]:
    """Write `run.metrics_path` (`metrics_record` of the same arguments); return the dict.

    Written last and atomically (a temporary file, then `os.replace`), so a reader sees the old
    file or the new one, never half of one.
    """
    record = metrics_record(run, splits, dataset=dataset, model=model, pretrained=pretrained, **fields)
    path = run.metrics_path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{run.run_id}.tmp")
    temporary.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)
    return record


def output_problems(folder: str | Path, record: dict | None = None) -> list[str]:
    """Why the outputs in `folder` might not all come from the run its metrics.json names.

    Empty when they do: the metrics.json names its run (`run_id`), every figure it lists is there,
    and no other figure (*.png) sits beside it. `record` is the folder's metrics.json, read if
    not given.
    """
    folder = Path(folder)
    if record is None:
        try:
            record = json.loads((folder / METRICS_FILE).read_text())
        except (OSError, ValueError):
            return [f"no readable {METRICS_FILE}"]
    problems = [] if record.get("run_id") else ["no run id (written before runs had ids)"]
    listed = {str(n) for n in record.get("figures") or []}
    missing = sorted(n for n in listed if not (folder / n).is_file())
    foreign = sorted(p.name for p in folder.glob("*.png") if p.name not in listed)
    if missing:
        problems.append("listed figures missing: " + ", ".join(missing))
    if foreign:
        problems.append("figures not from this run: " + ", ".join(foreign))
    return problems


def _load_metrics(item: str | Path | dict) -> tuple[dict, Path | None]:
    """(the record, its folder or None for a dict)."""
    if isinstance(item, dict):
        return item, None
    path = Path(item)
    if path.is_dir():
        path = path / METRICS_FILE
    return json.loads(path.read_text()), path.parent


_CONTEXT_KEYS = ("notebook", "profile", "dataset", "model", "pretrained", "image_size")
_RUN_KEYS = ("run_id", "started_at")


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
    own = "weights" in record or record.get("pretrained") is False  # a run trained from random weights says so itself
    row["weights"] = weights_label(record.get("weights") if own else parent.get("weights"), row["pretrained"])
    row["run"] = run_name
    block_threshold = (record.get("test") or {}).get("threshold", parent.get("threshold"))
    row["threshold"] = record.get("threshold", block_threshold)
    if "test" in record or "val" in record:
        row.update(_metric_columns(record.get("val"), "val"))
        row.update(_metric_columns(record.get("test"), "test"))
    else:  # a run given as a bare metrics block is a test block
        row.update(_metric_columns(record, "test"))
    row.update({key: parent.get(key, record.get(key)) for key in _RUN_KEYS})
    return row


def _checks(records: list[tuple[dict, Path | None]]) -> list[str]:
    """One "check" text per record: its folder's `output_problems`, and a note when the same
    notebook comes from several runs (rows that would otherwise look alike)."""
    runs_of: dict[Any, set] = {}
    for record, _ in records:
        runs_of.setdefault(record.get("notebook"), set()).add(record.get("run_id") or id(record))
    checks = []
    for record, folder in records:
        problems = output_problems(folder, record) if folder is not None else []
        if len(runs_of[record.get("notebook")]) > 1:
            problems.append(f"{len(runs_of[record.get('notebook')])} runs of this notebook in the table")
        checks.append("; ".join(problems) or "ok")
    return checks


def results_table(paths_or_dicts: str | Path | dict | Sequence[str | Path | dict], *, include_main: bool = False,
                  headline: bool = False):
    """One row per model/run from several metrics.json files (paths, folders or dicts).

    A file with a "runs" list contributes one row per run (named by its "name", "run" or
    "strategy" key); with `include_main=True` its top-level block is added as well, with
    `headline=True` only its top-level block (one row per file: the course table of notebook 07).
    Columns: notebook, profile, dataset, model, pretrained, image_size, weights (`weights_label`), run, threshold, then
    val_* and test_* metrics with *_lo/*_hi 95% intervals and *_recall_<class> columns, then the
    run the row comes from (run_id, started_at) and "check": "ok", or why the row's outputs may
    mix runs (`output_problems`; several runs of one notebook in the same table).
    """
    items = [paths_or_dicts] if isinstance(paths_or_dicts, (str, Path, dict)) else list(paths_or_dicts)
    loaded = [_load_metrics(item) for item in items]
    rows = []
    for (record, _), check in zip(loaded, _checks(loaded)):
        runs = [] if headline else record.get("runs") or []
        if include_main or not runs:
            rows.append({**_row(record, {}, None), "check": check})
        for i, run in enumerate(runs):
            name = run.get("name") or run.get("run") or run.get("strategy") or run.get("model") or f"run{i}"
            rows.append({**_row(run, record, str(name)), "check": check})
    return pd.DataFrame(rows)
