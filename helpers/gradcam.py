"""Grad-CAM: which parts of the image pushed the model towards its prediction?

Grad-CAM (Selvaraju et al., 2017) takes the activations A_k of one layer (K maps of h x w),
weights each map by the average gradient of the class score with respect to it, sums, and keeps
the positive part:  cam = ReLU(sum_k mean(dScore/dA_k) * A_k).  The map is then upsampled to the
image size and scaled to [0, 1]. A heatmap shows where the evidence is, not *why*, and a
confident model can look at the wrong place (a text marker, the edge of the film): that is
exactly what it is useful for spotting.

For a ViT the layer output is a sequence of tokens (N, 1 + h*w, D); we drop the class token and
fold the patch tokens back into an (N, D, h, w) grid (`vit_reshape_transform`). Use the tokens that
*enter* the last block's attention (`encoder.layers[-1].ln_1`): the output of the last block only
reaches the classifier through the class token, so its patch tokens get zero gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.loading import normalize
from helpers.models import gradcam_target_layer, vit_tokens_to_map

# ViT tokens (N, 1 + h*w, D) -> (N, D, h, w): drop the class token, fold patches into a grid.
vit_reshape_transform = vit_tokens_to_map


def _is_vit(model: nn.Module) -> bool:
    from torchvision.models import VisionTransformer

    return isinstance(model, VisionTransformer)


def default_target_layer(model: nn.Module) -> nn.Module:
    """`helpers.models.gradcam_target_layer(model)` when available, else a sensible guess.

    The guess: ViT -> `encoder.layers[-1].ln_1`; anything else -> the last Conv2d module.
    """
    try:
        return gradcam_target_layer(model)
    except (ImportError, AttributeError, KeyError, ValueError):
        pass
    if _is_vit(model):
        return model.encoder.layers[-1].ln_1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("No Conv2d layer found: pass target_layer= explicitly.")
    return convs[-1]


def _fix_vit_target(model: nn.Module, layer: nn.Module) -> nn.Module:
    """Redirect a ViT target whose patch tokens cannot receive gradient to the last block's ln_1."""
    if _is_vit(model):
        last = model.encoder.layers[-1]
        if layer is last or layer is model.encoder or layer is model.encoder.ln:
            warnings.warn(
                "Grad-CAM on the ViT's last encoder output gives zero gradient for patch tokens; "
                "using encoder.layers[-1].ln_1 (the tokens entering the last block) instead.",
                stacklevel=3,
            )
            return last.ln_1
    return layer


