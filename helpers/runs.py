"""One notebook run: its profile, its output folder, and what it saves there.

A notebook's `parameters` cell sets `PROFILE`; the next cell calls `start_run`, which fills in image
size, epochs, batch size, subset size, whether to load pretrained weights and how many bootstrap
resamples the 95% intervals take (`None` for a knob means "use the profile's value"). At the end the
notebook saves what it measured: `save_predictions` (one CSV per split, one row per image) and
`save_metrics` (metrics.json, in the schema of CONTRIBUTING.md). Reading those files back (results
tables, freshness checks) is the course builder's job (`coursebuild.records`). torch is imported
only inside functions, so the builder can read profiles and paths without it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

PROFILES: dict[str, dict] = {
    # Offline, 2 CPU cores, about a minute per notebook: proves the code runs, says nothing
    # about the real task.
    "smoke": dict(image_size=64, epochs=1, batch_size=16, max_per_class=24, pretrained=False,
                  amp=False, num_workers=0, n_bootstrap=200),
    # Real data on a laptop: minutes, not hours.
    "cpu": dict(image_size=128, epochs=3, batch_size=32, max_per_class=300, pretrained=True,
                amp=False, num_workers=2, n_bootstrap=1000),
    # The Kaggle T4 recipe.
    "full": dict(image_size=224, epochs=None, batch_size=32, max_per_class=None, pretrained=True,
                 amp=True, num_workers=2, n_bootstrap=1000),
}
METRICS_FILE = "metrics.json"
PREDICTIONS_PATTERN = "*_predictions.csv"  # save_predictions: <split>_predictions.csv
PREVIOUS_RUN_DIR = ".previous_run"  # where start_run moves an earlier run's outputs
OUTPUTS_FILE = ".course_outputs.json"  # the run's own outputs: the only files a later run may move
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".webp", ".gif"}


@dataclass(frozen=True)
class Config:
    """The resolved settings of one notebook run."""

    profile: str
    image_size: int
    epochs: int
    batch_size: int
    max_per_class: int | None
    pretrained: bool
    amp: bool
    num_workers: int
    n_bootstrap: int  # bootstrap resamples for every 95% interval of this run

    def __post_init__(self) -> None:
        """Refuse sizes that would fail late or train nothing (EPOCHS=0 returns an empty history)."""
        for name in ("image_size", "epochs", "batch_size", "max_per_class"):
            value = getattr(self, name)
            if not (name == "max_per_class" and value is None) and not _whole(value, 1):
                raise ValueError(f"{name.upper()} must be a positive whole number, got {value!r} "
                                 f"(profile {self.profile!r}); set {name.upper()} = None to use the "
                                 "profile's value.")
        if not _whole(self.n_bootstrap, 0):
            raise ValueError(f"N_BOOTSTRAP must be a whole number >= 0, got {self.n_bootstrap!r}; set it to "
                             "None to use the profile's value (0 gives no intervals).")


def _whole(value: Any, least: int) -> bool:
    """Is `value` a whole number (not a bool) of at least `least`?"""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def apply_profile(profile: str, *, recipe_epochs: int | None = None, **overrides) -> Config:
    """Resolve a profile name into a `Config`.

    `recipe_epochs` is the notebook's full-profile epoch count; the smoke and cpu profiles cap it
    (1 and 3 epochs). Keyword overrides replace single values; `None` overrides are ignored.
    """
    if profile not in PROFILES:
        raise ValueError(
            f"Unknown PROFILE {profile!r}. Use one of: {', '.join(PROFILES)} "
            "('smoke' = synthetic data, seconds on a CPU; 'cpu' = real data, minutes; "
            "'full' = the Kaggle GPU recipe; CONTRIBUTING.md, 'Profiles')."
        )
    values = dict(PROFILES[profile])
    if values["epochs"] is None:
        values["epochs"] = recipe_epochs if recipe_epochs is not None else 10
    elif recipe_epochs is not None:
        values["epochs"] = min(values["epochs"], recipe_epochs)
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"Unknown setting(s) {sorted(unknown)}; known: {sorted(values)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(profile=profile, **values)


def project_root() -> Path:
    """The course folder (holding `helpers/`, `notebooks/`, `assets/`): the parent of `helpers/` in
    a checkout, the working directory where `helpers` was pip-installed (Kaggle)."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").exists() else Path.cwd()


