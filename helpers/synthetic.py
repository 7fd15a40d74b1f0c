"""Small generated datasets that look (a little) like the real ones, for offline runs: `make_synthetic_dataset`
writes JPEG files in the Kaggle datasets' folder layouts, each class with a learnable signature (PNEUMONIA: a
consolidation or a bilateral haze; COVID19: lower-zone peripheral haze; TURBERCULOSIS: upper-zone nodules; DR:
haemorrhages and exudates); `synthetic_landscapes`, `synthetic_noise` and `synthetic_shapes` make *outside* images
for out-of-distribution experiments. Synthetic numbers say that the code works, never how well a method works."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from helpers.runs import output_root, project_root

# Images per class and split; pneumonia mimics the Kaggle train/ folder (1 NORMAL : 2.5 PNEUMONIA).
DEFAULT_COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "pneumonia": {"train": {"NORMAL": 48, "PNEUMONIA": 120}},
    "chest4": {split: {c: n for c in ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS")}
               for split, n in (("train", 36), ("val", 12), ("test", 12))},
    "fundus": {split: {c: n for c in ("No_DR", "DR")}
               for split, n in (("train", 40), ("valid", 14), ("test", 14))},
}


def _gaussian(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def _chest(rng: np.random.Generator, finding: str, height: int, width: int) -> Image.Image:
    """One grayscale chest 'radiograph' with the given finding."""
    yy, xx = np.mgrid[-1:1:complex(height), -1:1:complex(width)]
    j = lambda s=0.05: rng.uniform(-s, s)  # noqa: E731  (small jitter)
    img = np.full((height, width), 0.08)
    img[(xx / (0.9 + j())) ** 2 + ((yy - 0.1) / 1.1) ** 2 < 1] = 0.55 + j()  # body
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1, 1):
        lungs |= ((xx - side * (0.4 + j())) / (0.28 + j(0.03))) ** 2 + ((yy + 0.05 + j()) / 0.55) ** 2 < 1
    img[lungs] = 0.2 + j(0.03)
    img += 0.06 * lungs * (np.sin(yy * 22 + rng.uniform(0, 6)) > 0.6)  # ribs
    img += 0.45 * np.exp(-(xx / 0.08) ** 2)  # spine / mediastinum
    img += 0.35 * _gaussian(yy, xx, 0.3 + j(), 0.12 + j(), 0.2)  # heart
    if finding == "consolidation":  # lobar pneumonia: one soft bright patch
        side = rng.choice([-1, 1])
        img += 0.6 * _gaussian(yy, xx, rng.uniform(-0.1, 0.3), side * 0.4 + j(0.06), rng.uniform(0.15, 0.22)) * lungs
    elif finding == "haze":  # viral pneumonia: patchy bilateral haze
        blobs = sum(_gaussian(yy, xx, rng.uniform(-0.3, 0.3), side * rng.uniform(0.3, 0.5), 0.13)
                    for side in (-1, 1) for _ in range(3))
        img += 0.4 * np.clip(blobs, 0, 1.2) * lungs
    elif finding == "peripheral":  # COVID-19: lower-zone peripheral ground glass, both lungs
        for side in (-1, 1):
            img += 0.5 * _gaussian(yy, xx, 0.28 + j(0.1), side * (0.55 + j()), 0.2) * lungs
    elif finding == "nodules":  # tuberculosis: upper-zone nodules
        for _ in range(rng.integers(7, 12)):
            img += 0.55 * _gaussian(yy, xx, rng.uniform(-0.55, -0.15), rng.choice([-1, 1]) * rng.uniform(0.25, 0.55), 0.045) * lungs
    img += rng.normal(0, 0.035, img.shape)
    img = np.clip(img * rng.uniform(0.9, 1.1), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8), mode="L")


def _fundus(rng: np.random.Generator, disease: bool, size: int) -> Image.Image:
    """One colour fundus 'photograph'; disease adds haemorrhages and exudates."""
    yy, xx = np.mgrid[-1:1:complex(size), -1:1:complex(size)]
    r = np.sqrt(xx ** 2 + yy ** 2)
    shade = np.clip(1.1 - 0.6 * r ** 2, 0, 1) * rng.uniform(0.85, 1.1)
    img = np.stack([0.85 * shade, 0.38 * shade, 0.15 * shade], -1)
    side = rng.choice([-1, 1])
    disc_y, disc_x = rng.uniform(-0.1, 0.1), side * rng.uniform(0.3, 0.45)
    img += _gaussian(yy, xx, disc_y, disc_x, 0.08)[..., None] * np.array([0.3, 0.5, 0.3])
    img[r > 0.92] = 0
    image = Image.fromarray((np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    to_px = lambda y, x: ((x + 1) * size / 2, (y + 1) * size / 2)  # noqa: E731
    for _ in range(rng.integers(4, 7)):  # vessels leave the disc in gentle arcs
        angle = rng.uniform(0, 2 * np.pi)
        pts = [to_px(disc_y + t * np.sin(angle + 0.4 * t), disc_x + t * np.cos(angle + 0.4 * t))
               for t in np.linspace(0, 0.9, 12)]
        draw.line(pts, fill=(120, 25, 20), width=max(1, size // 64))
    if disease:
        for _ in range(rng.integers(8, 16)):  # haemorrhages: dark red dots
            cy, cx = to_px(*rng.uniform(-0.6, 0.6, 2))
            d = rng.uniform(1.5, 3.5) * size / 112
            draw.ellipse([cx - d, cy - d, cx + d, cy + d], fill=(90, 10, 10))
        for _ in range(rng.integers(4, 9)):  # hard exudates: yellow spots
            cy, cx = to_px(*rng.uniform(-0.6, 0.6, 2))
            d = rng.uniform(1.5, 3.0) * size / 112
            draw.ellipse([cx - d, cy - d, cx + d, cy + d], fill=(235, 215, 90))
    return image


def _write_pneumonia(root: Path, counts: dict, rng: np.random.Generator, size: int) -> None:
    for split, per_class in counts.items():
        for class_name, n in per_class.items():
            (folder := root / split / class_name).mkdir(parents=True)
            written, patient = 0, 1
            while written < n:
                images = min(n - written, int(rng.integers(1, 4)))  # 1-3 images per patient
                kind = "normal" if class_name == "NORMAL" else rng.choice(["bacteria", "virus"], p=[0.65, 0.35])
                for k in range(images):
                    h, w = int(rng.integers(size - 12, size + 20)), int(rng.integers(size, size + 32))
                    finding = {"normal": "none", "bacteria": "consolidation", "virus": "haze"}[kind]
                    prefix = "NORMAL2-IM" if patient % 3 == 0 else "IM"
                    name = (f"{prefix}-{patient:04d}-{k + 1:04d}.jpeg" if kind == "normal"
                            else f"person{patient}_{kind}_{written + k}.jpeg")
                    _chest(rng, finding, h, w).save(folder / name, quality=92)
                written += images
                patient += 1


def _write_chest4_or_fundus(root: Path, counts: dict, rng: np.random.Generator, size: int, fundus: bool) -> None:
    findings = {"COVID19": "peripheral", "NORMAL": "none", "PNEUMONIA": "consolidation", "TURBERCULOSIS": "nodules"}
    for split, per_class in counts.items():
        for class_name, n in per_class.items():
            (folder := root / split / class_name).mkdir(parents=True)
            for i in range(n):
                if fundus:
                    image, name = _fundus(rng, class_name == "DR", size), f"{class_name.lower()}_eye{i:04d}_{split}.jpg"
                else:
                    h, w = int(rng.integers(size - 12, size + 20)), int(rng.integers(size, size + 32))
                    image = _chest(rng, findings[class_name], h, w)
                    name = f"{class_name.lower()}_{split}_{i:04d}.jpg"
                image.save(folder / name, quality=92)


def chest_xray_image(finding: str = "consolidation", size: int = 224, seed: int = 0) -> Image.Image:
    """One synthetic grayscale chest X-ray: finding is none, consolidation, haze, peripheral or nodules."""
    return _chest(np.random.default_rng(seed), finding, size, size)


def make_synthetic_dataset(name: str, root: str | Path | None = None, *, counts: dict | None = None,
                           image_size: int = 112, seed: int = 0) -> Path:
    """Write (once, deterministic by `seed`) a synthetic version of dataset `name`; return its folder (default:
    `data/synthetic/<name>-seed<seed>/` under `output_root()`, writable even for a read-only course copy).
    `counts`: split -> class -> images (DEFAULT_COUNTS). Written under a temporary name and renamed, so no half
    dataset is ever left behind."""
    if name not in DEFAULT_COUNTS:
        raise ValueError(f"No synthetic version of {name!r}; choose one of {list(DEFAULT_COUNTS)}.")
    counts = counts or DEFAULT_COUNTS[name]
    root = Path(root) if root is not None else output_root() / "data" / "synthetic" / f"{name}-seed{seed}"
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    if name == "pneumonia":
        _write_pneumonia(tmp, counts, np.random.default_rng(seed), image_size)
    else:
        _write_chest4_or_fundus(tmp, counts, np.random.default_rng(seed), image_size, fundus=name == "fundus")
    (tmp / ".complete").write_text(f"synthetic {name}, seed {seed}\n")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first (or an incomplete folder is in the way)
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_synthetic_dataset(folder: str | Path) -> bool:
    """Whether `folder` lies in a dataset written by `make_synthetic_dataset`: it or one of its two parents
    holds the generated `.complete` marker, or it lies under the course folder's `data/synthetic/`."""
    folder = Path(folder).resolve()
    for candidate in [folder, *folder.parents[:2]]:
        marker = candidate / ".complete"
        if marker.is_file() and marker.read_text(errors="replace").startswith("synthetic"):
            return True
    return folder.is_relative_to((project_root() / "data" / "synthetic").resolve())


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise upsampled bilinearly (size, size, channels)."""
    coarse = rng.random((cells, cells, channels)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(size, size),
                                         mode="bilinear", align_corners=True)
    return up[0].permute(1, 2, 0).numpy()


def synthetic_landscapes(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    """`n` colour 'landscape photographs' (sky, sun, ridges, ground): uint8 (n, 3, size, size), like the cache."""
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
    """`n` noise images (colour noise, gray Gaussian noise, smooth colour fields): uint8 (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        if i % 3 == 0:
            img = rng.random((size, size, 3))
        elif i % 3 == 1:
            img = np.repeat(np.clip(rng.normal(rng.uniform(0.3, 0.7), 0.2, (size, size, 1)), 0, 1), 3, axis=2)
        else:
            img = _smooth_noise(rng, size, int(rng.integers(3, 9)), 3)
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def synthetic_shapes(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    """`n` 'clip-art' images (rectangles, ellipses and lines on plain backgrounds): uint8 (n, 3, size, size)."""
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
            if (shape := rng.integers(0, 3)) < 2:
                (draw.rectangle if shape == 0 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
            else:
                draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, max(2, size // 16))))
        out[i] = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(out)
