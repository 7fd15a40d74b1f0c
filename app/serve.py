"""What the app does with one image: check the upload, predict, check the input, explain.

Used by notebook 08 and by the Streamlit app (`app/streamlit_app.py`), so both run the very
same code:

- **Uploads** (`read_upload`): a user can send anything. Every problem a user can cause (not an
  image, a truncated file, a huge file, 16-bit or transparent PNGs) becomes an `UploadError` with
  a message for a person, never a stack trace; good images come back as 8-bit RGB
  (`ValidatedImage`).
- **One image, end to end** (`analyse_upload`, `analyse_image` -> `Analysis`): prediction and
  probability from a loaded model file (`app.bundle.AppModel`), the out-of-distribution
  verdict (`helpers.ood`) and a Grad-CAM heatmap.
- **Sample images** for the app (`sample_image_bytes`) and PNG encoding (`png_bytes`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.bundle import AppModel
from helpers.core import logits_to_probs, model_device, predict_labels, to_numpy
from helpers.gradcam import default_target_layer, grad_cam
from helpers.images import DicomError, is_dicom, oriented_rgb, read_dicom, resized_tensor
from helpers.loading import normalize
from helpers.ood import logits_and_features, ood_score
from helpers.plots import overlay
from helpers.synthetic import chest_xray_image, synthetic_landscapes

# ============================================================================ uploads

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # 20 MB as Streamlit counts them (MiB); messages use the same unit
MAX_UPLOAD_PIXELS = 50_000_000  # 50 megapixels
MIN_IMAGE_SIDE = 32


class UploadError(ValueError):
    """An uploaded file cannot be used; the message is written for the person who uploaded it."""


@dataclass
class ValidatedImage:
    """An upload that passed `read_upload`: 8-bit RGB, plus what was done to get there."""

    image: Image.Image  # mode "RGB", uint8
    format: str | None  # "PNG", "JPEG", ...
    original_mode: str  # PIL mode before conversion: "L", "RGBA", "I;16", ...
    original_size: tuple[int, int]  # (width, height)
    notes: list[str] = field(default_factory=list)


def read_upload(
    data: bytes,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_UPLOAD_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> ValidatedImage:
    """Check and decode an uploaded file; raise `UploadError` with a readable message if unusable.

    Order of checks: empty or too many bytes -> can PIL identify it -> pixel count (read from the
    header, before decoding, so a 'decompression bomb' is never decoded) -> full decode (catches
    truncated files) -> EXIF rotation and 8-bit RGB (`helpers.loading.oriented_rgb`, the
    same conversion the training images get).
    """
    if data is None or len(data) == 0:
        raise UploadError("The file is empty. Please upload an image (PNG, JPEG, TIFF or DICOM).")
    if len(data) > max_bytes:
        raise UploadError(f"The file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB. "
                          "Please upload a smaller image (exported as PNG or JPEG).")
    if is_dicom(data):
        return _read_dicom_upload(data, max_pixels, min_side)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(f"The image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels).") from None
        except Exception:  # UnidentifiedImageError and the many errors of broken headers
            raise UploadError("This file is not an image we can read. Please upload a PNG, JPEG, "
                              "BMP, TIFF or DICOM file.") from None
        width, height = image.size
        if width * height > max_pixels:
            raise UploadError(f"The image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
                              f"the limit is {max_pixels / 1e6:.0f} megapixels. Please downscale it first.")
        if min(width, height) < min_side:
            raise UploadError(f"The image is only {width} x {height} pixels; at least {min_side} pixels "
                              "per side are needed.")
        fmt, mode = image.format, image.mode
        notes: list[str] = []
        if getattr(image, "n_frames", 1) > 1:
            notes.append(f"the file holds {image.n_frames} frames; only the first is used")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(f"The image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels).") from None
        except Exception:  # OSError "image file is truncated", SyntaxError for broken chunks, ...
            raise UploadError("The image file is truncated or corrupt (it could not be decoded completely). "
                              "Please export or download it again.") from None
    rgb, convert_notes = oriented_rgb(image)  # EXIF orientation + to_rgb: exactly what training does
    return ValidatedImage(rgb, fmt, mode, (width, height), notes + convert_notes)


def _read_dicom_upload(data: bytes, max_pixels: int, min_side: int) -> ValidatedImage:
    """A DICOM upload, read by `helpers.images.read_dicom` as training reads a `.dcm` file."""
    try:
        image, notes = read_dicom(data)
    except DicomError as err:
        raise UploadError(f"This DICOM file cannot be shown: {err}") from None
    except Exception as err:  # a reader bug on an unusual file is about the file, never the model
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UploadError(f"This DICOM file could not be read ({type(err).__name__}: {reason}). Export the "
                          "image as PNG from your DICOM viewer and upload that instead.") from None
    width, height = image.size
    if width * height > max_pixels or min(width, height) < min_side:
        raise UploadError(f"The DICOM image is {width} x {height} pixels; it must have at least {min_side} "
                          f"pixels per side and at most {max_pixels / 1e6:.0f} megapixels.")
    rgb, convert_notes = oriented_rgb(image)
    return ValidatedImage(rgb, "DICOM", image.mode, (width, height), notes + convert_notes)


# ============================================================================ one image, end to end

IMAGE_KINDS = {"pneumonia": "chest X-ray", "chest4": "chest X-ray", "fundus": "retinal fundus photograph"}


def image_kind(app: AppModel) -> str:
    """What the model's images are, in words, from the bundle's dataset ("chest X-ray", "retinal fundus
    photograph"); for another dataset "image of the '<name>' dataset" (its classes: `app.class_names`)."""
    dataset = app.meta.get("dataset")
    return IMAGE_KINDS.get(dataset) or (f"image of the '{dataset}' dataset" if dataset else "training image")


@dataclass
class Analysis:
    """Everything the app shows for one image."""

    predicted: str
    probability: float  # probability of the predicted class
    probs: dict[str, float]
    threshold: float | None  # decision threshold on P(positive class), chosen on validation
    in_distribution: bool
    ood_method: str | None
    ood_score: float | None
    ood_threshold: float | None
    image_u8: np.ndarray  # (S, S, 3) the model input as uint8
    heatmap: np.ndarray  # (S, S) Grad-CAM in [0, 1]
    overlay: np.ndarray  # (S, S, 3) floats in [0, 1]
    notes: list[str] = field(default_factory=list)
    kind: str = "training image"  # what the model was trained on, in words (`image_kind`)

    @property
    def verdict(self) -> str:
        """The out-of-distribution verdict in words."""
        if self.ood_method is None:
            return "no out-of-distribution check in this model file"
        if self.in_distribution:
            return f"looks like the {self.kind}s the model was trained on"
        return f"does NOT look like the {self.kind}s the model was trained on: do not trust the prediction"


def analyse_image(app: AppModel, image: Image.Image, notes: Sequence[str] = ()) -> Analysis:
    """Prediction, probability, OOD verdict and Grad-CAM for one RGB PIL image."""
    size = app.image_size
    u8 = resized_tensor(image.convert("RGB"), size)[None]  # the resize of the training images
    logits, features = logits_and_features(app.model, u8)
    probs = logits_to_probs(torch.from_numpy(logits))[0].numpy().astype(np.float64)
    names = app.class_names
    threshold = app.meta.get("threshold")
    pred = int(predict_labels(probs[None], threshold)[0])  # binary: threshold on P(class 1); else argmax
    ood = app.meta.get("ood") or None
    score = ood_threshold = None
    in_dist = True
    if ood:
        score = float(ood_score(ood["method"], logits, features, ood.get("params"))[0])
        ood_threshold = float(ood["threshold"])
        in_dist = score >= ood_threshold
    x = normalize(u8.to(model_device(app.model)), normalization=app.model)  # as its weights need
    # No warnings.catch_warnings() here: it swaps the filters of the whole process, which is not
    # thread-safe (two sessions at once can leave warnings switched off for good); the blank map of
    # an untrained model is simply shown flat.
    heatmap = grad_cam(app.model, x, default_target_layer(app.model), class_idx=pred, warn_blank=False)[0]
    image_np = u8[0].permute(1, 2, 0).numpy()
    return Analysis(names[pred], float(probs[pred]), {n: float(p) for n, p in zip(names, probs)}, threshold,
                    bool(in_dist), ood["method"] if ood else None, score, ood_threshold, image_np, heatmap,
                    overlay(image_np, heatmap), list(notes), image_kind(app))


def analyse_upload(app: AppModel, data: bytes, **limits: Any) -> Analysis:
    """`read_upload` + `analyse_image`: the app's whole prediction path for uploaded bytes.

    Raises `UploadError` (with a message for the user) for files that cannot be used.
    """
    checked = read_upload(data, **limits)
    return analyse_image(app, checked.image, notes=checked.notes)


def png_bytes(image_u8: Any) -> bytes:
    """Encode a uint8 image ((3, H, W) tensor or (H, W, 3)/(H, W) array) as PNG bytes."""
    arr = to_numpy(image_u8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_image_bytes(kind: str, size: int = 224, seed: int = 0) -> bytes:
    """A generated sample for the app, as PNG bytes: "xray" (synthetic chest X-ray with a
    consolidation) or "landscape" (a synthetic outdoor scene: not an X-ray)."""
    if kind == "xray":
        return png_bytes(np.asarray(chest_xray_image("consolidation", size, seed)))
    if kind == "landscape":
        return png_bytes(synthetic_landscapes(1, size, seed)[0])
    raise ValueError(f"Unknown sample {kind!r}; use 'xray' or 'landscape'.")
