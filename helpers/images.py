"""Reading an image file (DICOM too) as the 8-bit RGB a model sees: training, the cache, the figures, the scan
and the app all read through here (EXIF orientation applied, 16-bit values rescaled by one bit depth per source,
transparency onto black, grayscale to 3 channels)."""

from __future__ import annotations

import io
import os
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

DICOM_EXTENSIONS = (".dcm", ".dicom")
_MAGIC_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"
_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                 b"UR US UT UV".split())
MIN_IMAGE_SIDE = 32  # the smallest side the app accepts (app/serve.py); the scan counts smaller images


class DicomError(ValueError):
    """A DICOM file that cannot be turned into pixels; the message says why and what to do."""


def is_dicom(source: str | Path | bytes) -> bool:
    """DICOM by content (bytes or a file's first bytes: b"DICM" after the preamble, or a group 0002/0008
    element at byte 0, explicit or implicit VR), whatever the name; a `.dcm` name counts too."""
    named = not isinstance(source, (bytes, bytearray)) and Path(source).suffix.lower() in DICOM_EXTENSIONS
    try:
        with io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb") as f:
            head = f.read(_MAGIC_OFFSET + 4)
    except OSError:
        head = b""
    return named or head[_MAGIC_OFFSET:_MAGIC_OFFSET + 4] == b"DICM" or (
        len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")
        and (head[4:6] in _VRS or int.from_bytes(head[4:8], "little") < 1024))


def _window(values: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Values -> [0, 1] through the file's display window, and how (DICOM PS3.3 C.11.2.1.2)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        return np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64) / (2 ** bits - 1), "its VOI LUT"
    if "WindowCenter" in ds and "WindowWidth" in ds:  # one value each, or several windows (CR, DX): the first
        centers, widths = (np.ravel(np.asarray(ds[k].value, dtype=np.float64)) for k in ("WindowCenter", "WindowWidth"))
        center, width = float(centers[0]), max(float(widths[0]), 1.0)
        several = f" (the file holds {len(centers)} display windows; only the first is used)" if len(centers) > 1 else ""
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)),
                    f"its sigmoid window {center:g}/{width:g}{several}")
        scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) if width > 1 else (values >= center) * 1.0
        return np.clip(scaled, 0.0, 1.0), f"its window center {center:g} / width {width:g}{several}"
    if bits := int(ds.get("BitsStored", 0) or 0):  # no window: the range the stored bits can hold
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        ends = np.asarray(apply_modality_lut(np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed
                                                      else [0, 2 ** bits - 1]), ds), dtype=np.float64)
        lo, hi = float(ends.min()), float(ends.max())
        return (np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0),
                f"its BitsStored ({bits}-bit values: {lo:g} -> black, {hi:g} -> white; no window in the file)")
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo if hi > lo else 1.0), "its own range (no window nor BitsStored in the file)"


def read_dicom(source: str | Path | bytes | BinaryIO) -> tuple[Image.Image, list[str]]:
    """A DICOM file (path, bytes or file object) -> 8-bit PIL image ("L", or "RGB" for colour), and notes."""
    import pydicom
    from pydicom import uid
    from pydicom.pixels import apply_modality_lut

    name = str(source) if isinstance(source, (str, Path)) else "the DICOM file"
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        ds = pydicom.dcmread(fp, force=True)  # force: also a data set without the preamble
        if "TransferSyntaxUID" not in ds.file_meta:  # no file meta: the encoding it was read with
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                              uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
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


HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_DATASET_BITS: dict[str, int] = {}  # dataset folder -> bit depth of its 16-bit images without metadata


def set_dataset_bit_depth(folder: str | Path, bits: int | None) -> None:
    """The bit depth of every 16-bit image without metadata under `folder` (set by the scan); None forgets it."""
    _DATASET_BITS.pop(os.path.abspath(folder), None)
    if bits is not None:
        _DATASET_BITS[os.path.abspath(folder)] = bits


def depth_holding(value: float) -> int:
    """The smallest usual bit depth (8, 10, 12, 14, 16, 32) whose range holds `value`."""
    return next(b for b in (8, 10, 12, 14, 16, 32) if value <= 2 ** b - 1)


def _png_sbit(stream: BinaryIO) -> int | None:
    """The significant bits of a PNG's first channel (its sBIT chunk), or None (none before the pixels)."""
    stream.seek(0)
    if stream.read(8) != b"\x89PNG\r\n\x1a\n":
        return None
    while len(head := stream.read(8)) == 8 and head[4:8] not in (b"IDAT", b"IEND"):
        body = stream.read(int.from_bytes(head[:4], "big") + 4)
        if head[4:8] == b"sBIT" and body:
            return body[0]
    return None


