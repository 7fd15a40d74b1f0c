"""Walking a dataset folder: `list_dataset` sorts every file into used images and `REASONS`; `check_image`
decodes an image once, `find_duplicates` pairs copies. `helpers.data.scan_dataset` puts it in a table."""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from helpers.datasets import (IGNORED_DIRS, DatasetSpec, WrongDatasetError, find_dataset_root, foreign_classes,
                              one_per_meaning, split_of, visible_folders)
from helpers.images import (DICOM_EXTENSIONS, HIGH_BIT_DEPTH_MODES, MIN_IMAGE_SIDE, display_path, exif_orientation,
                            is_dicom, read_dicom, stored_bits)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", *DICOM_EXTENSIONS}
# Image formats the course does not read: counted as "unsupported", not as "not an image".
OTHER_IMAGE_EXTENSIONS = set(".webp .gif .heic .heif .avif .jp2 .j2k .jxl .svg .ico .ppm .pgm .pbm .pnm .tga .psd .raw "
                             ".nii .nrrd .mha .mhd .jfif .jpe".split())
REASONS = {
    "hidden": "hidden or system files (names starting with '.', __MACOSX, .ipynb_checkpoints)",
    "not_image": "files that are not images",
    "unsupported": "images in a format the course does not read (convert them to PNG or JPEG)",
    "outside": "images outside any class folder (loose in the root or a split folder, or in a folder that is no class "
               "of the dataset)",
    "ambiguous": "images in a folder named like another class or split, below a class folder",
    "duplicate_folder": "images in a nested copy of the dataset (a duplicate folder)",
    "bad_name": "files whose name is not valid UTF-8 (rename them, e.g. with convmv)",
    "unreadable_folder": "folders that could not be read (permission denied)",
}
THUMB = 32  # side of the grayscale thumbnail kept per image for near-duplicate search
# Near duplicates: correlation of mean-centred thumbnails. On real pneumonia (5,840 images) no two
# different images exceed 0.98; copies reach 0.9997 re-encoded, 0.989-0.993 shrunk to 150 px
# (pHash/dHash do not separate them: unrelated radiographs lie a median 8 bits apart, shrunk copies 12).
NEAR_DUPLICATE_CORRELATION = 0.99
# More near matches than this: a crowd thumbnails cannot tell apart (real fundus: 26,000 pairs among
# 2,607 images); its matches are dropped as inconclusive. Over MAX_CROWDED_FRACTION of the images in
# crowds (fundus 24%, pneumonia 0): no near pair is reported at all, only exact ones.
MAX_NEAR_MATCHES = 3
MAX_CROWDED_FRACTION = 0.05


@dataclass
class Listing:
    """What `list_dataset` found: the used images and everything else by reason."""

    files: list[tuple[str, str, str]] = field(default_factory=list)  # (split, class, path)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (display path, REASONS key)
    broken: list[Path] = field(default_factory=list)  # symbolic links to nothing
    nested: list[str] = field(default_factory=list)  # used images from sub-folders of class folders
    unknown: list[str] = field(default_factory=list)  # folders that are no class of the dataset
    class_dirs: dict[tuple[str, str], Path] = field(default_factory=dict)  # (split, class) -> folder
    links: list[str] = field(default_factory=list)  # symbolic links to folders, followed: "link -> target"


