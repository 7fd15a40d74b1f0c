"""The app's model file: weights + everything the app needs to use them, and how the app finds it.

- **Model bundle** (`save_bundle` / `load_bundle` -> `AppModel`): the weights plus architecture,
  class names, image size, decision and OOD thresholds and profile, in one file. Loaded with
  `torch.load(weights_only=True)`, so a downloaded bundle cannot run code; every problem with a
  file is a `BundleError` that says what is wrong. Metadata that would load but give wrong answers
  (class names in another order than the dataset's, a threshold outside [0, 1], broken OOD
  settings) is refused at load and at save (`metadata_problems`).
- **Finding the model** (`locate_model` -> `ModelLocation`): the path in $COURSE_MODEL_PATH,
  the default path (`default_model_path`), an earlier download, a download from
  $COURSE_MODEL_URL. A download is checked (not empty, a course bundle, the expected sha256)
  before it is cached.

Notebook 08 writes the bundle; the Streamlit app (`app/streamlit_app.py`) finds and loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.core import as_normalization
from helpers.datasets import DATASETS
from helpers.models import apply_weights_info, build_model, get_head, random_info
from helpers.ood import OOD_METHODS

BUNDLE_FORMAT = "course-model-bundle/1"
MODEL_PATH_ENV = "COURSE_MODEL_PATH"
MODEL_URL_ENV = "COURSE_MODEL_URL"
BUNDLE_NAME = "pneumonia_app_model.pt"


def project_root() -> Path:
    """The course folder: the parent of app/ in a checkout, else the current working directory."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").exists() else Path.cwd()


def to_jsonable(value: Any) -> Any:
    """numpy/torch values, Paths and tuples as plain JSON types (NaN/inf -> None), recursively."""
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
    return to_jsonable(value.to_dict()) if hasattr(value, "to_dict") else str(value)


def default_model_path() -> Path:
    """Where notebook 08 saves the app bundle by default: assets/08_model_to_app/pneumonia_app_model.pt."""
    return project_root() / "assets" / "08_model_to_app" / BUNDLE_NAME


