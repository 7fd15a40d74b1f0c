"""Bad inputs, one table: each gets a clear error naming the thing to fix, or a handled result
with a note; never a silent change of what is being measured (issue #8).

Every row of `CASES` says what the bad input is (`what`, in words: the table of the closing
note), how to feed it to the course (`run`), and what must come back: an exception of type
`error` whose message matches `match` (the message names what to fix), or a result that `check`
accepts (the handled result and its note). Everything is built in tmp_path from tiny images;
nothing is downloaded (file:// URLs and a local silent socket stand in for the network).
"""

from __future__ import annotations

import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from app import bundle, serve
from app.bundle import BUNDLE_FORMAT  # by name: _bundle() has a local variable `bundle`
from helpers import data, datasets, runs
from helpers.loading import cache_images, load_image
from helpers.synthetic import make_synthetic_dataset

CHEST4 = ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS")


# ----------------------------------------------------------------------------- builders

def _jpeg(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 32), value).save(path)
    return path


def _dataset(root: Path, layout: dict[str, int], split: str = "train") -> Path:
    """`root/<split>/<class>/` with n one-image patients per class: {class folder: n}."""
    for cls, n in layout.items():
        for i in range(n):
            name = f"IM-{i:04d}-0001.jpeg" if cls.upper() == "NORMAL" else f"person{i}_virus_{i}.jpeg"
            _jpeg(root / split / cls / name, value=40 + 3 * i)
    return root


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _same_pixels_in_training_and_app(tmp_path: Path, image: Image.Image) -> dict[str, Any]:
    """What training (`load_image`) and the app (`read_upload`) make of the same file."""
    payload = _png(image)
    path = tmp_path / "upload.png"
    path.write_bytes(payload)
    trained = load_image(path, 48).permute(1, 2, 0).numpy()
    checked = serve.read_upload(payload)
    app = np.asarray(checked.image.resize((48, 48), Image.BILINEAR))
    return dict(train=trained, app=app, notes=checked.notes)


def _bundle(tmp_path: Path, **changes: Any) -> Path:
    """A model file with a valid format key and the given (bad) contents."""
    bundle = {"format": BUNDLE_FORMAT, "arch": "mobilenet_v2", "head": "gap_dropout",
              "num_outputs": 2, "class_names": ["NORMAL", "PNEUMONIA"], "image_size": 32,
              "state_dict": {}}
    bundle.update(changes)
    bundle = {k: v for k, v in bundle.items() if v is not None}
    path = tmp_path / "model.pt"
    torch.save(bundle, path)
    return path


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


class Payload:
    """A Python object in a model file: loading it would run code, so it must be refused."""


