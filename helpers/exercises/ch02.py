"""Chapter 02, full fine-tuning: which layers train, learning rates per group, one training step,
the keep-best epoch, and the chapter's own test predictions.

The material: ``new_model()`` (a fresh ResNet-18, the ResNet-50's layout, random weights), ``net``
(a small real CNN) with a batch ``x``/``y`` of real (smoke: synthetic) chest X-rays, ``history``
(a training run of a head on a small CNN's features, per epoch), and ``test_pred``/``val_pred``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import (Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, load_predictions,
                                    probabilities)

NOTEBOOK = "02_resnet50_finetune"
HEAD_LR, BACKBONE_LR = 1e-3, 1e-4


def new_model(seed: int = 42) -> nn.Module:
    """A fresh ResNet-18 with a 4-class head (random weights, seeded)."""
    from helpers import models

    torch.manual_seed(seed)
    return models.build_model("resnet18", 4, weights="random")


def _history(x: dict, y: dict, seed: int, epochs: int = 25, lr: float = 1e-2, noise: float = 0.3) -> pd.DataFrame:
    """A small CNN fine-tuned end to end (full batch, Adam), ``noise`` of its training labels
    shuffled so that over-fitting shows within a few epochs, even on the easy synthetic images."""
    gen = torch.Generator().manual_seed(seed)
    y_train = y["train"].clone()
    flip = torch.rand(len(y_train), generator=gen) < noise
    y_train[flip] = y_train[flip][torch.randperm(int(flip.sum()), generator=gen)]
    net = mat.small_cnn(int(y["train"].max()) + 1, seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    rows = []
    for epoch in range(1, epochs + 1):
        net.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x["train"]), y_train)
        loss.backward()
        optimizer.step()
        net.eval()
        with torch.no_grad():
            val = nn.functional.cross_entropy(net(x["val"]), y["val"])
        rows.append({"epoch": epoch, "train_loss": loss.item(), "val_loss": val.item()})
    return pd.DataFrame(rows)


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    splits = mat.small_splits("chest4", profile, data_dir, seed, max_per_class=20)
    size = 32 if profile == "smoke" else 64
    from helpers import loading

    images = {s: loading.normalize(loading.cache_images(getattr(splits, s), size)) for s in ("train", "val")}
    labels = {s: mat.labels(getattr(splits, s)) for s in ("train", "val")}
    pick = torch.randperm(len(labels["train"]), generator=torch.Generator().manual_seed(seed))[:8]
    public = {"new_model": new_model, "HEAD_LR": HEAD_LR, "BACKBONE_LR": BACKBONE_LR,
              "net": mat.small_cnn(len(splits.class_names), seed), "x": images["train"][pick], "y": labels["train"][pick],
              "history": _history(images, labels, seed),
              "test_pred": load_predictions(NOTEBOOK, "test", profile)[0],
              "val_pred": load_predictions(NOTEBOOK, "val", profile)[0]}
    return public, {}


# --------------------------------------------------------------------------- q1: freeze all but the last block


def _trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _part(model: nn.Module, *names: str) -> int:
    return sum(p.numel() for n in names for p in getattr(model, n).parameters())


q1 = Problem(
    "q1", "n_last_block",
    expected=lambda m: _part(new_model(m.seed), "layer4", "fc"),
    mistakes=[Mistake("that is every parameter: nothing was frozen.", value=lambda m: _trainable(new_model(m.seed)),
                      example="n_last_block = sum(p.numel() for p in new_model().parameters())"),
              Mistake("that is the head alone: layer4 must train too.", value=lambda m: _part(new_model(m.seed), "fc"),
                      example="n_last_block = sum(p.numel() for p in new_model().fc.parameters())"),
              Mistake("that is layer4 alone: the new head (fc) must train too.", value=lambda m: _part(new_model(m.seed), "layer4"),
                      example="n_last_block = sum(p.numel() for p in new_model().layer4.parameters())")],
    hint="`for p in m.parameters(): p.requires_grad_(False)`, then True over `m.layer4.parameters()` and "
         "`m.fc.parameters()`; count `p.numel()` where `p.requires_grad`.",
    solution="""
    m = new_model()
    for p in m.parameters():
        p.requires_grad_(False)
    for p in [*m.layer4.parameters(), *m.fc.parameters()]:
        p.requires_grad_(True)
    n_last_block = sum(p.numel() for p in m.parameters() if p.requires_grad)
    """,
)

# --------------------------------------------------------------------------- q2: two learning rates


def _lrs(fn: Any, m: Any) -> dict[str, float]:
    model = new_model(m.seed)
    optimizer = fn(model, 1e-3, 1e-4)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise Wrong(f"return the optimiser (torch.optim.AdamW(...)), not {type(optimizer).__name__}.")
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id.get(id(p), 0.0) for n, p in model.named_parameters()}


def _expected_lrs(m: Any, head: float = 1e-3, rest: float = 1e-4) -> dict[str, float]:
    return {n: (head if n.startswith("fc.") else rest) for n, _ in new_model(m.seed).named_parameters()}


q2 = coding(
    "q2", "make_optimizer",
    run=_lrs, expected=_expected_lrs, compare=lambda got, ref: got == ref,
    mistakes=[
        Mistake("the learning rates are swapped: the new head gets the larger one (head_lr).",
                value=lambda m: _expected_lrs(m, 1e-4, 1e-3),
                example="def make_optimizer(model, head_lr, backbone_lr):\n    head = [p for n, p in model.named_parameters() if n.startswith('fc')]\n"
                        "    rest = [p for n, p in model.named_parameters() if not n.startswith('fc')]\n"
                        "    return torch.optim.AdamW([{'params': rest, 'lr': head_lr}, {'params': head, 'lr': backbone_lr}])"),
        Mistake("some parameters are in no group: every parameter of the model must be optimised.",
                when=lambda got, m: 0.0 in got.values(),
                example="def make_optimizer(model, head_lr, backbone_lr):\n    return torch.optim.AdamW([{'params': model.layer4.parameters(), 'lr': backbone_lr},\n"
                        "                              {'params': model.fc.parameters(), 'lr': head_lr}])"),
        Mistake("one learning rate for all: make two parameter groups.", when=lambda got, m: len(set(got.values())) == 1,
                example="def make_optimizer(model, head_lr, backbone_lr):\n    return torch.optim.AdamW(model.parameters(), lr=head_lr)"),
    ],
    describe=lambda got, ref: "the learning rates of: " + ", ".join(
        f"{n} ({got[n]:g} instead of {ref[n]:g})" for n in list(ref) if got.get(n) != ref[n])[:300],
    hint="`head = list(model.fc.parameters())`; the backbone group is every parameter whose id is not a head's; "
         "`torch.optim.AdamW([{'params': ..., 'lr': ...}, {...}])`.",
    solution="""
    def make_optimizer(model, head_lr, backbone_lr):
        head_ids = {id(p) for p in model.fc.parameters()}
        backbone = [p for p in model.parameters() if id(p) not in head_ids]
        return torch.optim.AdamW([{"params": backbone, "lr": backbone_lr},
                                  {"params": list(model.fc.parameters()), "lr": head_lr}])
    """,
)

# --------------------------------------------------------------------------- q3: one training step


def _run_step(fn: Any, m: Any) -> dict:
    """One call on a copy of `net` in eval mode, with stale gradients already in .grad (a previous step's)."""
    model = copy.deepcopy(m.net).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.05)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loss = fn(model, m.x.clone(), m.y.clone(), optimizer, nn.CrossEntropyLoss())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        raise Wrong("return `loss.item()`, a float: the tensor keeps the whole graph of the step alive.")
    if not isinstance(loss, (float, int)):
        raise Wrong(f"return the loss as a float (`loss.item()`), not {type(loss).__name__}.")
    return {"loss": float(loss), "params": after.numpy(), "moved": float((after - before).abs().max()),
            "train_mode": model.training}


