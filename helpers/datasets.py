"""The course's datasets (`DATASETS`), and where to find a copy of one (`locate_dataset`); a folder that holds
another dataset is refused (`WrongDatasetError`). What is inside (images, patients, splits) is `helpers.data`'s."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from helpers.images import display_path
from helpers.runs import project_root

IGNORED_DIRS = {"__MACOSX", ".ipynb_checkpoints"}
KAGGLE_INPUT = Path("/kaggle/input")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def split_of(folder: str) -> str | None:
    """The split ("train", "val", "test") a folder name means (`Train`, `training_set`, `Val-Images`), or None."""
    key = re.sub(r"[^a-z]", "", folder.lower())
    return SPLIT_ALIASES.get(re.sub(r"(set|data|images?)$", "", key) or key)


@dataclass(frozen=True)
class DatasetSpec:
    """What the course knows about one dataset."""

    name: str
    handle: str  # Kaggle handle for kagglehub.dataset_download
    class_names: tuple[str, ...]  # canonical class order; binary: positive class last
    aliases: dict[str, str] = field(default_factory=dict)  # folder name -> canonical class

    def canonical_class(self, folder: str) -> str | None:
        """Map a class folder name to a canonical class name (case-insensitive), or None."""
        lookup = {c.lower(): c for c in self.class_names}
        lookup.update({k.lower(): v for k, v in self.aliases.items()})
        return lookup.get(folder.lower())


# pneumonia: pediatric chest X-rays, Guangzhou (Kermany et al. 2018), CC BY 4.0. chest4: chest X-rays in 4 classes
# pooled from several sources (the TB folder really is spelled TURBERCULOSIS). fundus: retinal fundus photographs,
# diabetic retinopathy (DR) vs no DR; any folder of disease/ and normal/ class folders works too.
DATASETS: dict[str, DatasetSpec] = {
    "pneumonia": DatasetSpec("pneumonia", "paultimothymooney/chest-xray-pneumonia", ("NORMAL", "PNEUMONIA")),
    "chest4": DatasetSpec("chest4", "jtiptj/chest-xray-pneumoniacovid19tuberculosis",
                          ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"),
                          aliases={"TUBERCULOSIS": "TURBERCULOSIS", "COVID-19": "COVID19", "COVID": "COVID19"}),
    "fundus": DatasetSpec("fundus", "pkdarabi/diagnosis-of-diabetic-retinopathy", ("normal", "disease"),
                          aliases={"No_DR": "normal", "DR": "disease"}),
}


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a dataset could be found or downloaded."""


class WrongDatasetError(DatasetNotFoundError):
    """A folder holds another dataset (or a mixture) than the one asked for."""


