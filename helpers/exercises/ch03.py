"""Chapter 03, ViT-B/16 head only: tokens and the patch grid, what a frozen ViT leaves to train,
Grad-CAM on patch tokens, where the NORMAL test images went, and the border-only shortcut probe.

The material: ``IMAGE_SIZE``/``PATCH`` (the recipe's 224 px with ImageNet weights, and 16 px),
``vit`` (a small real torchvision ViT, patch 16, 64 px, width 32, random weights, backbone frozen,
head ``vit.heads``),
``x`` (four chest X-rays at 64 px, real or in the smoke profile synthetic, one per class),
``tokens``/``grads`` (the tokens entering ``vit``'s last encoder block for ``x`` and the gradient of
the predicted class's score with respect to them), ``class_names``, ``test_pred``/``val_pred`` (the
chapter's saved predictions, or the stand-in), and ``PROBE_SIZE``/``FRAME`` (the border probe's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import (Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, load_predictions,
                                    probabilities)

NOTEBOOK = "03_vit_b16_head_only"
IMAGE_SIZE, PATCH, SMALL = 224, 16, 64  # the recipe's ViT-B/16 input; the exercises' small ViT
PROBE_SIZE, FRAME = 32, 4  # the chapter's border probe: 32 px thumbnails, the outer 4 px kept


def small_vit(n_classes: int, seed: int) -> nn.Module:
    """A small torchvision ViT (patch 16, 64 px, 2 layers of width 32), random weights with a random
    head (torchvision starts it at zero), every parameter but the head's frozen."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(image_size=SMALL, patch_size=PATCH, num_layers=2, num_heads=2, hidden_dim=32,
                            mlp_dim=64, num_classes=n_classes)
    nn.init.normal_(vit.heads.head.weight, std=0.5)
    for p in vit.parameters():
        p.requires_grad = False
    for p in vit.heads.parameters():
        p.requires_grad = True
    return vit.eval()


def tokens_and_grads(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens entering the last block's attention (``ln_1``'s output, (N, 1 + h*w, D)) and the
    gradient of the predicted class's score with respect to them: what Grad-CAM for a ViT reads."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        seen["tokens"] = output.detach().requires_grad_(True)
        return seen["tokens"]

    handle = vit.encoder.layers[-1].ln_1.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = vit(x)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (grads,) = torch.autograd.grad(score, seen["tokens"])
    finally:
        handle.remove()
    return seen["tokens"].detach(), grads.detach()


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    from helpers import loading

    splits = mat.small_splits("chest4", profile, data_dir, seed, max_per_class=4)
    labels = np.asarray(splits.test["label"])
    one_each = [int(np.flatnonzero(labels == c)[0]) for c in range(len(splits.class_names))]
    x = loading.normalize(loading.cache_images(splits.test.iloc[one_each], SMALL))
    vit = small_vit(len(splits.class_names), seed)
    tokens, grads = tokens_and_grads(vit, x)
    print(f"small ViT: {SMALL} px, {SMALL // PATCH} x {SMALL // PATCH} patches; tokens {tuple(tokens.shape)}")
    public = {"IMAGE_SIZE": IMAGE_SIZE, "PATCH": PATCH, "class_names": list(splits.class_names), "vit": vit, "x": x,
              "tokens": tokens, "grads": grads, "PROBE_SIZE": PROBE_SIZE, "FRAME": FRAME,
              "test_pred": load_predictions(NOTEBOOK, "test", profile)[0],
              "val_pred": load_predictions(NOTEBOOK, "val", profile)[0]}
    return public, {"fresh": small_vit(len(splits.class_names), seed)}


# --------------------------------------------------------------------------- q1: how many tokens

