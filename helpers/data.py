"""Datasets: where they are, what is in them, and how to split them without leaking patients.

The course uses three Kaggle datasets (see `DATASETS`). `load_splits` is the one call a notebook
needs: it finds the data (or writes a synthetic stand-in), scans it into a table, keeps the
provided splits, carves missing validation/test splits out of `train/` grouped by patient, and
optionally caps the number of images per class. Image loading (tensor cache and the per-image
path) lives in `helpers.loading` and is re-exported here.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from helpers.config import project_root
from helpers.loading import (  # noqa: F401  (re-exported for notebooks)
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    ImageFileDataset,
    TensorLoader,
    cache_images,
    denormalize,
    load_image,
    make_loaders,
    normalize,
    pil_transforms,
)
from helpers.synthetic import make_synthetic_dataset  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IGNORED_DIRS = {"__MACOSX", ".ipynb_checkpoints"}
KAGGLE_INPUT = Path("/kaggle/input")
# The official pneumonia val/ holds 16 images (0.3% of train): far too few to select a model.
# A provided val/ under both limits is folded into train and a real one carved instead.
MIN_USEFUL_VAL_IMAGES = 50
MIN_USEFUL_VAL_FRACTION = 0.05


@dataclass(frozen=True)
class DatasetSpec:
    """What the course knows about one dataset."""

    name: str
    handle: str  # Kaggle handle for kagglehub.dataset_download
    class_names: tuple[str, ...]  # canonical class order; binary: positive class last
    aliases: dict[str, str] = field(default_factory=dict)  # folder name -> canonical class
    description: str = ""

    @property
    def slug(self) -> str:
        return self.handle.split("/")[1]

    def canonical_class(self, folder: str) -> str | None:
        """Map a class folder name to a canonical class name (case-insensitive), or None."""
        lookup = {c.lower(): c for c in self.class_names}
        lookup.update({k.lower(): v for k, v in self.aliases.items()})
        return lookup.get(folder.lower())


DATASETS: dict[str, DatasetSpec] = {
    "pneumonia": DatasetSpec(
        "pneumonia", "paultimothymooney/chest-xray-pneumonia", ("NORMAL", "PNEUMONIA"),
        description="Pediatric chest X-rays, Guangzhou (Kermany et al. 2018), CC BY 4.0.",
    ),
    "chest4": DatasetSpec(
        "chest4", "jtiptj/chest-xray-pneumoniacovid19tuberculosis",
        ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"),
        aliases={"TUBERCULOSIS": "TURBERCULOSIS", "COVID-19": "COVID19", "COVID": "COVID19"},
        description="Chest X-rays in 4 classes pooled from several sources (the TB folder "
        "really is spelled TURBERCULOSIS).",
    ),
    "fundus": DatasetSpec(
        "fundus", "pkdarabi/diagnosis-of-diabetic-retinopathy", ("normal", "disease"),
        aliases={"No_DR": "normal", "DR": "disease"},
        description="Retinal fundus photographs, diabetic retinopathy (DR) vs no DR; any folder "
        "of disease/ and normal/ class folders works too.",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a dataset could be found or downloaded."""


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


# ----------------------------------------------------------------------------- locating

def _class_dirs(folder: Path, spec: DatasetSpec) -> list[Path]:
    if not folder.is_dir():
        return []
    return [d for d in folder.iterdir() if d.is_dir() and spec.canonical_class(d.name)]


def _is_dataset_root(folder: Path, spec: DatasetSpec) -> bool:
    """A root holds train/ with a folder for every class, or those class folders themselves."""
    def all_classes(parent: Path) -> bool:
        return {spec.canonical_class(d.name) for d in _class_dirs(parent, spec)} == set(spec.class_names)
    return all_classes(folder / "train") or all_classes(folder)


