"""torchvision backbones with a new classification head (``fc``, ``classifier`` or ``heads``), and freezing.

`build_model` records ``arch``, ``pretrained``, ``weights_info``, ``input_mean``/``input_std`` (the normalisation
its weights need), ``head_kind``, ``freeze`` and ``image_size`` on the model.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from helpers.core import IMAGENET_MEAN, IMAGENET_STD, model_device
from helpers.images import display_path
from helpers.runs import project_root

DISPLAY_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
                 "resnet152": "ResNet-152", "densenet121": "DenseNet-121", "mobilenet_v2": "MobileNetV2",
                 "vit_b_16": "ViT-B/16"}
ARCHITECTURES: tuple[str, ...] = tuple(DISPLAY_NAMES)
HEADS: tuple[str, ...] = ("linear", "gap_dropout", "mlp")
FREEZE_POLICIES: tuple[str, ...] = ("none", "head", "last_block")

_HEAD_ATTR = {"resnet": "fc", "densenet": "classifier", "mobilenet": "classifier", "vit": "heads"}


def _family(arch: str) -> str:
    for family in _HEAD_ATTR:  # resnet, densenet, mobilenet, vit
        if arch.startswith(family):
            return family
    raise ValueError(f"Unknown architecture {arch!r}. Known: {', '.join(ARCHITECTURES)}")


def _check_choice(value: str, known: tuple[str, ...], what: str) -> None:
    if value not in known:
        raise ValueError(f"Unknown {what} {value!r}. Known: {', '.join(known)}")


def _arch_of(model: nn.Module) -> str:
    if (arch := getattr(model, "arch", None)) is None:
        raise ValueError("This model has no `.arch` attribute; build it with helpers.models.build_model "
                         "or set model.arch to one of: " + ", ".join(ARCHITECTURES))
    return arch


def make_head(in_features: int, num_outputs: int, head: str = "linear") -> nn.Module:
    """A head on pooled features: "linear", "gap_dropout" (Dropout(0.5) -> Linear, the MobileNetV2
    recipe) or "mlp" (Dropout(0.4) -> Linear(512) -> ReLU -> Dropout(0.3) -> Linear)."""
    if head == "linear":
        return nn.Linear(in_features, num_outputs)
    if head == "gap_dropout":
        return nn.Sequential(nn.Dropout(0.5), nn.Linear(in_features, num_outputs))
    return nn.Sequential(nn.Dropout(0.4), nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.3),
                         nn.Linear(512, num_outputs))


def get_head(model: nn.Module) -> nn.Module:
    """The classifier head module of a model built by :func:`build_model`."""
    return getattr(model, _HEAD_ATTR[_family(_arch_of(model))])


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the classifier head (e.g. to give them their own learning rate)."""
    return get_head(model).parameters()


# Offline ImageNet weights: a file written by tools/convert_tflite_weights.py (state_dict, normalisation, padding).
WEIGHTS_DIR_ENV = "COURSE_WEIGHTS_DIR"
OFFLINE_FILES = {"mobilenet_v2": "mobilenet_v2_imagenet.pt"}
TFLITE_FILES = {"mobilenet_v2": "mobilenet_v2_1.0_224_quant.tflite"}  # what the tool converts
CONVERT_COMMAND = "uv run python tools/convert_tflite_weights.py"


class TFSamePadConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's "SAME" padding (stride 2, even size: 0 top/left, 1 bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return self._conv_forward(F.pad(x, (left, right, top, bottom)), self.weight, self.bias)


def use_tf_same_padding(model: nn.Module) -> nn.Module:
    """Give every strided 3x3 ``Conv2d`` of ``model`` TensorFlow's SAME padding, in place; returns it."""
    for module in list(model.modules()):
        if type(module) is nn.Conv2d and module.stride != (1, 1) and module.kernel_size == (3, 3):
            module.__class__, module.padding = TFSamePadConv2d, (0, 0)  # pads in forward instead
    return model


