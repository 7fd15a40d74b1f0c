"""Grad-CAM (Selvaraju et al., 2017): where the evidence is in one layer's maps, not why. For a ViT the patch tokens
entering the last block (`encoder.layers[-1].ln_1`) are folded into a grid (`vit_tokens_to_map`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from helpers.core import is_one_logit, logits_to_probs, model_device, predict_labels
from helpers.loading import normalize


# The layer Grad-CAM reads, by family (DenseNet: ``denseblock4``, as norm5's in-place ReLU breaks backward hooks).
_TARGET_LAYER = {"resnet": lambda m: m.layer4[-1], "densenet": lambda m: m.features.denseblock4,
                 "mobilenet": lambda m: m.features[-1], "vit": lambda m: m.encoder.layers[-1].ln_1}


def default_target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads (`_TARGET_LAYER` by `model.arch`), else ViT's last `ln_1` or the last Conv2d."""
    arch = str(getattr(model, "arch", ""))
    for family, layer in _TARGET_LAYER.items():
        if arch.startswith(family):
            with contextlib.suppress(AttributeError, IndexError):
                return layer(model)
    if isinstance(model, VisionTransformer):
        return model.encoder.layers[-1].ln_1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("No Conv2d layer found: pass target_layer= explicitly.")
    return convs[-1]


def vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 1 + h*w, D) ViT tokens -> (N, D, h, w) map (class token dropped; square grid)."""
    patches = tokens[:, 1:, :]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def usable_target_layer(model: nn.Module, layer: nn.Module) -> nn.Module:
    """`layer`, or for a ViT target whose patch tokens cannot receive gradient (the last block, the
    encoder, its final LayerNorm) the last block's `ln_1`, with a warning."""
    if isinstance(model, VisionTransformer) and layer in (model.encoder.layers[-1], model.encoder, model.encoder.ln):
        warnings.warn("Grad-CAM on the ViT's last encoder output gives zero gradient for patch tokens; using "
                      "encoder.layers[-1].ln_1 (the tokens entering the last block) instead.", stacklevel=3)
        return model.encoder.layers[-1].ln_1
    return layer


def _class_scores(logits: torch.Tensor, class_idx: int | Sequence[int] | None) -> torch.Tensor:
    """The score to explain per sample (`class_idx` None: the predicted class); one logit z: +z for 1, -z for 0."""
    if class_idx is not None:
        classes = torch.as_tensor(class_idx, device=logits.device).long().expand(logits.shape[0])
    else:
        classes = (logits.reshape(-1) > 0).long() if is_one_logit(logits) else logits.argmax(dim=1)
    if is_one_logit(logits):
        return torch.where(classes == 1, logits.reshape(-1), -logits.reshape(-1))
    return logits.gather(1, classes[:, None])[:, 0]


def _normalised_map(activations: torch.Tensor, gradients: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """cam = ReLU(sum_k mean(dScore/dA_k) * A_k), upsampled to `size` and scaled to [0, 1] per map."""
    if activations.ndim == 3:  # ViT tokens
        activations, gradients = vit_tokens_to_map(activations), vit_tokens_to_map(gradients)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    span = (high - low).clamp_min(torch.finfo(cam.dtype).tiny)  # no fixed epsilon: maps can be tiny
    return torch.where(high > low, (cam - low) / span, torch.zeros_like(cam))


def grad_cam(model: nn.Module, x: torch.Tensor, target_layer: nn.Module, class_idx: int | Sequence[int] | None = None,
             *, warn_blank: bool = True) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for a normalised batch x of the class `class_idx` (int, one per
    sample, or None = predicted). A hook swaps the layer's output (on this thread only: the app's sessions share
    one model) for a detached copy requiring grad, so frozen models work."""
    captured: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None  # the forward pass of another thread (another app session): leave it alone
        captured["activations"] = output.detach().requires_grad_(True)
        return captured["activations"]

    was_training = model.training
    handle = target_layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().float()
            scores = _class_scores(model(x).float(), class_idx)
            if "activations" not in captured:
                raise ValueError("target_layer was not used in the forward pass: pick a layer of this model.")
            activations = captured["activations"]
            (gradients,) = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
            if gradients is None or not gradients.any():
                if warn_blank:
                    warnings.warn("Grad-CAM: the class score has zero gradient at target_layer (an untrained head that "
                                  "starts at zero, or a layer that does not reach the output); heatmaps will be blank.",
                                  stacklevel=2)
                gradients = torch.zeros_like(activations)
            cam = _normalised_map(activations.detach(), gradients.detach(), x.shape[-2:])
    finally:
        handle.remove()
        model.train(was_training)
    return cam.cpu().numpy().astype(np.float32)


def explain(model: nn.Module, images_u8: torch.Tensor, *, target_layer: nn.Module | None = None,
            threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (N, C), predicted classes (`predict_labels` with `threshold`) and their Grad-CAM heatmaps
    (N, H, W), for uint8 images normalised as the model needs."""
    layer = usable_target_layer(model, target_layer if target_layer is not None else default_target_layer(model))
    x = normalize(images_u8.to(model_device(model)), normalization=model)  # as its weights need
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        probs = logits_to_probs(model(x)).cpu().numpy()
    model.train(was_training)
    predicted = predict_labels(probs, threshold)
    return probs, predicted, grad_cam(model, x, layer, class_idx=predicted.tolist())
