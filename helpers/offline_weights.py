"""Where ImageNet weights come from when torchvision's weight server cannot be reached.

``build_model(..., weights="imagenet")`` first asks torchvision (download, or its cache in
``~/.cache/torch/hub/checkpoints``). When that fails it looks for an offline copy, in order:

1. the folder named by the environment variable ``COURSE_WEIGHTS_DIR``;
2. ``data/weights/`` in the course folder;
3. ``../shared/weights`` beside the course folder (the development machines).

Only MobileNetV2 has an offline copy: TensorFlow's ``mobilenet_v2_1.0_224_quant.tflite``
(ImageNet, Apache 2.0), converted once by :mod:`helpers.tflite_weights` and cached.
A ``weights=`` path to a ``.tflite`` file or to a converted ``.pt`` file works as well.

The conversion keeps TensorFlow's folded BatchNorm (exact in eval mode; cached by the file's
sha256 alone); before fine-tuning, ``models.estimate_frozen_batchnorm(model, train_loader)``
gives it the statistics of a few hundred of the run's own training images
(:func:`restore_folded_batchnorm`), so it works wherever the course runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from helpers import tflite_weights
from helpers.runs import project_root
from helpers.core import check_normalization

ENV_VAR = "COURSE_WEIGHTS_DIR"
OFFLINE_FILES: dict[str, tuple[str, ...]] = {"mobilenet_v2": ("mobilenet_v2_1.0_224_quant.tflite",)}
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CALIBRATION_PER_CLASS = 100  # 200 training X-rays for the BatchNorm statistics
CALIBRATION_SIZE = 128  # the cpu profile's image size, and a third of the work of 224 px
RESTORE_IMAGES = 300  # training images for a converted model's BatchNorm statistics


def offline_dirs() -> list[Path]:
    """The folders searched for offline weights, in order (those that do not exist included)."""
    dirs = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
    root = project_root()
    return dirs + [root / "data" / "weights", root.parent / "shared" / "weights"]


def find_offline(arch: str) -> Path | None:
    """The first offline weight file for ``arch``, or None."""
    for folder in offline_dirs():
        for name in OFFLINE_FILES.get(arch, ()):
            if (folder / name).is_file():
                return folder / name
    return None


def _calibration_folder() -> Path | None:
    folder = project_root().parent / "shared" / "data" / "chest_xray_pneumonia_224" / "train"
    return folder if folder.is_dir() else None


def _calibration_batches(folder: Path, mean: tuple, std: tuple):
    """Batches of 32 normalised training X-rays, ``CALIBRATION_PER_CLASS`` per class, evenly spaced."""
    from PIL import Image

    files = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = sorted(class_dir.glob("*.jp*g"))
        step = max(len(found) // CALIBRATION_PER_CLASS, 1)
        files += found[::step][:CALIBRATION_PER_CLASS]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for start in range(0, len(files), 32):
        pixels = [torch.frombuffer(bytearray(Image.open(f).convert("RGB").resize(
            (CALIBRATION_SIZE, CALIBRATION_SIZE), Image.BILINEAR).tobytes()), dtype=torch.uint8)
            for f in files[start:start + 32]]
        x = torch.stack(pixels).view(-1, CALIBRATION_SIZE, CALIBRATION_SIZE, 3).permute(0, 3, 1, 2)
        yield (x.float() / 255 - m) / s


def default_calibration() -> tuple[object, str] | tuple[None, None]:
    """(images, name): 200 real training X-rays from ../shared when present, else (None, None).

    Used to measure a conversion's agreement with TensorFlow's interpreter, not for the BatchNorm
    statistics: those come from each run's own training images (:func:`restore_folded_batchnorm`).
    """
    folder = _calibration_folder()
    if folder is None:
        return None, None
    name = (f"{folder.parent.name}/{folder.name}: {CALIBRATION_PER_CLASS} per class, {CALIBRATION_SIZE} px, "
            "evenly spaced in file order")
    return (lambda: _calibration_batches(folder, tflite_weights.INPUT_MEAN, tflite_weights.INPUT_STD)), name


def _agreement_images():
    """Images to check a conversion against the interpreter: X-rays from ../shared, else
    scikit-image's sample photos, else None (then the agreement is not measured)."""
    images, _ = default_calibration()
    if images is not None:
        return images() if callable(images) else images
    try:
        u8 = torch.from_numpy(natural_images(224)).permute(0, 3, 1, 2)
    except ImportError:
        return None
    return (u8.float() / 255 - 0.5) / 0.5


def batchnorm_is_folded(model: nn.Module) -> bool:
    """Does the model still hold converted weights whose BatchNorm statistics are folded away?"""
    return (getattr(model, "weights_info", None) or {}).get("batchnorm") == "folded"


def _unaugmented(loader):
    """A TensorLoader's images unaugmented, in a fixed random order; any other loader as it is."""
    if not hasattr(loader, "ordered"):
        return loader
    view = loader.ordered()
    view.shuffle, view.generator = True, torch.Generator().manual_seed(0)
    return view


