"""Run profiles (smoke / cpu / full) and where each notebook writes its results.

A notebook's `parameters` cell sets `PROFILE`; the next cell calls `apply_profile`, which fills
in image size, epochs, batch size, subset size and whether to load pretrained weights. Any single
knob can still be overridden (pass it explicitly; `None` means "use the profile's value").
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.core import pick_device, seed_everything

PROFILES: dict[str, dict] = {
    # Offline, 2 CPU cores, about a minute per notebook: proves the code runs, says nothing
    # about the real task.
    "smoke": dict(image_size=64, epochs=1, batch_size=16, max_per_class=24, pretrained=False,
                  amp=False, num_workers=0),
    # Real data on a laptop: minutes, not hours.
    "cpu": dict(image_size=128, epochs=3, batch_size=32, max_per_class=300, pretrained=True,
                amp=False, num_workers=2),
    # The Kaggle T4 recipe.
    "full": dict(image_size=224, epochs=None, batch_size=32, max_per_class=None, pretrained=True,
                 amp=True, num_workers=2),
}


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
            "'full' = the Kaggle GPU recipe)."
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


def output_dir_for(notebook_stem: str, output_dir: str | Path | None = None) -> Path:
    """Folder for a notebook's figures and metrics.json: `assets/<stem>` unless given; created."""
    path = Path(output_dir) if output_dir is not None else project_root() / "assets" / notebook_stem
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Run:
    """Everything a notebook needs to know about this run, resolved once."""

    notebook: str
    cfg: Config
    data_dir: str | None
    out_dir: Path
    device: torch.device
    seed: int

    def context(self) -> dict:
        """The run fields of metrics.json (see `helpers.reporting.write_metrics`)."""
        return dict(notebook=self.notebook, profile=self.cfg.profile, data_dir=self.data_dir,
                    image_size=self.cfg.image_size, device=str(self.device))


def start_run(notebook: str, profile: str, *, data_dir: str | None = None, seed: int = 42,
              output_dir: str | None = None, recipe_epochs: int | None = None,
              **overrides) -> Run:
    """Apply the profile, seed everything, pick the device, make the assets folder.

    The smoke profile uses synthetic data unless `data_dir` is given. Prints one line saying
    what this run is, so every figure below can be read with it in mind.
    """
    cfg = apply_profile(profile, recipe_epochs=recipe_epochs, **overrides)
    if data_dir is None and profile == "smoke":
        data_dir = "synthetic"
    seed_everything(seed)
    device = pick_device()
    run = Run(notebook, cfg, None if data_dir is None else str(data_dir),
              output_dir_for(notebook, output_dir), device, seed)
    print(f"{notebook}: profile {cfg.profile!r} | data {data_dir or 'auto (locate/download)'} | "
          f"{cfg.image_size} px | {cfg.epochs} epoch(s) | batch {cfg.batch_size} | "
          f"max/class {cfg.max_per_class or 'all'} | pretrained requested: {cfg.pretrained} | "
          f"device {device} | outputs -> {run.out_dir}")
    return run