def stored_bits(image: Image.Image, path: str | Path | None = None) -> tuple[int, str] | None:
    """(bit depth, where from): the PNG's sBIT, else its dataset's rule (`set_dataset_bit_depth`), else None."""
    source = getattr(image, "_fp", None) if path is None else None  # an upload: the stream PIL read
    try:
        if image.format == "PNG" and (path is not None or source is not None):
            with (open(path, "rb") if path is not None else nullcontext(source)) as stream:
                position = stream.tell()
                bits = _png_sbit(stream)
                stream.seek(position)
            if bits:
                return bits, "from its PNG sBIT chunk"
    except (OSError, ValueError):  # a closed or odd stream: no metadata
        pass
    where = os.path.abspath(path) if path is not None else ""
    return next(((bits, "the rule for its whole dataset, guessed from its images (no PNG sBIT)")
                 for folder, bits in _DATASET_BITS.items() if where.startswith(folder + os.sep)), None)


def _rescale_high_bit_depth(image: Image.Image, bits: tuple[int, str] | None) -> tuple[Image.Image, str]:
    """16/32-bit grayscale -> 8-bit "L" by `bits` (else guessed from the maximum), floats in [0, 1]
    times 255, anything else stretched from its minimum to its maximum; and a note."""
    values = np.asarray(image, dtype=np.float64)
    if values.ndim == 3:  # e.g. a 2-channel 16-bit image opened as an array: keep the first
        values = values[..., 0]
    lo, hi = float(values.min()), float(values.max())
    if image.mode != "F" and lo >= 0:
        depth, source = bits or (depth_holding(hi), "guessed from this image's maximum (no bit-depth metadata)")
        scaled = values * (255.0 / (2 ** depth - 1))
        how = f"as {depth}-bit values, {source} (0 -> black, {2 ** depth - 1} -> white)"
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scaled, how = values * 255.0, "as values in [0, 1]"
    else:
        scaled = (values - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        how = "by its own range (minimum -> black, maximum -> white)"
    note = f"{image.mode} image (values {lo:g}..{hi:g}) rescaled to 8 bits {how}"
    return Image.fromarray(np.round(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L"), note


def to_rgb(image: Image.Image, *, bits: tuple[int, str] | None = None) -> tuple[Image.Image, list[str]]:
    """Any PIL image -> 8-bit RGB, with notes (16/32-bit rescaled by `bits`, else `stored_bits`)."""
    notes: list[str] = []
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image, note = _rescale_high_bit_depth(image, bits or stored_bits(image))
        notes.append(note)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            notes.append("transparent areas were flattened onto black")
        background = Image.new("RGB", image.size, (0, 0, 0))  # black, the background of a radiograph
        background.paste(image.convert("RGB"), mask=alpha)
        image = background
    if image.mode != "RGB":
        notes.append("grayscale image replicated to 3 channels (RGB)" if image.mode in ("L", "1")
                     else f"converted from {image.mode} to RGB")
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
    """A path that prints: relative to the working directory when that is short (at most two levels up, not
    the folder itself), else as given (another drive, a distant folder); bytes of a non-UTF-8 name as \\x."""
    try:
        relative = os.path.relpath(path)
        if relative != "." and not relative.startswith(os.path.join(os.pardir, os.pardir, os.pardir)):
            path = relative
    except (ValueError, OSError, TypeError):  # another drive, the working directory gone, no path
        pass
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def oriented_rgb(image: Image.Image, path: str | Path | None = None) -> tuple[Image.Image, list[str]]:
    """EXIF orientation applied, then `to_rgb`, with notes (`path`: the file, for its bit depth)."""
    bits = stored_bits(image, path) if image.mode in HIGH_BIT_DEPTH_MODES else None
    notes: list[str] = []
    if (orientation := exif_orientation(image)) != 1:
        try:
            image = ImageOps.exif_transpose(image)
            notes.append(f"rotated according to its EXIF orientation ({orientation})")
        except Exception:  # a broken EXIF block should not block an otherwise good image
            pass
    rgb, converted = to_rgb(image, bits=bits)
    return rgb, notes + converted


def gone(path: str | Path) -> FileNotFoundError:
    """The error for a file that was scanned but is not there any more."""
    return FileNotFoundError(f"The image {display_path(path)} is gone (deleted or moved after the dataset "
                             "was scanned). Run load_splits again to re-scan the folder, or put it back.")


def read_image(path: str | Path) -> Image.Image:
    """An image file (DICOM too) as 8-bit RGB, exactly as training and the app see it."""
    try:
        if is_dicom(path):
            return oriented_rgb(read_dicom(path)[0])[0]
        with Image.open(path) as im:
            im.load()
            rgb = oriented_rgb(im, path)[0]
            return im.copy() if rgb is im else rgb  # the file closes here: keep no lazy image
    except FileNotFoundError:
        raise gone(path) from None


def resized_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image resized (PIL bilinear) to a square, as uint8 (3, S, S): the model's input."""
    image = image.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """`read_image`, then `resized_tensor`: uint8 (3, S, S)."""
    return resized_tensor(read_image(path), image_size)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> PIL's integer luma in 3 equal channels (removes colour casts)."""
    r, g, b = images.to(torch.int32).unbind(-3)
    luma = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)
    return torch.stack([luma, luma, luma], dim=-3)