def restore_folded_batchnorm(model: nn.Module, loader, max_images: int = RESTORE_IMAGES) -> int:
    """Give a converted model's folded BatchNorm the statistics of up to ``max_images`` images of
    ``loader`` (this run's training images), once; returns how many BatchNorm layers got them (0:
    nothing to do). Eval outputs do not change; fine-tuning in train mode then works instead of
    collapsing. Recorded in ``model.weights_info["batchnorm"]``."""
    if not batchnorm_is_folded(model):
        return 0
    check_normalization(model, loader)

    def batches():
        seen = 0
        for batch in _unaugmented(loader):
            x = (batch[0] if isinstance(batch, (tuple, list)) else batch)[:max_images - seen]
            seen += len(x)
            yield x
            if seen >= max_images:
                return

    n = tflite_weights.restore_batchnorm_statistics(model, batches())
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.weights_info = {**model.weights_info, "batchnorm": f"restored from {n} training images of this run",
                          "calibration_images": n}
    print(f"Converted weights: restored the statistics of {layers} BatchNorm layers from {n} training images "
          "(folded by TensorFlow; without them fine-tuning collapses).", flush=True)
    return layers


def load_weights_file(arch: str, path: str | Path, calibration_images=None) -> tuple[nn.Module, dict]:
    """torchvision ``arch`` (with its ImageNet head) from a .tflite or .pt file, and its weights_info.

    A .tflite file is converted (cached by sha256 and calibration); ``calibration_images`` are the
    images for the BatchNorm statistics (default: none, exact in eval mode:
    ``models.estimate_frozen_batchnorm(model, train_loader)`` restores them from the run's own
    training images before fine-tuning). A .pt file is a converted file or a plain state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist. Use weights='imagenet', 'random' "
                                "or the path of a .tflite / converted .pt file.")
    if path.suffix == ".tflite":
        if arch != "mobilenet_v2":
            raise ValueError(f"{path.name} holds MobileNetV2 weights; arch is {arch!r}. Use arch='mobilenet_v2'.")
        payload = tflite_weights.load_tflite_weights(path, calibration_images, agreement_with=_agreement_images)
        return tflite_weights.model_from_payload(payload), _info(payload, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format" in state:
        payload = tflite_weights.load_converted(path)
        if payload["arch"] != arch:
            raise ValueError(f"{path.name} holds {payload['arch']} weights; arch is {arch!r}.")
        return tflite_weights.model_from_payload(payload), _info(payload, path)
    model = torchvision.models.get_model(arch, weights=None)
    model.load_state_dict(state)
    model.input_mean, model.input_std = IMAGENET_MEAN, IMAGENET_STD
    return model, dict(source=f"file:{path.name}", sha256=tflite_weights.file_sha256(path),
                       input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD, padding="torchvision")


def _info(payload: dict, path: Path) -> dict:
    """The weights_info of a converted payload (what metrics.json records)."""
    return dict(source=payload["source"], file=path.name, sha256=payload["sha256"],
                calibration=payload["calibration"], calibration_images=payload["calibration_images"],
                agreement=payload.get("agreement"), padding=payload["padding"],
                input_mean=tuple(payload["input_mean"]), input_std=tuple(payload["input_std"]),
                cache=payload.get("cache"), batchnorm="folded" if not payload["calibration_images"] else
                f"restored from {payload['calibration_images']} calibration images ({payload['calibration']})")


def torchvision_info(arch: str) -> dict:
    """weights_info of torchvision's DEFAULT weights (their own normalisation, from their transforms)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    transforms = weights.transforms()
    return dict(source="torchvision", file=os.path.basename(weights.url), sha256=None, weights=str(weights),
                input_mean=tuple(transforms.mean), input_std=tuple(transforms.std), padding="torchvision")


def random_info() -> dict:
    return dict(source="random", file=None, sha256=None, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                padding="torchvision")


# --------------------------------------------------------------------------- images to check a conversion

NATURAL_SAMPLES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel",
                   "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                   "rocket", "text", "clock", "cell")


def _u8_rgb(array, size: int):
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.asarray(Image.fromarray(array[..., :3]).resize((size, size), Image.BILINEAR))


def natural_images(size: int = 224, names: tuple[str, ...] = NATURAL_SAMPLES):
    """(N, size, size, 3) uint8: scikit-image's bundled sample photos (a dev dependency), squashed."""
    import numpy as np
    from skimage import data

    return np.stack([_u8_rgb(getattr(data, name)(), size) for name in names])


def xray_images(folder: str | Path, per_class: int = 12, size: int = 224):
    """(N, size, size, 3) uint8: the first ``per_class`` images of each class folder, in file order."""
    import numpy as np
    from PIL import Image

    files = [f for c in sorted(p for p in Path(folder).iterdir() if p.is_dir())
             for f in sorted(c.glob("*.jp*g"))[:per_class]]
    return np.stack([_u8_rgb(Image.open(f).convert("RGB"), size) for f in files])


def apply_weights_info(model: nn.Module, info: dict) -> nn.Module:
    """Give a model rebuilt from random weights (e.g. to load a bundle's state dict) what its
    original weights carried: TensorFlow SAME padding if ``info["padding"] == "tf_same"``, and
    ``input_mean`` / ``input_std`` / ``weights_info``. The state_dict keys do not change, so
    ``load_state_dict`` works before or after. Returns the model."""
    if info.get("padding") == "tf_same":
        tflite_weights.use_tf_same_padding(model)
    model.input_mean, model.input_std = tuple(info["input_mean"]), tuple(info["input_std"])
    model.weights_info = dict(info)
    model.pretrained = info.get("source", "random") != "random"
    return model
