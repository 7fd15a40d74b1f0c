"""Batch augmentation with random parameters drawn for every image (a torchvision v2 transform on a batch
tensor draws one set for all), in one `grid_sample` call, on the GPU. No preset flips: X-rays are never
mirrored, and a flip only the minority class gets ('strong') would be a cue for that class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=8)
def _base_grid(height: int, width: int, device: str) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] with a column of ones, (1, H*W, 3): `F.affine_grid`'s grid, cached."""
    ys = (torch.arange(height, device=device) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device) * 2 + 1) / width - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy, torch.ones_like(xx)], -1).view(1, height * width, 3)


@dataclass(frozen=True)
class BatchAugment:
    """Random rotation, scale, shift, flips, brightness and contrast, drawn for every image."""

    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05  # fraction of the image size
    hflip: float = 0.0  # probability
    vflip: float = 0.0
    brightness: float = 0.1  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.1

    @staticmethod
    def preset(name: str) -> "BatchAugment":
        """'light' (default training), 'strong' (minority class) or 'none'; no preset flips (module doc)."""
        presets = {"none": BatchAugment(0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0), "light": BatchAugment(),
                   "strong": BatchAugment(25.0, (0.75, 1.2), 0.12, brightness=0.35, contrast=0.35)}
        if name not in presets:
            raise ValueError(f"Unknown augmentation {name!r}; use one of {list(presets)} or a BatchAugment(...)")
        return presets[name]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 max_value: float = 1.0) -> torch.Tensor:
        """Augment float images in [0, max_value], shape (N, C, H, W); same shape back."""
        (n, _, h, w), dev = x.shape, x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator).to(dev) * (hi - lo) + lo

        angle, scale = uniform(-self.rotate, self.rotate) * math.pi / 180, uniform(*self.scale)
        flip_x, flip_y = (torch.where(uniform(0, 1) < p, -1.0, 1.0) for p in (self.hflip, self.vflip))
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        shift_x, shift_y = (uniform(-1, 1) * 2 * self.translate for _ in range(2))
        # theta maps output to input coordinates: rotation/scale composed with the flips.
        theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, shift_x], 1),
                             torch.stack([sin * flip_x, cos * flip_y, shift_y], 1)], 1)
        if self.rotate or self.scale != (1.0, 1.0) or self.translate or self.hflip or self.vflip:
            grid = torch.bmm(_base_grid(h, w, str(dev)).expand(n, -1, -1), theta.transpose(1, 2)).view(n, h, w, 2)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.brightness or self.contrast:
            b = uniform(1 - self.brightness, 1 + self.brightness).view(-1, 1, 1, 1)
            c = uniform(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1)
            mean = x[:, :, ::4, ::4].mean(dim=(1, 2, 3), keepdim=True)  # subsampled: same value
            x = torch.addcmul((1 - c) * mean * b, x, c * b)  # ((x - mean) * c + mean) * b, one pass
        return x.clamp_(0, max_value)
