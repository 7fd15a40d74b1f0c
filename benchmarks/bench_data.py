"""Images per second into a model: per-image PIL path vs tensor cache with batch augmentation.

(a) the conventional path (written here, the course does not ship it): a per-image `Dataset` +
    torchvision v2 PIL transforms + `DataLoader`, decoding every JPEG again in every epoch;
(b) the fast path: `cache_images` decodes and resizes every image once (the one-off caching
    pass, timed separately), then `TensorLoader` augments whole batches as tensors.

Both deliver augmented, normalised 224x224 batches. By default the images are generated JPEGs
the size of the real Kaggle originals (about 1500x1200 grayscale); `--image-dir` points at any
folder of images instead. No model is involved: this measures the input pipeline only.

    uv run python benchmarks/bench_data.py [--images 256] [--epochs 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from helpers.core import IMAGENET_MEAN, IMAGENET_STD
from helpers.images import read_image
from helpers.loading import TensorLoader, cache_images


class ImageFiles(Dataset):
    """The familiar torchvision path: read, resize, augment and normalise one image per item."""

    def __init__(self, frame: pd.DataFrame, image_size: int) -> None:
        self.paths, self.labels = list(frame["path"]), [int(v) for v in frame["label"]]
        self.transform = v2.Compose([
            v2.Resize((image_size, image_size)), v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.1, contrast=0.1), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.paths[i])), self.labels[i]


def make_originals(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Grayscale JPEGs of roughly the Kaggle originals' size and texture."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(1300, 1700)), int(rng.integers(1000, 1400))
        noise = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8), dtype=np.uint8))
        image = noise.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
        path = folder / f"IM-{i:04d}-0001.jpeg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(loader, epochs: int) -> float:
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="generated originals")
    parser.add_argument("--image-dir", type=Path, help="use these images instead")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (a)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    with tempfile.TemporaryDirectory() as tmp:
        if args.image_dir:
            paths = sorted(p for p in args.image_dir.rglob("*")
                           if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.images]
        else:
            start = time.perf_counter()
            paths = make_originals(Path(tmp), args.images)
            print(f"generated {len(paths)} JPEGs in {time.perf_counter() - start:.1f} s")
        frame = pd.DataFrame({"path": [str(p) for p in paths], "label": [i % 2 for i in range(len(paths))]})
        with Image.open(paths[0]) as im:
            print(f"images: {len(paths)}, e.g. {im.size[0]}x{im.size[1]} {im.mode}; "
                  f"{os.cpu_count()} CPU cores, torch {torch.__version__}, output {args.image_size} px, "
                  f"batch {args.batch_size}, {args.epochs} epoch(s) each")

        dataset = ImageFiles(frame, args.image_size)
        per_image = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                               num_workers=args.workers, persistent_workers=args.workers > 0)
        rate_a = images_per_second(per_image, args.epochs)
        print(f"(a) per-image PIL + DataLoader ({args.workers} workers): {rate_a:8.1f} images/s")

        start = time.perf_counter()
        cache = cache_images(frame, args.image_size)
        cache_seconds = time.perf_counter() - start
        fast = TensorLoader(cache, frame["label"], batch_size=args.batch_size, shuffle=True,
                            augment="light", seed=0)
        rate_b = images_per_second(fast, args.epochs)
        print(f"(b) tensor cache + batch augmentation:        {rate_b:8.1f} images/s")
        print(f"ratio (b)/(a): {rate_b / rate_a:.1f}x")
        mib = cache.numel() / 2 ** 20
        print(f"one-off caching pass: {cache_seconds:.1f} s for {len(paths)} images "
              f"({len(paths) / cache_seconds:.1f} images/s, {mib:.0f} MiB in memory; "
              f"about {cache_seconds / (len(paths) / rate_a):.2f} epochs of path (a))")


if __name__ == "__main__":
    main()