def find_dataset_root(folder: str | Path, spec: DatasetSpec, max_depth: int = 4) -> Path | None:
    """The shallowest folder below `folder` that looks like the dataset, or None.

    Shallowest first, so the pneumonia archive's nested duplicate `chest_xray/chest_xray/` is
    never picked over `chest_xray/`; `__MACOSX/` is never entered.
    """
    level = [Path(folder)]
    for _ in range(max_depth + 1):
        for candidate in level:
            if _is_dataset_root(candidate, spec):
                return candidate
        level = sorted(
            child for parent in level if parent.is_dir() for child in parent.iterdir()
            if child.is_dir() and child.name not in IGNORED_DIRS and not child.name.startswith(".")
        )
        if not level:
            return None
    return None


def _kaggle_candidates(spec: DatasetSpec, kaggle_input: Path) -> list[Path]:
    owner, slug = spec.handle.split("/")
    named = [kaggle_input / slug, kaggle_input / "datasets" / owner / slug]
    others = sorted(p for p in kaggle_input.glob("*") if p.is_dir()) if kaggle_input.is_dir() else []
    return [p for p in named if p.is_dir()] + [p for p in others if p not in named]


def _online(host: str = "www.kaggle.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def locate_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True,
                   kaggle_input: str | Path = KAGGLE_INPUT) -> Path:
    """Find a dataset's root folder, in the order of the course design.

    1. `data_dir`, when given (searched below for the dataset layout);
    2. an attached Kaggle dataset under /kaggle/input (either mount form);
    3. the local cache `data/<name>/` in the course folder;
    4. `kagglehub.dataset_download(handle)` (skipped at once when offline);
    5. otherwise one `DatasetNotFoundError` that lists these four ways.
    """
    spec = get_spec(name)
    if data_dir is not None:
        root = find_dataset_root(data_dir, spec)
        if root is None:
            raise DatasetNotFoundError(
                f"DATA_DIR={str(data_dir)!r} does not hold the {name} dataset: expected a train/ "
                f"folder (optionally val/, test/) with class folders {list(spec.class_names)}, "
                "or the class folders themselves. Check the path, or set DATA_DIR = None to "
                "locate/download it, or DATA_DIR = 'synthetic' for generated data."
            )
        return root
    for candidate in _kaggle_candidates(spec, Path(kaggle_input)):
        root = find_dataset_root(candidate, spec)
        if root is not None:
            return root
    local = project_root() / "data" / name
    if local.is_dir() and (root := find_dataset_root(local, spec)) is not None:
        return root
    reason = "download=False"
    if download:
        if _online():
            import kagglehub

            try:
                root = find_dataset_root(kagglehub.dataset_download(spec.handle), spec)
                if root is not None:
                    return root
                reason = "kagglehub downloaded it but the layout was not recognised"
            except Exception as err:  # network errors, auth, quota...
                reason = f"kagglehub failed: {type(err).__name__}: {err}"
        else:
            reason = "no internet connection (www.kaggle.com unreachable)"
    raise DatasetNotFoundError(
        f"Could not find the {name!r} dataset ({spec.handle}); {reason}. Provide it one of four "
        "ways:\n"
        f"  1. set DATA_DIR to a folder holding train/ (and optionally val/, test/) with class "
        f"folders {list(spec.class_names)};\n"
        f"  2. on Kaggle, attach the dataset '{spec.handle}' (Add Input) so it appears under "
        "/kaggle/input;\n"
        f"  3. unzip it into {local};\n"
        f"  4. turn on the internet so kagglehub.dataset_download('{spec.handle}') can fetch it.\n"
        "Or run offline on generated images with DATA_DIR = 'synthetic'."
    )


# ----------------------------------------------------------------------------- scanning

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-", re.IGNORECASE)
_ROBOFLOW = re.compile(r"(.+?)_(?:png|jpe?g)\.rf\.[0-9a-f]+$", re.IGNORECASE)
_COVID = re.compile(r"^(COVID-\d+)\.", re.IGNORECASE)
_TB = re.compile(r"^Tuberculosis-(\d+)\.", re.IGNORECASE)
# Rahman et al.'s TB files come in numbered runs, and neighbouring numbers are sometimes the same
# patient (on the real 4-class set, images N and N+1 correlate 0.53 on average, N and N+10 0.41,
# unrelated ones 0.36). With no patient metadata, runs of TB_BLOCK consecutive numbers are one
# group, so near neighbours never straddle two splits (except across a block edge).
TB_BLOCK = 10


