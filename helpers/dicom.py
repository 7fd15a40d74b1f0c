"""DICOM (`.dcm`) X-rays as 8-bit pictures: the way hospital images arrive.

`read_dicom` turns a DICOM file into an 8-bit grayscale PIL image the way a radiology viewer
shows it: the modality LUT (RescaleSlope/Intercept), then the file's own display window (a VOI
LUT Sequence, else WindowCenter/WindowWidth), and MONOCHROME1 images (where 0 is white) inverted,
so bone is always bright. Training (`helpers.loading.read_image`), the scan
(`helpers.scan`) and the app (`helpers.serve.read_upload`) all call it, so a `.dcm` gives the same
pixels everywhere. A file it cannot decode raises `DicomError` with a message saying what to do.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

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
