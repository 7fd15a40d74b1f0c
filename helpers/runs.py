"""One notebook run: `start_run` resolves the `PROFILE` knobs (`None` = the profile's value) and the output folder;
at the end the notebook calls `save_predictions` (one CSV per split) and `save_metrics` (metrics.json, schema in
CONTRIBUTING.md). Reading them back is `coursebuild.records`' job. torch is imported only inside functions."""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

# smoke: offline, 2 CPU cores, a minute per notebook (proves the code runs, nothing more); cpu: real data on
# a laptop, minutes not hours; full: the Kaggle T4 recipe.
PROFILES: dict[str, dict] = {
    "smoke": dict(image_size=64, epochs=1, batch_size=16, max_per_class=24, pretrained=False,
                  amp=False, num_workers=0, n_bootstrap=200),
    "cpu": dict(image_size=128, epochs=3, batch_size=32, max_per_class=300, pretrained=True,
                amp=False, num_workers=2, n_bootstrap=1000),
    "full": dict(image_size=224, epochs=None, batch_size=32, max_per_class=None, pretrained=True,
                 amp=True, num_workers=2, n_bootstrap=1000),
}
METRICS_FILE = "metrics.json"
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
        """Refuse sizes that would fail late or train nothing."""
        for name in ("image_size", "epochs", "batch_size", "max_per_class"):
            value = getattr(self, name)
            if not (name == "max_per_class" and value is None) and not _whole(value, 1):
                raise ValueError(f"{name.upper()} must be a positive whole number, got {value!r} (profile "
                                 f"{self.profile!r}); set {name.upper()} = None to use the profile's value.")
        if not _whole(self.n_bootstrap, 0):
            raise ValueError(f"N_BOOTSTRAP must be a whole number >= 0, got {self.n_bootstrap!r}; set it to "
                             "None to use the profile's value (0 gives no intervals).")