def _entries(folder: Path, must_read: bool, listing: Listing) -> list[os.DirEntry]:
    """The entries of a folder; an unreadable one is an error where images would go missing."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as err:
        if must_read:
            raise PermissionError(
                f"Cannot read the folder {display_path(folder)} ({err.strerror}): its images would be "
                f"missing from the dataset. Make it readable (chmod -R a+rX '{display_path(folder)}') "
                "or move it out of the dataset folder.") from None
        listing.excluded.append((display_path(folder), "unreadable_folder"))
        return []


def _visible_dirs(folder: Path, listing: Listing) -> list[Path]:
    return [Path(e.path) for e in _entries(folder, True, listing) if e.is_dir()
            and e.name not in IGNORED_DIRS and not e.name.startswith(".")]


def _file_reason(entry: os.DirEntry, context: str) -> str | None:
    """Why a file is not used (a REASONS key), or None when it is an image of a class folder."""
    name, suffix = entry.name, os.path.splitext(entry.name)[1].lower()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "bad_name"
    if name.startswith(".") or context == "hidden":
        return "hidden"
    if suffix not in IMAGE_EXTENSIONS and not is_dicom(entry.path):  # DICOM by content: no extension, .IMA, ...
        return "unsupported" if suffix in OTHER_IMAGE_EXTENSIONS else "not_image"
    return None if context == "class" else context


def _dir_context(entry: os.DirEntry, context: str, used: dict[str, tuple[str, str]],
                 spec: DatasetSpec, top: bool, split_paths: set[str]) -> str:
    """The context of a sub-folder: class, hidden, ambiguous, duplicate_folder or outside."""
    if entry.name.startswith(".") or entry.name in IGNORED_DIRS or context == "hidden":
        return "hidden"
    if entry.path in used:
        return "class"
    if entry.path in split_paths:
        return "outside"  # a split folder: its loose files are outside any class folder
    if context == "class":
        named = spec.canonical_class(entry.name) or split_of(entry.name)
        return "ambiguous" if named else "class"
    if top and context == "outside" and find_dataset_root(Path(entry.path), spec, max_depth=2):
        return "duplicate_folder"
    return context


def list_dataset(root: Path, spec: DatasetSpec) -> tuple[Listing, dict[str, Path]]:
    """Every file under `root`, sorted into used images and reasons; and the split folders."""
    listing = Listing()
    dirs = _visible_dirs(root, listing)
    splits = one_per_meaning(dirs, split_of, "split")
    classes = one_per_meaning(dirs, spec.canonical_class, "class")
    splits = splits or ({"train": root} if len(classes) >= 2 else {})  # a root of class folders: train
    for split, folder in splits.items():
        _visible_dirs(folder, listing)  # an unreadable split folder is an error that says so
        if (problem := foreign_classes(folder, spec)) is not None:  # class folders of another known dataset
            raise WrongDatasetError(problem)
        folders = visible_folders(folder)
        classes = one_per_meaning(folders, spec.canonical_class, "class")
        listing.class_dirs.update({(split, c): d for c, d in classes.items()})
        listing.unknown += [str(d) for d in folders if not spec.canonical_class(d.name) and split_of(d.name) is None]
    used = {str(d): key for key, d in listing.class_dirs.items()}
    split_paths = {str(p) for p in splits.values()}

    def walk(folder: Path, context: str, owner: tuple[str, str] | None, depth: int, above: frozenset) -> None:
        real = os.path.realpath(folder)
        if real in above:  # a symbolic link back up the tree
            return
        if os.path.islink(folder):
            listing.links.append(f"{display_path(folder)} -> {display_path(real)}")
        must_read = context == "class" or folder == root or str(folder) in split_paths
        for entry in _entries(folder, must_read, listing):
            if entry.is_symlink() and not os.path.exists(entry.path):
                listing.broken.append(Path(entry.path))
            elif entry.is_dir():
                sub = _dir_context(entry, context, used, spec, depth < 2, split_paths)
                walk(Path(entry.path), sub, used.get(entry.path, owner), depth + 1, above | {real})
            elif (reason := _file_reason(entry, context)) is not None:
                listing.excluded.append((display_path(entry.path), reason))
            elif owner is not None:
                listing.files.append((owner[0], owner[1], entry.path))
                if str(folder) not in used:
                    listing.nested.append(entry.path)

    walk(root, "outside", None, 0, frozenset())
    listing.files.sort()
    return listing, splits


@dataclass
class ImageCheck:
    """A decodable image: its size, a hash of its bytes and a small grayscale thumbnail."""

    width: int
    height: int
    digest: str
    thumb: np.ndarray  # uint8 (THUMB, THUMB)
    flags: tuple[str, ...] = ()  # keys of FLAGS: what training should be told about this image
    high: float | None = None  # a 16-bit image without metadata: its 99.9th percentile (the dataset's bit depth)


# What reading an image did that training should hear of (counted in one note per kind).
FLAGS = {
    "pages": "multi-page file(s) (TIFF pages, DICOM frames): only the first page is used",
    "windows": "DICOM file(s) with several display windows: only the first window is used",
    "small": f"image(s) smaller than {MIN_IMAGE_SIDE} pixels on a side, which the app refuses as uploads: "
             "trained and evaluated on all the same",
}


def check_image(path: Path) -> ImageCheck | str:
    """Decode an image once (JPEG in draft mode: truncated files still fail), EXIF orientation
    applied: `ImageCheck`, or the reason it cannot be used."""
    try:
        payload = path.read_bytes()
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        flags, high = [], None
        if is_dicom(payload) or path.suffix.lower() in DICOM_EXTENSIONS:
            image, notes = read_dicom(payload)
            size = image.size
            flags = [f for f, words in (("pages", " frames"), ("windows", "display windows")) if any(words in n for n in notes)]
        else:
            with Image.open(io.BytesIO(payload)) as im:
                size = im.size
                flags = ["pages"] if getattr(im, "n_frames", 1) > 1 else []
                im.draft("L", (max(THUMB, size[0] // 8), max(THUMB, size[1] // 8)))  # never below the thumbnail
                im.load()
                if im.mode in HIGH_BIT_DEPTH_MODES and im.mode != "F" and stored_bits(im) is None:
                    high = float(np.percentile(np.asarray(im), 99.9))
                image = im
                if exif_orientation(im) != 1:
                    image = ImageOps.exif_transpose(im)
                    size = size if image.size == im.size else (size[1], size[0])
        thumb = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR))
        flags += ["small"] if min(size) < MIN_IMAGE_SIDE else []
        return ImageCheck(size[0], size[1], digest, thumb, tuple(flags), high)
    except Exception as err:  # PIL and pydicom raise many types for broken files
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
        return f"{type(err).__name__}: {message}"


def find_duplicates(digests: list[str], thumbs: np.ndarray, *, near: float = NEAR_DUPLICATE_CORRELATION) -> pd.DataFrame:
    """Pairs (a < b) of row indices, `kind` "exact" (same bytes) or "near" (thumbnail correlation >=
    `near`; `near > 1` turns it off), and `similarity`; `attrs["near_checked"]`: False for a crowd."""
    from scipy.fft import dctn
    from scipy.spatial import cKDTree

    rows: list[tuple[int, int, str, float]] = []
    by_digest = pd.Series(range(len(digests))).groupby(pd.Series(digests, dtype=object)).agg(list)
    for members in by_digest[by_digest.map(len) > 1]:
        rows += [(a, b, "exact", 1.0) for i, a in enumerate(members) for b in members[i + 1:]]
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    keep = np.flatnonzero(x.std(axis=1) >= 2.0)  # a flatter thumbnail (grey levels) has no structure to compare
    crowded = 0
    if len(keep) > 1 and near <= 1.0:
        v = x[keep] / np.linalg.norm(x[keep], axis=1, keepdims=True)
        # Candidates from a k-d tree over the 6 x 6 lowest orthonormal DCT coefficients (a projection never
        # lengthens a difference, so none is missed), verified on the whole thumbnail.
        low = dctn(v.reshape(len(v), THUMB, THUMB), norm="ortho", axes=(1, 2))[:, :6, :6].reshape(len(v), 36)
        radius = float(np.sqrt(2.0 * (1.0 - near))) + 1e-4  # |u - w| of unit vectors at similarity `near`
        pairs = cKDTree(low).query_pairs(radius, output_type="ndarray")
        a, b = np.sort(pairs, axis=1).T if len(pairs) else (np.zeros(0, int), np.zeros(0, int))
        sims = np.concatenate([np.einsum("nd,nd->n", v[a[i:i + 4096]], v[b[i:i + 4096]])
                               for i in range(0, len(a), 4096)]) if len(a) else np.zeros(0, np.float32)
        ok = sims >= near
        a, b, sims = a[ok], b[ok], sims[ok]
        matches = np.bincount(np.concatenate([a, b]), minlength=len(v))
        clear = (matches[a] <= MAX_NEAR_MATCHES) & (matches[b] <= MAX_NEAR_MATCHES)
        crowded = int((matches > MAX_NEAR_MATCHES).sum())
        clear &= crowded <= MAX_CROWDED_FRACTION * len(v)
        digest_of = np.asarray(digests, dtype=object)
        rows += [(int(keep[i]), int(keep[j]), "near", round(float(sim), 4))
                 for i, j, sim in zip(a[clear], b[clear], sims[clear]) if digest_of[keep[i]] != digest_of[keep[j]]]
    found = pd.DataFrame(rows, columns=["a", "b", "kind", "similarity"])
    found.attrs["near_checked"] = near <= 1.0 and crowded <= MAX_CROWDED_FRACTION * max(len(keep), 1)
    return found


def duplicate_groups(frame: pd.DataFrame, pairs: list[dict], key: str = "patient_id") -> pd.Series:
    """One group per row: its `key` (patient id), joined with others where images are duplicates."""
    ids = frame[key].astype(str)
    codes, names = pd.factorize(ids)
    of_path = dict(zip(frame["path"], codes))
    edges = np.array([(of_path.get(p["path_a"], -1), of_path.get(p["path_b"], -1)) for p in pairs], int).reshape(-1, 2)
    edges = edges[(edges >= 0).all(axis=1)]  # both images in the frame
    graph = coo_matrix((np.ones(len(edges)), edges.T), shape=(len(names), len(names)))
    component = connected_components(graph, directed=False)[1]
    smallest = pd.Series(names).groupby(component).transform("min")  # the smallest id names the group
    return ids.map(dict(zip(names, smallest)))


def cross_split_duplicates(frame: pd.DataFrame, pairs: list[dict]) -> pd.DataFrame:
    """The duplicate pairs across splits (earlier split first): path, split, class of each, kind, similarity."""
    info, order = frame.set_index("path")[["split", "class_name"]], ("train", "val", "test").index
    rows = []
    for pair in pairs:
        a, b = pair["path_a"], pair["path_b"]
        if a not in info.index or b not in info.index or info.at[a, "split"] == info.at[b, "split"]:
            continue
        if order(info.at[a, "split"]) > order(info.at[b, "split"]):
            a, b = b, a
        rows.append(dict(path_a=a, split_a=info.at[a, "split"], class_a=info.at[a, "class_name"],
                         path_b=b, split_b=info.at[b, "split"], class_b=info.at[b, "class_name"],
                         kind=pair["kind"], similarity=pair["similarity"]))
    columns = ["path_a", "split_a", "class_a", "path_b", "split_b", "class_b", "kind", "similarity"]
    return pd.DataFrame(rows, columns=columns)


def duplicate_note(duplicates: pd.DataFrame) -> str | None:
    """A sentence on the duplicates across splits, or None when there are none."""
    if duplicates.empty:
        return None
    kinds = duplicates["kind"].value_counts()
    where = (duplicates["split_a"] + "-" + duplicates["split_b"]).value_counts()
    conflict = int((duplicates["class_a"] != duplicates["class_b"]).sum())
    where = ", ".join(f"{k} {v}" for k, v in where.items())
    return (f"Duplicates across splits: {int(kinds.get('exact', 0))} exact (same bytes) and {int(kinds.get('near', 0))} "
            f"near (re-encoded or resized) pair(s) of images in two splits ({where})"
            + (f", {conflict} of them with different labels" if conflict else "") + "; see splits.duplicates. A model "
            "scored on a copy of a training image looks better than it is: they come from the provided splits (carved "
            "splits keep copies together).")


def flag_notes(flagged: list[tuple[str, str]]) -> list[str]:
    """One sentence per kind of `FLAGS` in (path, flag) pairs, with a count and an example."""
    by_flag = pd.DataFrame(flagged, columns=["path", "flag"]).groupby("flag", sort=False)["path"].agg(list)
    return [f"{len(paths)} {FLAGS[flag]} (e.g. {display_path(paths[0])})." for flag, paths in by_flag.items()]


def exclusion_notes(excluded: list[tuple[str, str]], nested: list[str], links: list[str] = ()) -> list[str]:
    """Sentences on the files not used (by reason), the nested images used and the links followed."""
    notes = [f"Followed {len(links)} symbolic link(s) to folders: " + "; ".join(links[:5])] if links else []
    if excluded:
        by_reason = pd.DataFrame(excluded, columns=["path", "reason"]).groupby("reason", sort=False)["path"].agg(list)
        parts = []
        for reason, paths in by_reason.items():
            suffixes = pd.Series([Path(p).suffix.lower() or "(none)" for p in paths]).value_counts()
            kinds = " [" + ", ".join(f"{k} {v}" for k, v in suffixes.head(5).items()) + "]"
            kinds = kinds if reason in ("unsupported", "not_image") else ""
            parts.append(f"{len(paths)} {REASONS[reason]}{kinds}, e.g. {display_path(paths[0])}")
        notes.append(f"Not used: {len(excluded)} file(s) or folder(s) under the root: " + "; ".join(parts)
                     + " (listed in splits.excluded).")
    return notes + ([f"Used {len(nested)} image(s) from sub-folders of class folders, with the class of the folder "
                     f"above (e.g. {display_path(nested[0])})."] if nested else [])