def _cannot_write(folder: Path) -> OSError | None:
    """None when a file can be created in `folder` (created if missing), else the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error
    return None


def output_root() -> Path:
    """Where runs write (assets/<notebook>, generated data in data/synthetic): the course folder,
    or, when it is read-only (a course attached as a Kaggle dataset under /kaggle/input), the working
    directory (/kaggle/working), else a folder in the temporary directory."""
    for folder in (project_root(), Path.cwd(), Path(tempfile.gettempdir()) / "course-outputs"):
        if _cannot_write(folder) is None:
            return folder
    return project_root()  # nothing writable: start_run says so


def assets_dir(notebook: str, output_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Where a notebook writes its outputs: `output_dir`, else `<root>/assets/<notebook>` (root:
    `output_root()`); nothing is created."""
    if output_dir is not None and str(output_dir) != "":
        return Path(output_dir)
    return Path(root if root is not None else output_root()) / "assets" / notebook


def portable_data_dir(data_dir: str | Path | Mapping | None) -> str | dict | None:
    """How metrics.json names a data folder: never an absolute path of the machine it ran on.

    `None` and `"synthetic"` stay; a Kaggle location becomes `kaggle:<owner>/<slug>/...`; any other
    folder a path relative to the course folder (`../shared/data/chest_xray_pneumonia_224`). A
    mapping (one folder per dataset, notebook 00) is converted value by value.
    """
    if isinstance(data_dir, Mapping):
        return {str(name): portable_data_dir(folder) for name, folder in data_dir.items()}
    if data_dir is None or str(data_dir) == "synthetic":
        return None if data_dir is None else str(data_dir)
    if not Path(data_dir).is_absolute():
        if not Path(data_dir).exists():
            return str(data_dir)
        data_dir = Path(data_dir).resolve()  # relative to the working directory (notebooks/)
    parts = Path(data_dir).parts
    if "kagglehub" in parts and "datasets" in parts:  # ~/.cache/kagglehub/datasets/o/s/versions/N/...
        rest = parts[parts.index("datasets") + 1:]
        rest = rest[:2] + rest[4:] if len(rest) > 3 and rest[2] == "versions" else rest
        return "kaggle:" + "/".join(rest)
    if parts[:3] == ("/", "kaggle", "input"):
        rest = parts[3:]
        return "kaggle:" + "/".join(rest[1:] if rest[:1] == ("datasets",) else rest)
    return Path(os.path.relpath(data_dir, project_root())).as_posix()


def _own_name(folder: Path, name: Any) -> bool:
    """Is `name` a plain relative path of a file inside `folder` (never `..`, never absolute)?"""
    return (isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts
            and (folder / name).is_file())


def recorded_outputs(folder: str | Path) -> dict[str, Any]:
    """{"run_id", "files"}: the outputs a run recorded in `folder` (its OUTPUTS_FILE). A folder written
    before that file existed: its metrics.json and the figures it lists. Only these may ever be moved."""
    folder = Path(folder)
    for name in (OUTPUTS_FILE, METRICS_FILE):
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        files = record.get("files") if name == OUTPUTS_FILE else [METRICS_FILE, *(record.get("figures") or [])]
        own = sorted({str(n) for n in files or [] if _own_name(folder, n)})
        return {"run_id": record.get("run_id"), "files": own}
    return {"run_id": None, "files": []}


def record_outputs(out_dir: str | Path, run_id: str, names: Sequence[str]) -> None:
    """Add `names` (files in `out_dir`) to the outputs run `run_id` recorded there (OUTPUTS_FILE)."""
    out_dir = Path(out_dir)
    record = recorded_outputs(out_dir) if (out_dir / OUTPUTS_FILE).is_file() else {"run_id": run_id, "files": []}
    if record.get("run_id") != run_id:
        record = {"run_id": run_id, "files": []}
    record["files"] = sorted({*record["files"], *(str(n) for n in names)})
    temporary = out_dir / f".{OUTPUTS_FILE}.{secrets.token_hex(3)}.tmp"
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, out_dir / OUTPUTS_FILE)