STEP = """
def train_step(model, x, y, optimizer, criterion):
    model.train()
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()
"""


def _variant(source: str) -> Any:
    scope: dict = {}
    exec(source, scope)  # noqa: S102 - our own text
    return scope["train_step"]


def _step_ok(got: dict, ref: dict) -> bool:
    return abs(got["loss"] - ref["loss"]) < 1e-4 and np.allclose(got["params"], ref["params"], atol=1e-5)


q3 = coding(
    "q3", "train_step",
    run=_run_step, compare=_step_ok,
    mistakes=[
        Mistake("the weights did not move: call optimizer.step() after loss.backward() (a step before backward uses no gradient).",
                when=lambda got, m: got["moved"] == 0,
                example="def train_step(model, x, y, optimizer, criterion):\n    model.train()\n    optimizer.zero_grad()\n"
                        "    loss = criterion(model(x), y)\n    loss.backward()\n    return loss.item()"),
        Mistake("the previous step's gradients were added to this one's: call optimizer.zero_grad() before loss.backward().",
                value=lambda m: _run_step(_variant(STEP.replace("    optimizer.zero_grad()\n", "")), m),
                example=STEP.replace("    optimizer.zero_grad()\n", "")),
        Mistake("the model stayed in eval mode: call model.train() first (BatchNorm normalises by the batch only in train mode).",
                when=lambda got, m: not got["train_mode"], example=STEP.replace("    model.train()\n", "")),
    ],
    describe=lambda got, ref: (f"the loss ({got['loss']:.4f} instead of {ref['loss']:.4f})" if abs(got["loss"] - ref["loss"]) >= 1e-4
                               else "the weights after the step: the loss is right, the update is not (one step of the given optimiser)"),
    hint="Four lines in this order: model.train(); optimizer.zero_grad(); loss = criterion(model(x), y); loss.backward(); "
         "optimizer.step(); then return loss.item().",
    solution=STEP,
)