def save_bundle(path: str | Path, model: nn.Module, *, class_names: Sequence[str], image_size: int,
                profile: str, threshold: float | None = None, ood: dict | None = None,
                dataset: str = "pneumonia", synthetic_data: bool = False, notes: str = "",
                metrics: dict | None = None) -> Path:
    """Save weights + everything needed to use them, as one file (`torch.save`).

    `ood`: {"method": one of OOD_METHODS, "threshold": float, "keep_fraction": float,
    "params": {name: tensor}} (params only for mahalanobis). Only tensors, strings, numbers,
    lists and dicts are stored, so `load_bundle` can use `torch.load(weights_only=True)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format": BUNDLE_FORMAT,
        "arch": model.arch,
        "head": getattr(model, "head_kind", "linear"),
        "num_outputs": int(_num_outputs(model)),
        "class_names": [str(c) for c in class_names],
        "image_size": int(image_size),
        "pretrained": bool(getattr(model, "pretrained", False)),
        "weights_info": _weights_info(model),
        "profile": str(profile),
        "dataset": dataset,
        "synthetic_data": bool(synthetic_data),
        "threshold": None if threshold is None else float(threshold),
        "ood": _ood_block(ood) if ood is not None else None,
        "metrics": to_jsonable(metrics or {}),
        "notes": notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    bundle["fingerprint"] = fingerprint(bundle)
    problems = metadata_problems(bundle, _feature_width(model))
    if problems:
        raise ValueError(f"Not saving the model bundle {path}: " + "; ".join(problems)
                         + ". Pass save_bundle the values of this training run (notebook 08).")
    tmp = path.with_name(path.name + ".tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)
    return path


FINGERPRINTED = ("arch", "head", "num_outputs", "class_names", "image_size", "dataset", "threshold", "weights_info")


def fingerprint(bundle: dict) -> dict[str, str]:
    """{field: digest} of the fields that decide what the model's answers mean, each bound to the
    weights: a field edited after `save_bundle` (image_size by hand) no longer matches its digest."""
    weights = hashlib.sha256()
    for name, tensor in sorted(bundle["state_dict"].items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = lambda key: json.dumps([key, to_jsonable(bundle.get(key)), weights.hexdigest()], sort_keys=True)  # noqa: E731
    return {key: hashlib.sha256(digest(key).encode()).hexdigest()[:16] for key in FINGERPRINTED}


def edited_fields(bundle: dict) -> list[str]:
    """The fingerprinted fields whose value is not the one `save_bundle` wrote ([] for a bundle without
    a fingerprint, written before it existed)."""
    recorded = bundle.get("fingerprint")
    if not isinstance(recorded, dict):
        return []
    now = fingerprint(bundle)
    return [key for key in FINGERPRINTED if recorded.get(key) != now[key]]


def _weights_info(model: nn.Module) -> dict:
    """Where the weights came from, their padding and the input normalisation they need."""
    info = dict(getattr(model, "weights_info", None) or random_info())
    mean, std = as_normalization(model)
    return to_jsonable({**info, "input_mean": list(mean), "input_std": list(std),
                        "padding": info.get("padding", "torchvision")})


def _ood_block(ood: dict) -> dict:
    """The OOD settings as plain values (`to_jsonable`), their fitted `params` as CPU
    tensors, so the bundle loads with weights_only=True."""
    block = to_jsonable({k: v for k, v in ood.items() if k != "params"})
    if "params" in ood:
        block["params"] = {str(k): torch.as_tensor(v).detach().to("cpu", copy=True) for k, v in ood["params"].items()}
    return block


def _num_outputs(model: nn.Module) -> int:
    """Number of outputs of the model: out_features of the last nn.Linear of its head."""
    linears = [m for m in get_head(model).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


def _feature_width(model: nn.Module) -> int:
    """Width D of the pooled backbone features: in_features of the first nn.Linear of the head."""
    return next(m for m in get_head(model).modules() if isinstance(m, nn.Linear)).in_features


# ============================================================================ checking the metadata

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _class_name_problems(meta: dict) -> list[str]:
    """class_names: distinct strings, one per output (2 for a 1-output model), in the order of the
    recorded dataset (`helpers.datasets.DATASETS`): output i of the model means class i of it."""
    names, n_out = meta.get("class_names"), meta.get("num_outputs")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        return [f"class_names is {names!r}: it must be a list of class names, one per model output"]
    if len(set(names)) != len(names):
        return [f"class_names {list(names)} names a class twice"]
    problems = []
    if not _is_whole(n_out) or n_out < 1:
        problems.append(f"num_outputs is {n_out!r}: it must be a positive whole number")
    elif len(names) != max(2, int(n_out)):
        problems.append(f"class_names names {len(names)} classes but the model has {n_out} output(s) "
                        f"(it needs {max(2, int(n_out))} class names)")
    dataset = meta.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        problems.append(f"dataset is {dataset!r}: it must be the name of the training dataset")
    spec = DATASETS.get(dataset) if isinstance(dataset, str) else None
    expected = list(spec.class_names) if spec else []
    canonical = [spec.canonical_class(n) for n in names] if spec else []
    if spec and canonical != expected:
        if len(canonical) == len(expected) and set(canonical) == set(expected):
            problems.append(f"class_names {list(names)} are the classes of the '{dataset}' dataset in another "
                            f"order; the dataset's order is {expected} (label i = output i), so every "
                            "prediction would be shown under the wrong class name")
        else:
            problems.append(f"class_names {list(names)} are not the classes of its recorded dataset "
                            f"'{dataset}', which are {expected} in this order")
    return problems


def _number_problems(meta: dict) -> list[str]:
    """threshold: None (most probable class) or a finite number in [0, 1]; image_size: whole, >= 1;
    metrics: a dict whose test_auc (shown on the page) is a number or absent."""
    problems, t, size, metrics = [], meta.get("threshold"), meta.get("image_size"), meta.get("metrics")
    if t is not None and not (_is_number(t) and math.isfinite(t) and 0 <= t <= 1):
        problems.append(f"threshold is {t!r}: it must be a number from 0 to 1 (the decision threshold on "
                        "the probability of the positive class, chosen on validation images) or None")
    if not _is_whole(size) or size < 1:
        problems.append(f"image_size is {size!r}: it must be a positive whole number of pixels")
    auc = metrics.get("test_auc") if isinstance(metrics, dict) else None
    if metrics is not None and (not isinstance(metrics, dict) or (auc is not None and not _is_number(auc))):
        problems.append(f"metrics is {metrics!r}: it must be a dict whose test_auc is a number")
    return problems


def _ood_problems(meta: dict, feature_width: int | None) -> list[str]:
    """ood: None/{} (no check) or a known method, a finite threshold, keep_fraction in (0, 1] and,
    for mahalanobis, params whose shapes fit the model (checked when `feature_width` is given)."""
    ood = meta.get("ood")
    if ood is None or (isinstance(ood, dict) and not ood):
        return []
    if not isinstance(ood, dict):
        return [f"ood is a {type(ood).__name__}: it must be a dict (method, threshold, params) or None"]
    method, t, keep = ood.get("method"), ood.get("threshold"), ood.get("keep_fraction")
    problems = []
    if method not in OOD_METHODS:
        problems.append(f"ood.method is {method!r}: it must be one of {', '.join(OOD_METHODS)}")
    if not (_is_number(t) and math.isfinite(t)):
        problems.append(f"ood.threshold is {t!r}: it must be a finite number (images scoring below it are "
                        "rejected)")
    if keep is not None and not (_is_number(keep) and 0 < keep <= 1):
        problems.append(f"ood.keep_fraction is {keep!r}: it must be a number in (0, 1]")
    if method == "mahalanobis" and feature_width is not None:
        problems += _mahalanobis_problems(ood.get("params"), feature_width, len(meta.get("class_names") or ()))
    return problems


def _mahalanobis_problems(params: Any, width: int, n_classes: int) -> list[str]:
    """ood.params of helpers.ood.fit_mahalanobis: means (classes, D), precision (D, D), finite floats."""
    if not isinstance(params, dict) or not {"means", "precision"} <= set(params):
        held = sorted(params) if isinstance(params, dict) else repr(params)
        return [f"ood.params holds {held}: the mahalanobis method needs 'means' and 'precision' "
                "(helpers.ood.fit_mahalanobis)"]
    problems = []
    for name, shape, why in (("means", (n_classes, width), f"one row per class, {width} backbone features"),
                             ("precision", (width, width), f"{width} backbone features")):
        value = params[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"ood.params.{name} is a {type(value).__name__}, not a tensor of floats")
        elif tuple(value.shape) != shape:
            problems.append(f"ood.params.{name} has shape {tuple(value.shape)}, but this model needs {shape} ({why})")
        elif not torch.isfinite(value).all():
            problems.append(f"ood.params.{name} holds NaN or infinite values")
    return problems


def metadata_problems(meta: dict, feature_width: int | None = None) -> list[str]:
    """What is wrong with a bundle's metadata, one phrase per field (empty list: nothing).

    Checked: class_names (against num_outputs and the order of the recorded dataset), threshold,
    image_size, metrics.test_auc, ood (method, threshold, keep_fraction; Mahalanobis params when `feature_width`,
    the width of the model's backbone features, is given). `save_bundle` refuses to write and
    `load_bundle` refuses to load a bundle with problems: it would load and give wrong answers.
    """
    return _class_name_problems(meta) + _number_problems(meta) + _ood_problems(meta, feature_width)


def _refused(path: Path, problems: list[str]) -> BundleError:
    return BundleError(f"The model file {path} cannot be used: its metadata is wrong, so the app would "
                       "give wrong answers with it: " + "; ".join(problems) + ". Save the bundle again "
                       "from notebook 08 (app.bundle.save_bundle records these fields from the training "
                       f"run), or set {MODEL_PATH_ENV} to another model file.")


@dataclass
class AppModel:
    """A loaded bundle: the model (eval mode, CPU) and its metadata."""

    model: nn.Module
    meta: dict  # everything in the bundle except the weights
    path: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def profile(self) -> str:
        return str(self.meta.get("profile", "unknown"))

    def describe(self) -> str:
        """One sentence for a person: architecture, weights, profile, data, input size, date."""
        m = self.meta
        data = "synthetic images" if m.get("synthetic_data") else f"the {m.get('dataset')} dataset"
        weights = "ImageNet-pretrained" if m.get("pretrained") else "randomly initialised (no ImageNet weights)"
        return (f"{m['arch']} ({weights}), trained in the '{m.get('profile')}' profile on {data}, "
                f"{m['image_size']} px input, saved {m.get('created', '?')}")


class BundleError(RuntimeError):
    """A model file exists but cannot be used; the message says why."""


_BUNDLE_KEYS = ("arch", "head", "num_outputs", "class_names", "image_size", "state_dict")


def _read_error(path: Path, err: Exception) -> BundleError:
    """A readable reason; never PyTorch's hint to retry with weights_only=False (that runs code)."""
    text = str(err)
    if "Unsupported global" in text:
        return BundleError(f"Refused the model file {path}: it holds Python objects, not only tensors "
                           "and plain data, and loading it could run code. Use a bundle saved by "
                           "app.bundle.save_bundle (notebook 08).")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read(200).lstrip().lower().startswith((b"<!doctype", b"<html")):
            return BundleError(f"Could not read the model file {path}: it is an HTML page (a failed "
                               "download?), not a model file.")
    first_line = "" if "weights_only" in text else (text.strip().splitlines() or [""])[0][:200]
    return BundleError(f"Could not read the model file {path}: it is not a PyTorch file written by "
                       f"torch.save, or it is damaged ({type(err).__name__}{': ' + first_line if first_line else ''}).")


def load_bundle(path: str | Path) -> AppModel:
    """Load a bundle written by `save_bundle` (safely: weights_only=True) and rebuild the model.

    Every problem with the file (unreadable, not a bundle, missing keys, metadata that would give
    wrong answers (`metadata_problems`), unknown architecture, weights that do not fit the
    architecture) is a `BundleError` that names the file and the field and says what to do.
    """
    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _read_error(path, err) from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a course model bundle (expected format {BUNDLE_FORMAT!r}); "
                          "create one with notebook 08 (app.bundle.save_bundle).")
    missing = [k for k in _BUNDLE_KEYS if k not in bundle]
    if missing:
        raise BundleError(f"The model file {path} is incomplete: it has no {', '.join(missing)}. "
                          "Save it again with app.bundle.save_bundle (notebook 08).")
    if problems := metadata_problems(bundle):  # before the weights: they cannot mend wrong metadata
        raise _refused(path, problems)
    if edited := edited_fields(bundle):
        what = ("its weights, or every field," if len(edited) == len(FINGERPRINTED)
                else "field(s) " + ", ".join(f"{k} (now {bundle.get(k)!r})" for k in edited))
        raise BundleError(f"The model file {path} was changed after it was saved: {what} no longer match "
                          "what app.bundle.save_bundle recorded with these weights, so the app would feed or "
                          "read the model wrongly. Do not edit a bundle by hand: save it again from notebook 08 "
                          f"with the values of its training run, or set {MODEL_PATH_ENV} to another model file.")
    try:
        model = build_model(bundle["arch"], bundle["num_outputs"], pretrained=False, head=bundle["head"],
                            image_size=bundle["image_size"])  # + the padding and normalisation it was trained with:
        apply_weights_info(model, bundle.get("weights_info") or random_info())
        model.load_state_dict(bundle["state_dict"])
    except Exception as err:  # unknown arch, weights of another architecture or head, bad sizes
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise BundleError(f"The model file {path} does not fit its own description (arch "
                          f"{bundle['arch']!r}, {bundle['num_outputs']} output(s)): {type(err).__name__}: "
                          f"{reason}") from None
    if problems := _ood_problems(bundle, _feature_width(model)):  # the Mahalanobis shapes need the model
        raise _refused(path, problems)
    model.pretrained = bool(bundle.get("pretrained", False))  # as trained, not as rebuilt here
    model.eval()
    meta = {k: v for k, v in bundle.items() if k not in ("state_dict", "fingerprint")}
    return AppModel(model, meta, path)


