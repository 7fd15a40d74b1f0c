"""Chapter 01, head-only training: what a frozen backbone leaves to train, freezing it, the head
trained on cached features, and reading the chapter's own test predictions.

The material: ``model`` (a ResNet-18, the ResNet-152's layout, random weights, backbone frozen),
``train_feats``/``y_train`` and ``val_feats``/``y_val`` (features of small 4-class chest X-ray
splits from MobileNetV2's ImageNet weights when converted weights are here, else a small CNN),
``class_names``, and ``test_pred``/``val_pred`` (the chapter's saved predictions, or the stand-in).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import (Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, load_predictions,
                                    probabilities)

NOTEBOOK = "01_resnet152_head_only"


def new_resnet(n_classes: int, seed: int) -> nn.Module:
    from helpers import models

    torch.manual_seed(seed)
    return models.build_model("resnet18", n_classes, weights="random")


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    splits = mat.small_splits("chest4", profile, data_dir, seed, max_per_class=20)
    net, what = mat.backbone(seed)
    size = 32 if profile == "smoke" else 64
    feats = {s: mat.features(net, getattr(splits, s), size) for s in ("train", "val")}
    print(f"features: {what}, {size} px, {tuple(feats['train'].shape)} for train")
    model = new_resnet(len(splits.class_names), seed)
    for p in model.parameters():
        p.requires_grad = False
    model.fc.requires_grad_(True)
    test_pred, _ = load_predictions(NOTEBOOK, "test", profile)
    val_pred, _ = load_predictions(NOTEBOOK, "val", profile)
    public = {"class_names": list(splits.class_names), "model": model,
              "train_feats": feats["train"], "y_train": mat.labels(splits.train),
              "val_feats": feats["val"], "y_val": mat.labels(splits.val),
              "test_pred": test_pred, "val_pred": val_pred}
    return public, {"fresh": new_resnet(len(splits.class_names), seed)}


# --------------------------------------------------------------------------- q1: what head-only trains


def _head_size(m: Any) -> int:
    return sum(p.numel() for p in m.fresh.fc.parameters())


q1 = Problem(
    "q1", "n_trainable",
    expected=_head_size,
    mistakes=[Mistake("that is every parameter: count only those with requires_grad (the frozen backbone does not train).",
                      value=lambda m: sum(p.numel() for p in m.fresh.parameters()),
                      example="n_trainable = sum(p.numel() for p in model.parameters())"),
              Mistake("the biases are missing: the head has D x C weights plus C biases.",
                      value=lambda m: m.fresh.fc.weight.numel(), example="n_trainable = model.fc.weight.numel()"),
              Mistake("0: that counts a model with the head frozen too; the new head (model.fc) trains.",
                      value=lambda m: 0, example="n_trainable = 0")],
    hint="Sum `p.numel()` over `model.parameters()` whose `requires_grad` is True.",
    solution="n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)",
)

# --------------------------------------------------------------------------- q2: freeze a backbone


def _run_freeze(fn: Any, m: Any) -> dict:
    found = {}
    for name, fresh in (("ResNet", copy.deepcopy(m.fresh)), ("small CNN", mat.small_cnn(len(m.class_names)))):
        fresh.train()
        out = fn(fresh)
        after = out if isinstance(out, nn.Module) else fresh
        found[name] = {"trainable": sorted(n for n, p in after.named_parameters() if p.requires_grad),
                       "training": after.training}
    return found


def _head_only(got: dict, ref: dict) -> bool:
    return all(got[k]["trainable"] == ref[k]["trainable"] for k in ref)


def _all(got: dict) -> bool:
    return len(got["ResNet"]["trainable"]) > 2


q2 = coding(
    "q2", "freeze_backbone",
    run=_run_freeze, compare=_head_only,
    mistakes=[
        Mistake("model.eval() does not freeze anything: it switches BatchNorm and Dropout to inference. "
                "Freezing is `requires_grad = False` on the backbone's parameters.",
                when=lambda got, m: _all(got) and not got["ResNet"]["training"],
                example="def freeze_backbone(model):\n    model.eval()\n    return model"),
        Mistake("nothing was frozen: set `p.requires_grad = False` for every parameter, then True for `model.fc`'s.",
                when=lambda got, m: all(len(v["trainable"]) > 2 for v in got.values()) and "conv1.weight" in got["ResNet"]["trainable"],
                example="def freeze_backbone(model):\n    for p in model.fc.parameters():\n        p.requires_grad = True\n    return model"),
        Mistake("the head is frozen too: then nothing trains. Make `model.fc`'s parameters trainable again.",
                when=lambda got, m: all(v["trainable"] == [] for v in got.values()),
                example="def freeze_backbone(model):\n    for p in model.parameters():\n        p.requires_grad = False\n    return model"),
        Mistake("some backbone parameters still train: every parameter but the head's must be frozen (loop over "
                "`model.parameters()`, not only the first layers).",
                when=lambda got, m: _all(got) and "fc.weight" in got["ResNet"]["trainable"],
                example="def freeze_backbone(model):\n    params = list(model.parameters())\n    for p in params[: len(params) // 2]:\n        p.requires_grad = False\n    return model"),
    ],
    describe=lambda got, ref: "which parameters train: " + "; ".join(
        f"{k}: {', '.join(got[k]['trainable'][:4]) or 'none'}{' ...' if len(got[k]['trainable']) > 4 else ''} "
        f"instead of {', '.join(ref[k]['trainable'])}" for k in ref if got[k]["trainable"] != ref[k]["trainable"]),
    hint="`for p in model.parameters(): p.requires_grad = False`, then the same with True over `model.fc.parameters()`; return the model.",
    solution="""
    def freeze_backbone(model):
        for p in model.parameters():
            p.requires_grad = False
        for p in model.fc.parameters():
            p.requires_grad = True
        return model
    """,
)

# --------------------------------------------------------------------------- q3: the head-only loop


def _loss(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(head(x), y))


def _run_train_head(fn: Any, m: Any) -> dict:
    x, y = m.train_feats.clone(), m.y_train.clone()
    torch.manual_seed(m.seed)
    head = fn(x, y, 100, 1e-2)
    if not isinstance(head, nn.Module):
        raise Wrong(f"return the trained head (an nn.Module such as nn.Linear), not {type(head).__name__}.")
    out = head(x[:2])
    if out.shape != (2, len(m.class_names)):
        raise Wrong(f"the head gives {tuple(out.shape[1:])} outputs per image: one logit per class ({len(m.class_names)}) is needed.")
    torch.manual_seed(m.seed)
    start = nn.Linear(x.shape[1], len(m.class_names))
    return {"loss": _loss(head, x, y), "start": _loss(start, x, y), "val": _loss(head, m.val_feats, m.y_val)}


q3 = coding(
    "q3", "train_head",
    run=_run_train_head,
    # As low as the reference loop's loss, and at least half its fall from the untrained head: a loop that never
    # steps keeps the start loss, however little the reference falls on weak (random or tiny) features.
    compare=lambda got, ref: (got["loss"] <= ref["loss"] + 0.05
                              and got["start"] - got["loss"] > 0.5 * (ref["start"] - ref["loss"])),
    mistakes=[Mistake("the loss did not fall: in the loop call optimizer.zero_grad(), loss.backward() and optimizer.step().",
                      when=lambda got, m: got["loss"] >= got["start"] - 1e-3,
                      example="def train_head(features, labels, steps, lr):\n    head = nn.Linear(features.shape[1], int(labels.max()) + 1)\n"
                              "    optimizer = torch.optim.Adam(head.parameters(), lr=lr)\n    for _ in range(steps):\n"
                              "        optimizer.zero_grad()\n        loss = nn.functional.cross_entropy(head(features), labels)\n"
                              "        loss.backward()\n    return head")],
    describe=lambda got, ref: (f"the final training loss: {got['loss']:.3f}, where the same loop reaches {ref['loss']:.3f} "
                               f"(from {ref['start']:.3f}): more steps, the given learning rate, or Adam"),
    hint="`head = nn.Linear(features.shape[1], n_classes)`; `optimizer = torch.optim.Adam(head.parameters(), lr=lr)`; "
         "in each step: zero_grad, `cross_entropy(head(features), labels)`, backward, step.",
    solution="""
    def train_head(features, labels, steps, lr):
        head = nn.Linear(features.shape[1], int(labels.max()) + 1)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(head(features), labels)
            loss.backward()
            optimizer.step()
        return head
    """,
)

# --------------------------------------------------------------------------- q4, q5: the chapter's predictions


def confusion(frame: Any) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one (the class order of the prob_ columns)."""
    p, names = probabilities(frame)
    k = len(names)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (frame["y_true"].to_numpy(), p.argmax(1)), 1)
    return cm