def _class_scores(logits: torch.Tensor, class_idx: int | Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The score to explain per sample, and the class index it belongs to.

    A 1-logit (sigmoid) model has score +logit for class 1 and -logit for class 0.
    """
    n = logits.shape[0]
    if logits.ndim == 1:
        logits = logits[:, None]
    if class_idx is None:
        classes = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
    else:
        classes = torch.as_tensor(class_idx, device=logits.device).long().expand(n)
    if logits.shape[1] == 1:
        scores = torch.where(classes == 1, logits[:, 0], -logits[:, 0])
    else:
        scores = logits.gather(1, classes[:, None])[:, 0]
    return scores, classes


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target_layer: nn.Module,
    class_idx: int | Sequence[int] | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for a normalised batch x (N, 3, H, W).

    `class_idx`: the class to explain (an int, one per sample, or None = the predicted class).
    `reshape_transform`: turns the layer output into (N, K, h, w); token outputs of shape
    (N, 1 + h*w, D) (ViT) are folded with `vit_reshape_transform` automatically.

    How gradients reach the activations even when every parameter is frozen: a forward hook
    replaces the layer's output by a detached copy that requires grad, so autograd tracks
    everything after the layer (and nothing before it, which also saves time). It runs outside
    `torch.inference_mode` and in eval mode; the model's train/eval state is restored afterwards.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured["activations"] = leaf
        return leaf

    was_training = model.training
    handle = target_layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().float()
            scores, _ = _class_scores(model(x).float(), class_idx)
            if "activations" not in captured:
                raise ValueError("target_layer was not used in the forward pass: pick a layer of this model.")
            activations = captured["activations"]
            (gradients,) = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
            if gradients is None or not gradients.any():
                warnings.warn(
                    "Grad-CAM: the class score has zero gradient at target_layer (an untrained head that "
                    "starts at zero, or a layer that does not reach the output); heatmaps will be blank.",
                    stacklevel=2,
                )
                gradients = torch.zeros_like(activations)
            activations, gradients = activations.detach(), gradients.detach()
            if reshape_transform is None and activations.ndim == 3:
                reshape_transform = vit_reshape_transform
            if reshape_transform is not None:
                activations, gradients = reshape_transform(activations), reshape_transform(gradients)
            weights = gradients.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
            cam = F.relu((weights * activations).sum(dim=1, keepdim=True))  # (N, 1, h, w)
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            low = cam.amin(dim=(1, 2), keepdim=True)
            high = cam.amax(dim=(1, 2), keepdim=True)
            span = (high - low).clamp_min(torch.finfo(cam.dtype).tiny)  # no fixed epsilon: maps can be tiny
            cam = torch.where(high > low, (cam - low) / span, torch.zeros_like(cam))
    finally:
        handle.remove()
        model.train(was_training)
    return cam.cpu().numpy().astype(np.float32)


def _to_hwc_float(image: Any) -> np.ndarray:
    """An image as (H, W, 3) floats in [0, 1]; takes uint8 or float, CHW or HWC, tensor or array."""
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def overlay(image: Any, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap (H, W), coloured with `cmap`, over an image; returns RGB floats (H, W, 3)."""
    import matplotlib

    img = _to_hwc_float(image)
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {img.shape[:2]} differ in size")
    colored = matplotlib.colormaps[cmap](heat)[..., :3]
    return np.clip((1 - alpha) * img + alpha * colored, 0.0, 1.0).astype(np.float32)


def plot_gradcam(
    model: nn.Module,
    images_u8: Any,
    class_names: Sequence[str],
    out_dir: str | Path,
    name: str = "gradcam.png",
    target_layer: nn.Module | None = None,
    vit: bool | str = "auto",
    y_true: Sequence[int] | None = None,
    n: int = 8,
    alpha: float = 0.4,
):
    """Show up to `n` images (uint8 (N, 3, H, W)) above their Grad-CAM overlays; save out_dir/name.

    Titles give the predicted class and its probability (and the true class when `y_true` is
    given; wrong predictions in red). `target_layer=None` uses `default_target_layer(model)`;
    `vit="auto"` detects a torchvision VisionTransformer and folds its tokens into a grid.
    """
    from helpers.plots import new_figure, save_figure

    images = torch.as_tensor(np.asarray(images_u8)) if not isinstance(images_u8, torch.Tensor) else images_u8
    images = images[:n]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images_u8 must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    is_vit = _is_vit(model) if vit == "auto" else bool(vit)
    layer = target_layer if target_layer is not None else default_target_layer(model)
    layer = _fix_vit_target(model, layer)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = normalize(images.to(device))

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = model(x).float()
    model.train(was_training)
    logits = logits[:, None] if logits.ndim == 1 else logits
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits)
        probs = torch.cat([1 - p1, p1], dim=1).cpu().numpy()
    else:
        probs = torch.softmax(logits, dim=1).cpu().numpy()
    heatmaps = grad_cam(model, x, layer, reshape_transform=vit_reshape_transform if is_vit else None)

    count = images.shape[0]
    fig, axes = new_figure(nrows=2, ncols=count, figsize=(2.2 * count, 4.8), squeeze=False)
    for i in range(count):
        image = images[i].cpu()
        pred = int(probs[i].argmax())
        title = f"pred {class_names[pred]} ({probs[i, pred]:.2f})"
        color = "black"
        if y_true is not None:
            true = int(y_true[i])
            title = f"true {class_names[true]}\n" + title
            color = "black" if true == pred else "red"
        axes[0, i].imshow(_to_hwc_float(image))
        axes[0, i].set_title(title, fontsize=8, color=color)
        axes[1, i].imshow(overlay(image, heatmaps[i], alpha=alpha))
        axes[1, i].set_title("Grad-CAM", fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("Grad-CAM: where the evidence for the predicted class is", fontsize=10)
    return save_figure(fig, out_dir, name)