# --------------------------------------------------------------------------- q4: the keep-best epoch


CASES = [("val_loss", [0.9, 0.7, 0.6, 0.65, 0.8]), ("val_auc", [0.70, 0.78, 0.81, 0.79, 0.80]),
         ("val_loss", [0.5, 0.6, 0.7, 0.8, 0.9])]
TRAIN_LOSS = [[1.0, 0.8, 0.6, 0.5, 0.4], [1.0, 0.8, 0.6, 0.5, 0.4], [1.0, 0.8, 0.6, 0.5, 0.55]]


def _run_best(fn: Any, m: Any) -> list[int]:
    frames = [(pd.DataFrame({"epoch": range(1, len(v) + 1), "train_loss": t, monitor: v}), monitor)
              for (monitor, v), t in zip(CASES, TRAIN_LOSS)]
    frames.append((m.history.copy(), "val_loss"))
    return [int(fn(frame, monitor)) for frame, monitor in frames]


q4 = coding(
    "q4", "best_epoch",
    run=_run_best, compare=lambda got, ref: got == ref,
    mistakes=[
        Mistake("off by one: epochs count from 1; read the `epoch` column of the best row, not its index.",
                when=lambda got, m: all(g == r - 1 for g, r in zip(got, q4.expected(m))),
                example="def best_epoch(history, monitor):\n    col = history[monitor]\n    return int(col.idxmax() if 'auc' in monitor else col.idxmin())"),
        Mistake("for an AUC (or an accuracy) the best epoch has the *largest* value; for a loss, the smallest.",
                when=lambda got, m: got[1] == 1 and got[0] == q4.expected(m)[0],
                example="def best_epoch(history, monitor):\n    return int(history.loc[history[monitor].idxmin(), 'epoch'])"),
        Mistake("that is the last epoch: keep-best restores the epoch with the best validation value, not the last one.",
                when=lambda got, m: got[:3] == [5, 5, 5],
                example="def best_epoch(history, monitor):\n    return int(history['epoch'].iloc[-1])"),
        Mistake("that watches the training loss: keep-best watches the `monitor` column (validation).",
                when=lambda got, m: got[2] == 4,
                example="def best_epoch(history, monitor):\n    return int(history.loc[history['train_loss'].idxmin(), 'epoch'])"),
    ],
    describe=lambda got, ref: "the epochs returned: " + ", ".join(
        f"{monitor}: {g} instead of {r}" for (monitor, _), g, r in zip([*CASES, ("history's val_loss", 0)], got, ref) if g != r),
    hint="`best = history[monitor].idxmax() if 'auc' in monitor or 'acc' in monitor else history[monitor].idxmin()`; "
         "return `history.loc[best, 'epoch']`.",
    solution="""
    def best_epoch(history, monitor):
        higher_is_better = "auc" in monitor or "acc" in monitor
        best = history[monitor].idxmax() if higher_is_better else history[monitor].idxmin()
        return int(history.loc[best, "epoch"])
    """,
)

# --------------------------------------------------------------------------- q5, q6: reading a run and the predictions