def recall(frame: Any) -> np.ndarray:
    cm = confusion(frame)
    return np.diag(cm) / cm.sum(1)


q4 = Problem(
    "q4", "cm",
    expected=lambda m: confusion(m.test_pred),
    mistakes=[Mistake("transposed: rows must be the true class and columns the prediction "
                      "(`confusion_matrix(y_true, y_pred)`, in that order).",
                      value=lambda m: confusion(m.test_pred).T,
                      example="from sklearn.metrics import confusion_matrix\np = test_pred.filter(like='prob_').to_numpy()\n"
                              "cm = confusion_matrix(p.argmax(1), test_pred['y_true'])"),
              Mistake("normalised rows (rates): the question asks for counts of images.",
                      value=lambda m: confusion(m.test_pred) / confusion(m.test_pred).sum(1, keepdims=True),
                      example="from sklearn.metrics import confusion_matrix\np = test_pred.filter(like='prob_').to_numpy()\n"
                              "cm = confusion_matrix(test_pred['y_true'], p.argmax(1), normalize='true')")],
    alternatives=lambda m: {"the validation predictions' matrix (the question is about test)": confusion(m.val_pred)},
    hint="The predicted class is the argmax of the prob_ columns: `test_pred.filter(like='prob_').to_numpy().argmax(1)`; "
         "then `sklearn.metrics.confusion_matrix(y_true, y_pred)`.",
    solution="""
    from sklearn.metrics import confusion_matrix
    y_pred = test_pred.filter(like="prob_").to_numpy().argmax(1)
    cm = confusion_matrix(test_pred["y_true"], y_pred, labels=range(len(class_names)))
    """,
)

