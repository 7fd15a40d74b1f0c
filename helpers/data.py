"""What is in a dataset, and how to split it without leaking patients: `load_splits` finds (`helpers.datasets`) or
generates the data, scans it into one row per image, keeps the provided splits, carves missing val/test splits out
of `train/` grouped by patient, and optionally caps the images per class."""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from helpers import datasets, scan
from helpers.datasets import DatasetNotFoundError, DatasetSpec, get_spec, locate_dataset, split_of
from helpers.images import depth_holding, display_path, set_dataset_bit_depth
from helpers.runs import _check_seed as check_seed  # SEED is refused by the same rule as start_run's
from helpers.scan import (NEAR_DUPLICATE_CORRELATION, THUMB, Listing, check_image, cross_split_duplicates,
                          duplicate_groups, duplicate_note, exclusion_notes, find_duplicates, flag_notes,
                          list_dataset)
from helpers.synthetic import is_synthetic_dataset, make_synthetic_dataset

IMAGE_EXTENSIONS = scan.IMAGE_EXTENSIONS  # the file types a class folder's images may have
SPLIT_ALIASES = datasets.SPLIT_ALIASES  # split folder names, matched without regard to case

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_ROBOFLOW = re.compile(r"^(.+?)_(png|jpe?g)\.rf\.[0-9a-f]+\.\w+$", re.IGNORECASE)  # abc_png.rf.<hash>.jpg
# Neighbouring TB file numbers are sometimes one patient (real 4-class set: images N and N+1
# correlate 0.53 on average, N and N+10 0.41, unrelated 0.36): TB_BLOCK consecutive numbers are one group.
TB_BLOCK = 10


def _tb_block(number: str) -> str:
    first = (int(number) - 1) // TB_BLOCK * TB_BLOCK + 1
    return f"Tuberculosis-{first:03d}-{first + TB_BLOCK - 1:03d}"


# Known namings of public datasets: (rule, pattern on the file name with a Roboflow export suffix
# removed, group 1 -> id). Rules marked IMAGE_IDS name images, not patients (none are published).
PATIENT_RULES: list[tuple[str, re.Pattern, Callable[[str], str] | None]] = [
    (rule, re.compile(pattern, re.IGNORECASE), to_id) for rule, pattern, to_id in [
        ("pneumonia person<N>_bacteria|virus", _PERSON.pattern[1:], None),
        ("pneumonia IM-<N>", r"((?:NORMAL\d*-)?IM-\d+)-", None),
        ("4-class Tuberculosis-<N>, blocks of 10 numbers", r"Tuberculosis-(\d+)\.", _tb_block),
        ("EyePACS/ODIR <patient>_left|right", r"(\d+)_(?:left|right)\b", None),
        ("ChestX-ray14 <patient>_<visit>", r"(\d{8})_\d{3}\.", None),
        ("Montgomery/Shenzhen <patient>_<0|1>", r"((?:MCU|CHN)CXR_\d+)_", None),
        ("4-class COVID-<N>", r"(COVID-\d+)\.", None),
        ("APTOS <id>", r"([0-9a-f]{12})\.", None),
        ("Roboflow export of <source>", r"(.+)\.(?:png|jpe?g)$", None),
    ]]
BY_IMAGE = "no patient id (each image its own group)"
IMAGE_IDS = {"4-class COVID-<N>", "APTOS <id>", "Roboflow export of <source>", BY_IMAGE}


def patient_rule(filename: str) -> tuple[str, str] | None:
    """(id, rule) from the first of `PATIENT_RULES` that matches a file name, or None."""
    name = Path(filename).name
    source = _ROBOFLOW.match(name)
    name = f"{source.group(1)}.{source.group(2)}" if source else name
    for rule, pattern, to_id in PATIENT_RULES[:-1] + (PATIENT_RULES[-1:] if source else []):
        if m := pattern.match(name):
            return (to_id or str)(m.group(1)), rule
    return None


def parse_patient_id(filename: str) -> str:
    """Patient (or source) id from a file name (`PATIENT_RULES`), else the file stem: `person123_bacteria_4.jpeg`
    -> `person123`, `IM-0115-0001.jpeg` -> `IM-0115`, `Tuberculosis-23.jpg` -> `Tuberculosis-021-030`."""
    found = patient_rule(filename)
    return found[0] if found else Path(filename).stem