def _silent_server() -> tuple[socket.socket, str]:
    """A host that accepts the connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/model.pt"


# ----------------------------------------------------------------------------- the cases

@dataclass
class Case:
    kind: str  # files, folders, parameters, model files, uploads
    what: str  # the bad input, in words
    run: Callable[[Path, pytest.MonkeyPatch], Any]
    error: type[BaseException] | None = None
    match: str = ""  # regex the error message must match: it names what to fix
    check: Callable[[Any], None] | None = None  # asserts the handled result and its note
    id: str = ""


def _run_chest4_as_pneumonia(tmp, mp):
    return data.load_splits("pneumonia", _dataset(tmp / "chest4", {c: 4 for c in CHEST4}))


def _run_kaggle_only_chest4(tmp, mp):
    mp.setattr(datasets, "project_root", lambda: tmp)
    _dataset(tmp / "input" / "chest-xray-pneumoniacovid19tuberculosis" / "Chest X_Ray", {c: 4 for c in CHEST4})
    return datasets.locate_dataset("pneumonia", download=False, kaggle_input=tmp / "input")


def _run_extra_covid_folder(tmp, mp):
    return datasets.locate_dataset("pneumonia", _dataset(tmp / "pn", {"NORMAL": 4, "PNEUMONIA": 4, "COVID19": 2}))


def _run_unknown_class_folder(tmp, mp):
    root = _dataset(tmp / "eyes", {"DR": 8, "No_DR": 8, "ungradable": 3})
    with pytest.warns(UserWarning, match="no class of the fundus dataset"):
        return data.load_splits("fundus", root)


def _check_unknown_class_folder(splits):
    assert any("Ignored 1 folder" in n and "ungradable" in n for n in splits.notes)
    assert set(splits.frame["class_name"]) == {"normal", "disease"} and len(splits.frame) == 16


def _run_data_dir_empty(tmp, mp):
    return data.load_splits("pneumonia", "")


def _run_data_dir_dot(tmp, mp):
    _dataset(tmp / "somewhere" / "below", {"NORMAL": 4, "PNEUMONIA": 4})
    mp.chdir(tmp)
    return datasets.locate_dataset("pneumonia", ".")


def _run_data_dir_dot_is_root(tmp, mp):
    _dataset(tmp, {"NORMAL": 8, "PNEUMONIA": 8})
    mp.chdir(tmp)
    return datasets.locate_dataset("pneumonia", ".")


def _run_generated_data_by_path(tmp, mp):
    """From notebooks/, DATA_DIR = "../data" reaches the generated sets in data/synthetic/."""
    course = tmp / "course"
    for name, counts in (("chest4", {"train": {c: 6 for c in CHEST4}}),
                         ("pneumonia", {"train": {"NORMAL": 14, "PNEUMONIA": 14}})):
        make_synthetic_dataset(name, course / "data" / "synthetic" / f"{name}-seed42", counts=counts,
                               image_size=32, seed=42)
    (course / "notebooks").mkdir()
    mp.chdir(course / "notebooks")
    return data.load_splits("pneumonia", "../data")


def _check_generated_data_by_path(splits):
    assert splits.root.name == "pneumonia-seed42"  # not the 4-class set beside it
    assert splits.synthetic and "synthetic" in splits.notes[0]


def _run_all_unreadable_class(tmp, mp):
    root = _dataset(tmp / "eyes", {"disease": 4})
    for i in range(3):
        (root / "train" / "normal").mkdir(parents=True, exist_ok=True)
        (root / "train" / "normal" / f"{i}.jpg").write_bytes(b"not a jpeg")
    return data.load_splits("fundus", root)


def _run_test_split_without_class(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 8, "PNEUMONIA": 8})
    _dataset(root, {"PNEUMONIA": 4}, split="test")
    return data.load_splits("pneumonia", root)


def _run_carve_two_patients(tmp, mp):
    return data.load_splits("pneumonia", _dataset(tmp / "pn", {"NORMAL": 2, "PNEUMONIA": 12}))


def _run_carve_three_patients(tmp, mp):
    return data.load_splits("pneumonia", _dataset(tmp / "pn", {"NORMAL": 3, "PNEUMONIA": 12}))


def _check_every_split_every_class(splits):
    counts = splits.counts()
    assert list(counts.index) == ["train", "val", "test"] and (counts.to_numpy() > 0).all(), counts
    owners = splits.frame.groupby("patient_id")["split"].nunique()
    assert (owners == 1).all()  # still grouped by patient
    assert any("Carved" in n for n in splits.notes)


def _run_broken_symlink(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 6, "PNEUMONIA": 6})
    (root / "train" / "NORMAL" / "IM-0099-0001.jpeg").symlink_to(tmp / "gone.jpeg")
    with pytest.warns(UserWarning, match="Skipped 1"):
        return data.load_splits("pneumonia", root)


def _check_broken_symlink(splits):
    assert [Path(p).name for p, _ in splits.skipped] == ["IM-0099-0001.jpeg"]
    assert "broken symbolic link" in splits.skipped[0][1]
    assert any("Skipped 1" in n for n in splits.notes)


def _run_corrupt_tensor_cache(tmp, mp):
    root = _dataset(tmp / "pn", {"NORMAL": 3, "PNEUMONIA": 3})
    frame = data.scan_dataset(root, "pneumonia")
    first = cache_images(frame, 16, cache_dir=tmp / "cache")
    (cache_file,) = (tmp / "cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # interrupted write
    with pytest.warns(UserWarning, match="rebuilding"):
        again = cache_images(frame, 16, cache_dir=tmp / "cache")
    return first, again, cache_images(frame, 16, cache_dir=tmp / "cache")


def _check_corrupt_tensor_cache(result):
    first, again, third = result
    assert torch.equal(first, again) and torch.equal(first, third)


def _check_16bit(result):
    train, app = result["train"], result["app"]
    assert np.array_equal(train, app)  # one pixel reader
    assert (train == 255).mean() < 0.05 and train[:, 0].max() < 10 and train[:, -1].min() > 245
    assert any("12-bit" in n for n in result["notes"])


def _check_rgba(result):
    assert np.array_equal(result["train"], result["app"])
    assert result["train"][24, 40].tolist() == [0, 0, 0]  # transparency -> black, in both
    assert any("transparent" in n for n in result["notes"])


def _check_same(result):
    assert np.array_equal(result["train"], result["app"])
    assert any("transparent" in n for n in result["notes"])


def _rgba() -> Image.Image:
    arr = np.zeros((40, 60, 4), dtype=np.uint8)
    arr[..., 0], arr[:, :30, 3] = 200, 255  # left half opaque red, right half transparent
    return Image.fromarray(arr, mode="RGBA")


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1)), mode="L").convert("P")
    image.info["transparency"] = image.getpixel((50, 0))  # a bright grey becomes transparent
    return image


def _run_same_name_other_url(tmp, mp):
    for folder, arch in (("a", "no_such_net"), ("b", "mobilenet_v2")):
        (tmp / folder).mkdir()
        _bundle(tmp / folder, arch=arch)
    first = bundle.locate_model("", (tmp / "a" / "model.pt").as_uri(), default=tmp / "absent.pt",
                                download_dir=tmp / "dl")
    second = bundle.locate_model("", (tmp / "b" / "model.pt").as_uri(), default=tmp / "absent.pt",
                                 download_dir=tmp / "dl")
    return first, second


def _check_same_name_other_url(result):
    first, second = result
    assert first.path != second.path and second.source == "download"
    assert torch.load(second.path, weights_only=True)["arch"] == "mobilenet_v2"


def _run_html_download(tmp, mp):
    (tmp / "site").mkdir()
    (tmp / "site" / "model.pt").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    url = (tmp / "site" / "model.pt").as_uri()
    first = bundle.locate_model("", url, default=tmp / "absent.pt", download_dir=tmp / "dl")
    return first, list((tmp / "dl").glob("*"))


def _check_not_cached(result):
    location, cached = result
    assert location.path is None and cached == []
    assert "HTML page" in location.messages[-1] and "Nothing was cached" in location.messages[-1]


def _run_wrong_sha256(tmp, mp):
    good = _bundle(tmp)
    wrong = bundle.locate_model("", good.as_uri() + "#sha256=" + "0" * 64, default=tmp / "absent.pt",
                                download_dir=tmp / "dl")
    mp.setenv(bundle.MODEL_SHA256_ENV, __import__("hashlib").sha256(good.read_bytes()).hexdigest())
    right = bundle.locate_model("", good.as_uri(), default=tmp / "absent.pt", download_dir=tmp / "dl")
    return wrong, right


def _check_wrong_sha256(result):
    wrong, right = result
    assert wrong.path is None and "sha256" in wrong.messages[-1]
    assert right.source == "download"


def _run_silent_host(tmp, mp):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        mp.delenv(name, raising=False)
    mp.setattr(bundle, "DOWNLOAD_TIMEOUT_S", 0.5)  # the default (5 s) is what the page waits
    server, url = _silent_server()
    try:
        return bundle.locate_model("", url, default=tmp / "absent.pt", download_dir=tmp / "dl")
    finally:
        server.close()


def _check_silent_host(location):
    assert location.path is None and "did not answer within 0.5 s" in location.messages[-1]


def _run_read_only_output_dir(tmp, mp):
    """A folder without write permission; as root (who may write anyway) a read-only sysfs folder."""
    folder = tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores the permission bits
        folder = Path("/sys/kernel")
    return runs.start_run("nb", "smoke", output_dir=str(folder))


CASES = [
    # ------------------------------------------------------------------ folders
    Case("folders", "4-class chest X-ray folder given as the pneumonia dataset", _run_chest4_as_pneumonia,
         datasets.WrongDatasetError, r"looks like the chest4 dataset.*not pneumonia", id="chest4-as-pneumonia"),
    Case("folders", "on Kaggle only the 4-class set attached, pneumonia wanted", _run_kaggle_only_chest4,
         datasets.DatasetNotFoundError, r"(?s)Could not find the 'pneumonia'.*Refused: .*chest4", id="kaggle-only-chest4"),
    Case("folders", "pneumonia folder with an extra COVID19 class folder", _run_extra_covid_folder,
         datasets.WrongDatasetError, r"COVID19.*mixes in class folder\(s\) of chest4", id="foreign-class-folder"),
    Case("folders", "class folder the dataset does not know (train/ungradable)", _run_unknown_class_folder,
         check=_check_unknown_class_folder, id="unknown-class-folder"),
    Case("folders", 'DATA_DIR = ""', _run_data_dir_empty, ValueError, r"DATA_DIR='' is empty", id="data-dir-empty"),
    Case("folders", 'DATA_DIR = "." with a dataset somewhere below the working directory', _run_data_dir_dot,
         datasets.DatasetNotFoundError, r"working directory .* not searched", id="data-dir-dot"),
    Case("folders", 'DATA_DIR = "." when the working directory is the dataset root', _run_data_dir_dot_is_root,
         check=lambda root: Path(root).resolve().name.startswith("test_bad_input"), id="data-dir-dot-root"),
    Case("folders", 'DATA_DIR = "../data" from notebooks/ (generated sets in data/synthetic)',
         _run_generated_data_by_path, check=_check_generated_data_by_path, id="generated-data-by-path"),
    Case("folders", "class folder whose every image is unreadable", _run_all_unreadable_class, ValueError,
         r"Every image of class normal in the train split is unreadable", id="class-all-unreadable"),
    Case("folders", "provided test/ without one of the classes", _run_test_split_without_class, ValueError,
         r"The test split has no images of class NORMAL", id="test-split-missing-class"),
    Case("folders", "carve with 2 patients of a class for val and test", _run_carve_two_patients, ValueError,
         r"The test split holds no image of class NORMAL \(carved", id="carve-too-few-patients"),
    Case("folders", "carve with 3 patients of a class (naive carve leaves test without it)",
         _run_carve_three_patients, check=_check_every_split_every_class, id="carve-few-patients"),
    Case("folders", "broken symbolic link in a class folder", _run_broken_symlink,
         check=_check_broken_symlink, id="broken-symlink"),
    # ------------------------------------------------------------------ files
    Case("files", "corrupt tensor-cache file (interrupted write)", _run_corrupt_tensor_cache,
         check=_check_corrupt_tensor_cache, id="corrupt-tensor-cache"),
    Case("files", "12-bit X-ray stored as 16-bit PNG (training and app)",
         lambda tmp, mp: _same_pixels_in_training_and_app(
             tmp, Image.fromarray(np.tile(np.linspace(0, 4095, 60), (40, 1)).astype(np.uint16))),
         check=_check_16bit, id="16bit-png"),
    Case("files", "RGBA PNG with transparency (training and app)",
         lambda tmp, mp: _same_pixels_in_training_and_app(tmp, _rgba()), check=_check_rgba, id="rgba-png"),
    Case("files", "palette PNG with a transparent colour (training and app)",
         lambda tmp, mp: _same_pixels_in_training_and_app(tmp, _palette_with_transparency()),
         check=_check_same, id="palette-png"),
    Case("files", "grayscale + alpha (LA) PNG (training and app)",
         lambda tmp, mp: _same_pixels_in_training_and_app(tmp, _rgba().convert("LA")),
         check=_check_same, id="la-png"),
    # ------------------------------------------------------------------ parameters
    Case("parameters", "IMAGE_SIZE = 0", lambda tmp, mp: runs.apply_profile("smoke", image_size=0),
         ValueError, r"IMAGE_SIZE must be a positive whole number, got 0", id="image-size-0"),
    Case("parameters", "BATCH_SIZE = -4", lambda tmp, mp: runs.apply_profile("cpu", batch_size=-4),
         ValueError, r"BATCH_SIZE must be a positive whole number, got -4", id="batch-size-negative"),
    Case("parameters", "EPOCHS = 0 (start_run)",
         lambda tmp, mp: runs.start_run("nb", "smoke", output_dir=str(tmp), epochs=0),
         ValueError, r"EPOCHS must be a positive whole number, got 0", id="epochs-0"),
    Case("parameters", "EPOCHS = 2.5", lambda tmp, mp: runs.apply_profile("full", epochs=2.5),
         ValueError, r"EPOCHS must be a positive whole number, got 2.5", id="epochs-float"),
    Case("parameters", "MAX_PER_CLASS = 0", lambda tmp, mp: runs.apply_profile("cpu", max_per_class=0),
         ValueError, r"MAX_PER_CLASS must be a positive whole number", id="max-per-class-0"),
    # ------------------------------------------------------------------ model files
    Case("model files", "bundle with an unknown arch", lambda tmp, mp: bundle.load_bundle(_bundle(tmp, arch="no_such_net")),
         bundle.BundleError, r"does not fit its own description \(arch 'no_such_net'", id="bundle-unknown-arch"),
    Case("model files", "bundle whose weights do not fit its arch",
         lambda tmp, mp: bundle.load_bundle(_bundle(tmp, state_dict={"fc.weight": torch.zeros(2, 8)})),
         bundle.BundleError, r"does not fit its own description \(arch 'mobilenet_v2'", id="bundle-mismatched-arch"),
    Case("model files", "bundle without state_dict", lambda tmp, mp: bundle.load_bundle(_bundle(tmp, state_dict=None)),
         bundle.BundleError, r"incomplete: it has no state_dict", id="bundle-no-weights"),
    Case("model files", "model file holding a Python object (would run code)",
         lambda tmp, mp: bundle.load_bundle(_bundle(tmp, extra=Payload())),
         bundle.BundleError, r"Refused the model file .* could run code", id="bundle-python-object"),
    Case("model files", "random bytes named model.pt",
         lambda tmp, mp: bundle.load_bundle(_write(tmp / "model.pt", b"not a torch file")),
         bundle.BundleError, r"Could not read the model file .*not a PyTorch file", id="model-junk"),
    Case("model files", "HTML error page saved as model.pt",
         lambda tmp, mp: bundle.load_bundle(_write(tmp / "model.pt", b"<!DOCTYPE html><html>404</html>")),
         bundle.BundleError, r"it is an HTML page", id="model-html"),
    Case("model files", "download URL with the file name of an earlier download", _run_same_name_other_url,
         check=_check_same_name_other_url, id="download-same-name"),
    Case("model files", "download URL that returns an HTML error page", _run_html_download,
         check=_check_not_cached, id="download-html-page"),
    Case("model files", "download whose sha256 does not match (#sha256= or env var)", _run_wrong_sha256,
         check=_check_wrong_sha256, id="download-sha256"),
    Case("model files", "download host that accepts the connection and never answers", _run_silent_host,
         check=_check_silent_host, id="download-silent-host"),
    # ------------------------------------------------------------------ uploads
    Case("uploads", "empty upload", lambda tmp, mp: serve.read_upload(b""), serve.UploadError,
         r"The file is empty", id="upload-empty"),
    Case("uploads", "text file named .png", lambda tmp, mp: serve.read_upload(b"hello, not a picture"),
         serve.UploadError, r"not an image we can read", id="upload-not-image"),
    Case("uploads", "truncated PNG",
         lambda tmp, mp: serve.read_upload(_png(_rgba())[:-60]), serve.UploadError,
         r"truncated or corrupt", id="upload-truncated"),
    Case("uploads", "upload one byte over the 20 MB limit of the widget",
         lambda tmp, mp: serve.read_upload(b"\0" * (serve.MAX_UPLOAD_BYTES + 1)), serve.UploadError,
         r"the limit is 20 MB", id="upload-too-big"),
    Case("uploads", "image of 20 x 20 pixels", lambda tmp, mp: serve.read_upload(_png(Image.new("L", (20, 20)))),
         serve.UploadError, r"only 20 x 20 pixels", id="upload-tiny"),
    # ------------------------------------------------------------------ parameters checked in start_run (issue 17.8)
    Case("parameters", "SEED = None", lambda tmp, mp: runs.start_run("nb", "smoke", seed=None, output_dir=str(tmp)),
         ValueError, r"SEED must be a whole number, got None: set SEED = 42", id="seed-none"),
    Case("parameters", 'SEED = "42"', lambda tmp, mp: runs.start_run("nb", "smoke", seed="42", output_dir=str(tmp)),
         ValueError, r"SEED must be a whole number, got '42'", id="seed-text"),
    Case("parameters", "read-only OUTPUT_DIR (found in start_run, before training)", _run_read_only_output_dir,
         PermissionError, r"OUTPUT_DIR .* cannot be written to .*Set OUTPUT_DIR to a folder you may write to",
         id="output-dir-read-only"),
    Case("parameters", "OUTPUT_DIR below a file", lambda tmp, mp: runs.start_run(
         "nb", "smoke", output_dir=str(_write(tmp / "a_file", b"x") / "out")),
         PermissionError, r"OUTPUT_DIR .*a_file/out' cannot be written to", id="output-dir-under-file"),
]


# ------------------------------------------------------------------ model files: metadata (issue 17, item 7)
# A bundle whose weights are fine but whose metadata is wrong loaded and gave wrong answers (class
# names in another order, a NaN threshold) or failed later with a message that blamed the image
# (unknown OOD method, Mahalanobis params missing or of another width). Now refused at load.

_GOOD_BUNDLE: dict[str, Any] = {}


def _good_bundle_contents() -> dict:
    """What save_bundle writes for a tiny valid model (MobileNetV2 at 32 px), built once per session."""
    if not _GOOD_BUNDLE:
        from helpers.models import build_model

        torch.manual_seed(0)
        model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32)
        _GOOD_BUNDLE.update({
            "format": BUNDLE_FORMAT, "arch": "mobilenet_v2", "head": "gap_dropout", "num_outputs": 2,
            "class_names": ["NORMAL", "PNEUMONIA"], "image_size": 32, "dataset": "pneumonia", "threshold": 0.5,
            "ood": {"method": "mahalanobis", "threshold": -10.0, "keep_fraction": 0.95,
                    "params": {"means": torch.zeros(2, 1280), "precision": torch.eye(1280)}},
            "state_dict": model.state_dict()})
    return _GOOD_BUNDLE


def _meta_bundle(tmp: Path, **changes: Any) -> bundle.AppModel:
    """load_bundle of the tiny valid bundle with some metadata changed (ood_<key>= changes one OOD key)."""
    contents = dict(_good_bundle_contents(), ood=dict(_good_bundle_contents()["ood"]))
    for key, value in changes.items():
        if key.startswith("ood_"):
            contents["ood"][key[4:]] = value
        else:
            contents[key] = value
    torch.save(contents, tmp / "model.pt")
    return bundle.load_bundle(tmp / "model.pt")


def _save_nan_threshold(tmp, mp):
    from helpers.models import build_model

    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32)
    return bundle.save_bundle(tmp / "model.pt", model, class_names=["NORMAL", "PNEUMONIA"], image_size=32,
                              profile="smoke", threshold=float("nan"))


def _check_good_bundle(app: bundle.AppModel) -> None:
    assert app.class_names == ["NORMAL", "PNEUMONIA"] and app.meta["threshold"] == 0.5
    assert app.meta["ood"]["method"] == "mahalanobis"


_REFUSED = r"model\.pt cannot be used: its metadata is wrong.*"
_WHAT_TO_DO = r".*Save the bundle again from notebook 08"
CASES += [
    Case("model files", "a valid bundle (the baseline of the rows below) loads", lambda tmp, mp: _meta_bundle(tmp),
         check=_check_good_bundle, id="bundle-meta-baseline"),
    Case("model files", "bundle with the class names in another order than its dataset's",
         lambda tmp, mp: _meta_bundle(tmp, class_names=["PNEUMONIA", "NORMAL"]), bundle.BundleError,
         _REFUSED + r"class_names \['PNEUMONIA', 'NORMAL'\] are the classes of the 'pneumonia' dataset in another "
         r"order; the dataset's order is \['NORMAL', 'PNEUMONIA'\]" + _WHAT_TO_DO, id="bundle-class-order"),
    Case("model files", "bundle with the class names of another dataset (fundus names, dataset pneumonia)",
         lambda tmp, mp: _meta_bundle(tmp, class_names=["normal", "disease"]), bundle.BundleError,
         _REFUSED + r"are not the classes of its recorded dataset 'pneumonia'" + _WHAT_TO_DO, id="bundle-class-other"),
    Case("model files", "bundle with 3 class names for a 2-output model",
         lambda tmp, mp: _meta_bundle(tmp, class_names=["NORMAL", "PNEUMONIA", "COVID19"]), bundle.BundleError,
         _REFUSED + r"names 3 classes but the model has 2 output\(s\)", id="bundle-class-count"),
    Case("model files", "bundle with the same class name twice",
         lambda tmp, mp: _meta_bundle(tmp, class_names=["NORMAL", "NORMAL"]), bundle.BundleError,
         _REFUSED + r"names a class twice", id="bundle-class-twice"),
    Case("model files", "bundle with threshold NaN", lambda tmp, mp: _meta_bundle(tmp, threshold=float("nan")),
         bundle.BundleError, _REFUSED + r"threshold is nan: it must be a number from 0 to 1" + _WHAT_TO_DO,
         id="bundle-threshold-nan"),
    Case("model files", "bundle with threshold 1.5", lambda tmp, mp: _meta_bundle(tmp, threshold=1.5),
         bundle.BundleError, _REFUSED + r"threshold is 1.5: it must be a number from 0 to 1", id="bundle-threshold-high"),
    Case("model files", "bundle with threshold -0.1", lambda tmp, mp: _meta_bundle(tmp, threshold=-0.1),
         bundle.BundleError, _REFUSED + r"threshold is -0.1:", id="bundle-threshold-negative"),
    Case("model files", "bundle with threshold '0.5' (a string)", lambda tmp, mp: _meta_bundle(tmp, threshold="0.5"),
         bundle.BundleError, _REFUSED + r"threshold is '0.5':", id="bundle-threshold-string"),
    Case("model files", "bundle with image_size 0", lambda tmp, mp: _meta_bundle(tmp, image_size=0),
         bundle.BundleError, _REFUSED + r"image_size is 0: it must be a positive whole number", id="bundle-image-size-0"),
    Case("model files", "bundle whose test AUC (shown on the page) is a string",
         lambda tmp, mp: _meta_bundle(tmp, metrics={"test_auc": "0.93"}), bundle.BundleError,
         _REFUSED + r"metrics is \{'test_auc': '0.93'\}: it must be a dict whose test_auc is a number",
         id="bundle-metrics-auc-string"),
    Case("model files", "bundle with an unknown OOD method", lambda tmp, mp: _meta_bundle(tmp, ood_method="odin"),
         bundle.BundleError, _REFUSED + r"ood.method is 'odin': it must be one of msp, energy, mahalanobis",
         id="bundle-ood-method"),
    Case("model files", "bundle with OOD threshold NaN", lambda tmp, mp: _meta_bundle(tmp, ood_threshold=float("nan")),
         bundle.BundleError, _REFUSED + r"ood.threshold is nan: it must be a finite number", id="bundle-ood-threshold-nan"),
    Case("model files", "bundle with OOD threshold missing", lambda tmp, mp: _meta_bundle(tmp, ood_threshold=None),
         bundle.BundleError, _REFUSED + r"ood.threshold is None", id="bundle-ood-threshold-missing"),
    Case("model files", "bundle with keep_fraction 95 (percent, not a fraction)",
         lambda tmp, mp: _meta_bundle(tmp, ood_keep_fraction=95), bundle.BundleError,
         _REFUSED + r"ood.keep_fraction is 95: it must be a number in \(0, 1\]", id="bundle-ood-keep-fraction"),
    Case("model files", "bundle with the mahalanobis method and no params",
         lambda tmp, mp: _meta_bundle(tmp, ood_params={}), bundle.BundleError,
         _REFUSED + r"ood.params holds \[\]: the mahalanobis method needs 'means' and 'precision'",
         id="bundle-ood-no-params"),
    Case("model files", "bundle with Mahalanobis params of another model (512 features, not 1280)",
         lambda tmp, mp: _meta_bundle(tmp, ood_params={"means": torch.zeros(2, 512), "precision": torch.eye(512)}),
         bundle.BundleError, _REFUSED + r"ood.params.means has shape \(2, 512\), but this model needs \(2, 1280\)",
         id="bundle-ood-params-width"),
    Case("model files", "bundle with NaN in the Mahalanobis precision matrix",
         lambda tmp, mp: _meta_bundle(tmp, ood_params={"means": torch.zeros(2, 1280),
                                                        "precision": torch.full((1280, 1280), float("nan"))}),
         bundle.BundleError, _REFUSED + r"ood.params.precision holds NaN", id="bundle-ood-params-nan"),
    Case("model files", "save_bundle with threshold NaN (refused before writing)", _save_nan_threshold, ValueError,
         r"Not saving the model bundle .*model.pt: threshold is nan", id="save-bundle-threshold-nan"),
]

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.error is not None:
        with pytest.raises(case.error, match=case.match) as err:
            case.run(tmp_path, monkeypatch)
        assert "weights_only=False" not in str(err.value)  # never advise loading code
    else:
        assert case.check(case.run(tmp_path, monkeypatch)) in (None, True)  # a lambda check returns its verdict


def test_every_case_is_named_and_kinds_are_covered():
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"files", "folders", "parameters", "model files", "uploads"}
    assert all((c.error is None) != (c.check is None) for c in CASES)


def test_default_download_timeout_is_a_few_seconds():
    assert bundle.DOWNLOAD_TIMEOUT_S <= 5