q5 = Problem(
    "q5", "recall_per_class",
    expected=lambda m: recall(m.test_pred),
    mistakes=[Mistake("that is the precision (divided by the column sums, the predictions): recall divides by the true counts (row sums).",
                      value=lambda m: np.diag(confusion(m.test_pred)) / confusion(m.test_pred).sum(0),
                      example="recall_per_class = np.diag(cm) / cm.sum(0)"),
              Mistake("one number: the question asks for one recall per class, in the order of class_names.",
                      when=lambda got, m: np.ndim(got) == 0, example="recall_per_class = np.trace(cm) / cm.sum()")],
    alternatives=lambda m: {"the validation split's recall (the question is about test)": recall(m.val_pred)},
    hint="Recall of class k: correct predictions of k (the diagonal) over the images whose true class is k (the row sum).",
    solution="recall_per_class = np.diag(cm) / cm.sum(1)",
)

QUESTIONS = [
    Question("What does `requires_grad = False` change, and what does it not change?",
             "No gradient is computed for that parameter, so the optimiser never moves it; the forward pass is the same, "
             "and BatchNorm still uses its running statistics only if the module is in eval mode."),
    Question("Why can head-only training run on cached features, computed once?",
             "A frozen backbone maps each image to the same features every epoch; only the head changes, so each "
             "epoch is a pass of a linear layer over a small tensor (without augmentation, which would change the features)."),
    Question("What does caching features cost you?", "Augmentation: each image always gives the same features, so random "
             "flips or crops no longer vary from epoch to epoch (unless you cache several augmented copies)."),
    Question("Why does a head on ImageNet features work on chest X-rays at all?", "Early and middle layers detect edges, "
             "textures and shapes that are useful in any image; the head only has to combine them for the new classes."),
    Question("What is the difference between model.eval() and freezing?", "eval() switches BatchNorm to running statistics and "
             "turns Dropout off, for any parameter; freezing (requires_grad=False) stops updates. They are independent."),
    Question("A ResNet-152 has about 58 million parameters; how many does its new 4-class head train?",
             "2048 x 4 weights + 4 biases = 8,196: a tiny model, which is why head-only training needs little data and time."),
    Question("When is head-only training not enough?", "When the images differ much from ImageNet (texture, grey levels, "
             "scale) so that the frozen features do not separate the classes; then fine-tuning deeper layers helps (chapter 02)."),
    Question("Why does the confusion matrix's orientation matter?", "Rows = true class, columns = prediction is the convention "
             "of scikit-learn; swapping them swaps recall and precision when you read rows or columns."),
    Question("Recall per class versus accuracy: which tells you the tuberculosis images are missed?",
             "The recall of TURBERCULOSIS (its row): accuracy averages over all images and can stay high while a small class is missed."),
    Question("Why are the exercises' references computed from a snapshot rather than your variables?",
             "So that a check compares with the data as set up: changing `model` or `test_pred` in the notebook cannot make "
             "a wrong answer look right."),
]

EXPERIMENTS = [
    Experiment("Head capacity", "Replace the linear head by a two-layer MLP (hidden 256, ReLU, Dropout) on the same cached features.",
               "Whether validation loss improves or the training loss only falls faster (over-fitting on few images)."),
    Experiment("Features from another layer", "Cache the features after layer3 instead of layer4 (global-average-pooled) and train the same head.",
               "Whether less ImageNet-specific features separate X-ray classes better or worse; compare validation recall per class."),
    Experiment("How many images does the head need?", "Train the head on 10%, 25%, 50%, 100% of the cached training features.",
               "Where the validation score stops improving: the head has few parameters, so the curve flattens early."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