q5 = Problem(
    "q5", "restored_epoch",
    expected=lambda m: int(m.history.loc[m.history["val_loss"].idxmin(), "epoch"]),
    mistakes=[Mistake("that epoch has the lowest *training* loss (here the last one); keep-best watches the validation loss.",
                      value=lambda m: int(m.history.loc[m.history["train_loss"].idxmin(), "epoch"]),
                      example="restored_epoch = int(history.loc[history['train_loss'].idxmin(), 'epoch'])"),
              Mistake("off by one: epochs are numbered from 1 (use the column epoch, not the row index).",
                      value=lambda m: int(m.history["val_loss"].idxmin()), example="restored_epoch = int(history['val_loss'].idxmin())")],
    hint="The row with the smallest `val_loss` (`idxmin`), and its `epoch`; or `best_epoch(history, 'val_loss')` from q4.",
    solution='restored_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])',
)


def balanced_accuracy(frame: Any) -> float:
    p, _ = probabilities(frame)
    y, pred = frame["y_true"].to_numpy(), p.argmax(1)
    return float(np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)]))


def accuracy(frame: Any) -> float:
    p, _ = probabilities(frame)
    return float(np.mean(p.argmax(1) == frame["y_true"].to_numpy()))


q6 = Problem(
    "q6", "balanced_acc",
    expected=lambda m: balanced_accuracy(m.test_pred),
    mistakes=[Mistake("that is the plain accuracy: balanced accuracy averages the recall of each class, so a small class counts as much as a large one.",
                      value=lambda m: accuracy(m.test_pred),
                      example="balanced_acc = float(np.mean(test_pred.filter(like='prob_').to_numpy().argmax(1) == test_pred['y_true']))")],
    alternatives=lambda m: {"the validation split's balanced accuracy (the question is about test)": balanced_accuracy(m.val_pred)},
    hint="`sklearn.metrics.balanced_accuracy_score(y_true, y_pred)` with y_pred the argmax of the prob_ columns.",
    solution="""
    from sklearn.metrics import balanced_accuracy_score
    balanced_acc = balanced_accuracy_score(test_pred["y_true"], test_pred.filter(like="prob_").to_numpy().argmax(1))
    """,
)

QUESTIONS = [
    Question("What changes between head-only training and full fine-tuning?", "Every layer's parameters receive gradients and "
             "move; features adapt to X-rays, at the cost of more compute per epoch, more memory, and a higher risk of over-fitting."),
    Question("Why give the pretrained layers a smaller learning rate than the new head?", "The pretrained weights are already "
             "good; large steps would destroy them before the random head has learnt anything useful."),
    Question("Why must optimizer.zero_grad() come before loss.backward()?", "backward() adds to .grad; without zeroing, each "
             "step uses the sum of all previous gradients."),
    Question("What does model.train() change for a ResNet?", "BatchNorm normalises with the batch's statistics and updates its "
             "running averages; in eval() it uses the running averages. Dropout (if any) is on only in train mode."),
    Question("Why return loss.item() rather than loss from a training step?", "The tensor holds the whole computation graph; "
             "keeping it (e.g. appending to a list) keeps that memory alive."),
    Question("What does a validation loss that falls then rises while the training loss keeps falling mean?", "Over-fitting: "
             "the model fits the training images better and new ones worse; keep-best restores the epoch before it rises."),
    Question("Why choose the best epoch on validation, never on test?", "Choosing on test makes the test score part of "
             "training: it becomes optimistic and no longer estimates performance on new patients."),
    Question("Why does data augmentation matter more for fine-tuning than for head-only training?", "Millions of trainable "
             "parameters can memorise a few thousand images; augmentation shows new variations each epoch."),
    Question("Balanced accuracy versus accuracy on an imbalanced test set: which can a majority-class model inflate?",
             "Accuracy: always predicting the largest class scores its share; balanced accuracy gives 1/C for it."),
    Question("What is 'the last block' of a ResNet, and why unfreeze it first?", "layer4, the deepest stage: the most "
             "ImageNet-specific features, so adapting them helps most while the general early layers stay frozen."),
]

EXPERIMENTS = [
    Experiment("How deep to fine-tune", "Train with freeze='head', 'last_block' and 'none' (chapter 02's model, same epochs).",
               "Validation loss and the time per epoch: where the gain stops being worth the compute."),
    Experiment("One learning rate or two", "Fine-tune with one learning rate (1e-3) and with 1e-3 head / 1e-4 backbone.",
               "Whether the single large rate makes the first epochs' validation loss jump (pretrained features damaged)."),
    Experiment("Without keep-best", "Train for twice the epochs and compare the last epoch's test score with the kept-best epoch's.",
               "How much the last epoch loses when validation loss rises: the cost of not keeping the best checkpoint."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