def weights_dirs() -> list[Path]:
    """The folders searched for offline weights, in order (those that do not exist included)."""
    root = project_root()
    env = [Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()] if os.environ.get(WEIGHTS_DIR_ENV) else []
    return env + [root / "data" / "weights", root.parent / "shared" / "weights"]


def find_offline(arch: str, names: dict[str, str] = OFFLINE_FILES) -> Path | None:
    """The first offline file for ``arch`` (default: a converted weights file), or None."""
    found = [d / names[arch] for d in weights_dirs() if arch in names and (d / names[arch]).is_file()]
    return found[0] if found else None


def load_weights_file(arch: str, path: str | Path) -> tuple[nn.Module, dict]:
    """torchvision ``arch`` (ImageNet head) from a converted weights file or a state dict, and its weights_info."""
    path = Path(path).expanduser()
    if path.suffix == ".tflite":
        raise ValueError(f"{path} is a TensorFlow Lite file: convert it first with "
                         f"{CONVERT_COMMAND} --tflite {path}, then use the .pt file it writes.")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist. Use weights='imagenet', 'random' or the "
                                f"path of a weights file ({CONVERT_COMMAND} writes one).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and "normalization" in state):  # a plain state dict: torchvision's conventions
        state = {"state_dict": state, "normalization": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)}
    if state.get("arch", arch) != arch:
        raise ValueError(f"{path.name} holds {state['arch']} weights; arch is {arch!r}.")
    norm = state["normalization"]
    info = {"source": f"file:{path.name}", **state.get("info", {}), "file": path.name,
            "padding": state.get("padding", "torchvision"), "input_mean": tuple(norm["mean"]),
            "input_std": tuple(norm["std"])}
    model = apply_weights_info(torchvision.models.get_model(arch, weights=None), info)
    model.load_state_dict(state["state_dict"])
    return model, info


def apply_weights_info(model: nn.Module, info: dict) -> nn.Module:
    """Give a model what its weights carry (padding, input_mean/std, weights_info, pretrained); returns it."""
    if info.get("padding") == "tf_same":
        use_tf_same_padding(model)
    model.input_mean, model.input_std = tuple(info["input_mean"]), tuple(info["input_std"])
    model.weights_info, model.pretrained = dict(info), info.get("source", "random") != "random"
    return model


def random_info() -> dict:
    """weights_info of a randomly initialised model."""
    return dict(source="random", file=None, sha256=None, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                padding="torchvision")


_ANNOUNCED: set[str] = set()  # architectures whose missing weights were already announced


def _pretrained_warning(arch: str, error: Exception) -> None:
    """Say loudly that ImageNet weights are missing and what that means."""
    tflite = find_offline(arch, TFLITE_FILES)
    message = (f"Could not load ImageNet weights for {arch} ({type(error).__name__}: {error}). Continuing from RANDOM "
               "initialisation: this is not transfer learning, the numbers will be much worse and are NOT comparable "
               "to the reference results. model.pretrained is False (recorded in metrics.json). To fix: enable "
               "internet (Kaggle: Settings -> Internet on), put the torchvision weight file in "
               "~/.cache/torch/hub/checkpoints/, or (MobileNetV2) put a weights file converted by "
               f"tools/convert_tflite_weights.py in data/weights/ or in the folder named by ${WEIGHTS_DIR_ENV}."
               + (f" {display_path(tflite)} is there but not converted: run `{CONVERT_COMMAND} --tflite "
                  f"{display_path(tflite)}`." if tflite else ""))
    if arch in _ANNOUNCED:  # the full banner once per architecture, then a reminder
        print(f"!! {arch}: again no ImageNet weights, random initialisation (model.pretrained = False)", flush=True)
        return
    _ANNOUNCED.add(arch)
    bar = "!" * 78
    print(f"{bar}\n!! PRETRAINED WEIGHTS NOT AVAILABLE for {arch}\n!! {message}\n{bar}", flush=True)


def _load_pretrained(arch: str) -> nn.Module:
    """torchvision model with its DEFAULT ImageNet weights (downloads on first use)."""
    return torchvision.models.get_model(arch, weights="DEFAULT")