def parse_patient_id(filename: str) -> str:
    """Patient (or source) id from a file name; the file stem when the name carries none.

    `person123_bacteria_456.jpeg` -> `person123`, `IM-0115-0001.jpeg` -> `IM-0115`,
    `NORMAL2-IM-0007-0001.jpeg` -> `NORMAL2-IM-0007`; Roboflow exports
    (`abc_png.rf.<hash>.jpg`) are grouped by their source image `abc`. 4-class set:
    `COVID-17.jpg` -> `COVID-17` (no patient ids; neighbouring numbers are no more alike than
    random pairs); `Tuberculosis-23.jpg` -> `Tuberculosis-021-030` (a block of `TB_BLOCK`
    consecutive numbers, since neighbouring numbers are sometimes the same patient).
    """
    name = Path(filename).name
    if m := _PERSON.match(name):
        return m.group(1)
    if m := _IM.match(name):
        return m.group(1)
    if m := _COVID.match(name):
        return m.group(1)
    if m := _TB.match(name):
        first = (int(m.group(1)) - 1) // TB_BLOCK * TB_BLOCK + 1
        return f"Tuberculosis-{first:03d}-{first + TB_BLOCK - 1:03d}"
    stem = Path(name).stem
    if m := _ROBOFLOW.match(stem):
        return m.group(1)
    return stem


def parse_subtype(filename: str, class_name: str) -> str:
    """Pneumonia subtype from the file name: bacteria, virus, or normal."""
    m = _PERSON.match(Path(filename).name)
    if m:
        return m.group(2).lower()
    return "normal" if class_name.upper() == "NORMAL" else "unknown"


