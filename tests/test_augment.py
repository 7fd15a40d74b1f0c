"""The augmentation presets: 'strong' (the minority class's augmentation) never mirrors an image."""

import torch

from helpers.augment import BatchAugment


def _left_bright(n: int, size: int = 32) -> torch.Tensor:
    """n copies of an asymmetric image: bright left half, dark right half, in [0, 1]."""
    x = torch.full((n, 3, size, size), 0.2)
    x[:, :, :, : size // 2] = 1.0
    return x


def test_strong_preset_has_no_flip_and_is_stronger_than_light():
    strong, light = BatchAugment.preset("strong"), BatchAugment.preset("light")
    assert strong.hflip == 0.0 and strong.vflip == 0.0
    assert strong.rotate > light.rotate and strong.translate > light.translate
    assert strong.scale[0] < light.scale[0] and strong.scale[1] > light.scale[1]
    assert strong.contrast > light.contrast


def test_strong_batch_augment_never_mirrors_an_image():
    x = _left_bright(64)
    out = BatchAugment.preset("strong")(x.clone(), torch.Generator().manual_seed(0))
    half = x.shape[-1] // 2
    left, right = out[..., :half].mean(dim=(1, 2, 3)), out[..., half:].mean(dim=(1, 2, 3))
    assert (left > right).all(), f"{int((left <= right).sum())} of 64 images mirrored"
    assert (out - x).abs().mean() > 1e-2  # it did augment
