"""Any decoded image as the 8-bit RGB a model sees: `to_rgb`.

Training (`helpers.loading.read_image`) and the app (`helpers.serve.read_upload`) both convert
through it (after the EXIF orientation, `helpers.loading.oriented_rgb`), so a file gives the same
pixels in both.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA_BACKGROUND = (0, 0, 0)  # transparency is composited onto black, the background of a radiograph


def _rescale_high_bit_depth(image: Image.Image) -> tuple[Image.Image, str]:
    """16/32-bit integer or float grayscale -> 8-bit "L", by the bit depth its values use.

    `image.convert("L")` clips every value above 255 to white: a 12-bit X-ray stored as a 16-bit
    PNG (values up to 4095) comes out almost entirely white. Integer values are divided by the
    full scale of the smallest bit depth (8, 10, 12, 14, 16, 32) that holds their maximum, so
    0 stays black and a 12-bit 4095 becomes 255; floats in [0, 1] are scaled by 255; anything
    else (negative values, other floats) is stretched from its own minimum to its maximum.
    """
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
    """Any PIL image -> 8-bit RGB, and notes on what was converted.

    Grayscale is replicated to 3 channels; palette images are expanded; transparency (RGBA, LA,
    palette with transparency) is composited onto `ALPHA_BACKGROUND` (black); 16/32-bit
    grayscale is rescaled by its bit depth (see `_rescale_high_bit_depth`), never clipped.
    """
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
