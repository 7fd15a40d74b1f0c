"""From a trained model to an app: reject wrong inputs, shrink the model, ship it in one file.

Used by notebook 08 and by the Streamlit app (`app/streamlit_app.py`), so both run the very
same code:

- **Uploads** (`read_upload`): a user can send anything. Every problem a user can cause (not an
  image, a truncated file, a huge file, 16-bit or transparent PNGs) becomes an `UploadError` with
  a message for a person, never a stack trace; good images come back as 8-bit RGB.
- **Out-of-distribution (OOD) scores**: how much an input looks like the training X-rays.
  Convention: *higher = more in-distribution*; an input is rejected when its score falls below a
  threshold chosen on validation X-rays (`threshold_keeping`, e.g. keep 95% of them).
- **Outside images** for experiments without downloads: `synthetic_landscapes`,
  `synthetic_noise`, `synthetic_shapes` (three different generators).
- **Export and int8 quantization** with ONNX Runtime (`export_onnx`, `quantize_onnx_static`,
  `quantize_onnx_dynamic`, `onnx_session`, `onnx_predict`, `measure_latency`).
- **Model bundle** (`save_bundle` / `load_bundle`): weights + everything the app needs to use
  them (architecture, class names, image size, decision and OOD thresholds, profile). Loaded with
  `torch.load(weights_only=True)`, so a downloaded bundle cannot run code.
- **Finding the model** (`locate_model`: env var, default path, download URL) and **analysing one
  image** (`analyse_upload`: prediction, probability, OOD verdict, Grad-CAM).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import socket
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from helpers.config import project_root
from helpers.core import logits_to_probs, model_device
from helpers.gradcam import default_target_layer, grad_cam
from helpers.loading import normalize, to_rgb
from helpers.models import backbone_and_head, build_model, get_head
from helpers.synthetic import chest_xray_image
from helpers.plots import overlay

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
    truncated files) -> EXIF rotation -> conversion to 8-bit RGB (`helpers.loading.to_rgb`, the
    same conversion the training images get).
    """
    if data is None or len(data) == 0:
        raise UploadError("The file is empty. Please upload a chest X-ray image (PNG or JPEG).")
    if len(data) > max_bytes:
        raise UploadError(f"The file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB. "
                          "Please upload a smaller image (a chest X-ray exported as PNG or JPEG).")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(f"The image has too many pixels (limit {max_pixels / 1e6:.0f} megapixels).") from None
        except Exception:  # UnidentifiedImageError and the many errors of broken headers
            raise UploadError("This file is not an image we can read. Please upload a PNG, JPEG, "
                              "BMP or TIFF file of a chest X-ray.") from None
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
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not block an otherwise good image
        rotated = image
    if rotated is not image:
        if rotated.size != image.size or rotated.tobytes() != image.tobytes():
            notes.append("rotated according to its EXIF orientation")
        image = rotated
    rgb, convert_notes = to_rgb(image)
    return ValidatedImage(rgb, fmt, mode, (width, height), notes + convert_notes)


# ============================================================================ outside images