q1 = Problem(
    "q1", "n_tokens",
    expected=lambda m: (m.IMAGE_SIZE // m.PATCH) ** 2 + 1,
    mistakes=[Mistake("the class token is missing: the encoder sees the patch tokens plus one learned class token.",
                      value=lambda m: (m.IMAGE_SIZE // m.PATCH) ** 2, example="n_tokens = (IMAGE_SIZE // PATCH) ** 2"),
              Mistake("that is the number of patches per SIDE: the grid is square, (S/16) x (S/16) patches, plus the class token.",
                      value=lambda m: m.IMAGE_SIZE // m.PATCH, example="n_tokens = IMAGE_SIZE // PATCH"),
              Mistake("that is the patches per side plus one: the grid has (S/16) ** 2 patches, plus one class token.",
                      value=lambda m: m.IMAGE_SIZE // m.PATCH + 1, example="n_tokens = IMAGE_SIZE // PATCH + 1")],
    hint="Patches per side: IMAGE_SIZE // PATCH; the grid is square; one class token comes on top.",
    solution="n_tokens = (IMAGE_SIZE // PATCH) ** 2 + 1",
)

# --------------------------------------------------------------------------- q2: tokens back to the patch grid


def _as_array(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise Wrong(f"return a tensor ({what}), not {type(value).__name__}.")
    return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _cases(m: Any) -> list[torch.Tensor]:
    """The material's tokens (4 x 4 grid) and a 3 x 3 grid of distinct numbers (B=2, D=5)."""
    return [m.tokens.clone(), torch.arange(2 * 10 * 5, dtype=torch.float32).reshape(2, 10, 5)]


def _run_grid(fn: Any, m: Any) -> list[np.ndarray]:
    out = []
    for t in _cases(m):
        try:
            out.append(_as_array(fn(t.clone()), "(B, D, h, w)"))
        except RuntimeError as error:
            if "invalid for input of size" in str(error):
                raise Wrong(f"a reshape failed ({error}): the 1 + h*w tokens include the class token, which has no "
                            "place in the grid; drop token 0 first.") from None
            raise
    return out


def _grid_same(got: list, ref: list) -> bool:
    return all(g.shape == r.shape and np.allclose(g, r, atol=1e-6) for g, r in zip(got, ref))


def _straight(t: torch.Tensor) -> np.ndarray:
    b, n, d = t.shape
    side = int(round((n - 1) ** 0.5))
    return t[:, 1:, :].reshape(b, d, side, side).numpy()


q2 = coding(
    "q2", "tokens_to_grid",
    run=_run_grid, compare=_grid_same,
    mistakes=[
        Mistake("channels last: Grad-CAM needs (B, D, h, w), channels first; transpose the token and feature axes.",
                when=lambda got, m: all(g.shape == (t.shape[0], int(round((t.shape[1] - 1) ** 0.5)),
                                                    int(round((t.shape[1] - 1) ** 0.5)), t.shape[2])
                                        for g, t in zip(got, _cases(m))),
                example="def tokens_to_grid(tokens):\n    b, n, d = tokens.shape\n    side = int((n - 1) ** 0.5)\n"
                        "    return tokens[:, 1:, :].reshape(b, side, side, d)"),
        Mistake("right shape, scrambled values: reshaping (B, N, D) straight to (B, D, h, w) mixes tokens and features; "
                "`.transpose(1, 2)` first, to (B, D, N), then reshape.",
                value=lambda m: [_straight(t) for t in _cases(m)],
                example="def tokens_to_grid(tokens):\n    b, n, d = tokens.shape\n    side = int((n - 1) ** 0.5)\n"
                        "    return tokens[:, 1:, :].reshape(b, d, side, side)"),
        Mistake("the LAST token was dropped: the class token is the FIRST one (index 0), `tokens[:, 1:]`.",
                value=lambda m: [t[:, :-1, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], *(2 * [int(round((t.shape[1] - 1) ** 0.5))])).numpy()
                                 for t in _cases(m)],
                example="def tokens_to_grid(tokens):\n    b, n, d = tokens.shape\n    side = int((n - 1) ** 0.5)\n"
                        "    return tokens[:, :-1, :].transpose(1, 2).reshape(b, d, side, side)"),
    ],
    describe=lambda got, ref: "; ".join(f"case {i + 1}: shape {g.shape}" + (f" instead of {r.shape}" if g.shape != r.shape
                                                                         else ", other values")
                                        for i, (g, r) in enumerate(zip(got, ref)) if not _grid_same([g], [r])),
    hint="`tokens[:, 1:, :]` drops the class token; `.transpose(1, 2)` gives (B, D, N); then "
         "`.reshape(B, D, h, w)` with h = w = sqrt(N).",
    solution="""
    def tokens_to_grid(tokens):
        patches = tokens[:, 1:, :]
        side = int(round(patches.shape[1] ** 0.5))
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    """,
)

# --------------------------------------------------------------------------- q3: what head-only training trains


def _head(m: Any) -> int:
    return sum(p.numel() for p in m.fresh.heads.parameters())


q3 = Problem(
    "q3", "n_trainable",
    expected=_head,
    mistakes=[Mistake("that is every parameter: count only those with requires_grad (the frozen encoder does not train).",
                      value=lambda m: sum(p.numel() for p in m.fresh.parameters()),
                      example="n_trainable = sum(p.numel() for p in vit.parameters())"),
              Mistake("the biases are missing: the head is Linear(D, C), D x C weights plus C biases.",
                      value=lambda m: m.fresh.heads.head.weight.numel(), example="n_trainable = vit.heads.head.weight.numel()"),
              Mistake("that is the chapter's ViT-B/16 head (768 x 4 + 4): the question is about `vit`, width 32.",
                      value=lambda m: 768 * len(m.class_names) + len(m.class_names), example="n_trainable = 768 * 4 + 4")],
    hint="Sum `p.numel()` over `vit.parameters()` whose `requires_grad` is True.",
    solution="n_trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)",
)

# --------------------------------------------------------------------------- q4: Grad-CAM on the patch grid


def _fold(t: torch.Tensor) -> torch.Tensor:
    side = int(round((t.shape[1] - 1) ** 0.5))
    return t[:, 1:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def _scaled(cam: np.ndarray) -> np.ndarray:
    """Each map scaled to [0, 1] (0 where flat): Grad-CAM maps are compared up to their scale."""
    cam = np.asarray(cam, dtype=np.float64)
    low = cam.min(axis=(-2, -1), keepdims=True)
    span = cam.max(axis=(-2, -1), keepdims=True) - low
    return np.divide(cam - low, span, out=np.zeros_like(cam), where=span > 1e-12)


def _cam(tokens: torch.Tensor, grads: torch.Tensor, relu: bool = True, average: bool = True) -> np.ndarray:
    a, g = _fold(tokens), _fold(grads)
    w = g.mean(dim=(2, 3), keepdim=True) if average else g
    cam = (w * a).sum(dim=1)
    return (cam.clamp_min(0) if relu else cam).numpy()


FOLD = """
def patch_cam(tokens, grads):
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    a = tokens[:, 1:, :].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    g = grads[:, 1:, :].transpose(1, 2).reshape(grads.shape[0], grads.shape[2], side, side)
"""


def _run_cam(fn: Any, m: Any) -> np.ndarray:
    try:
        out = _as_array(fn(m.tokens.clone(), m.grads.clone()), "(B, h, w)")
    except RuntimeError as error:
        if "invalid for input of size" in str(error):
            raise Wrong(f"a reshape failed ({error}): drop the class token (token 0) before folding the grid.") from None
        raise
    b, n, _ = m.tokens.shape
    side = int(round((n - 1) ** 0.5))
    if out.shape != (b, side, side):
        raise Wrong(f"return one map per image, shape (B, h, w) = {(b, side, side)}, not {out.shape}: sum over the "
                    "feature axis D.")
    return _scaled(out)


q4 = coding(
    "q4", "patch_cam",
    run=_run_cam, expected=lambda m: _scaled(_cam(m.tokens, m.grads)),
    compare=lambda got, ref: np.allclose(got, ref, atol=1e-5),
    mistakes=[
        Mistake("no ReLU: Grad-CAM keeps only the positive evidence for the class, `clamp_min(0)` (or F.relu) after the sum.",
                value=lambda m: _scaled(_cam(m.tokens, m.grads, relu=False)),
                example=FOLD + "    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)\n"),
        Mistake("the gradients were not averaged: Grad-CAM weighs each feature map by its MEAN gradient over the grid "
                "(one weight per channel), not position by position.",
                value=lambda m: _scaled(_cam(m.tokens, m.grads, average=False)),
                example=FOLD + "    return (g * a).sum(dim=1).clamp_min(0)\n"),
    ],
    describe=lambda got, ref: f"the maps (scaled to [0, 1]): {int((~np.isclose(got, ref, atol=1e-5)).sum())} of {ref.size} cells differ",
    hint="Fold both into (B, D, h, w) (your `tokens_to_grid` of q2); weights = `g.mean(dim=(2, 3), keepdim=True)` (B, D, 1, 1); "
         "`(weights * a).sum(dim=1)`, then `.clamp_min(0)`.",
    solution=FOLD + """
    weights = g.mean(dim=(2, 3), keepdim=True)  # one weight per feature map: its mean gradient
    return (weights * a).sum(dim=1).clamp_min(0)
""",
)

# --------------------------------------------------------------------------- q5: where did the NORMAL images go?


def confusion(frame: Any) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one (argmax)."""
    p, names = probabilities(frame)
    cm = np.zeros((len(names), len(names)), dtype=int)
    np.add.at(cm, (frame["y_true"].to_numpy(), p.argmax(1)), 1)
    return cm


def _normal(m: Any) -> int:
    return m.class_names.index("NORMAL")


q5 = Problem(
    "q5", "normal_row",
    expected=lambda m: confusion(m.test_pred)[_normal(m)],
    mistakes=[Mistake("that is the NORMAL column: the images predicted NORMAL, by true class. The question is where the "
                      "truly NORMAL images went: their row.",
                      value=lambda m: confusion(m.test_pred)[:, _normal(m)],
                      example="p = test_pred.filter(like='prob_').to_numpy()\n"
                              "normal_row = np.bincount(test_pred['y_true'][p.argmax(1) == 1], minlength=4)"),
              Mistake("rates, not counts: the question asks how many NORMAL test images went to each class.",
                      value=lambda m: confusion(m.test_pred)[_normal(m)] / confusion(m.test_pred)[_normal(m)].sum(),
                      example="p = test_pred.filter(like='prob_').to_numpy()\n"
                              "pred = p[test_pred['y_true'] == 1].argmax(1)\nnormal_row = np.bincount(pred, minlength=4) / len(pred)")],
    alternatives=lambda m: {"the validation predictions' NORMAL row (the question is about test)": confusion(m.val_pred)[_normal(m)]},
    hint="Keep the test rows whose y_true is NORMAL (`class_names.index('NORMAL')`), take the argmax of their prob_ "
         "columns, and count each class: `np.bincount(..., minlength=len(class_names))`.",
    solution="""
    k = class_names.index("NORMAL")
    predicted = test_pred.filter(like="prob_").to_numpy().argmax(1)
    normal_row = np.bincount(predicted[test_pred["y_true"].to_numpy() == k], minlength=len(class_names))
    """,
)

# --------------------------------------------------------------------------- q6: what the border probe sees

q6 = Problem(
    "q6", "n_border",
    expected=lambda m: m.PROBE_SIZE ** 2 - (m.PROBE_SIZE - 2 * m.FRAME) ** 2,
    mistakes=[Mistake("that is the blanked-out centre (where the lungs are): the probe sees the rest, the frame around it.",
                      value=lambda m: (m.PROBE_SIZE - 2 * m.FRAME) ** 2, example="n_border = (PROBE_SIZE - 2 * FRAME) ** 2"),
              Mistake("the four corners were counted twice: four strips of PROBE_SIZE x FRAME overlap in the corners.",
                      value=lambda m: 4 * m.PROBE_SIZE * m.FRAME, example="n_border = 4 * PROBE_SIZE * FRAME"),
              Mistake("the four corners are missing: the frame is the whole thumbnail minus the centre square.",
                      value=lambda m: 4 * (m.PROBE_SIZE - 2 * m.FRAME) * m.FRAME,
                      example="n_border = 4 * (PROBE_SIZE - 2 * FRAME) * FRAME")],
    hint="The whole thumbnail, PROBE_SIZE x PROBE_SIZE, minus the centre square the chapter blanks: "
         "`lungs[FRAME:-FRAME, FRAME:-FRAME] = True`.",
    solution="n_border = PROBE_SIZE ** 2 - (PROBE_SIZE - 2 * FRAME) ** 2",
)

QUESTIONS = [
    Question("How does a ViT turn an image into tokens?",
             "It cuts the image into 16 x 16-pixel patches, projects each patch linearly (a 16 x 16 convolution with "
             "stride 16) to a 768-number token, adds a position embedding, and prepends a learned class token."),
    Question("Why do the ViT's ImageNet weights want 224 px images?",
             "They were trained on a 14 x 14 grid of patches; at another size the position embeddings must be "
             "interpolated to the new grid, which costs accuracy."),
    Question("What does the classifier of a ViT read?",
             "Only the final class token (after the last LayerNorm); the class token gathers information from every "
             "patch through self-attention."),
    Question("Why does Grad-CAM for a ViT use the tokens ENTERING the last block, not its output?",
             "After the last block only the class token goes on to the classifier, so the patch tokens of the output "
             "get zero gradient: the map would be blank."),
    Question("How fine is a ViT-B/16 Grad-CAM map at 224 px, compared with a ResNet's?",
             "14 x 14 cells, one per patch; a ResNet's last stage is 7 x 7 at 224 px. Both are upsampled to the image."),
    Question("Why can the ViT's head be trained on cached class-token features?",
             "The encoder is frozen, in eval mode (dropout off) and sees no augmentation, so each image's features are "
             "the same every epoch: compute them once, then train the linear head on the stored vectors."),
    Question("Why does the chapter use no augmentation?",
             "Random flips or rotations would change the input, and so the features, every epoch: the feature cache "
             "would be wrong."),
    Question("How many parameters does the chapter's head train, against the whole ViT-B/16?",
             "768 x 4 + 4 = 3,076 of about 86 million: well under 0.01%."),
    Question("What does the border-only probe measure?",
             "How far a model gets without looking at the lungs: the outer frame shows shoulders, text markers, "
             "collimation and exposure, which here reveal the hospital (the source) rather than the disease."),
    Question("Why are COVID19 and TURBERCULOSIS easy to 'detect' in this dataset for the wrong reason?",
             "They come from other hospitals and scanners than NORMAL and PNEUMONIA (adult films, some photographed "
             "with a colour cast): class and source coincide, so source cues predict the class."),
    Question("Why does the chapter feed grayscale images?",
             "Many TB images carry a blue/cyan cast: with colour the network could detect TB from the tint alone."),
    Question("What would settle whether the model recognises disease rather than source?",
             "An external test set from new sources (hospitals not in training), where source cues no longer match the class."),
]

EXPERIMENTS = [
    Experiment("Unfreeze the last encoder block", "Set `requires_grad = True` for `model.encoder.layers[-1]` (and "
               "`encoder.ln`) and train with `train.fit` at a low learning rate instead of the feature cache.",
               "Whether the ViT gains more from partial fine-tuning than the CNNs of chapters 01-02, and what it costs per epoch."),
    Experiment("Colour on", "Run the chapter with GRAYSCALE = False.",
               "Whether TURBERCULOSIS recall rises while NORMAL/PNEUMONIA stay the same: a sign the tint is being used."),
    Experiment("A wider frame", "Change FRAME in the border probe from 4 to 2 and to 8 pixels.",
               "How the probe's balanced accuracy and 'right source' share move: how much of the score needs no lungs at all."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