def get_spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` of a dataset name, or a ValueError listing the known names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


def visible_folders(folder: Path) -> list[Path]:
    """Sub-folders (and broken links, which the scan reports) that are not hidden nor `__MACOSX`; none
    when `folder` is no folder or cannot be read (the scan reports that)."""
    try:
        found = [d for d in folder.iterdir() if d.is_dir() or (d.is_symlink() and not d.exists())] if folder.is_dir() else []
    except OSError:
        return []
    return sorted(d for d in found if d.name not in IGNORED_DIRS and not d.name.startswith("."))


def one_per_meaning(folders: list[Path], meaning: Callable[[str], str | None], what: str) -> dict[str, Path]:
    """{meaning: folder}; two folders with the same meaning are an error naming both."""
    found: dict[str, Path] = {}
    for d in folders:
        if (key := meaning(d.name)) in found:
            raise ValueError(
                f"Two folders mean the same {what} {key!r}: {display_path(found[key])} and {display_path(d)} "
                "(folder names match without regard to case and spelling). Merge them into one or remove "
                "one, so that no image is silently left out.")
        if key is not None:
            found[key] = d
    return found


def foreign_classes(folder: Path, spec: DatasetSpec) -> str | None:
    """Why the class folders in `folder` belong to another known dataset (the 4-class set offered as
    pneumonia is no superset of it: taking the wanted classes would measure something else), or None."""
    names = [d.name for d in visible_folders(folder)]
    foreign = {n: o.name for n in names if not spec.canonical_class(n)
               for o in DATASETS.values() if o.name != spec.name and o.canonical_class(n)}
    if not foreign:
        return None
    whole = [o for o in DATASETS.values() if o.name != spec.name
             and {o.canonical_class(n) for n in names} >= set(o.class_names)]
    looks = (f"it looks like the {whole[0].name} dataset ({whole[0].handle})" if whole else
             "it mixes in class folder(s) of " + ", ".join(sorted(set(foreign.values()))))
    return (f"{folder} holds class folders {names}, including {sorted(foreign)} which the "
            f"{spec.name} dataset does not have: {looks}, not {spec.name} (class folders "
            f"{list(spec.class_names)}). Point DATA_DIR at the {spec.name} data, or load it as "
            f"{whole[0].name if whole else 'the dataset it is'}.")


def _is_dataset_root(folder: Path, spec: DatasetSpec, rejected: list[str]) -> bool:
    """A root holds a train split with a folder for every class, or those class folders themselves,
    and no class folder of another known dataset (reasons for refusing go to `rejected`)."""
    for parent in [d for d in visible_folders(folder) if split_of(d.name) == "train"] + [folder]:
        if {spec.canonical_class(d.name) for d in visible_folders(parent)} >= set(spec.class_names):
            if (problem := foreign_classes(parent, spec)) is not None:
                rejected.append(problem)
            return problem is None
    return False


def find_dataset_root(folder: str | Path, spec: DatasetSpec, max_depth: int = 4,
                      rejected: list[str] | None = None) -> Path | None:
    """The shallowest folder below `folder` that looks like the dataset (`chest_xray/` over its nested copy
    `chest_xray/chest_xray/`), or None. A folder that holds another dataset's classes, or is a val or test
    split, is refused (reason in `rejected`), not searched."""
    level = [Path(folder)]
    for _ in range(max_depth + 1):
        refused = []
        for candidate in level:
            found: list[str] = []
            if split_of(candidate.name) in ("val", "test") and not any(  # a test/ that holds train/ is a root
                    split_of(d.name) == "train" for d in visible_folders(candidate)):
                found.append(f"{candidate} is a {split_of(candidate.name)} split folder, not a dataset: training "
                             "on it would train (and carve validation and test) on held-out images. If it is "
                             "part of a dataset, point DATA_DIR at the folder above it that holds train/.")
            elif _is_dataset_root(candidate, spec, found):
                return candidate
            if found:
                refused.append(candidate)
                if rejected is not None:
                    rejected.extend(found)
        level = sorted(child for parent in level if parent not in refused for child in visible_folders(parent))
    return None


def _online(host: str = "www.kaggle.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def locate_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True,
                   kaggle_input: str | Path = KAGGLE_INPUT) -> Path:
    """A dataset's root folder: in `data_dir` when given, else under /kaggle/input, else in the local
    cache `data/<name>/`, else downloaded by kagglehub (when online); else a `DatasetNotFoundError`."""
    spec = get_spec(name)
    if data_dir is not None:
        return _locate_in_data_dir(data_dir, spec)
    rejected: list[str] = []
    owner, slug = spec.handle.split("/")
    kaggle_input, local = Path(kaggle_input), project_root() / "data" / name
    named = [kaggle_input / slug, kaggle_input / "datasets" / owner / slug]  # Kaggle's two mount points, then the rest
    others = sorted(p for p in kaggle_input.glob("*") if p.is_dir() and p not in named)
    for candidate in [p for p in named if p.is_dir()] + others + ([local] if local.is_dir() else []):
        if (root := find_dataset_root(candidate, spec, rejected=rejected)) is not None:
            return root
    reason = "download=False" if not download else "no internet connection (www.kaggle.com unreachable)"
    if download and _online():
        import kagglehub

        try:
            if (root := find_dataset_root(kagglehub.dataset_download(spec.handle), spec, rejected=rejected)):
                return root
            reason = "kagglehub downloaded it but the layout was not recognised"
        except Exception as err:  # network errors, auth, quota...
            reason = f"kagglehub failed: {type(err).__name__}: {err}"
    raise DatasetNotFoundError(
        f"Could not find the {name!r} dataset ({spec.handle}); {reason}. Provide it one of four ways:\n"
        f"  1. set DATA_DIR to a folder holding train/ (and optionally val/, test/) with class folders "
        f"{list(spec.class_names)};\n  2. on Kaggle, attach the dataset '{spec.handle}' (Add Input) so it "
        f"appears under /kaggle/input;\n  3. unzip it into {local};\n  4. turn on the internet so "
        f"kagglehub.dataset_download('{spec.handle}') can fetch it.\nOr run offline on generated images "
        "with DATA_DIR = 'synthetic'." + "".join(f"\nRefused: {r}" for r in rejected))


def _locate_in_data_dir(data_dir: str | Path, spec: DatasetSpec) -> Path:
    """The dataset root in DATA_DIR; the working directory is never searched below itself."""
    if not str(data_dir).strip():
        raise ValueError(f"DATA_DIR={str(data_dir)!r} is empty. Use DATA_DIR = None to locate or "
                         "download the data, 'synthetic' for generated images, or a folder path.")
    is_cwd = Path(data_dir).resolve() == Path.cwd().resolve()
    rejected: list[str] = []
    if (root := find_dataset_root(data_dir, spec, max_depth=0 if is_cwd else 4, rejected=rejected)) is not None:
        return root
    if rejected:
        raise WrongDatasetError(f"DATA_DIR={str(data_dir)!r} does not hold the {spec.name} dataset: {rejected[0]}")
    where = (f" is the working directory ({Path.cwd()}), which is not searched below itself: give "
             "the dataset folder itself" if is_cwd else " does not hold the " + spec.name + " dataset")
    raise DatasetNotFoundError(
        f"DATA_DIR={str(data_dir)!r}{where}: expected a train/ folder (optionally val/, test/) with class "
        f"folders {list(spec.class_names)}, or the class folders themselves. Check the path, or set "
        "DATA_DIR = None to locate/download it, or DATA_DIR = 'synthetic' for generated data.")