def _torchvision_imagenet(arch: str, image_size: int) -> tuple[nn.Module, dict]:
    """torchvision's DEFAULT ImageNet model and its weights_info (ViT-B/16: embeddings interpolated to image_size)."""
    said = io.StringIO()  # torch.hub's "Downloading: ... to /root/..." (stdout or stderr) and its progress bar
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        model = _load_pretrained(arch)  # on failure the caller's one-line note says what happened
    if said.getvalue():
        print(f"Downloaded torchvision's ImageNet weights for {arch}.", flush=True)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    transforms = weights.transforms()
    info = dict(source="torchvision", file=os.path.basename(weights.url), sha256=None, weights=str(weights),
                input_mean=tuple(transforms.mean), input_std=tuple(transforms.std), padding="torchvision")
    if arch != "vit_b_16" or image_size == 224:
        return model, info
    warnings.warn(f"ViT-B/16 ImageNet weights were trained at 224 px; image_size={image_size}: position embeddings "
                  "are interpolated (bicubic) to the new patch grid. Expect lower accuracy than at 224 px.",
                  UserWarning, stacklevel=4)
    resized = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    resized.load_state_dict(interpolate_embeddings(image_size, 16, model.state_dict()))
    return resized, info


def _backbone_with_weights(arch: str, weights: str | Path, image_size: int) -> tuple[nn.Module, dict]:
    """The torchvision model (with its ImageNet head) and its weights_info (source "random" if none)."""
    if weights == "imagenet":
        try:
            return _torchvision_imagenet(arch, image_size)
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
            offline = find_offline(arch)
            if offline is None:
                _pretrained_warning(arch, error)
            else:
                print(f"torchvision's ImageNet weights for {arch} could not be loaded ({type(error).__name__}); "
                      f"using the offline copy {display_path(offline)}.", flush=True)
                weights = offline
    if weights not in ("imagenet", "random"):
        return load_weights_file(arch, weights)
    vit_kwargs = {"image_size": image_size} if arch == "vit_b_16" else {}
    return torchvision.models.get_model(arch, weights=None, **vit_kwargs), random_info()


def _resolve_weights_argument(pretrained: bool | None, weights: str | Path | None) -> str | Path:
    """``weights`` from the two parameters; ``pretrained`` (older callers) maps to "imagenet"/"random"."""
    if weights is None:
        return "random" if pretrained is False else "imagenet"
    if isinstance(weights, str) and weights in ("imagenet", "random"):
        if pretrained is not None and pretrained != (weights == "imagenet"):
            raise ValueError(f"pretrained={pretrained} contradicts weights={weights!r}: pass only weights=.")
        return weights
    if isinstance(weights, (str, Path)) and Path(weights).suffix in (".tflite", ".pt", ".pth"):
        return Path(weights)
    raise ValueError(f"weights={weights!r}: use 'imagenet', 'random' or the path of a weights file (.pt).")


def build_model(arch: str, num_outputs: int, *, pretrained: bool | None = None, weights: str | Path | None = None,
                head: str = "linear", freeze: str = "none", image_size: int = 224) -> nn.Module:
    """A torchvision ``arch`` with a new ``head`` of ``num_outputs`` logits and a freezing policy.

    ``weights``: "imagenet" (torchvision's, else a converted file in `weights_dirs`, else a loud warning and random
    initialisation: ``model.pretrained`` False), "random", or a converted or state-dict ``.pt`` file;
    ``pretrained=True/False`` means imagenet/random. ``image_size`` matters for ViT-B/16 only (a multiple of 16;
    other than 224: interpolated position embeddings)."""
    _check_choice(arch, ARCHITECTURES, "architecture")
    _check_choice(head, HEADS, "head")
    _check_choice(freeze, FREEZE_POLICIES, "freeze policy")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if arch == "vit_b_16" and (image_size % 16 != 0 or image_size < 16):
        raise ValueError(f"ViT-B/16 needs image_size to be a multiple of 16 (got {image_size}).")
    weights = _resolve_weights_argument(pretrained, weights)
    model, info = _backbone_with_weights(arch, weights, image_size)
    head_attr = _HEAD_ATTR[_family(arch)]
    in_features = next(m for m in getattr(model, head_attr).modules() if isinstance(m, nn.Linear)).in_features
    setattr(model, head_attr, make_head(in_features, num_outputs, head))
    apply_weights_info(model, info)
    model.arch, model.head_kind, model.image_size = arch, head, image_size
    return set_trainable(model, freeze)