def _whole(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def apply_profile(profile: str, *, recipe_epochs: int | None = None, **overrides) -> Config:
    """A `Config` for `profile`: smoke/cpu cap `recipe_epochs` (the full recipe's); `None` overrides are ignored."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown PROFILE {profile!r}. Use one of: {', '.join(PROFILES)} ('smoke' = synthetic data, "
                         "seconds on a CPU; 'cpu' = real data, minutes; 'full' = the Kaggle GPU recipe; "
                         "CONTRIBUTING.md, 'Profiles').")
    values = dict(PROFILES[profile])
    if values["epochs"] is None:
        values["epochs"] = recipe_epochs if recipe_epochs is not None else 10
    elif recipe_epochs is not None:
        values["epochs"] = min(values["epochs"], recipe_epochs)
    if unknown := set(overrides) - set(values):
        raise TypeError(f"Unknown setting(s) {sorted(unknown)}; known: {sorted(values)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(profile=profile, **values)


def project_root() -> Path:
    """The course folder: the parent of `helpers/` in a checkout, else (pip-installed) the working directory."""
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
    """Where runs write: the course folder, else (read-only) the working directory, else a temporary folder."""
    for folder in (project_root(), Path.cwd(), Path(tempfile.gettempdir()) / "course-outputs"):
        if _cannot_write(folder) is None:
            return folder
    return project_root()  # nothing writable: start_run says so


def assets_dir(notebook: str, output_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """`output_dir`, else `<root or output_root()>/assets/<notebook>`; nothing is created."""
    if output_dir is not None and str(output_dir) != "":
        return Path(output_dir)
    return Path(root if root is not None else output_root()) / "assets" / notebook


def portable_data_dir(data_dir: str | Path | Mapping | None) -> str | dict | None:
    """How metrics.json names a data folder (never an absolute path): `None`/"synthetic" stay, Kaggle
    becomes `kaggle:<owner>/<slug>/...`, else relative to the course folder; a mapping value by value."""
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
        return "kaggle:" + "/".join(parts[4:] if parts[3:4] == ("datasets",) else parts[3:])
    return Path(os.path.relpath(data_dir, project_root())).as_posix()


def _own_name(folder: Path, name: Any) -> bool:
    return (isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts
            and (folder / name).is_file())


def recorded_outputs(folder: str | Path) -> dict[str, Any]:
    """{"run_id", "files"}: the outputs a run recorded in `folder` (OUTPUTS_FILE, else metrics.json and its figures)."""
    folder = Path(folder)
    for name in (OUTPUTS_FILE, METRICS_FILE):
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            files = record.get("files") if name == OUTPUTS_FILE else [METRICS_FILE, *(record.get("figures") or [])]
            own = sorted({str(n) for n in files or [] if _own_name(folder, n)})
            return {"run_id": record.get("run_id"), "files": own}
    return {"run_id": None, "files": []}


def record_outputs(out_dir: str | Path, run_id: str, names: Sequence[str]) -> None:
    """Add `names` (files in `out_dir`) to the outputs run `run_id` recorded there (OUTPUTS_FILE)."""
    out_dir = Path(out_dir)
    earlier = recorded_outputs(out_dir) if (out_dir / OUTPUTS_FILE).is_file() else {}
    files = {*(earlier["files"] if earlier.get("run_id") == run_id else []), *(str(n) for n in names)}
    _write_atomic(out_dir / OUTPUTS_FILE, json.dumps({"run_id": run_id, "files": sorted(files)}, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file, then rename it to `path`: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def retire_previous_outputs(out_dir: Path) -> None:
    """Move the outputs an earlier run recorded in `out_dir` to `.previous_run/`, replacing those there; files
    the course did not record (a user's notes) are never moved."""
    earlier, previous = recorded_outputs(out_dir), out_dir / PREVIOUS_RUN_DIR
    if not earlier["files"]:
        return
    for name in recorded_outputs(previous)["files"] + [OUTPUTS_FILE]:
        (previous / name).unlink(missing_ok=True)
    for name in earlier["files"]:
        (previous / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / name, previous / name)
    (previous / OUTPUTS_FILE).write_text(json.dumps(earlier, indent=1) + "\n")
    (out_dir / OUTPUTS_FILE).unlink(missing_ok=True)


def _holds_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    except OSError:
        return False


def dataset_folder_around(folder: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The dataset folder `folder` lies in (`data_dir`, or a split folder of class folders of images), or None."""
    folder = Path(folder).resolve()
    if (data_dir is not None and str(data_dir) != "synthetic" and Path(data_dir).is_dir()
            and folder.is_relative_to(Path(data_dir).resolve())):
        return Path(data_dir)
    for place in (folder, *folder.parents):
        if place.name.lower() in SPLIT_NAMES and place.is_dir() and any(
                child.is_dir() and _holds_images(child) for child in place.iterdir()):
            return place
        if place.parent.name.lower() in SPLIT_NAMES and _holds_images(place):
            return place.parent
    return None


def _writable_output_dir(notebook: str, output_dir: str | Path | None, data_dir: str | None = None) -> Path:
    """The output folder, created and probed now (not after training); never inside a dataset."""
    where = assets_dir(notebook, output_dir)
    if (dataset := dataset_folder_around(where, data_dir)) is not None:
        raise ValueError(f"OUTPUT_DIR {str(where)!r} lies inside the dataset folder {str(dataset)!r}: the figures "
                         "saved there would be read as images of the dataset by the next run. Set OUTPUT_DIR to a "
                         "folder outside the data (None: assets/<notebook>), then run this cell again.")
    if (error := _cannot_write(where)) is not None:
        raise PermissionError(f"OUTPUT_DIR {str(where)!r} cannot be written to ({type(error).__name__}: "
                              f"{error.strerror or error}). Set OUTPUT_DIR to a folder you may write to (None: "
                              "assets/<notebook>), or fix its permissions, then run this cell again.") from None
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
    """UTC start time plus 6 random hex digits: 20261202T0612Z-a3f9c1."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%MZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Run:
    """This run, resolved once; `run_id`/`started_at` tell its outputs from another run's."""

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


def start_run(notebook: str, profile: str, *, data_dir: str | None = None, seed: int = 42,
              output_dir: str | None = None, recipe_epochs: int | None = None, **overrides) -> Run:
    """Check the parameters (what could fail late fails here), seed everything, pick the device, prepare the output
    folder (earlier outputs move to `.previous_run/`), say what the run is; smoke without `data_dir`: synthetic data."""
    from helpers.core import pick_device, seed_everything  # imports torch
    from helpers.images import display_path

    cfg = apply_profile(profile, recipe_epochs=recipe_epochs, **overrides)
    seed = _check_seed(seed)
    out_dir = _writable_output_dir(notebook, output_dir, data_dir)
    if data_dir is None and profile == "smoke":
        data_dir = "synthetic"
    seed_everything(seed)
    run = Run(notebook, cfg, None if data_dir is None else str(data_dir), out_dir, device := pick_device(), seed)
    retire_previous_outputs(out_dir)  # silently: the run's own earlier outputs only, never a user's file
    record_outputs(out_dir, run.run_id, [])
    if output_root() != project_root():
        print(f"The course folder {display_path(project_root())} is read-only: outputs and generated data go to "
              f"{display_path(output_root())} instead.")
    data = "auto (locate/download)" if data_dir is None else display_path(data_dir)
    print(f"{notebook}: profile {cfg.profile!r} | data {data} | {cfg.image_size} px | "
          f"{cfg.epochs} epoch(s) | batch {cfg.batch_size} | max/class {cfg.max_per_class or 'all'} | pretrained "
          f"requested: {cfg.pretrained} | device {device} | outputs -> {display_path(run.out_dir)} | "
          f"run {run.run_id}")
    return run


def _relative_image(path: Any, roots: Sequence[Path]) -> str:
    """`path` relative to the first of `roots` holding it (posix); non-UTF-8 bytes as \\x escapes."""
    absolute = Path(path).resolve()
    relative = next((absolute.relative_to(r).as_posix() for r in roots if absolute.is_relative_to(r)), path)
    return os.fsencode(str(relative)).decode("utf-8", "backslashreplace")


def save_predictions(run: Run, split: str, frame: pd.DataFrame, y_true: Any, probs: Any,
                     class_names: Sequence[str], *, root: str | Path | None = None) -> Path:
    """Write `<out_dir>/<split>_predictions.csv`: image (relative to `root`, DATA_DIR or the course folder),
    label, y_true, prob_<class> per class (also for one-logit binary `probs` of shape (n,) or (n, 1))."""
    from helpers.core import to_numpy

    y = np.asarray(to_numpy(y_true), dtype=int).reshape(-1)
    p = np.asarray(to_numpy(probs), dtype=float)
    names = [str(n) for n in class_names]
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1 and len(names) == 2):
        p = np.stack([1.0 - p.reshape(-1), p.reshape(-1)], axis=1)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probs has shape {p.shape}: expected one column per class ({len(names)}: {names}).")
    if not len(frame) == len(y) == len(p):
        raise ValueError(f"{split}: {len(frame)} images, {len(y)} labels and {len(p)} rows of probabilities "
                         "differ: pass the frame, labels and probabilities of the same split, in one order.")
    data_dir = run.data_dir if run.data_dir is not None and Path(run.data_dir).is_dir() else None
    roots = [Path(f).resolve() for f in (root, data_dir) if f is not None] + [project_root()]
    table = pd.DataFrame({"image": [_relative_image(x, roots) for x in frame["path"]],
                          "label": [names[i] for i in y], "y_true": y,
                          **{f"prob_{name}": p[:, j] for j, name in enumerate(names)}})
    path = run.out_dir / f"{split}_predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, table.to_csv(index=False, lineterminator="\n"))  # write_text gives the platform's newlines
    record_outputs(run.out_dir, run.run_id, [path.name])
    return path


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy/torch values, Paths and tuples to plain JSON types; NaN/inf -> None."""
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray, np.bool_, np.number)):
        value = value.tolist()  # numpy scalars too: plain bool, int, float
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "to_dict"):  # pandas objects
        return to_jsonable(value.to_dict())
    return str(value)  # Paths, devices, dtypes


def _data_dir(run: Run, splits: Any) -> Any:
    """The data folder(s) a run read: `splits.root` (one per dataset for a mapping), else DATA_DIR."""
    if isinstance(splits, Mapping):
        return {str(name): s.root for name, s in splits.items()}
    return run.data_dir if splits is None else splits.root


def weights_label(block: dict | str | None, pretrained: bool | None = None) -> str:
    """"ImageNet (TFLite, converted)", "random"... from a metrics.json `weights` block (or already such a label)."""
    if isinstance(block, str):
        return block
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
    """(name, pretrained, weights block), taken from a model built by `models.build_model` when given one."""
    import torch

    if isinstance(model, torch.nn.Module):
        pretrained = getattr(model, "pretrained", None) if pretrained is None else pretrained
        weights = weights or getattr(model, "weights_info", None)
        model = getattr(model, "arch", type(model).__name__)
    keys = ("source", "file", "sha256", "padding", "input_mean", "input_std", "agreement", "batchnorm")
    return model, pretrained, {k: weights[k] for k in keys if k in weights} if weights else None


def figure_stamp(run: Run, splits: Any = None, model: Any = None, weights: dict | None = None) -> str:
    """"profile cpu | data <folder> | weights ImageNet (TFLite, converted)": a figure footer (`plots.set_stamp`)."""
    data = portable_data_dir(_data_dir(run, splits))
    folders = data.values() if isinstance(data, Mapping) else [data]
    parts = [f"profile {run.cfg.profile}", "data " + ", ".join(Path(str(f)).name for f in folders)]
    if model is not None or weights is not None:
        _, pretrained, block = _model_fields(model, None, weights)
        parts.append(f"weights {weights_label(block, pretrained) or 'unknown'}")
    return " | ".join(parts)


def save_metrics(run: Run, splits: Any, *, dataset: str, model: Any, pretrained: bool | None = None,
                 weights: dict | None = None, class_names: Sequence[str] | None = None,
                 threshold: float | None = None, val: dict | None = None, test: dict | None = None,
                 timing: dict | None = None, figures: Sequence[str] = (), runs: list[dict] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Write this run's metrics.json (schema: CONTRIBUTING.md; `extra` keys may replace schema keys) to
    `run.metrics_path` atomically, and return it as a dict."""
    model, pretrained, weights = _model_fields(model, pretrained, weights)
    class_names = getattr(splits, "class_names", []) if class_names is None else class_names
    parts = {split: getattr(splits, split, None) for split in ("train", "val", "test")}  # a `DataSplits`'s frames
    n_images = {split: len(part) for split, part in parts.items() if isinstance(part, Sized)} or None
    record: dict[str, Any] = {
        "notebook": run.notebook, "profile": run.cfg.profile, "dataset": dataset,
        "data_dir": portable_data_dir(_data_dir(run, splits)), "model": model, "pretrained": pretrained,
        "image_size": run.cfg.image_size, "class_names": list(class_names), "threshold": threshold,
        "val": val, "test": test, "timing": timing, "device": str(run.device),
        **{key: value for key, value in (("n_images", n_images), ("weights", weights), ("runs", runs))
           if value is not None}, **extra}
    record = to_jsonable({**record, "figures": list(figures), "run_id": run.run_id, "started_at": run.started_at,
                          "written_at": now_iso(), "n_bootstrap": run.cfg.n_bootstrap})
    run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(run.metrics_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    own_figures = [f for f in record["figures"] if _own_name(run.out_dir, f)]
    record_outputs(run.out_dir, run.run_id, [METRICS_FILE, *own_figures])
    return record
