"""Run profiles (smoke / cpu / full), one run's identity, and where each notebook writes its results.

A notebook's `parameters` cell sets `PROFILE`; the next cell calls `start_run`, which fills in image
size, epochs, batch size, subset size, whether to load pretrained weights and how many bootstrap
resamples the 95% intervals take. Any single knob can still be overridden (pass it explicitly;
`None` means "use the profile's value"). This module is the one home of the profiles, of the
output paths (`assets/<notebook>/metrics.json`) and of the rule that tells whether a metrics.json
belongs to a given run (`coursebuild` reads them from here). It imports torch only inside
`start_run`, so the course builder can read profiles and paths without it.
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
# What a number from each profile does and does not mean (the results tables and the website).
PROFILE_NOTES: dict[str, str] = {
    "smoke": ("smoke profile: synthetic data (unless a data folder was given), tiny images, one short "
              "epoch, random initialisation. These numbers only show that the code runs; they say "
              "nothing about the real task."),
    "cpu": ("cpu profile: real data at about 128 px, a few epochs, on a laptop-sized budget. "
            "Numbers show trends, not what the full recipe reaches."),
    "full": ("full profile: the Kaggle T4 recipe (224 px, ImageNet weights where they could be "
             "downloaded, full epoch counts). Check the pretrained column: a run without ImageNet "
             "weights is not the intended recipe."),
}
# Seconds one notebook may take in `python -m coursebuild.run_all` (its --timeout default).
PROFILE_TIMEOUT_S: dict[str, int] = {"smoke": 900, "cpu": 3 * 3600, "full": 12 * 3600}
METRICS_FILE = "metrics.json"
PREVIOUS_RUN_DIR = ".previous_run"  # where start_run moves an earlier run's outputs


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
            if name == "max_per_class" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name.upper()} must be a positive whole number, got {value!r} "
                                 f"(profile {self.profile!r}); set {name.upper()} = None to use the "
                                 "profile's value.")
        if isinstance(self.n_bootstrap, bool) or not isinstance(self.n_bootstrap, numbers.Integral) \
                or self.n_bootstrap < 0:
            raise ValueError(f"N_BOOTSTRAP must be a whole number >= 0, got {self.n_bootstrap!r}; set it to "
                             "None to use the profile's value (0 gives no intervals).")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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
    """The course folder (holding `helpers/`, `notebooks/`, `assets/`).

    In a checkout (`uv sync` installs `helpers` editable) that is the parent of `helpers/`. When
    `helpers` was pip-installed into site-packages (Kaggle), it is the current working directory.
    """
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").exists() else Path.cwd()


def portable_data_dir(data_dir: str | Path | Mapping | None) -> str | dict | None:
    """How metrics.json names a data folder: never an absolute path of the machine it ran on.

    `None` and `"synthetic"` stay as they are; a Kaggle location becomes `kaggle:<owner>/<slug>/...`
    (attached under /kaggle/input, or in the kagglehub download cache); any other folder becomes a
    path relative to the course folder (for example `../shared/data/chest_xray_pneumonia_224`).
    A mapping (one folder per dataset, as in notebook 00) is converted value by value.
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