# What freeze="last_block" trains besides the head: the backbone's last stage.
_LAST_BLOCK = {"resnet": lambda m: [m.layer4], "densenet": lambda m: [m.features.denseblock4, m.features.norm5],
               "mobilenet": lambda m: [m.features[-2], m.features[-1]],
               "vit": lambda m: [m.encoder.layers[-1], m.encoder.ln]}


def label(model: nn.Module) -> str:
    """"ResNet-50, random weights" / "MobileNetV2, ImageNet": the architecture and the weights really loaded."""
    arch, weights = _arch_of(model), "ImageNet" if getattr(model, "pretrained", False) else "random weights"
    return f"{DISPLAY_NAMES.get(arch, arch)}, {weights}"


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the head's (``requires_grad = False``); returns the model."""
    model.requires_grad_(False)
    get_head(model).requires_grad_(True)
    model.freeze = "head"
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Make every parameter trainable again (full fine-tuning); returns the model."""
    model.requires_grad_(True)
    model.freeze = "none"
    return model


def set_trainable(model: nn.Module, freeze: str) -> nn.Module:
    """A freezing policy by name (`build_model(freeze=...)`): "none", "head" or "last_block"."""
    _check_choice(freeze, FREEZE_POLICIES, "freeze policy")
    if freeze == "none":
        return unfreeze(model)
    freeze_backbone(model)
    if freeze == "last_block":
        for module in _LAST_BLOCK[_family(_arch_of(model))](model):
            module.requires_grad_(True)
    model.freeze = freeze
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except sub-modules whose parameters are all frozen (frozen BatchNorm keeps its statistics)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model


@torch.no_grad()
def estimate_frozen_batchnorm(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> int:
    """Estimate frozen BatchNorm statistics still at their placeholders (mean 0, variance 1: activations grow until
    fp16 overflows) from up to 10 training batches; returns how many layers. ImageNet models: none."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in batchnorms if m.running_mean is not None and not any(p.requires_grad for p in m.parameters())
              and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]
    if getattr(model, "pretrained", False) or not layers:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    device, seen = model_device(model) if device is None else device, 0
    for seen, (x, _) in enumerate(islice(loader, 10), 1):
        model(x.to(device))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
        m.eval()
    model.train(was_training)
    print(f"Estimated the statistics of {len(layers)} frozen BatchNorm layers from {seen} training "
          "batch(es): without ImageNet weights they held placeholders (mean 0, variance 1).", flush=True)
    return len(layers)


class _ViTBackbone(nn.Module):
    """ViT up to the class-token embedding (after the final LayerNorm), sharing the weights."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token  # the same Parameter object as in the ViT
        self.encoder = vit.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, tokens, D)
        return self.encoder(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1))[:, 0]


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone giving pooled features (N, D), head), sharing the weights: ``head(backbone(x)) == model(x)``."""
    family = _family(_arch_of(model))
    head = get_head(model)
    if family == "resnet":
        backbone = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                                 model.layer3, model.layer4, model.avgpool, nn.Flatten(1))
    elif family == "densenet":
        # torchvision's DenseNet.forward: features -> ReLU -> global average pool.
        backbone = nn.Sequential(model.features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    elif family == "mobilenet":
        backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    else:
        backbone = _ViTBackbone(model)
    if hasattr(model, "input_mean"):  # the normalisation its weights need goes with the backbone
        backbone.input_mean, backbone.input_std = model.input_mean, model.input_std
    return backbone, head