# ============================================================================ finding the model

@dataclass
class ModelLocation:
    """Result of `locate_model`: a path (or None) and what was tried, in words."""

    path: Path | None
    source: str  # "env", "default", "download", "cache" or "none"
    messages: list[str] = field(default_factory=list)


MODEL_SHA256_ENV = "COURSE_MODEL_SHA256"
DOWNLOAD_TIMEOUT_S = 5.0  # a host that accepts the connection and never answers: give up after this


def _download(url: str, target: Path, timeout: float) -> None:
    """Download `url` to a temporary file, check it (`_check_download`), then move it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        _check_download(Path(tmp_name), url)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _expected_sha256(url: str) -> str | None:
    """The checksum to insist on: `#sha256=<hex>` at the end of the URL, else $COURSE_MODEL_SHA256."""
    fragment = urllib.parse.urlparse(url).fragment
    if fragment.startswith("sha256="):
        return fragment.split("=", 1)[1].strip().lower()
    return os.environ.get(MODEL_SHA256_ENV, "").strip().lower() or None


def _check_download(path: Path, url: str) -> None:
    """Refuse (ValueError) a download that is empty, has the wrong checksum or is not a bundle."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the server sent an empty file")
    expected = _expected_sha256(url)
    if expected is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"its sha256 is {digest}, not the expected {expected}")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        head = path.read_bytes()[:200].lstrip().lower()
        kind = "an HTML page" if head.startswith((b"<!doctype", b"<html")) else f"{size} bytes of something else"
        raise ValueError(f"it is not a model file ({kind})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"it is not a course model bundle (format key {BUNDLE_FORMAT!r} missing)")


def _cache_path(cache: Path, url: str) -> Path:
    """One cache file per URL (not per file name): a different URL never gets an old download."""
    bare = urllib.parse.urldefrag(url).url
    name = Path(urllib.parse.urlparse(bare).path).name or BUNDLE_NAME
    return cache / f"{hashlib.sha256(bare.encode()).hexdigest()[:16]}-{name}"


def _download_failed(url: str, err: Exception, timeout: float) -> str:
    """What went wrong with a download, in one sentence for `ModelLocation.messages`."""
    if isinstance(err, (TimeoutError, socket.timeout)) or "timed out" in str(err):
        return f"Downloading {url} failed: the server did not answer within {timeout:g} s."
    if isinstance(err, ValueError):
        return f"Downloading {url} failed: {err}. Nothing was cached."
    return f"Downloading {url} failed ({type(err).__name__}: {err})."


def locate_model(path: str | Path | None = None, url: str | None = None, *,
                 default: str | Path | None = None, download_dir: str | Path | None = None,
                 timeout: float | None = None) -> ModelLocation:
    """Find the app's model bundle: explicit path (env COURSE_MODEL_PATH) -> default path ->
    earlier download of the same URL -> download from `url` (env COURSE_MODEL_URL). Never raises.

    `path`/`url` default to the environment variables; pass "" to ignore them. A download is
    checked before it is cached (not empty, a course bundle, and the sha256 given as
    `#sha256=<hex>` at the end of the URL or in $COURSE_MODEL_SHA256); `timeout` defaults to
    DOWNLOAD_TIMEOUT_S.
    """
    path = os.environ.get(MODEL_PATH_ENV, "") if path is None else str(path)
    url = os.environ.get(MODEL_URL_ENV, "") if url is None else url
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    default = Path(default) if default is not None else default_model_path()
    messages: list[str] = []
    if path:
        if Path(path).is_file():
            return ModelLocation(Path(path), "env", messages)
        messages.append(f"{MODEL_PATH_ENV}={path} does not point to a file.")
    if default.is_file():
        return ModelLocation(default, "default", messages)
    messages.append(f"No model at the default path {default}.")
    if not url:
        messages.append(f"{MODEL_URL_ENV} is not set, so nothing was downloaded.")
        return ModelLocation(None, "none", messages)
    cache = Path(download_dir) if download_dir else Path.home() / ".cache" / "medical-transfer-learning-course"
    target = _cache_path(cache, url)
    if target.is_file():
        try:
            _check_download(target, url)
            return ModelLocation(target, "cache", messages)
        except ValueError as err:
            messages.append(f"The cached download {target} was discarded: {err}.")
            target.unlink()
    try:
        _download(url, target, timeout)  # checked before it is moved into the cache
        return ModelLocation(target, "download", messages)
    except Exception as err:  # offline, 404, DNS, timeout, wrong file...
        messages.append(_download_failed(url, err, timeout))
    return ModelLocation(None, "none", messages)