def assets_dir(notebook_stem: str, output_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Where a notebook writes its figures and metrics.json: `output_dir`, else `<root>/assets/<stem>`.

    `root` is the course folder (default `project_root()`); nothing is created.
    """
    if output_dir is not None and str(output_dir) != "":
        return Path(output_dir)
    return Path(root if root is not None else project_root()) / "assets" / notebook_stem


def metrics_path(notebook_stem: str, output_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """The metrics.json of a notebook (see `assets_dir`)."""
    return assets_dir(notebook_stem, output_dir, root) / METRICS_FILE


def output_dir_for(notebook_stem: str, output_dir: str | Path | None = None) -> Path:
    """Folder for a notebook's figures and metrics.json: `assets/<stem>` unless given; created."""
    path = assets_dir(notebook_stem, output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _started(record: Mapping) -> dt.datetime | None:
    try:
        stamp = dt.datetime.fromisoformat(str(record.get("started_at")))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)


def read_fresh_metrics(path: str | Path, since: dt.datetime, profile: str | None = None) -> dict | None:
    """The metrics.json at `path` if a run that started at `since` or later wrote it, else None.

    The rule, in one place: the file's `started_at` (its run's start) is not older than `since`
    (one second of slack); a file without `started_at` (written before run ids) counts by its
    modification time. With `profile`, a file of another profile does not count either.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    started = _started(record)
    when = started.timestamp() if started else path.stat().st_mtime
    if when < since.timestamp() - 1.0:
        return None  # left from an earlier run
    if profile is not None and record.get("profile", profile) != profile:
        return None
    return record


def retire_previous_outputs(out_dir: Path) -> list[str]:
    """Move an earlier run's metrics.json and figures (every *.png, and whatever its metrics.json
    lists under "figures") into `out_dir/.previous_run/`, replacing what an even earlier run left
    there; return the moved names. Afterwards the folder holds only what this run writes, so a run
    that stops half-way never leaves new figures beside old metrics.
    """
    old = out_dir / METRICS_FILE
    names = {p.name for p in out_dir.glob("*.png") if p.is_file()}
    try:
        listed = json.loads(old.read_text()).get("figures") or [] if old.is_file() else []
    except (OSError, ValueError, AttributeError):
        listed = []
    names |= {str(n) for n in listed if isinstance(n, str) and (out_dir / n).is_file()}
    names |= {METRICS_FILE} if old.is_file() else set()
    if not names:
        return []
    previous = out_dir / PREVIOUS_RUN_DIR
    shutil.rmtree(previous, ignore_errors=True)
    for name in sorted(names):
        (previous / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / name, previous / name)
    return sorted(names)


def _writable_output_dir(notebook: str, output_dir: str | Path | None) -> Path:
    """`output_dir_for`, checked now (a probe file) rather than after training."""
    where = assets_dir(notebook, output_dir)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
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


@dataclass(frozen=True)
class Run:
    """Everything a notebook needs to know about this run, resolved once.

    `run_id` and `started_at` name this run in its metrics.json, so that outputs of two runs are
    never taken for one; `metrics_path` is where `reporting.write_metrics` writes.
    """

    notebook: str
    cfg: Config
    data_dir: str | None
    out_dir: Path
    device: torch.device
    seed: int
    run_id: str = field(default_factory=lambda: new_run_id())
    started_at: str = field(default_factory=lambda: now_iso())

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def n_bootstrap(self) -> int:
        """Bootstrap resamples for the 95% intervals (the profile's `n_bootstrap`)."""
        return self.cfg.n_bootstrap

    def context(self) -> dict:
        """The run fields of metrics.json (see `helpers.reporting.write_metrics`)."""
        return dict(notebook=self.notebook, profile=self.cfg.profile, data_dir=self.data_dir,
                    image_size=self.cfg.image_size, device=str(self.device))


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A short id unique to one run: UTC start time plus 6 random hex digits (20261202T0612Z-a3f9c1)."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%MZ}-{secrets.token_hex(3)}"


def start_run(notebook: str, profile: str, *, data_dir: str | None = None, seed: int = 42,
              output_dir: str | None = None, recipe_epochs: int | None = None,
              **overrides) -> Run:
    """Check the parameters, seed everything, pick the device, prepare the output folder.

    Everything that could fail late fails here: the profile's knobs, `seed`, and whether the
    output folder can be written. An earlier run's metrics.json and figures in that folder are
    moved to `.previous_run/` (`retire_previous_outputs`). The smoke profile uses synthetic data
    unless `data_dir` is given. Prints one line saying what this run is.
    """
    from helpers.core import pick_device, seed_everything  # imports torch

    cfg = apply_profile(profile, recipe_epochs=recipe_epochs, **overrides)
    seed = _check_seed(seed)
    out_dir = _writable_output_dir(notebook, output_dir)
    if data_dir is None and profile == "smoke":
        data_dir = "synthetic"
    seed_everything(seed)
    device = pick_device()
    run = Run(notebook, cfg, None if data_dir is None else str(data_dir), out_dir, device, seed)
    moved = retire_previous_outputs(out_dir)
    print(f"{notebook}: profile {cfg.profile!r} | data {data_dir or 'auto (locate/download)'} | "
          f"{cfg.image_size} px | {cfg.epochs} epoch(s) | batch {cfg.batch_size} | "
          f"max/class {cfg.max_per_class or 'all'} | pretrained requested: {cfg.pretrained} | "
          f"device {device} | outputs -> {run.out_dir} | run {run.run_id}")
    if moved:
        print(f"  an earlier run's {len(moved)} output file(s) moved to {out_dir / PREVIOUS_RUN_DIR}")
    return run