def retire_previous_outputs(out_dir: Path) -> list[str]:
    """Move the outputs an earlier run recorded in `out_dir` (`recorded_outputs`) into
    `out_dir/.previous_run/`, replacing the ones an even earlier run was moved there; return the moved
    names. Files the course did not record as its own (a user's pictures, notes) are never moved."""
    earlier = recorded_outputs(out_dir)
    names, previous = earlier["files"], out_dir / PREVIOUS_RUN_DIR
    if not names:
        return []
    for name in recorded_outputs(previous)["files"] + [OUTPUTS_FILE]:
        (previous / name).unlink(missing_ok=True)
    for name in names:
        (previous / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / name, previous / name)
    (previous / OUTPUTS_FILE).write_text(json.dumps({**earlier, "files": names}, indent=1) + "\n")
    (out_dir / OUTPUTS_FILE).unlink(missing_ok=True)
    return names


def _holds_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    except OSError:
        return False


def dataset_folder_around(folder: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The dataset folder that `folder` lies in, or None: `data_dir` itself, or a split folder
    (train/, val/, test/...) holding class folders of images, or a class folder in one."""
    folder = Path(folder).resolve()
    if data_dir is not None and str(data_dir) != "synthetic" and Path(data_dir).is_dir():
        if folder.is_relative_to(Path(data_dir).resolve()):
            return Path(data_dir)
    for place in (folder, *folder.parents):
        if place.name.lower() in SPLIT_NAMES and place.is_dir() and any(
                child.is_dir() and _holds_images(child) for child in place.iterdir()):
            return place
        if place.parent.name.lower() in SPLIT_NAMES and _holds_images(place):
            return place.parent
    return None


def _writable_output_dir(notebook: str, output_dir: str | Path | None, data_dir: str | None = None) -> Path:
    """The output folder, created and checked now (a probe file) rather than after training; never a
    folder inside a dataset (a figure saved there would be trained on as an image)."""
    where = assets_dir(notebook, output_dir)
    if (dataset := dataset_folder_around(where, data_dir)) is not None:
        raise ValueError(
            f"OUTPUT_DIR {str(where)!r} lies inside the dataset folder {str(dataset)!r}: the figures saved there "
            "would be read as images of the dataset by the next run. Set OUTPUT_DIR to a folder outside the "
            "data (None: assets/<notebook>), then run this cell again.")
    if (error := _cannot_write(where)) is not None:
        raise PermissionError(
            f"OUTPUT_DIR {str(where)!r} cannot be written to ({type(error).__name__}: {error.strerror or error}). "
            "Set OUTPUT_DIR to a folder you may write to (None: assets/<notebook>), or fix its "
            "permissions, then run this cell again.") from None
    return where


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"SEED must be a whole number, got {seed!r}: set SEED = 42 (any whole number; "
                         "the same number repeats the same run, a different one shows the spread).")
    return int(seed)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A short id unique to one run: UTC start time plus 6 random hex digits (20261202T0612Z-a3f9c1)."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%MZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Run:
    """Everything a notebook needs to know about this run, resolved once. `run_id` and `started_at`
    name it in its metrics.json, so that outputs of two runs are never taken for one."""

    notebook: str
    cfg: Config
    data_dir: str | None
    out_dir: Path
    device: torch.device
    seed: int
    run_id: str = field(default_factory=new_run_id)
    started_at: str = field(default_factory=now_iso)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def n_bootstrap(self) -> int:
        """Bootstrap resamples for the 95% intervals (the profile's `n_bootstrap`)."""
        return self.cfg.n_bootstrap


def start_run(notebook: str, profile: str, *, data_dir: str | None = None, seed: int = 42,
              output_dir: str | None = None, recipe_epochs: int | None = None, **overrides) -> Run:
    """Check the parameters, seed everything, pick the device, prepare the output folder.

    What could fail late fails here: the profile's knobs, `seed`, a folder that cannot be written or
    lies inside a dataset. The outputs an earlier run recorded in that folder move to `.previous_run/`
    (nothing else there is touched); this run records its own in OUTPUTS_FILE. The smoke profile uses
    synthetic data unless `data_dir` is given. Prints one line saying what this run is.
    """
    from helpers.core import pick_device, seed_everything  # imports torch

    cfg = apply_profile(profile, recipe_epochs=recipe_epochs, **overrides)
    seed = _check_seed(seed)
    out_dir = _writable_output_dir(notebook, output_dir, data_dir)
    if data_dir is None and profile == "smoke":
        data_dir = "synthetic"
    seed_everything(seed)
    device = pick_device()
    run = Run(notebook, cfg, None if data_dir is None else str(data_dir), out_dir, device, seed)
    moved = retire_previous_outputs(out_dir)
    record_outputs(out_dir, run.run_id, [])
    if output_root() != project_root():
        print(f"The course folder {project_root()} is read-only: outputs and generated data go to "
              f"{output_root()} instead.")
    print(f"{notebook}: profile {cfg.profile!r} | data {data_dir or 'auto (locate/download)'} | "
          f"{cfg.image_size} px | {cfg.epochs} epoch(s) | batch {cfg.batch_size} | "
          f"max/class {cfg.max_per_class or 'all'} | pretrained requested: {cfg.pretrained} | "
          f"device {device} | outputs -> {run.out_dir} | run {run.run_id}")
    if moved:
        print(f"  an earlier run's {len(moved)} output file(s) moved to {out_dir / PREVIOUS_RUN_DIR}")
    return run


def _relative_image(path: Any, roots: Sequence[Path]) -> str:
    """`path` relative to the first of `roots` that holds it (posix), else as it is; a name that is
    not UTF-8 shows its bytes as \\x escapes (as `scan.display_path`)."""
    absolute = Path(path).resolve()
    relative = next((absolute.relative_to(r).as_posix() for r in roots if absolute.is_relative_to(r)), path)
    return os.fsencode(str(relative)).decode("utf-8", "backslashreplace")


def save_predictions(run: Run, split: str, frame: pd.DataFrame, y_true: Any, probs: Any,
                     class_names: Sequence[str], *, root: str | Path | None = None) -> Path:
    """Write `<out_dir>/<split>_predictions.csv`, one row per image of `frame` (a split of
    `data.DataSplits`): image (relative to `root`, else to DATA_DIR, else to the course folder),
    label (the true class name), y_true (its index), prob_<class> for every class. A one-logit
    binary run (`probs` of shape (n,) or (n, 1): the probability of class 1) still gets one
    column per class."""
    from helpers.core import to_numpy

    y = np.asarray(to_numpy(y_true), dtype=int).reshape(-1)
    p = np.asarray(to_numpy(probs), dtype=float)
    names = [str(n) for n in class_names]
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1 and len(names) == 2):
        p = p.reshape(-1)
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probs has shape {p.shape}: expected one column per class ({len(names)}: {names}).")
    if not len(frame) == len(y) == len(p):
        raise ValueError(f"{split}: {len(frame)} images, {len(y)} labels and {len(p)} rows of probabilities "
                         "differ: pass the frame, labels and probabilities of the same split, in one order.")
    folders = [root] if root is not None else []
    folders += [run.data_dir] if run.data_dir is not None and Path(run.data_dir).is_dir() else []
    roots = [Path(f).resolve() for f in folders]
    table = pd.DataFrame({"image": [_relative_image(x, roots + [project_root()]) for x in frame["path"]],
                          "label": [names[i] for i in y], "y_true": y})
    for j, name in enumerate(names):
        table[f"prob_{name}"] = p[:, j]
    path = run.out_dir / f"{split}_predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{run.run_id}.tmp")
    table.to_csv(temporary, index=False)
    os.replace(temporary, path)
    record_outputs(run.out_dir, run.run_id, [path.name])
    return path


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy/torch values, Paths and tuples to plain JSON types; NaN/inf -> None."""
    import torch

    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "to_dict"):  # pandas objects
        return to_jsonable(value.to_dict())
    return str(value)  # Paths, devices, dtypes


def _data_dir(run: Run, splits: Any) -> Any:
    """The data folder(s) a run read: `splits.root`, one per dataset for a mapping of splits
    (notebook 00), else the run's DATA_DIR."""
    if isinstance(splits, Mapping):
        return {str(name): s.root for name, s in splits.items()}
    return run.data_dir if splits is None else splits.root


