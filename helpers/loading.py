"""The course's one data path: `cache_images` decodes every image once into a uint8 tensor; `TensorLoader`
cuts, augments (on the GPU if any) and normalises batches from it; `make_loaders` builds train/val/test.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import PIL
import torch

from helpers import images as image_files
from helpers.augment import BatchAugment
from helpers.core import as_label_tensor, as_normalization
from helpers.data import DataSplits
from helpers.images import gone, load_image, to_grayscale


def normalize(x: torch.Tensor, scale: float | None = None, *, normalization=None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Images (N, 3 or 1, H, W) -> (x / scale - mean) / std as floats (`normalization`: a model, a (mean, std)
    pair or None = ImageNet's, or `mean=`/`std=`; `scale`: 255 for uint8, else 1). One channel broadcasts."""
    scale = (255.0 if x.dtype == torch.uint8 else 1.0) if scale is None else scale
    mean_t, std_t = (torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                     for v in as_normalization(normalization if mean is None else (mean, std)))
    return torch.addcmul(-mean_t / std_t, x.float(), 1.0 / (scale * std_t))


def denormalize(x: torch.Tensor, normalization=None) -> torch.Tensor:
    """Inverse of `normalize` (same `normalization`): back to [0, 1] floats for display."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in as_normalization(normalization))
    return (x * std + mean).clamp(0, 1)


# Bump when the pixels a file gives change in a way the source fingerprint below cannot see.
PREPROCESS_VERSION = 2


def _cache_key(paths: Sequence[str], image_size: int) -> str:
    """Keyed on the preprocessing (`helpers.images`' source, PIL's version), the size and every file's path and
    content (a hash of its bytes): a cache made otherwise is never reused."""
    preprocessing = "\n".join([inspect.getsource(image_files), PIL.__version__, str(PREPROCESS_VERSION)])
    digest = hashlib.sha1(f"{hashlib.sha1(preprocessing.encode()).hexdigest()}|{image_size}".encode())
    for p in paths:
        digest.update(os.fsencode(p))
        try:
            digest.update(hashlib.blake2b(Path(p).read_bytes(), digest_size=16).digest())
        except FileNotFoundError:
            raise gone(p) from None
    return digest.hexdigest()[:16]


def _load_cache(target: Path, n: int, image_size: int) -> torch.Tensor | None:
    """A saved image cache, or None (with a warning) when it is corrupt or of the wrong shape."""
    try:
        images = torch.load(target, weights_only=True)
        if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                and tuple(images.shape) == (n, 3, image_size, image_size)):
            return images
        problem = "it holds something else than the expected uint8 images"
    except Exception as err:  # truncated or overwritten file
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(f"The image cache {image_files.display_path(target)} could not be used ({problem}); "
                  "rebuilding it.", stacklevel=3)
    return None


def cache_images(frame: pd.DataFrame, image_size: int, *, cache_dir: str | Path | None = None,
                 num_threads: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """Decode and resize every image of `frame` once (in threads): uint8 tensor (N, 3, S, S), frame order; with
    `cache_dir` also saved there (`_cache_key`) and loaded next time. `grayscale`: three equal channels."""
    paths, target = [str(p) for p in frame["path"]], None
    if cache_dir is not None:
        gray = "_gray" if grayscale else ""
        target = Path(cache_dir) / f"images_{image_size}px{gray}_{_cache_key(paths, image_size)}.pt"
        if target.exists() and (cached := _load_cache(target, len(paths), image_size)) is not None:
            return cached
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=num_threads or min(8, (os.cpu_count() or 2) * 2)) as pool:
        for i, image in enumerate(pool.map(lambda p: load_image(p, image_size), paths)):
            out[i] = to_grayscale(image) if grayscale else image
    if target is not None:  # written whole or not at all: a killed run leaves no half file
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            torch.save(out, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return out


class TensorLoader:
    """A DataLoader stand-in: batches from a uint8 image tensor, augmented per image, normalised (a model, a
    (mean, std) pair or None = ImageNet's), on `device`; `sample_weights` draw with replacement;
    `strong_classes` get `strong`; `drop_single` drops a last batch of one."""

    def __init__(self, images: torch.Tensor, labels, *, batch_size: int = 32, shuffle: bool = False,
                 augment: str | BatchAugment = "none", strong: str | BatchAugment = "strong",
                 strong_classes: Sequence[int] = (), sample_weights: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", drop_last: bool = False, seed: int | None = None,
                 drop_single: bool = False, normalization=None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("TensorLoader expects uint8 images (N, 3, H, W): make them with cache_images.")
        self.device, self.normalization = torch.device(device), as_normalization(normalization)  # (mean, std)
        # Stored with one channel when all three are equal (a third of the memory and augmentation work).
        self.grayscale = bool(torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]))
        stored = images[:, :1].clone() if self.grayscale else images
        self._images = stored.to(self.device) if self.device.type == "cuda" else stored
        self.labels = as_label_tensor(labels)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.batch_size, self.shuffle, self.drop_last, self.drop_single = batch_size, shuffle, drop_last, drop_single
        self.augment, self.strong = (BatchAugment.preset(a) if isinstance(a, str) else a for a in (augment, strong))
        self.strong_classes, self.sample_weights = torch.as_tensor(list(strong_classes), dtype=torch.long), sample_weights
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def images(self) -> torch.Tensor:
        """The cached uint8 images, (N, 3, S, S) (a view for grayscale caches)."""
        return self._images.expand(-1, 3, -1, -1) if self.grayscale else self._images

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    @property
    def augments(self) -> bool:
        """Random augmentation of the pixels? (Then a cached pass would keep one random view.)"""
        return self.augment != BatchAugment.preset("none") or len(self.strong_classes) > 0

    def ordered(self) -> "TensorLoader":
        """The same images once each, in order, unaugmented, none dropped (shares images and generator)."""
        view = copy.copy(self)
        view.shuffle, view.sample_weights, view.drop_last, view.drop_single = False, None, False, False
        view.augment, view.strong_classes = BatchAugment.preset("none"), self.strong_classes[:0]
        return view

    def __len__(self) -> int:
        full, rest = divmod(self.dataset_size, self.batch_size)  # drop_single: a last batch of one goes
        return full if self.drop_last or (self.drop_single and rest == 1 and full) else full + (rest > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.dataset_size
        order = (torch.multinomial(self.sample_weights, n, replacement=True, generator=self.generator)
                 if self.sample_weights is not None else
                 torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self._images[idx.to(self._images.device)].to(self.device, non_blocking=True).float()
            y = self.labels[idx]
            is_strong = torch.isin(y, self.strong_classes)
            if not is_strong.any():
                x = self.augment(x, self.generator, 255.0)  # one call for the whole batch (the usual case)
            else:  # `strong` for the images of strong_classes, `augment` for the rest
                is_strong = is_strong.to(x.device)
                x[is_strong] = self.strong(x[is_strong], self.generator, 255.0)
                if (~is_strong).any():
                    x[~is_strong] = self.augment(x[~is_strong], self.generator, 255.0)
            yield normalize(x, 255.0, normalization=self.normalization), y.to(self.device, non_blocking=True)


def with_normalization(loaders, normalization):
    """`loaders` (a dict or one) normalising as `normalization` says: TensorLoaders copied (sharing images)."""
    if isinstance(loaders, dict):
        return {name: with_normalization(loader, normalization) for name, loader in loaders.items()}
    if not isinstance(loaders, TensorLoader):
        return loaders
    view = copy.copy(loaders)
    view.normalization = as_normalization(normalization)
    return view


def weighted_sampler_weights(labels) -> torch.Tensor:
    """One weight per image, 1 / (images in its class): every class is drawn equally often."""
    labels = as_label_tensor(labels)
    return (1.0 / torch.bincount(labels).float())[labels].double()


def make_loaders(splits: DataSplits, image_size: int, batch_size: int, *, device: str | torch.device = "cpu",
                 augment: str | BatchAugment = "light", strong_classes: Sequence[int] = (),
                 balanced_sampler: bool = False, cache_dir: str | Path | None = None, seed: int = 42,
                 grayscale: bool = False, normalization=None) -> dict[str, TensorLoader]:
    """{"train", "val", "test"} TensorLoaders over the cached images; only train is shuffled, augmented (`strong`
    for `strong_classes`), class-balanced with `balanced_sampler` and drops a last batch of one image."""
    loaders = {}
    for split in ("train", "val", "test"):
        frame, train = getattr(splits, split), split == "train"
        loaders[split] = TensorLoader(
            cache_images(frame, image_size, cache_dir=cache_dir, grayscale=grayscale), frame["label"],
            batch_size=batch_size, shuffle=train, augment=augment if train else "none",
            strong_classes=strong_classes if train else (),
            sample_weights=weighted_sampler_weights(frame["label"]) if train and balanced_sampler else None,
            device=device, seed=seed if train else None, drop_single=train, normalization=normalization)
    return loaders