def _read_images(frame: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[tuple[str, str]], np.ndarray, list[str]]:
    """Decode every image once: readable rows (+ width, height, content_hash), (path, reason) of the rest,
    their thumbnails, and notes on reading them (`scan.FLAGS`; one bit depth set for the dataset's 16-bit
    images without metadata)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        checks = list(pool.map(check_image, map(Path, frame["path"])))
    bad = np.array([isinstance(c, str) for c in checks], dtype=bool)
    skipped = [(display_path(p), c) for p, c, b in zip(frame["path"], checks, bad) if b]
    good = [c for c in checks if not isinstance(c, str)]
    kept = frame[~bad].reset_index(drop=True)
    kept["width"], kept["height"] = [c.width for c in good], [c.height for c in good]
    kept["content_hash"] = [c.digest for c in good]
    lost = set(zip(frame["split"], frame["class_name"])) - set(zip(kept["split"], kept["class_name"]))
    if lost:
        split, class_name = sorted(lost)[0]
        i = np.flatnonzero(bad & (frame["split"] == split) & (frame["class_name"] == class_name))[0]
        raise ValueError(
            f"Every image of class {class_name} in the {split} split is unreadable (e.g. "
            f"{display_path(frame['path'].iloc[i])}: {checks[i]}): the split would silently lose the "
            "class. Replace the files (check the download) or point DATA_DIR at a good copy.")
    thumbs = np.stack([c.thumb for c in good]) if good else np.zeros((0, THUMB, THUMB), np.uint8)
    highs = [c.high for c in good if c.high is not None]
    bits = depth_holding(max(highs)) if highs else None
    set_dataset_bit_depth(root, bits)
    notes = flag_notes([(p, f) for p, c in zip(kept["path"], good) for f in c.flags])
    if highs:
        notes.append(f"{len(highs)} 16-bit image(s) without bit-depth metadata (PNG sBIT): all read as {bits}-bit "
                     "values, one rule for the dataset guessed from its images (the brightest 0.1% of an image's "
                     "pixels may clip to white).")
    return kept, skipped, thumbs, notes


def _rows(listing: Listing, split_dirs: dict[str, Path], spec: DatasetSpec, root: Path) -> list[dict]:
    """One row per used image, with its patient: a file naming (`patient_rule`), else its folder in a class
    folder of several, else the image; a split without images of a class is an error naming both."""
    found = {(split, c) for split, c, _ in listing.files}
    for split, split_dir in split_dirs.items():
        for class_name in spec.class_names:
            if (split, class_name) not in found:
                where = listing.class_dirs.get((split, class_name)) or split_dir / class_name
                what = (f"is a symbolic link to {os.readlink(where)}, which does not exist"
                        if os.path.islink(where) and not os.path.exists(where) else "is missing or holds no images")
                raise ValueError(f"The {split} split has no images of class {class_name}: class folder {where} {what}. "
                                 f"Every class {list(spec.class_names)} needs images in {split_dir}; check the "
                                 "download or point DATA_DIR at the right folder.")
    inside = [Path(os.path.relpath(f, listing.class_dirs[(split, c)])).parts for split, c, f in listing.files]
    sub_folders: dict[tuple[str, str], set[str]] = {}
    for (split, c, _), parts in zip(listing.files, inside):
        sub_folders.setdefault((split, c), set()).update(parts[:1] if len(parts) > 1 else ())
    rows = []
    for (split, c, f), parts in zip(listing.files, inside):
        pid, rule = patient_rule(f) or (  # one sub-folder in a class folder is no patient
            (parts[0], "patient folder (class/<patient>/...)") if len(parts) > 1 and len(sub_folders[(split, c)]) > 1
            else (Path(os.path.relpath(f, root)).with_suffix("").as_posix(), BY_IMAGE))
        person = _PERSON.match(os.path.basename(f))  # the pneumonia subtype: bacteria, virus, or normal
        subtype = person.group(2).lower() if person else "normal" if c.upper() == "NORMAL" else "unknown"
        rows.append(dict(path=f, label=spec.class_names.index(c), class_name=c, split=split, patient_id=pid,
                         patient_rule=rule, subtype=subtype))
    return rows


def scan_dataset(root: str | Path, name: str, *, check_images: bool = True) -> pd.DataFrame:
    """One row per image of `root/{train,val,test}/<class>/` (or `root/<class>/`): path, label, class_name, split,
    patient_id, subtype, width, height, content_hash. `attrs` hold what was not used: "excluded" (path,
    `scan.REASONS` key), "skipped" (unreadable), "unknown_folders" (warned), "nested", "links"; and "duplicate_pairs".
    """
    spec, root = get_spec(name), Path(root)
    listing, split_dirs = list_dataset(root, spec) if root.is_dir() else (Listing(), {})
    if "train" not in split_dirs:
        raise DatasetNotFoundError(f"{root} has no train/ folder with class folders {list(spec.class_names)}.")
    frame = pd.DataFrame(_rows(listing, split_dirs, spec, root))
    skipped = [(display_path(p), "broken symbolic link (its target does not exist)") for p in listing.broken]
    pairs, read_notes = [], []
    if check_images:
        frame, unreadable, thumbs, read_notes = _read_images(frame, root)
        skipped += unreadable
        near = 2.0 if is_synthetic_dataset(root) else NEAR_DUPLICATE_CORRELATION  # generated: one template, exact only
        found = find_duplicates(list(frame["content_hash"]), thumbs, near=near)
        frame.attrs["near_checked"] = bool(found.attrs["near_checked"])
        paths = frame["path"].to_numpy()
        pairs = [dict(path_a=paths[a], path_b=paths[b], kind=k, similarity=round(s, 4))
                 for a, b, k, s in found.itertuples(index=False)]
    marker = display_path(root / ".complete")  # the generator's own completion marker
    excluded = [e for e in listing.excluded if not (e[0] == marker and is_synthetic_dataset(root))]
    frame.attrs.update(skipped=skipped, unknown_folders=listing.unknown, excluded=excluded,
                       nested=listing.nested, duplicate_pairs=pairs, links=listing.links, read_notes=read_notes)
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} unreadable image(s) of {len(frame) + len(skipped)} (listed in "
                      f"frame.attrs['skipped']), e.g. {skipped[0][0]} ({skipped[0][1]})", stacklevel=2)
    if listing.unknown:
        warnings.warn(f"Ignored {len(listing.unknown)} folder(s) that are no class of the {name} dataset "
                      f"{list(spec.class_names)}: {listing.unknown}", stacklevel=2)
    return frame


def carve_splits(frame: pd.DataFrame, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42,
                 carve: tuple[str, ...] = ("val", "test"), group_by: str = "patient_id") -> pd.DataFrame:
    """Move whole patients (groups of `group_by`; class: their most frequent label) from train into the splits in
    `carve`: shuffled within each class and taken until each split holds its fraction of the class; a split left
    without a patient of a class takes the last train patient of it, as long as train keeps one."""
    frame = frame.copy()
    fractions = {"val": val_fraction, "test": test_fraction}
    train = frame[frame["split"] == "train"]
    table = train.groupby(group_by)["label"].agg(label=lambda s: s.mode().iloc[0], n="size")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, group in table.groupby("label"):
        order = group.iloc[rng.permutation(len(group))]
        before = order["n"].cumsum() - order["n"]  # images already assigned before this patient
        targets = list(zip(carve, np.cumsum([fractions[split] * order["n"].sum() for split in carve])))
        chosen = {pid: next((s for s, e in targets if start < e), "train") for pid, start in before.items()}
        for split in carve:
            in_train = [pid for pid in order.index if chosen[pid] == "train"]
            if split not in chosen.values() and len(in_train) > 1:
                chosen[in_train[-1]] = split
        assignment.update(chosen)
    is_train = frame["split"] == "train"
    frame.loc[is_train, "split"] = frame.loc[is_train, group_by].map(assignment)
    return frame


def subsample(frame: pd.DataFrame, max_per_class: int | None, seed: int = 42,
              keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """A reproducible subset with at most `max_per_class` per class of a split; splits in `keep` stay whole. Every
    class of a split is scaled by one factor, keeping the split's class balance (capping each class separately
    would balance an imbalanced dataset and hide what weighted losses are for)."""
    if max_per_class is None:
        return frame
    parts = []
    for name, split in frame.groupby("split", sort=True):
        factor = 1.0 if name in keep else min(1.0, max_per_class / split["label"].value_counts().max())
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
    skipped: list[tuple[str, str]]
    synthetic: bool
    notes: list[str]
    carved: tuple[str, ...]  # splits carved out of train/ (not provided by the dataset)
    excluded: list[tuple[str, str]]  # (path, scan.REASONS key) not used
    duplicates: pd.DataFrame  # pairs of copies in two splits (`scan.cross_split_duplicates`)

    def _part(self, split: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == split].reset_index(drop=True)

    train = property(lambda self: self._part("train"), doc="The train rows.")
    val = property(lambda self: self._part("val"), doc="The validation rows.")
    test = property(lambda self: self._part("test"), doc="The test rows.")

    def counts(self) -> pd.DataFrame:
        """Images per split (rows) and class (columns)."""
        table = pd.crosstab(self.frame["split"], self.frame["class_name"])
        order = [s for s in ("train", "val", "test") if s in table.index]
        return table.loc[order, [c for c in self.class_names if c in table.columns]]


def _require_every_class(frame: pd.DataFrame, spec: DatasetSpec, carved: tuple[str, ...]) -> None:
    """Stop with a message naming the split and class when a split lacks a class."""
    for split in ("train", "val", "test"):
        if absent := [c for c in spec.class_names if c not in set(frame.loc[frame["split"] == split, "class_name"])]:
            how = ("carved out of train/ by patient: too few patient groups of that class to give every split one "
                   "(see the note on patients: if those groups are no patients, pass load_splits(..., groups=...)); "
                   "add images or lower the number of carved splits"
                   if split in carved or (carved and split == "train") else "check the folder")
            raise ValueError(f"The {split} split holds no image of class {absent[0]} ({how}). "
                             "Every split must hold every class, or its metrics are undefined.")


def _user_groups(frame: pd.DataFrame, groups: Callable | str | Path, root: Path, spec: DatasetSpec) -> pd.DataFrame:
    """`patient_id`, `patient_rule` from `groups`: a function of the path, "parent" (the image's folder)
    or a CSV of file,patient rows (file: the path below the root or any tail of it)."""
    paths = [os.path.relpath(p, root) for p in frame["path"]]
    if callable(groups):
        ids, rule = [groups(p) for p in frame["path"]], f"groups={getattr(groups, '__name__', 'function')}"
    elif str(groups) == "parent":
        flat = [p for p in paths if spec.canonical_class(Path(p).parent.name) or split_of(Path(p).parent.name)]
        if flat:
            raise ValueError(f'groups="parent" takes the folder of each image as its patient, but {len(flat)} image(s) '
                             f"lie directly in a class folder (e.g. {display_path(flat[0])}): a whole class would be "
                             "one patient. Use it with one folder per patient (class/<patient>/image), or pass a CSV "
                             "of file,patient or a function.")
        ids, rule = [Path(p).parent.name for p in paths], 'groups="parent" (the folder of each image)'
    else:
        table = pd.read_csv(groups, dtype=str).dropna()
        lookup = dict(zip(table.iloc[:, 0].str.strip(), table.iloc[:, 1].str.strip()))
        tails = [[Path(*Path(p).parts[i:]).as_posix() for i in range(len(Path(p).parts))] for p in paths]
        ids = [next((lookup[t] for t in ts if t in lookup), None) for ts in tails]
        rule = f"groups={display_path(groups)}"
    if missing := [p for p, i in zip(paths, ids) if i is None or str(i).strip() == ""]:
        raise ValueError(f"{rule} gives no patient for {len(missing)} image(s) (e.g. {display_path(missing[0])}): "
                         "every image needs one (a CSV row file,patient, file being the path below "
                         f"{display_path(root)} or the file name).")
    return frame.assign(patient_id=[str(i) for i in ids], patient_rule=rule)


def _carve_missing(frame: pd.DataFrame, pairs: list, missing: tuple[str, ...], notes: list[str],
                   val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Carve the `missing` splits out of train by patient, copies of one image kept together; notes which rule
    grouped how many images, loudly for images split by image."""
    frame["group"] = duplicate_groups(frame, pairs)
    train = frame[frame["split"] == "train"]
    grouped = train[~train["patient_rule"].isin(IMAGE_IDS)]
    parts = [f"{len(part)} images into {part['patient_id'].nunique()} patients by {rule}"
             for rule, part in grouped.groupby("patient_rule", sort=False)]
    notes += ["Patients (carving keeps each one in one split): " + "; ".join(parts) + "."] if parts else []
    if len(by_image := train[train["patient_rule"].isin(IMAGE_IDS)]):
        rules = ", ".join(f"{r} {n}" for r, n in by_image["patient_rule"].value_counts().items())
        notes.append(f"WARNING: {len(by_image)} of {len(train)} images carry no patient id ({rules}; e.g. "
                     f"{Path(by_image['path'].iloc[0]).name}): the split is by image there, and one patient's images "
                     "may leak into two splits (scores look better than they are). Give the grouping with "
                     'load_splits(..., groups=...): a function of the path, a CSV of file,patient, or "parent" (one '
                     "folder per patient).")
    joined = train["patient_id"].nunique() - train["group"].nunique()
    frame = carve_splits(frame, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, carve=missing,
                         group_by="group").drop(columns="group")
    notes.append(f"Carved {' and '.join(missing)} out of train/ by patient ({frame['patient_id'].nunique()} patient ids"
                 + (f"; {joined} joined with another because they share duplicate images" if joined else "")
                 + "), stratified by class.")
    return frame


def load_splits(name: str, data_dir: str | Path | None = None, *, seed: int = 42, val_fraction: float = 0.15,
                test_fraction: float = 0.15, max_per_class: int | None = None, check_images: bool = True,
                groups: Callable[[str], str] | str | Path | None = None) -> DataSplits:
    """Find (or generate, `data_dir="synthetic"`) a dataset, scan it and return train/val/test splits.

    Provided splits are kept; a missing val or test split is carved out of train/, stratified by class and grouped
    by patient (`PATIENT_RULES`, else one folder per patient, else by image with a warning; `groups` overrides: a
    function of the path, a CSV of file,patient, or "parent"). A tiny provided val/ (the official pneumonia one: 16
    images, one image moves accuracy 6 points) is folded into train and a val split carved instead. `seed` must be
    a whole number, as SEED is."""
    seed, spec = check_seed(seed), get_spec(name)
    generate = data_dir is not None and str(data_dir) == "synthetic"
    root = make_synthetic_dataset(name, seed=seed) if generate else locate_dataset(name, data_dir)
    synthetic = generate or is_synthetic_dataset(root)
    frame = scan_dataset(root, name, check_images=check_images)
    attrs, frame.attrs = frame.attrs, {}  # pandas deep-copies attrs in every operation (each group of a groupby)
    skipped, pairs, unknown = attrs["skipped"], attrs["duplicate_pairs"], attrs["unknown_folders"]
    notes = [f"Data: {display_path(root)}" + (" (synthetic: generated images, not patients)" if synthetic else "")]
    notes += [f"Skipped {len(skipped)} unreadable image(s); see splits.skipped."] if skipped else []
    if unknown:
        notes.append(f"Ignored {len(unknown)} folder(s) that are no class of the {name} dataset: " + ", ".join(unknown))
    notes += exclusion_notes(attrs["excluded"], attrs["nested"], attrs["links"]) + attrs["read_notes"]
    if groups is not None:
        frame = _user_groups(frame, groups, Path(root), spec)
    n_val, n_train = int((frame["split"] == "val").sum()), int((frame["split"] == "train").sum())
    if 0 < n_val < 50 and n_val < 0.05 * n_train:  # the official pneumonia val/: 16 images, 0.3% of train
        frame.loc[frame["split"] == "val", "split"] = "train"
        notes.append(f"The provided val/ holds only {n_val} images: too few to select a model on, so it was folded "
                     "into train and a validation split carved instead.")
    missing = tuple(s for s in ("val", "test") if not (frame["split"] == s).any())
    if missing:
        frame = _carve_missing(frame, pairs, missing, notes, val_fraction, test_fraction, seed)
    whole = () if "test" in missing else ("test",)  # a provided test split is cheap to evaluate whole
    frame = subsample(frame, max_per_class, seed=seed, keep=whole).reset_index(drop=True)
    if max_per_class is not None:
        notes.append(f"Subsampled to at most {max_per_class} images per class and split, keeping each split's "
                     "class balance (profile setting)" + ("; the provided test split is kept whole." if whole else "."))
    _require_every_class(frame, spec, missing)
    duplicates = cross_split_duplicates(frame, pairs)
    notes += [note] if (note := duplicate_note(duplicates)) else []
    if check_images and not attrs.get("near_checked", True):
        notes.append("Near duplicates (re-encoded or resized copies) were not searched: " + (
            "generated images share one template." if synthetic else "too many of these images look alike at "
            "thumbnail scale to tell copies apart; only exact copies (same bytes) were searched."))
    return DataSplits(name, Path(root), list(spec.class_names), frame, skipped, synthetic, notes, missing,
                      attrs["excluded"], duplicates)
