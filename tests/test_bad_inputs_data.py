"""Bad inputs of issue 17 (files and folders, pixels, duplicates, cache, metrics): more rows of the
table of `tests/test_bad_inputs.py`, run by the same rules (`Case`: an error whose message names
what to fix, or a handled result that `check` accepts). Every image is built in tmp_path; DICOM
files are written with pydicom itself.

Only modules that existed before issue 17 are imported at the top, so that the table also runs
(and fails row by row) against the code before the fixes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app import serve
from helpers import data, evaluate, loading, reporting
from test_bad_inputs import Case

# ----------------------------------------------------------------------------- builders


def _texture(seed: int, size: tuple[int, int] = (64, 56)) -> Image.Image:
    """A grayscale image with structure of its own (distinct images are no near duplicates)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _save(image: Image.Image, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def _dataset(root: Path, layout: dict[str, int], split: str = "train", seed: int = 0) -> Path:
    """`root/<split>/<class>/` with n distinct one-image patients per class: {class folder: n}."""
    for k, (cls, n) in enumerate(layout.items()):
        for i in range(n):
            name = f"IM-{i:04d}-0001.jpeg" if cls.upper() == "NORMAL" else f"person{i}_virus_{i}.jpeg"
            _save(_texture(seed * 10_000 + k * 1000 + i), root / split / cls / name)
    return root


def _dicom(path: Path, values: np.ndarray, *, photometric: str = "MONOCHROME2",
           window: tuple[Any, Any] | None = None, preamble: bool = True) -> Path:
    """A 16-bit (12 bits stored) DICOM file written by pydicom; `preamble=False`: a bare data set
    (no 128-byte preamble, no file meta, implicit VR), as some exports write them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = values.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def _ramp() -> np.ndarray:
    return np.tile(np.linspace(0, 4095, 64), (48, 1)).astype(np.uint16)


def _train_and_app(path: Path, size: int = 48) -> dict[str, Any]:
    """What training (`load_image`) and the app (`read_upload`) make of one file."""
    trained = loading.load_image(path, size).permute(1, 2, 0).numpy()
    checked = serve.read_upload(path.read_bytes())
    return dict(train=trained, app=np.asarray(checked.image.resize((size, size), Image.BILINEAR)),
                notes=checked.notes)


def _notes(splits) -> str:
    return "\n".join(splits.notes)


# ----------------------------------------------------------------------------- folders


def _run_nested_class_subfolder(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    _save(_texture(77), root / "train" / "NORMAL" / "batch2" / "IM-0900-0001.jpeg")
    return data.load_splits("pneumonia", root)


def _check_nested_class_subfolder(splits):
    assert "IM-0900-0001.jpeg" in {Path(p).name for p in splits.frame["path"]}
    assert (splits.frame["class_name"] == "NORMAL").sum() == 7
    assert "sub-folders of class folders" in _notes(splits)


def _run_case_twin_class(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 4, "PNEUMONIA": 4})
    _dataset(root, {"normal": 2}, seed=5)
    return data.load_splits("pneumonia", root)


def _run_second_split_spelling(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 4, "PNEUMONIA": 4})
    _dataset(root, {"NORMAL": 3, "PNEUMONIA": 3}, split="val", seed=1)
    _dataset(root, {"NORMAL": 3, "PNEUMONIA": 3}, split="valid", seed=2)
    return data.load_splits("pneumonia", root)


def _run_other_extensions(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    _save(_texture(90), root / "train" / "NORMAL" / "IM-0800-0001.webp")
    _save(_texture(91), root / "train" / "NORMAL" / "IM-0801-0001.gif")
    (root / "train" / "PNEUMONIA" / "labels.csv").write_text("file,label\n")
    return data.load_splits("pneumonia", root)


def _check_other_extensions(splits):
    text = _notes(splits)
    assert "2 images in a format the course does not read" in text and ".webp 1" in text
    assert "1 files that are not images" in text
    assert {r for _, r in splits.excluded} == {"unsupported", "not_image"} and len(splits.excluded) == 3


def _run_loose_images(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    _save(_texture(80), root / "train" / "stray.jpeg")
    _save(_texture(81), root / "stray_at_root.png")
    return data.load_splits("pneumonia", root)


def _check_loose_images(splits):
    assert sorted(Path(p).name for p, r in splits.excluded if r == "outside") == ["stray.jpeg", "stray_at_root.png"]
    assert "2 images outside any class folder" in _notes(splits)


def _run_archive_copies(tmp, mp):
    root = _dataset(tmp / "chest_xray", {"NORMAL": 6, "PNEUMONIA": 6})
    _dataset(root / "chest_xray", {"NORMAL": 6, "PNEUMONIA": 6})  # the nested duplicate of the archive
    _save(_texture(3), root / "__MACOSX" / "train" / "NORMAL" / "._IM-0000-0001.jpeg")
    return data.load_splits("pneumonia", root)


def _check_archive_copies(splits):
    assert len(splits.frame) == 12  # once, not twice
    reasons = [r for _, r in splits.excluded]
    assert reasons.count("duplicate_folder") == 12 and reasons.count("hidden") == 1
    assert "12 images in a nested copy of the dataset" in _notes(splits)


def _run_class_named_subfolder(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    _save(_texture(70), root / "train" / "NORMAL" / "PNEUMONIA" / "person99_virus_1.jpeg")
    return data.load_splits("pneumonia", root)


def _check_class_named_subfolder(splits):
    assert [r for _, r in splits.excluded] == ["ambiguous"] and len(splits.frame) == 12
    assert "folder named like another class" in _notes(splits)


def _run_non_utf8_name(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    folder = os.fsencode(root / "train" / "NORMAL")
    _texture(60).save(os.fsdecode(folder + b"/IM-0700-0001-\xff\xfe.jpeg"), format="JPEG")
    splits = data.load_splits("pneumonia", root)
    return splits, loading.make_loaders(splits, 16, 4, cache_dir=tmp / "cache")


def _check_non_utf8_name(result):
    splits, loaders = result
    assert [r for _, r in splits.excluded] == ["bad_name"] and "\\xff" in splits.excluded[0][0]
    assert "not valid UTF-8" in _notes(splits) and loaders["train"].dataset_size == len(splits.train)


def _run_unreadable_class_folder(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    locked = str(root / "train" / "PNEUMONIA")
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(real):
        def call(path="."):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real(path)
        return call

    mp.setattr(os, "scandir", refuse(real_scandir))  # tests run as root, where chmod 000 has no effect
    mp.setattr(os, "listdir", refuse(real_listdir))
    return data.load_splits("pneumonia", root)


def _run_deleted_after_scan(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    splits = data.load_splits("pneumonia", root)
    Path(splits.train["path"].iloc[0]).unlink()
    return loading.cache_images(splits.train, 16)


# ----------------------------------------------------------------------------- pixels


def _run_dicom_in_dataset(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    dcm = _dicom(root / "train" / "NORMAL" / "IM-0500-0001.dcm", _ramp(), window=(1024, 2048))
    splits = data.load_splits("pneumonia", root)
    return splits, _train_and_app(dcm)


def _check_dicom_in_dataset(result):
    splits, pixels = result
    assert "IM-0500-0001.dcm" in {Path(p).name for p in splits.frame["path"]}
    assert np.array_equal(pixels["train"], pixels["app"])
    row = pixels["train"][10, :, 0].astype(int)
    assert row[0] <= 3 and row[-1] == 255 and (row == 255).mean() > 0.4  # window 0..2048: the right half white
    assert any("window center 1024" in n for n in pixels["notes"])


def _run_dicom_monochrome1(tmp, mp):
    return _train_and_app(_dicom(tmp / "m1.dcm", _ramp(), photometric="MONOCHROME1"))


def _check_dicom_monochrome1(pixels):
    row = pixels["train"][10, :, 0].astype(int)
    assert np.array_equal(pixels["train"], pixels["app"]) and row[0] >= 252 and row[-1] <= 3
    assert any("MONOCHROME1" in n for n in pixels["notes"])


def _run_dicom_without_pixels(tmp, mp):
    path = _dicom(tmp / "broken.dcm", _ramp())
    payload = path.read_bytes()
    return serve.read_upload(payload[: len(payload) - 3000])


def _run_exif_rotated(tmp, mp):
    image = _texture(5, (60, 40)).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    path = _save(image, tmp / "rotated.jpeg", exif=exif.tobytes(), quality=95)
    return _train_and_app(path)


def _check_exif_rotated(pixels):
    assert np.array_equal(pixels["train"], pixels["app"])
    assert any("EXIF" in n for n in pixels["notes"])


# ----------------------------------------------------------------------------- duplicates


def _run_exact_duplicate_provided(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 60, "PNEUMONIA": 60})
    _dataset(root, {"NORMAL": 12, "PNEUMONIA": 12}, split="test", seed=3)
    source = root / "train" / "NORMAL" / "IM-0007-0001.jpeg"
    (root / "test" / "NORMAL" / "IM-0990-0001.jpeg").write_bytes(source.read_bytes())
    # the picture of PNEUMONIA 0 shrunk and re-encoded: a near duplicate
    _save(Image.open(root / "train" / "PNEUMONIA" / "person0_virus_0.jpeg").resize((48, 42)),
          root / "test" / "PNEUMONIA" / "person990_virus_1.jpeg", quality=70)
    return data.load_splits("pneumonia", root)


def _check_exact_duplicate_provided(splits):
    dup = splits.duplicates
    assert sorted(dup["kind"]) == ["exact", "near"] and set(dup["split_b"]) == {"test"}
    assert set(dup["split_a"]) <= {"train", "val"}  # val is carved out of train
    assert "1 exact (same bytes) and 1 near" in _notes(splits)


def _run_duplicates_carved(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 30, "PNEUMONIA": 30})
    for i in range(30):  # every NORMAL image also saved as a second patient's image
        source = root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg"
        (root / "train" / "NORMAL" / f"IM-{500 + i:04d}-0001.jpeg").write_bytes(source.read_bytes())
    return data.load_splits("pneumonia", root)


def _check_duplicates_carved(splits):
    assert splits.duplicates.empty
    assert splits.frame.groupby("content_hash")["split"].nunique().max() == 1
    assert "30 joined with another because they share duplicate images" in _notes(splits)


# ----------------------------------------------------------------------------- tensor cache


def _run_replaced_same_mtime(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 3, "PNEUMONIA": 3})
    frame = data.scan_dataset(root, "pneumonia")
    first = loading.cache_images(frame, 16, cache_dir=tmp / "cache")
    path = Path(frame["path"].iloc[0])
    stat = path.stat()
    _save(Image.new("L", (64, 56), 255), path, format="JPEG")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return first, loading.cache_images(frame, 16, cache_dir=tmp / "cache"), loading.cache_images(frame, 16)


def _check_replaced_same_mtime(result):
    first, cached, fresh = result
    assert torch.equal(cached, fresh) and not torch.equal(first[0], cached[0])


def _run_preprocessing_changed(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 3, "PNEUMONIA": 3})
    frame = data.scan_dataset(root, "pneumonia")
    loading.cache_images(frame, 16, cache_dir=tmp / "cache")
    mp.setattr(loading, "PREPROCESS_VERSION", loading.PREPROCESS_VERSION + 1)
    loading.cache_images(frame, 16, cache_dir=tmp / "cache")
    return sorted(p.name for p in (tmp / "cache").iterdir())


def _run_killed_cache_write(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 3, "PNEUMONIA": 3})
    frame = data.scan_dataset(root, "pneumonia")

    def killed(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    mp.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        loading.cache_images(frame, 16, cache_dir=tmp / "cache")
    return sorted(p.name for p in (tmp / "cache").iterdir())


# ----------------------------------------------------------------------------- metrics and batches


def _run_one_normal_image(tmp, mp):
    y = np.array([0] + [1] * 40)
    probs = np.stack([1 - np.linspace(0.2, 0.9, 41), np.linspace(0.2, 0.9, 41)], axis=1)
    probs[0] = [0.9, 0.1]
    return evaluate.compute_metrics(y, probs, ["NORMAL", "PNEUMONIA"], n_bootstrap=200)


def _check_one_normal_image(m):
    assert m["specificity"] == 1.0 and m["too_few"] == {"NORMAL": 1}
    assert m["ci95"]["specificity"] is None and m["ci95"]["recall"]["NORMAL"] is None
    assert reporting.with_ci(m, "specificity") == "1.000 (too few to measure: 1 NORMAL image)"
    assert "[" in reporting.with_ci(m, "sensitivity")  # the 40 PNEUMONIA images keep their interval
    assert any("too few images to measure: NORMAL 1" in n for n in m["notes"])


def _run_last_batch_of_one(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 5, "PNEUMONIA": 4}, split="train")
    _dataset(root, {"NORMAL": 2, "PNEUMONIA": 2}, split="val", seed=1)
    _dataset(root, {"NORMAL": 2, "PNEUMONIA": 2}, split="test", seed=2)
    splits = data.load_splits("pneumonia", root)  # 9 training images, batches of 4: 4 + 4 + 1
    return {True: [len(y) for _, y in loading.make_loaders(splits, 17, 4)["train"]]}


CASES = [
    Case("folders", "image one folder below a class folder (train/NORMAL/batch2/)", _run_nested_class_subfolder,
         check=_check_nested_class_subfolder, id="class-subfolder"),
    Case("folders", "class folders NORMAL/ and normal/ side by side", _run_case_twin_class, ValueError,
         r"Two folders mean the same class 'NORMAL': .*NORMAL and .*normal", id="case-twin-class"),
    Case("folders", "val/ and valid/ side by side", _run_second_split_spelling, ValueError,
         r"Two folders mean the same split 'val': .*val and .*valid", id="second-split-spelling"),
    Case("folders", "files with other extensions (.webp, .gif, .csv) in class folders", _run_other_extensions,
         check=_check_other_extensions, id="other-extensions"),
    Case("folders", "images loose in a split folder and in the root", _run_loose_images,
         check=_check_loose_images, id="loose-images"),
    Case("folders", "nested copy chest_xray/chest_xray/ and __MACOSX inside the root", _run_archive_copies,
         check=_check_archive_copies, id="archive-copies"),
    Case("folders", "a folder named like another class below a class folder", _run_class_named_subfolder,
         check=_check_class_named_subfolder, id="class-named-subfolder"),
    Case("folders", "file name that is not valid UTF-8", _run_non_utf8_name, check=_check_non_utf8_name,
         id="non-utf8-name"),
    Case("folders", "class folder without read permission", _run_unreadable_class_folder, PermissionError,
         r"Cannot read the folder .*PNEUMONIA.*chmod", id="unreadable-class-folder"),
    Case("files", "image deleted after the scan, before caching", _run_deleted_after_scan, FileNotFoundError,
         r"is gone \(deleted or moved after the dataset was scanned\)\. Run load_splits again",
         id="deleted-after-scan"),
    Case("files", "DICOM (.dcm) with a window, in a class folder and uploaded", _run_dicom_in_dataset,
         check=_check_dicom_in_dataset, id="dicom-window"),
    Case("files", "MONOCHROME1 DICOM (0 is white), training and app", _run_dicom_monochrome1,
         check=_check_dicom_monochrome1, id="dicom-monochrome1"),
    Case("uploads", "truncated DICOM upload", _run_dicom_without_pixels, serve.UploadError,
         r"DICOM file cannot be shown", id="dicom-truncated"),
    Case("files", "JPEG with EXIF orientation 6 (training and app)", _run_exif_rotated,
         check=_check_exif_rotated, id="exif-rotated"),
    Case("folders", "same image in provided train/ and test/ (byte copy, and shrunk re-encoded copy)",
         _run_exact_duplicate_provided, check=_check_exact_duplicate_provided, id="duplicates-provided"),
    Case("folders", "copies of images under two patient ids, splits carved", _run_duplicates_carved,
         check=_check_duplicates_carved, id="duplicates-carved"),
    Case("files", "image replaced with the same modification time (tensor cache)", _run_replaced_same_mtime,
         check=_check_replaced_same_mtime, id="cache-same-mtime"),
    Case("files", "preprocessing code changed (tensor cache)", _run_preprocessing_changed,
         check=lambda names: len(names) == 2, id="cache-preprocessing"),
    Case("files", "run killed while the tensor cache is written", _run_killed_cache_write,
         check=lambda names: names == [], id="cache-killed-write"),
    Case("parameters", "one NORMAL image in a split (specificity 1.000 [1.000, 1.000])", _run_one_normal_image,
         check=_check_one_normal_image, id="too-few-to-measure"),
    Case("parameters", "IMAGE_SIZE = 17 and a last training batch of one image (BatchNorm)",
         _run_last_batch_of_one, check=lambda sizes: sizes == {True: [4, 4]},
         id="last-batch-of-one"),
]


# ----------------------------------------------------------------------------- issue 29: splits and patients


def _flat(root: Path, names: dict[str, list[str]], split: str = "train", seed: int = 0) -> Path:
    """`root/<split>/<class>/<name>` with distinct images: {class folder: [relative names]}."""
    for k, (cls, files) in enumerate(names.items()):
        for i, name in enumerate(files):
            _save(_texture(seed * 10_000 + k * 1000 + i), root / split / cls / name)
    return root


def _run_capitalised_splits(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 20, "PNEUMONIA": 20}, split="Train")
    _dataset(root, {"NORMAL": 5, "PNEUMONIA": 5}, split="Test", seed=1)
    return root, data.load_splits("pneumonia", root)


def _check_capitalised_splits(result):
    root, splits = result
    assert splits.carved == ("val",) and Path(splits.root) == root
    tested = {Path(p).parent.parent.name for p in splits.test["path"]}
    trained = {Path(p).parent.parent.name for p in splits.frame.loc[splits.frame["split"] != "test", "path"]}
    assert tested == {"Test"} and trained == {"Train"} and len(splits.test) == 10


def _run_alias_splits(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 20, "PNEUMONIA": 20}, split="Training_Set")
    _dataset(root, {"NORMAL": 5, "PNEUMONIA": 5}, split="TESTING", seed=1)
    return data.load_splits("pneumonia", root)


def _run_only_test_folder(tmp, mp):
    return data.load_splits("pneumonia", _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8}, split="Test"))


def _run_data_dir_is_test(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8})
    _dataset(root, {"NORMAL": 8, "PNEUMONIA": 8}, split="test", seed=1)
    return data.load_splits("pneumonia", root / "test")


def _run_seed_none_split(tmp, mp):
    return data.load_splits("pneumonia", _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8}), seed=None)


def _eyes(first: int, n: int) -> list[str]:
    return [f"{p}_{eye}.jpeg" for p in range(first, first + n) for eye in ("left", "right")]


def _run_eyepacs_names(tmp, mp):
    return data.load_splits("pneumonia", _flat(tmp / "pn", {"NORMAL": _eyes(10, 20), "PNEUMONIA": _eyes(100, 20)}))


def _check_eyepacs_names(splits):
    assert splits.frame.groupby("patient_id")["split"].nunique().max() == 1
    assert set(splits.frame["patient_id"]) == {str(p) for p in (*range(10, 30), *range(100, 120))}
    assert "80 images into 40 patients by EyePACS/ODIR" in _notes(splits)


def _run_unknown_names(tmp, mp):
    return data.load_splits("pneumonia", _flat(tmp / "pn", {c: [f"scan_{i}.png" for i in range(12)]
                                                           for c in ("NORMAL", "PNEUMONIA")}))


def _check_unknown_names(splits):
    assert splits.frame["patient_id"].nunique() == 24  # the same name in two classes is no patient
    text = _notes(splits)
    assert "split is by image" in text and "may leak" in text and "groups=" in text


def _run_patient_folders(tmp, mp):
    layout = {c: [f"pat{c[0]}{p:02d}/{k}.jpeg" for p in range(10) for k in (1, 2, 3)] for c in ("NORMAL", "PNEUMONIA")}
    return data.load_splits("pneumonia", _flat(tmp / "pn", layout))


def _check_patient_folders(splits):
    assert splits.frame["patient_id"].nunique() == 20
    assert splits.frame.groupby("patient_id")["split"].nunique().max() == 1
    assert "60 images into 20 patients by patient folder" in _notes(splits)


def _run_container_folder(tmp, mp):  # one sub-folder per class is no patient
    layout = {c: [f"images/{i}.png" for i in range(12)] for c in ("NORMAL", "PNEUMONIA")}
    return data.load_splits("pneumonia", _flat(tmp / "pn", layout))


def _check_container_folder(splits):
    assert splits.frame["patient_id"].nunique() == 24 and "split is by image" in _notes(splits)


def _csv_dataset(tmp: Path, rows: int) -> tuple[Path, Path]:
    root = _flat(tmp / "pn", {c: [f"{c[0]}{i:03d}.png" for i in range(12)] for c in ("NORMAL", "PNEUMONIA")})
    table = tmp / "groups.csv"
    lines = [f"{c[0]}{i:03d}.png,{c[0]}-patient{i // 2}" for c in ("NORMAL", "PNEUMONIA") for i in range(12)]
    table.write_text("file,patient\n" + "\n".join(lines[:rows]) + "\n")
    return root, table


def _run_groups_csv(tmp, mp):
    return data.load_splits("pneumonia", *_csv_dataset(tmp, 24)[:1], groups=tmp / "groups.csv")


def _check_groups_csv(splits):
    assert splits.frame["patient_id"].nunique() == 12
    assert splits.frame.groupby("patient_id")["split"].nunique().max() == 1
    assert "24 images into 12 patients by groups=" in _notes(splits) and "groups.csv" in _notes(splits)


def _run_groups_csv_incomplete(tmp, mp):
    root, table = _csv_dataset(tmp, 22)
    return data.load_splits("pneumonia", root, groups=table)


def _run_groups_callable(tmp, mp):
    root, _ = _csv_dataset(tmp, 24)
    return data.load_splits("pneumonia", root, groups=lambda path: Path(path).stem[0] + str(int(Path(path).stem[1:]) // 3))


def _check_groups_callable(splits):
    assert splits.frame["patient_id"].nunique() == 8  # N0..N3, P0..P3
    assert splits.frame.groupby("patient_id")["split"].nunique().max() == 1


def _run_groups_parent_flat(tmp, mp):
    return data.load_splits("pneumonia", _csv_dataset(tmp, 24)[0], groups="parent")


# ----------------------------------------------------------------------------- issue 29: files


def _png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit grayscale PNG, with an sBIT chunk (significant bits) when given."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    raw = buffer.getvalue()
    if sbit is None:
        return raw
    chunk = b"sBIT" + bytes([sbit])
    return raw[:33] + struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def _xray12() -> np.ndarray:
    return (np.asarray(_texture(42), dtype=np.float64) / 255 * 4095).astype(np.uint16)


def _run_png16_marker(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8})
    plain, marked = _xray12(), _xray12()
    marked[0, 0] = 65535  # one bright marker pixel
    for name, values in (("IM-0600-0001.png", plain), ("IM-0601-0001.png", marked)):
        (root / "train" / "NORMAL" / name).write_bytes(_png16(values))
    splits = data.load_splits("pneumonia", root)
    images = [loading.load_image(root / "train" / "NORMAL" / n, 56).numpy() for n in ("IM-0600-0001.png", "IM-0601-0001.png")]
    return splits, images


def _check_png16_marker(result):
    splits, (plain, marked) = result
    assert np.abs(plain[:, 8:, 8:].astype(int) - marked[:, 8:, 8:]).max() <= 1  # the same X-ray, the same pixels
    assert plain.max() >= 250  # scaled as 12-bit values, not 16-bit
    assert "2 16-bit image(s) without bit-depth metadata" in _notes(splits) and "12-bit" in _notes(splits)


def _run_png16_sbit(tmp, mp):
    values = (_xray12() // 4).astype(np.uint16)  # a dark 12-bit image: its maximum is about 1000
    path = tmp / "dark.png"
    path.write_bytes(_png16(values, sbit=12))
    from helpers.images import read_image

    return values, np.asarray(read_image(path))[..., 0], _train_and_app(path, 56)


def _check_png16_sbit(result):
    values, trained, pixels = result
    assert np.abs(trained.astype(int) - np.round(values.astype(float) * 255 / 4095)).max() <= 1  # by its 12 significant bits
    assert np.array_equal(pixels["train"], pixels["app"]) and any("sBIT" in n for n in pixels["notes"])


def _run_dicom_no_window(tmp, mp):
    return _train_and_app(_dicom(tmp / "dark.dcm", _ramp() // 4))


def _check_dicom_no_window(pixels):
    row = pixels["train"][10, :, 0].astype(int)
    assert abs(row[-1] - 64) <= 2 and any("BitsStored" in n for n in pixels["notes"])  # 1023 of 4095, not white


def _run_dicom_several_windows(tmp, mp):
    return _train_and_app(_dicom(tmp / "cr.dcm", _ramp(), window=([1024, 2048], [2048, 4096])))


def _check_dicom_several_windows(pixels):
    row = pixels["train"][10, :, 0].astype(int)
    assert np.array_equal(pixels["train"], pixels["app"]) and row[-1] == 255 and (row == 255).mean() > 0.4
    assert any("2 display windows" in n and "first" in n for n in pixels["notes"])


def _run_dicom_by_content(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    no_extension = _dicom(root / "train" / "NORMAL" / "IM-0500-0001", _ramp(), window=(1024, 2048))
    bare = _dicom(root / "train" / "NORMAL" / "IM-0501-0001.dcm", _ramp(), window=(1024, 2048), preamble=False)
    return data.load_splits("pneumonia", root), _train_and_app(no_extension), _train_and_app(bare)


def _check_dicom_by_content(result):
    splits, no_extension, bare = result
    assert {"IM-0500-0001", "IM-0501-0001.dcm"} <= {Path(p).name for p in splits.frame["path"]}
    assert splits.excluded == [] and splits.skipped == []
    for pixels in (no_extension, bare):
        assert np.array_equal(pixels["train"], pixels["app"]) and pixels["train"][10, -1, 0] == 255


def _run_symlinked_folders(tmp, mp):
    store = _dataset(tmp / "store", {"NORMAL": 6, "PNEUMONIA": 6})
    root = tmp / "pn"
    (root / "train").mkdir(parents=True)
    (root / "train" / "NORMAL").symlink_to(store / "train" / "NORMAL")  # a class folder elsewhere
    _dataset(root / "_pool", {"PNEUMONIA": 6}, seed=1)  # a class folder linked from inside the root
    (root / "train" / "PNEUMONIA").symlink_to(root / "_pool" / "train" / "PNEUMONIA")
    _dataset(tmp / "elsewhere", {"NORMAL": 3, "PNEUMONIA": 3}, split="test", seed=2)
    (root / "test").symlink_to(tmp / "elsewhere" / "test")  # a split folder elsewhere
    return data.load_splits("pneumonia", root)


def _check_symlinked_folders(splits):
    assert (splits.frame["split"] != "test").sum() == 12 and len(splits.test) == 6
    assert "symbolic link" in _notes(splits)


def _run_broken_class_link(tmp, mp):
    root = _dataset(tmp / "pn", {"PNEUMONIA": 6})
    (root / "train" / "NORMAL").symlink_to(tmp / "gone")
    return data.load_splits("pneumonia", root)


def _run_small_and_multipage(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8})
    for i in range(3):
        _save(_texture(300 + i, (20, 24)), root / "train" / "PNEUMONIA" / f"person{50 + i}_virus_1.jpeg")
    _save(_texture(400), root / "train" / "NORMAL" / "IM-0700-0001.tiff", save_all=True, append_images=[_texture(401)])
    return data.load_splits("pneumonia", root)


def _check_small_and_multipage(splits):
    text = _notes(splits)
    assert len(splits.frame) == 20
    assert "3 image(s) smaller than 32 pixels on a side" in text
    assert "1 multi-page file(s)" in text and "first page" in text


CASES_29 = [
    Case("folders", "capitalised Train/ and Test/ split folders", _run_capitalised_splits,
         check=_check_capitalised_splits, id="split-capitalised"),
    Case("folders", "split folders Training_Set/ and TESTING/", _run_alias_splits,
         check=lambda s: s.carved == ("val",) and len(s.test) == 10, id="split-aliases"),
    Case("folders", "only a Test/ folder (no train)", _run_only_test_folder, data.DatasetNotFoundError,
         r"Test is a test split folder", id="split-only-test"),
    Case("parameters", "DATA_DIR pointing at the test/ folder", _run_data_dir_is_test, data.DatasetNotFoundError,
         r"test is a test split folder.*point DATA_DIR at the folder above", id="data-dir-test-folder"),
    Case("parameters", "load_splits(seed=None)", _run_seed_none_split, ValueError,
         r"SEED must be a whole number, got None", id="split-seed-none"),
    Case("patients", "EyePACS names 10_left.jpeg / 10_right.jpeg", _run_eyepacs_names,
         check=_check_eyepacs_names, id="patients-eyepacs"),
    Case("patients", "file names with no known patient id (scan_1.png in both classes)", _run_unknown_names,
         check=_check_unknown_names, id="patients-unknown"),
    Case("patients", "one folder per patient (class/patient/1.jpeg)", _run_patient_folders,
         check=_check_patient_folders, id="patients-folders"),
    Case("patients", "one sub-folder per class (class/images/*.png)", _run_container_folder,
         check=_check_container_folder, id="patients-container-folder"),
    Case("patients", "groups= a CSV of file,patient", _run_groups_csv, check=_check_groups_csv, id="groups-csv"),
    Case("patients", "groups= a CSV that misses 2 images", _run_groups_csv_incomplete, ValueError,
         r"groups.csv.* no patient for 2 image", id="groups-csv-incomplete"),
    Case("patients", "groups= a function", _run_groups_callable, check=_check_groups_callable, id="groups-callable"),
    Case("patients", 'groups="parent" with images directly in class folders', _run_groups_parent_flat, ValueError,
         r'groups="parent".*class folder', id="groups-parent-flat"),
    Case("files", "16-bit PNGs of one X-ray, one with a bright marker pixel", _run_png16_marker,
         check=_check_png16_marker, id="png16-marker"),
    Case("files", "dark 16-bit PNG with sBIT 12", _run_png16_sbit, check=_check_png16_sbit, id="png16-sbit"),
    Case("files", "dark DICOM (BitsStored 12) without a window", _run_dicom_no_window,
         check=_check_dicom_no_window, id="dicom-bits-stored"),
    Case("files", "DICOM with two window centres and widths (CR/DX export)", _run_dicom_several_windows,
         check=_check_dicom_several_windows, id="dicom-several-windows"),
    Case("files", "DICOM without an extension, and without the 128-byte preamble", _run_dicom_by_content,
         check=_check_dicom_by_content, id="dicom-by-content"),
    Case("folders", "symlinked class folders and a symlinked split folder", _run_symlinked_folders,
         check=_check_symlinked_folders, id="symlinked-folders"),
    Case("folders", "class folder that is a broken symbolic link", _run_broken_class_link, ValueError,
         r"NORMAL is a symbolic link to .*gone, which does not exist", id="broken-class-link"),
    Case("files", "images smaller than the app accepts, and a two-page TIFF", _run_small_and_multipage,
         check=_check_small_and_multipage, id="small-and-multipage"),
]
CASES += CASES_29


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            case.run(tmp_path, monkeypatch)
    else:
        assert case.check(case.run(tmp_path, monkeypatch)) in (None, True)  # a lambda check returns its verdict


def test_cases_are_named_once():
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_scan_counts_small_images_by_the_apps_minimum():
    from helpers import images

    assert images.MIN_IMAGE_SIDE == serve.MIN_IMAGE_SIDE