WEIGHTS_KEYS = ("source", "file", "sha256", "padding", "input_mean", "input_std", "agreement", "batchnorm")


def weights_label(block: dict | None, pretrained: bool | None = None) -> str:
    """A few words for a table or a figure: "ImageNet (TFLite, converted)", "torchvision ImageNet",
    "random"... from a `weights` block of metrics.json (or `pretrained` when there is none)."""
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


def _model_fields(model: Any, pretrained: bool | None, weights: dict | None) -> tuple[Any, Any, Any]:
    """(name, pretrained, weights block): a model built by `models.build_model` gives all three;
    the weights block keeps where the weights came from and the input normalisation they need."""
    import torch

    if isinstance(model, torch.nn.Module):
        pretrained = getattr(model, "pretrained", None) if pretrained is None else pretrained
        weights = weights or getattr(model, "weights_info", None)
        model = getattr(model, "arch", type(model).__name__)
    return model, pretrained, {k: weights.get(k) for k in WEIGHTS_KEYS if k in weights} if weights else None


def figure_stamp(run: Run, splits: Any = None, model: Any = None, weights: dict | None = None) -> str:
    """"profile cpu | data <folder> | weights ImageNet (TFLite, converted)": the footer of a run's
    figures (`plots.set_stamp`), so a figure can be told apart from another run's."""
    data = portable_data_dir(_data_dir(run, splits))
    folders = data.values() if isinstance(data, Mapping) else [data]
    parts = [f"profile {run.cfg.profile}", "data " + ", ".join(Path(str(f)).name for f in folders)]
    if model is not None or weights is not None:
        _, pretrained, block = _model_fields(model, None, weights)
        parts.append(f"weights {weights_label(block, pretrained) or 'unknown'}")
    return " | ".join(parts)


