"""Test-time augmentation: predict on several views (functions on a normalised batch, same shape back) and
average; `evaluate.predict` takes `tta="flips"`, `"plausible"` or a list of views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F


def identity(x: torch.Tensor) -> torch.Tensor:
    """No augmentation."""
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return torch.flip(x, dims=[-1])


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom (an upside-down chest X-ray: anatomically implausible)."""
    return torch.flip(x, dims=[-2])


def rot90(x: torch.Tensor) -> torch.Tensor:
    """Rotate by 90 degrees (anatomically implausible for X-rays)."""
    return torch.rot90(x, k=1, dims=[-2, -1])


def _affine(x: torch.Tensor, degrees: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Rotate by `degrees`, shift by (dx, dy) fractions of the size; the border repeats (no black corners)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid works in [-1, 1] coordinates, so a shift of 0.05 of the width is 0.1 there
    matrix = torch.tensor([[cos, -sin, -2 * shift[0]], [sin, cos, -2 * shift[1]]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(matrix.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rotate(degrees: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TTA function that rotates by `degrees` (positive = counter-clockwise)."""
    view = partial(_affine, degrees=degrees)
    view.__name__ = f"rotate({degrees:+g})"
    return view


def shift(dx: float, dy: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TTA function that shifts by (dx, dy), fractions of the image width and height."""
    view = partial(_affine, shift=(dx, dy))
    view.__name__ = f"shift({dx:+g},{dy:+g})"
    return view


#: The common "reference" set: cheap, but upside-down or sideways chest X-rays never occur.
TTA_FLIPS: list[Callable[[torch.Tensor], torch.Tensor]] = [identity, hflip, vflip, rot90]
#: Anatomically plausible views: small rotations and shifts, like differences in patient positioning.
TTA_PLAUSIBLE: list[Callable[[torch.Tensor], torch.Tensor]] = [
    identity, rotate(-7), rotate(7), shift(0.04, 0.0), shift(-0.04, 0.0), shift(0.0, 0.04)]
TTA_SETS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [identity], "flips": TTA_FLIPS, "plausible": TTA_PLAUSIBLE}


def resolve(tta: None | str | Sequence[Callable]) -> list[Callable]:
    """The list of view functions for `tta`: None -> [identity], a name of `TTA_SETS`, or a list."""
    tta = "none" if tta is None else tta
    if isinstance(tta, str):
        if tta not in TTA_SETS:
            raise ValueError(f"Unknown TTA set {tta!r}. Known: {', '.join(TTA_SETS)} (or a list of functions).")
        return list(TTA_SETS[tta])
    if not (transforms := list(tta)) or not all(callable(t) for t in transforms):
        raise ValueError("tta must be None, 'flips', 'plausible' or a non-empty list of functions x -> x")
    return transforms