def _check_image(path: Path) -> tuple[int, int] | str:
    """(width, height) of a decodable image, or the reason it cannot be used.

    JPEGs are decoded in draft mode (at 1/8 scale): every byte is still read, so truncated
    files fail, but it costs a fraction of a full decode.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("L", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size
    except Exception as err:  # PIL raises many types for broken files
        return f"{type(err).__name__}: {err}"


def scan_dataset(root: str | Path, name: str, *, check_images: bool = True) -> pd.DataFrame:
    """One row per image: path, label, class_name, split, patient_id, subtype, width, height.

    Looks at `root/{train,val|valid|validation,test}/<class>/` (or `root/<class>/`, taken as
    train). Hidden files, `.DS_Store`, `__MACOSX` and non-image files are ignored. Unreadable or
    corrupt images are skipped, counted and reported (`df.attrs["skipped"]`). A missing or
    empty class folder is an error: the model would silently never see that class.
    """
    spec = get_spec(name)
    root = Path(root)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_ALIASES} if root.is_dir() else {}
    if not split_dirs and len(_class_dirs(root, spec)) >= 2:
        split_dirs = {"train": root}
    if "train" not in split_dirs:
        raise DatasetNotFoundError(
            f"{root} has no train/ folder with class folders {list(spec.class_names)}."
        )
    rows = []
    for split, split_dir in split_dirs.items():
        classes = {spec.canonical_class(d.name): d for d in _class_dirs(split_dir, spec)}
        for class_name in spec.class_names:
            folder = classes.get(class_name)
            files = [] if folder is None else sorted(
                f for f in folder.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files and (split == "train" or folder is not None):
                where = folder or split_dir / class_name
                raise ValueError(
                    f"Class folder {where} is missing or holds no images. Every class "
                    f"{list(spec.class_names)} needs images in {split_dir}; check the download "
                    "or point DATA_DIR at the right folder."
                )
            label = spec.class_names.index(class_name)
            rows += [dict(path=str(f), label=label, class_name=class_name, split=split,
                          patient_id=parse_patient_id(f.name),
                          subtype=parse_subtype(f.name, class_name)) for f in files]
    frame = pd.DataFrame(rows)
    frame.attrs["skipped"] = []
    if check_images:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            checks = list(pool.map(_check_image, map(Path, frame["path"])))
        bad = [isinstance(c, str) for c in checks]
        frame.attrs["skipped"] = [(p, c) for p, c, b in zip(frame["path"], checks, bad) if b]
        sizes = [c if not b else (0, 0) for c, b in zip(checks, bad)]
        frame["width"], frame["height"] = [s[0] for s in sizes], [s[1] for s in sizes]
        skipped = frame.attrs["skipped"]
        frame = frame[~np.array(bad)].reset_index(drop=True)
        frame.attrs["skipped"] = skipped
        if skipped:
            msg = (f"Skipped {len(skipped)} unreadable image(s) of {len(checks)} "
                   f"(listed in frame.attrs['skipped']), e.g. {skipped[0][0]} ({skipped[0][1]})")
            warnings.warn(msg, stacklevel=2)
    return frame


# ----------------------------------------------------------------------------- splitting

def carve_splits(frame: pd.DataFrame, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 42, carve: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    """Move whole patients from train into the splits named in `carve`, per class.

    Patients are shuffled within each class (a patient's class is their most frequent label)
    and taken until each new split holds its fraction of that class's images, so every split
    keeps the class balance of the whole and no patient appears in two splits.
    """
    frame = frame.copy()
    fractions = {"val": val_fraction, "test": test_fraction}
    train = frame[frame["split"] == "train"]
    patients = train.groupby("patient_id")["label"].agg(lambda s: s.mode().iloc[0]).rename("label")
    sizes = train.groupby("patient_id").size().rename("n")
    table = pd.concat([patients, sizes], axis=1)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, group in table.groupby("label"):
        order = group.iloc[rng.permutation(len(group))]
        before = order["n"].cumsum() - order["n"]  # images already assigned before this patient
        total, edge = order["n"].sum(), 0.0
        targets = []
        for split in carve:
            edge += fractions[split] * total
            targets.append((split, edge))
        for pid, start in before.items():
            assignment[pid] = next((s for s, e in targets if start < e), "train")
    is_train = frame["split"] == "train"
    frame.loc[is_train, "split"] = frame.loc[is_train, "patient_id"].map(assignment)
    return frame


def subsample(frame: pd.DataFrame, max_per_class: int | None, seed: int = 42) -> pd.DataFrame:
    """A random, reproducible subset in which no class of a split has more than `max_per_class`.

    Every class of a split is scaled by the same factor (the largest class gets exactly
    `max_per_class`), so the subset keeps the class balance of the full split: capping each
    class separately would make an imbalanced dataset balanced and hide what weighted losses,
    samplers and thresholds are for.
    """
    if max_per_class is None:
        return frame
    parts = []
    for _, split in frame.groupby("split", sort=True):
        factor = min(1.0, max_per_class / split["label"].value_counts().max())
        for _, group in split.groupby("label", sort=True):
            n = max(1, round(len(group) * factor))
            parts.append(group.sample(n=min(len(group), n), random_state=seed))
    return pd.concat(parts).sort_index()


@dataclass
class DataSplits:
    """A dataset scanned and split: `frame` has one row per image with its `split`."""

    name: str
    root: Path
    class_names: list[str]
    frame: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    carved: tuple[str, ...] = ()  # splits carved out of train/ (not provided by the dataset)

    @property
    def train(self) -> pd.DataFrame:
        return self.frame[self.frame["split"] == "train"].reset_index(drop=True)

    @property
    def val(self) -> pd.DataFrame:
        return self.frame[self.frame["split"] == "val"].reset_index(drop=True)

    @property
    def test(self) -> pd.DataFrame:
        return self.frame[self.frame["split"] == "test"].reset_index(drop=True)

    def counts(self) -> pd.DataFrame:
        """Images per split (rows) and class (columns)."""
        table = pd.crosstab(self.frame["split"], self.frame["class_name"])
        order = [s for s in ("train", "val", "test") if s in table.index]
        return table.loc[order, [c for c in self.class_names if c in table.columns]]


def load_splits(name: str, data_dir: str | Path | None = None, *, seed: int = 42,
                val_fraction: float = 0.15, test_fraction: float = 0.15,
                max_per_class: int | None = None, check_images: bool = True) -> DataSplits:
    """Find (or generate) a dataset, scan it and return train/val/test splits.

    Provided splits are kept. A missing validation or test split is carved out of train/,
    stratified by class and grouped by patient, so that no patient's images end up on both
    sides (images of one patient look alike; a model tested on a patient it trained on looks
    better than it is).

    Why not use the official pneumonia `val/`? It holds 16 images (8 per class): one image
    moves validation accuracy by 6 points, so choosing an epoch, threshold or model on it is
    choosing on noise. A provided validation split with fewer than MIN_USEFUL_VAL_IMAGES images
    that is also under MIN_USEFUL_VAL_FRACTION of train is therefore folded back into train,
    and a patient-grouped validation split is carved instead.

    `data_dir="synthetic"` writes (once) and uses a small generated dataset with the same
    folder layout, so everything runs offline.
    """
    spec = get_spec(name)
    synthetic = data_dir is not None and str(data_dir) == "synthetic"
    root = make_synthetic_dataset(name, seed=seed) if synthetic else locate_dataset(name, data_dir)
    frame = scan_dataset(root, name, check_images=check_images)
    skipped = list(frame.attrs.get("skipped", []))
    notes = [f"Data: {root}" + (" (synthetic)" if synthetic else "")]
    if skipped:
        notes.append(f"Skipped {len(skipped)} unreadable image(s); see splits.skipped.")
    n_val, n_train = int((frame["split"] == "val").sum()), int((frame["split"] == "train").sum())
    if 0 < n_val < MIN_USEFUL_VAL_IMAGES and n_val < MIN_USEFUL_VAL_FRACTION * n_train:
        frame.loc[frame["split"] == "val", "split"] = "train"
        notes.append(f"The provided val/ holds only {n_val} images: too few to select a model "
                     "on, so it was folded into train and a validation split carved instead.")
    missing = tuple(s for s in ("val", "test") if not (frame["split"] == s).any())
    if missing:
        frame = carve_splits(frame, val_fraction=val_fraction, test_fraction=test_fraction,
                             seed=seed, carve=missing)
        notes.append(f"Carved {' and '.join(missing)} out of train/ by patient "
                     f"({frame['patient_id'].nunique()} patient ids), stratified by class.")
    frame = subsample(frame, max_per_class, seed=seed).reset_index(drop=True)
    if max_per_class is not None:
        notes.append(f"Subsampled to at most {max_per_class} images per class and split, keeping "
                     "each split's class balance (profile setting).")
    return DataSplits(name, Path(root), list(spec.class_names), frame, skipped, synthetic, notes, missing)


# ----------------------------------------------------------------------------- balancing

def _label_tensor(labels) -> torch.Tensor:
    """Labels (list, numpy array, pandas Series or tensor) as a new int64 tensor."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().to("cpu", torch.long).clone()
    return torch.tensor(np.array(labels, dtype=np.int64))


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, scaled to mean 1 (for `CrossEntropyLoss(weight=...)`)."""
    counts = torch.bincount(_label_tensor(labels), minlength=num_classes).float()
    if (counts == 0).any():
        raise ValueError(f"Some class has no training images (counts per class: {counts.tolist()}).")
    weights = counts.sum() / (num_classes * counts)
    return weights / weights.mean()


def pos_weight(labels) -> torch.Tensor:
    """n_negative / n_positive, shape (1,), for `BCEWithLogitsLoss(pos_weight=...)`."""
    labels = _label_tensor(labels)
    n_pos = int((labels == 1).sum())
    if n_pos == 0:
        raise ValueError("No positive training images: pos_weight is undefined.")
    return torch.tensor([(len(labels) - n_pos) / n_pos], dtype=torch.float32)


def weighted_sampler_weights(labels) -> torch.Tensor:
    """One weight per image, 1 / (images in its class): every class is drawn equally often."""
    labels = _label_tensor(labels)
    counts = torch.bincount(labels).float()
    return (1.0 / counts)[labels].double()


def make_weighted_sampler(labels, *, seed: int | None = None) -> WeightedRandomSampler:
    """A sampler that draws balanced batches (with replacement) for a `DataLoader`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    weights = weighted_sampler_weights(labels)
    return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True,
                                 generator=generator)
