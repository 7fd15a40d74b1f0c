"""Reading an image file as the 8-bit RGB a model sees, the same way everywhere.

`read_image` decodes a file (DICOM through `read_dicom`: modality LUT, the file's display window,
MONOCHROME1 inverted), turns it as its EXIF orientation says and converts it with `to_rgb`
(16-bit values rescaled by their bit depth, transparency onto black, grayscale to 3 channels).
Training, the tensor cache, the figures, the dataset scan and the app all read through here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

# --------------------------------------------------------------------------- DICOM

DICOM_EXTENSIONS = (".dcm", ".dicom")
_MAGIC_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"


class DicomError(ValueError):
    """A DICOM file that cannot be turned into pixels; the message says why and what to do."""


def is_dicom(source: str | Path | bytes) -> bool:
    """True for a DICOM Part 10 file (the b"DICM" marker after the 128-byte preamble) or a `.dcm` name."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[_MAGIC_OFFSET:_MAGIC_OFFSET + 4]) == b"DICM"
    return Path(source).suffix.lower() in DICOM_EXTENSIONS


def _window(values: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Values -> [0, 1] through the file's display window, and how (DICOM PS3.3 C.11.2.1.2)."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) or 16
        return np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64) / (2 ** bits - 1), "its VOI LUT"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if getattr(v, "VM", 1) > 1 else v)  # noqa: E731 (several windows: the first)
        center, width = first(ds.WindowCenter), max(first(ds.WindowWidth), 1.0)
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), f"its sigmoid window {center:g}/{width:g}"
        scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) if width > 1 else (values >= center) * 1.0
        return np.clip(scaled, 0.0, 1.0), f"its window center {center:g} / width {width:g}"
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo if hi > lo else 1.0), "its own range (no window in the file)"


def read_dicom(source: str | Path | bytes | BinaryIO) -> tuple[Image.Image, list[str]]:
    """A DICOM file (path, bytes or file object) -> 8-bit PIL image ("L", or "RGB" for colour), and notes."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pragma: no cover - pydicom is a dependency of the course
        raise DicomError("Reading DICOM (.dcm) files needs pydicom: pip install pydicom.") from None
    name = str(source) if isinstance(source, (str, Path)) else "the DICOM file"
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        ds = pydicom.dcmread(fp)
        pixels = ds.pixel_array
    except Exception as err:  # missing pixel data, compressed without a decoder plug-in, broken file
        raise DicomError(
            f"Could not read the pixels of {name} ({type(err).__name__}: {err}). If it is a compressed "
            "DICOM, install a decoder (pip install pylibjpeg pylibjpeg-libjpeg) or export the image "
            "as PNG; otherwise the file is damaged.") from None
    notes = []
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
        notes.append(f"the DICOM file holds {ds.NumberOfFrames} frames; only the first is used")
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # colour (rare for X-rays): pydicom gives RGB
        notes.append("colour DICOM used as RGB")
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"), notes
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    scaled, how = _window(values, ds)
    notes.append(f"DICOM shown through {how}")
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
        notes.append("MONOCHROME1 DICOM inverted (bone bright)")
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), mode="L"), notes


# --------------------------------------------------------------------------- any image to RGB

HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA_BACKGROUND = (0, 0, 0)  # transparency is composited onto black, the background of a radiograph


def _rescale_high_bit_depth(image: Image.Image) -> tuple[Image.Image, str]:
    """16/32-bit grayscale -> 8-bit "L" by the smallest bit depth (8..32) holding its maximum
    (`convert("L")` would clip a 12-bit X-ray to white); floats in [0, 1] times 255; anything
    else stretched from its minimum to its maximum."""
    values = np.asarray(image, dtype=np.float64)
    if values.ndim == 3:  # e.g. a 2-channel 16-bit image opened as an array: keep the first
        values = values[..., 0]
    lo, hi = float(values.min()), float(values.max())
    if image.mode != "F" and lo >= 0:
        bits = next(b for b in (8, 10, 12, 14, 16, 32) if hi <= 2 ** b - 1)
        scaled = values * (255.0 / (2 ** bits - 1))
        how = f"as {bits}-bit values (0 -> black, {2 ** bits - 1} -> white)"
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scaled, how = values * 255.0, "as values in [0, 1]"
    else:
        span = hi - lo if hi > lo else 1.0
        scaled = (values - lo) / span * 255.0
        how = "by its own range (minimum -> black, maximum -> white)"
    note = f"{image.mode} image (values {lo:g}..{hi:g}) rescaled to 8 bits {how}"
    return Image.fromarray(np.round(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L"), note


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL image -> 8-bit RGB, with notes: grayscale replicated, palettes expanded,
    transparency onto black, 16/32-bit rescaled by its bit depth (never clipped)."""
    notes: list[str] = []
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image, note = _rescale_high_bit_depth(image)
        notes.append(note)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            notes.append("transparent areas were flattened onto black")
        background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        background.paste(image.convert("RGB"), mask=alpha)
        image = background
    if image.mode in ("L", "1"):
        notes.append("grayscale image replicated to 3 channels (RGB)")
    elif image.mode != "RGB":
        notes.append(f"converted from {image.mode} to RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, notes


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an image (1: as stored; 2-8: to be turned), 1 when unreadable."""
    try:
        value = int(image.getexif().get(0x0112, 1))  # ExifTags.Base.Orientation
    except Exception:  # a broken EXIF block: use the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def display_path(path: str | Path) -> str:
    """A path that prints: bytes of a non-UTF-8 name shown as \\x escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def oriented_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """A decoded image turned as its EXIF orientation says, then `to_rgb`; with notes."""
    notes: list[str] = []
    if (orientation := exif_orientation(image)) != 1:
        try:
            image = ImageOps.exif_transpose(image)
            notes.append(f"rotated according to its EXIF orientation ({orientation})")
        except Exception:  # a broken EXIF block should not block an otherwise good image
            pass
    rgb, converted = to_rgb(image)
    return rgb, notes + converted


def gone(path: str | Path) -> FileNotFoundError:
    """The error for a file that was scanned but is not there any more."""
    return FileNotFoundError(f"The image {display_path(path)} is gone (deleted or moved after the dataset "
                             "was scanned). Run load_splits again to re-scan the folder, or put it back.")


def read_image_with_notes(path: str | Path) -> tuple[Image.Image, list[str]]:
    """An image file (DICOM too) as 8-bit RGB, with notes on what was converted."""
    try:
        if is_dicom(path):
            image, notes = read_dicom(path)
            rgb, converted = oriented_rgb(image)
            return rgb, notes + converted
        with Image.open(path) as im:
            im.load()
            rgb, notes = oriented_rgb(im)
            return (im.copy() if rgb is im else rgb), notes  # the file closes here: keep no lazy image
    except FileNotFoundError:
        raise gone(path) from None


def read_image(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB, exactly as training and the app see it."""
    return read_image_with_notes(path)[0]


def resized_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image resized (PIL bilinear) to a square, as uint8 (3, S, S): the model's input."""
    image = image.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """`read_image`, then `resized_tensor`: uint8 (3, S, S)."""
    return resized_tensor(read_image(path), image_size)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (..., 3, H, W) -> their luminance (PIL's integer ITU-R 601-2 luma) in three
    equal channels: removes colour casts (the tint of photographed films) a model could use."""
    r, g, b = images.to(torch.int32).unbind(-3)
    luma = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)
    return torch.stack([luma, luma, luma], dim=-3)