def metrics_record(run: Run, splits: Any, *, dataset: str, model: Any, pretrained: bool | None = None,
                   weights: dict | None = None, class_names: Sequence[str] | None = None,
                   threshold: float | None = None, val: dict | None = None, test: dict | None = None,
                   timing: dict | None = None, figures: Sequence[str] = (), runs: list[dict] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """This run's metrics.json as a dict (schema: CONTRIBUTING.md, "metrics.json"). `splits`: a
    `data.DataSplits`, a mapping of them, or None; `model`: a name or the model built by
    `models.build_model`; `figures`: the files saved beside it; `extra` keys come last and may
    replace a schema key (notebook 00 gives `image_size=None`)."""
    model, pretrained, weights = _model_fields(model, pretrained, weights)
    if class_names is None:
        class_names = getattr(splits, "class_names", [])
    record: dict[str, Any] = {
        "notebook": run.notebook, "profile": run.cfg.profile, "dataset": dataset,
        "data_dir": portable_data_dir(_data_dir(run, splits)), "model": model, "pretrained": pretrained,
        "image_size": run.cfg.image_size, "class_names": list(class_names), "threshold": threshold,
        "val": val, "test": test, "timing": timing, "device": str(run.device),
    }
    if weights is not None:
        record["weights"] = weights
    if runs is not None:
        record["runs"] = runs
    record.update(extra)
    record.update(figures=list(figures), run_id=run.run_id, started_at=run.started_at, written_at=now_iso(),
                  n_bootstrap=run.cfg.n_bootstrap)
    return to_jsonable(record)


def save_metrics(run: Run, splits: Any, *, dataset: str, model: Any, **fields: Any) -> dict[str, Any]:
    """Write `run.metrics_path` (`metrics_record` of the same arguments) and return the dict: last,
    and atomically (a temporary file, then `os.replace`), so a reader never sees half a file."""
    record = metrics_record(run, splits, dataset=dataset, model=model, **fields)
    path = run.metrics_path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{run.run_id}.tmp")
    temporary.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)
    record_outputs(run.out_dir, run.run_id, [METRICS_FILE] + [f for f in record["figures"] if _own_name(run.out_dir, f)])
    return record