def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise upsampled bilinearly (size, size, channels)."""
    coarse = rng.random((cells, cells, channels)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(size, size),
                                         mode="bilinear", align_corners=True)
    return up[0].permute(1, 2, 0).numpy()


def synthetic_landscapes(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    """`n` colour 'landscape photographs': sky gradient, sun, mountain ridges, textured ground.

    uint8 (n, 3, size, size), like the tensor cache. Nothing like a chest X-ray: colourful,
    bright sky on top, no body outline.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1:complex(size), 0:1:complex(size)]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        top, bottom = rng.uniform([0.1, 0.3, 0.6], [0.4, 0.6, 1.0]), rng.uniform([0.6, 0.7, 0.8], [1.0, 0.9, 1.0])
        if rng.random() < 0.3:  # sunset sky
            bottom = rng.uniform([0.9, 0.4, 0.2], [1.0, 0.7, 0.4])
        img = top + (bottom - top) * yy[..., None]
        sun_y, sun_x = rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.9)
        sun = np.exp(-((yy - sun_y) ** 2 + (xx - sun_x) ** 2) / (2 * rng.uniform(0.03, 0.06) ** 2))
        img = img + sun[..., None] * np.array([1.0, 0.9, 0.5])
        for layer in range(rng.integers(1, 4)):  # mountain ridges, further ones paler
            ridge = rng.uniform(0.35, 0.6) + 0.05 * layer
            for _ in range(3):
                ridge = ridge + rng.uniform(0.02, 0.1) * np.sin(xx[0] * rng.uniform(3, 14) + rng.uniform(0, 6))
            colour = rng.uniform([0.2, 0.25, 0.3], [0.5, 0.55, 0.6]) * (1 - 0.2 * layer)
            img = np.where((yy > ridge[None, :])[..., None], colour, img)
        horizon = rng.uniform(0.6, 0.8)
        ground = rng.uniform([0.1, 0.35, 0.05], [0.45, 0.65, 0.25])
        texture = _smooth_noise(rng, size, 12, 1) * 0.25
        img = np.where((yy > horizon)[..., None], ground * (0.8 + texture) + 0.1 * yy[..., None], img)
        img = img + rng.normal(0, 0.02, img.shape)
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def synthetic_noise(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    """`n` noise images: per-pixel colour noise, gray Gaussian noise and smooth colour fields.

    uint8 (n, 3, size, size). What a broken camera, a corrupted file or a blank screen sends.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            img = rng.random((size, size, 3))
        elif kind == 1:
            img = np.repeat(np.clip(rng.normal(rng.uniform(0.3, 0.7), 0.2, (size, size, 1)), 0, 1), 3, axis=2)
        else:
            img = _smooth_noise(rng, size, int(rng.integers(3, 9)), 3)
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def synthetic_shapes(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    """`n` 'clip-art / document' images: plain backgrounds with rectangles, ellipses and lines.

    uint8 (n, 3, size, size). A third generator, unlike both landscapes and noise.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        background = tuple(int(v) for v in rng.integers(150, 256, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 9)):
            box = np.sort(rng.integers(0, size, 4).reshape(2, 2), axis=0).T.ravel()
            x0, x1, y0, y1 = (int(v) for v in box)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = rng.integers(0, 3)
            if shape == 0:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
            elif shape == 1:
                draw.ellipse([x0, y0, x1, y1], fill=colour)
            else:
                draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, max(2, size // 16))))
        out[i] = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(out)


# ============================================================================ OOD scores
# Convention everywhere below: a HIGHER score means MORE like the training X-rays.

def _two_or_more_columns(logits: Any) -> torch.Tensor:
    """Logits as (N, C) float tensor; one logit z (sigmoid model) becomes [0, z] (same softmax)."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).float()
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1, 1)
        z = torch.cat([torch.zeros_like(z), z], dim=1)
    return z


def msp_score(logits: Any) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017): confidence of the predicted class."""
    return torch.softmax(_two_or_more_columns(logits), dim=1).max(dim=1).values.numpy().astype(np.float64)


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative energy T * logsumexp(logits / T) (Liu et al. 2020): large logits = familiar input."""
    z = _two_or_more_columns(logits)
    return (temperature * torch.logsumexp(z / temperature, dim=1)).numpy().astype(np.float64)


def invalid_class_score(probs: Any, invalid_index: int = -1) -> np.ndarray:
    """For a model with an extra INVALID class: 1 - P(INVALID)."""
    p = np.asarray(probs, dtype=np.float64)
    return 1.0 - p[:, invalid_index]


@contextlib.contextmanager
def _one_thread():
    """Run small linear algebra on one thread: a 1280 x 1280 inverse takes ~0.1 s that way, while
    multi-threaded BLAS on a busy shared machine can take seconds (threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_mahalanobis(features: Any, labels: Any) -> dict[str, torch.Tensor]:
    """Class means and one shared (Ledoit-Wolf shrunk) precision matrix of training features.

    Lee et al. (2018): in-distribution features sit close to their class mean; distance is
    measured with the covariance of the training features. Shrinkage keeps the covariance
    invertible when there are fewer images than feature dimensions (always true in smoke runs).
    """
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = np.asarray(labels).reshape(-1)
    classes = np.unique(y)
    means = torch.stack([x[torch.as_tensor(y == c)].mean(dim=0) for c in classes])
    centred = x - means[torch.as_tensor(np.searchsorted(classes, y))]
    shrink = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    with _one_thread():
        cov = centred.T @ centred / len(centred)
        mu = torch.trace(cov) / cov.shape[0]
        cov = (1 - shrink) * cov + shrink * mu * torch.eye(cov.shape[0], dtype=cov.dtype)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    return {"means": means.float(), "precision": precision.float(), "shrinkage": torch.tensor(shrink)}


def mahalanobis_score(features: Any, params: dict[str, torch.Tensor]) -> np.ndarray:
    """Minus the squared Mahalanobis distance to the closest class mean (higher = closer)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    means = params["means"].double()
    precision = params["precision"].double()
    with _one_thread():
        diff = x[:, None, :] - means[None, :, :]  # (N, C, D)
        d2 = ((diff @ precision) * diff).sum(dim=-1)  # (N, C) squared distances
    return (-d2.min(dim=1).values).numpy()


OOD_METHODS: tuple[str, ...] = ("msp", "energy", "mahalanobis")


def ood_score(method: str, logits: Any, features: Any = None, params: dict | None = None) -> np.ndarray:
    """Dispatch to one of `OOD_METHODS` (higher = more in-distribution)."""
    if method == "msp":
        return msp_score(logits)
    if method == "energy":
        return energy_score(logits)
    if method == "mahalanobis":
        if features is None or params is None:
            raise ValueError("mahalanobis needs backbone features and the fitted params (fit_mahalanobis)")
        return mahalanobis_score(features, params)
    raise ValueError(f"Unknown OOD method {method!r}. Known: {', '.join(OOD_METHODS)}")


def threshold_keeping(id_scores: Any, keep: float = 0.95) -> float:
    """The score threshold that keeps at least a fraction `keep` of these (validation) images.

    Rejects the floor((1 - keep) * n) lowest-scoring images (fewer when scores tie).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = np.sort(np.asarray(id_scores, dtype=np.float64).reshape(-1))
    if len(scores) == 0:
        raise ValueError("threshold_keeping needs at least one score")
    k = int(np.floor((1.0 - keep) * len(scores) + 1e-9))
    return float(scores[min(k, len(scores) - 1)])


def rejection_rate(scores: Any, threshold: float) -> float:
    """Share of images whose score falls below `threshold` (i.e. would be rejected)."""
    s = np.asarray(scores, dtype=np.float64)
    return float((s < threshold).mean()) if len(s) else float("nan")


def ood_auroc(id_scores: Any, ood_scores: Any) -> float:
    """AUROC of telling outside images (positives) from real ones with the score.

    1.0: every outside image scores below every real one; 0.5: no better than chance.
    Ties count one half.
    """
    a = np.asarray(id_scores, dtype=np.float64)
    b = np.asarray(ood_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    below = (b[:, None] < a[None, :]).mean()
    ties = (b[:, None] == a[None, :]).mean()
    return float(below + 0.5 * ties)


def logits_and_features(model: nn.Module, images_u8: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and pooled backbone features (N, D) for uint8 images (N, 3, S, S).

    Images must already have the model's input size. Uses `helpers.models.backbone_and_head`:
    `head(backbone(x)) == model(x)`, so one pass gives both.
    """

    backbone, head = backbone_and_head(model)
    device = model_device(model)
    model.eval()
    logits, feats = [], []
    with torch.inference_mode():
        for start in range(0, len(images_u8), batch_size):
            x = normalize(images_u8[start:start + batch_size].to(device))
            f = backbone(x)
            logits.append(head(f).float().cpu())
            feats.append(f.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def resize_u8(images_u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize uint8 images (N, 3, H, W) to (N, 3, S, S) with PIL bilinear (as the tensor cache does)."""
    if images_u8.shape[-1] == image_size and images_u8.shape[-2] == image_size:
        return images_u8
    out = torch.empty((len(images_u8), 3, image_size, image_size), dtype=torch.uint8)
    for i, img in enumerate(images_u8):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((image_size, image_size), Image.BILINEAR)
        out[i] = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    return out


# ============================================================================ export & int8

def _from_deploy_extra(module: str, *names: str):
    """`from module import names` (or the module) of ONNX / ONNX Runtime, saying how to install them."""
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{error}. The ONNX part of notebook 08 needs ONNX and ONNX Runtime: run "
                          '`pip install ".[deploy]"` in the course folder, or `pip install onnx onnxruntime` '
                          "(`uv sync` installs them).") from error
    return [getattr(imported, name) for name in names] if names else imported


def export_onnx(model: nn.Module, path: str | Path, image_size: int, opset: int = 17) -> Path:
    """Export `model` (eval mode, CPU copy) to ONNX with a dynamic batch axis.

    Input "input": float32 (N, 3, S, S), ImageNet-normalised; output "logits".
    Uses the TorchScript-based exporter (`dynamo=False`): the newer dynamo exporter needs the
    `onnxscript` package, which the course does not install.
    """
    import copy
    _from_deploy_extra("onnx")  # torch's exporter needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the TorchScript exporter
        torch.onnx.export(cpu_model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


class _CalibrationReader:
    """Feeds calibration images (normalised, batch 1) to ONNX Runtime's static quantizer."""

    def __init__(self, images_u8: torch.Tensor):
    
        self._batches = iter([{"input": normalize(img[None]).numpy()} for img in images_u8])

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover  (not used by MinMax calibration)
        pass


def _preprocessed(src: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation)."""
    (quant_pre_process,) = _from_deploy_extra("onnxruntime.quantization.shape_inference", "quant_pre_process")

    dst = src.with_name(src.stem + "_prep.onnx")
    quant_pre_process(str(src), str(dst))
    return dst


def quantize_onnx_static(src: str | Path, dst: str | Path, calibration_images_u8: torch.Tensor,
                         per_channel: bool = True) -> Path:
    """Post-training static int8 quantization (QDQ format) calibrated on a few training images.

    Weights AND activations become int8; the activation ranges come from running the
    calibration images through the model (MinMax). Per-channel weight scales matter for
    MobileNetV2's depthwise convolutions (one scale per layer loses too much precision).
    """
    CalibrationMethod, QuantFormat, QuantType, quantize_static = _from_deploy_extra(
        "onnxruntime.quantization", "CalibrationMethod", "QuantFormat", "QuantType", "quantize_static")

    src, dst = Path(src), Path(dst)
    prep = _preprocessed(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(prep), str(dst), _CalibrationReader(calibration_images_u8),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    finally:
        prep.unlink(missing_ok=True)
    return dst


def quantize_onnx_dynamic(src: str | Path, dst: str | Path) -> Path:
    """Post-training dynamic int8 quantization: int8 weights, activations quantized on the fly."""
    QuantType, quantize_dynamic = _from_deploy_extra("onnxruntime.quantization", "QuantType", "quantize_dynamic")

    src, dst = Path(src), Path(dst)
    prep = _preprocessed(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(prep), str(dst), weight_type=QuantType.QInt8)
    finally:
        prep.unlink(missing_ok=True)
    return dst


def onnx_session(path: str | Path, threads: int | None = None):
    """A CPU ONNX Runtime session with `threads` intra-op threads (default: torch's thread count).

    Thread spinning is switched off: spinning workers keep burning CPU after a run, which would
    slow down whatever is measured next (and the other users of a shared machine).
    """
    ort = _from_deploy_extra("onnxruntime")

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predict(session, images_u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) from an ONNX Runtime session, for uint8 images (N, 3, S, S)."""

    outs = []
    for start in range(0, len(images_u8), batch_size):
        x = normalize(images_u8[start:start + batch_size]).numpy()
        outs.append(torch.from_numpy(session.run(["logits"], {"input": x})[0]))
    return logits_to_probs(torch.cat(outs)).numpy().astype(np.float64)


def measure_latency(run_once: Callable[[], Any], n_runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median and 90th percentile wall time (ms) of `run_once()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(n_runs):
        start = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": n_runs}


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


def linear_parameter_share(model: nn.Module) -> float:
    """Share of the parameters that sit in nn.Linear layers (what dynamic Linear quantization touches)."""
    total = sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return linear / max(total, 1)


# ============================================================================ model bundle

BUNDLE_FORMAT = "course-model-bundle/1"
MODEL_PATH_ENV = "COURSE_MODEL_PATH"
MODEL_URL_ENV = "COURSE_MODEL_URL"
BUNDLE_NAME = "pneumonia_app_model.pt"


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
        "profile": str(profile),
        "dataset": dataset,
        "synthetic_data": bool(synthetic_data),
        "threshold": None if threshold is None else float(threshold),
        "ood": _plain(ood) if ood is not None else None,
        "metrics": _plain(metrics or {}),
        "notes": notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)
    return path


def _plain(value: Any) -> Any:
    """Numbers/arrays -> plain Python or tensors, so the bundle loads with weights_only=True."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _num_outputs(model: nn.Module) -> int:

    linears = [m for m in get_head(model).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


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
                           "helpers.deploy.save_bundle (notebook 08).")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read(200).lstrip().lower().startswith((b"<!doctype", b"<html")):
            return BundleError(f"Could not read the model file {path}: it is an HTML page (a failed "
                               "download?), not a model file.")
    first_line = "" if "weights_only" in text else (text.strip().splitlines() or [""])[0][:200]
    return BundleError(f"Could not read the model file {path}: it is not a PyTorch file written by "
                       f"torch.save, or it is damaged ({type(err).__name__}{': ' + first_line if first_line else ''}).")


def load_bundle(path: str | Path) -> AppModel:
    """Load a bundle written by `save_bundle` (safely: weights_only=True) and rebuild the model.

    Every problem with the file (unreadable, not a bundle, missing keys, unknown architecture,
    weights that do not fit the architecture) is a `BundleError` that says what is wrong.
    """
    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _read_error(path, err) from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a course model bundle (expected format {BUNDLE_FORMAT!r}); "
                          "create one with notebook 08 (helpers.deploy.save_bundle).")
    missing = [k for k in _BUNDLE_KEYS if k not in bundle]
    if missing:
        raise BundleError(f"The model file {path} is incomplete: it has no {', '.join(missing)}. "
                          "Save it again with helpers.deploy.save_bundle (notebook 08).")
    try:
        model = build_model(bundle["arch"], bundle["num_outputs"], pretrained=False, head=bundle["head"],
                            image_size=bundle["image_size"])
        model.load_state_dict(bundle["state_dict"])
    except Exception as err:  # unknown arch, weights of another architecture or head, bad sizes
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise BundleError(f"The model file {path} does not fit its own description (arch "
                          f"{bundle['arch']!r}, {bundle['num_outputs']} output(s)): {type(err).__name__}: "
                          f"{reason}") from None
    if len(bundle["class_names"]) != max(2, int(bundle["num_outputs"])):
        raise BundleError(f"The model file {path} names {len(bundle['class_names'])} classes but the "
                          f"model has {bundle['num_outputs']} output(s).")
    model.pretrained = bool(bundle.get("pretrained", False))  # as trained, not as rebuilt here
    model.eval()
    meta = {k: v for k, v in bundle.items() if k != "state_dict"}
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


# ============================================================================ one image, end to end

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

    @property
    def verdict(self) -> str:
        if self.ood_method is None:
            return "no out-of-distribution check in this model file"
        if self.in_distribution:
            return "looks like the chest X-rays the model was trained on"
        return "does NOT look like the chest X-rays the model was trained on: do not trust the prediction"


def analyse_image(app: AppModel, image: Image.Image, notes: Sequence[str] = ()) -> Analysis:
    """Prediction, probability, OOD verdict and Grad-CAM for one RGB PIL image."""

    size = app.image_size
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    u8 = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None]
    logits, features = logits_and_features(app.model, u8)
    probs = logits_to_probs(torch.from_numpy(logits))[0].numpy().astype(np.float64)
    names = app.class_names
    threshold = app.meta.get("threshold")
    if len(names) == 2 and threshold is not None:
        pred = int(probs[1] >= threshold)
    else:
        pred = int(probs.argmax())
    ood = app.meta.get("ood") or None
    score = ood_threshold = None
    in_dist = True
    if ood:
        score = float(ood_score(ood["method"], logits, features, ood.get("params"))[0])
        ood_threshold = float(ood["threshold"])
        in_dist = score >= ood_threshold
    x = normalize(u8.to(model_device(app.model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blank-map warning of untrained models; shown as a flat map
        heatmap = grad_cam(app.model, x, default_target_layer(app.model), class_idx=pred)[0]
    image_np = u8[0].permute(1, 2, 0).numpy()
    return Analysis(names[pred], float(probs[pred]), {n: float(p) for n, p in zip(names, probs)}, threshold,
                    bool(in_dist), ood["method"] if ood else None, score, ood_threshold, image_np, heatmap,
                    overlay(image_np, heatmap), list(notes))


def analyse_upload(app: AppModel, data: bytes, **limits: Any) -> Analysis:
    """`read_upload` + `analyse_image`: the app's whole prediction path for uploaded bytes.

    Raises `UploadError` (with a message for the user) for files that cannot be used.
    """
    checked = read_upload(data, **limits)
    return analyse_image(app, checked.image, notes=checked.notes)


def png_bytes(image_u8: Any) -> bytes:
    """Encode a uint8 image ((3, H, W) tensor or (H, W, 3)/(H, W) array) as PNG bytes."""
    arr = image_u8.detach().cpu().numpy() if isinstance(image_u8, torch.Tensor) else np.asarray(image_u8)
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


__all__ = [
    "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "UploadError", "ValidatedImage", "read_upload", "to_rgb",
    "synthetic_landscapes", "synthetic_noise", "synthetic_shapes",
    "OOD_METHODS", "msp_score", "energy_score", "invalid_class_score", "fit_mahalanobis",
    "mahalanobis_score", "ood_score", "threshold_keeping", "rejection_rate", "ood_auroc",
    "logits_and_features", "resize_u8",
    "export_onnx", "quantize_onnx_static", "quantize_onnx_dynamic", "onnx_session", "onnx_predict",
    "measure_latency", "file_size_mb", "linear_parameter_share",
    "BUNDLE_FORMAT", "MODEL_PATH_ENV", "MODEL_URL_ENV", "MODEL_SHA256_ENV", "DOWNLOAD_TIMEOUT_S", "default_model_path", "save_bundle", "load_bundle",
    "AppModel", "BundleError", "ModelLocation", "locate_model", "Analysis", "analyse_image", "analyse_upload",
    "png_bytes", "sample_image_bytes",
]
