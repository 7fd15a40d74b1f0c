"""Chapter 05, class imbalance: class weights for cross-entropy, ``pos_weight`` for BCE, the
sampler's per-image weights, the 1- vs 2-logit head, and choosing a strategy on validation.

The material: ``y_train`` (the training labels of small pneumonia splits, NORMAL = 0, PNEUMONIA = 1,
with the real data's imbalance; synthetic in smoke), ``logits``/``y`` (the chapter's made-up batch of
8 images with 2 logits each), ``test_pred``/``val_pred`` (the chapter's saved predictions of the
strategy it chose, or the stand-in) and ``ablation`` (the chapter's table, one row per strategy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import (DATA, Chapter, Experiment, Mistake, Problem, Question, Wrong, coding,
                                    load_predictions, numeric, probabilities)

NOTEBOOK = "05_imbalance_ablations"
STRATEGIES = ["plain_ce", "weighted_ce", "bce_pos_weight", "normal_strong_aug", "weighted_sampler", "bce_1logit"]


def load_ablation(profile: str, root: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """The chapter's ablation table (one row per strategy): the reference run's
    ``assets/05_imbalance_ablations/ablation_table.csv`` when it exists and profile != "smoke", else
    the stand-in shipped in ``helpers/exercises/data/05_imbalance_ablations/`` (made-up numbers)."""
    from helpers.runs import project_root

    real = Path(root if root is not None else project_root()) / "assets" / NOTEBOOK / "ablation_table.csv"
    if profile != "smoke" and real.is_file():
        path, source = real, "the reference run's ablation table"
    else:
        path, source = DATA / NOTEBOOK / "ablation_table.csv", "a STAND-IN ablation table (made-up numbers)"
    table = pd.read_csv(path, index_col="run")
    print(f"ablation: {source}, {len(table)} strategies")
    return table, source


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    splits = mat.small_splits("pneumonia", profile, data_dir, seed, max_per_class=200)
    torch.manual_seed(seed)
    logits = torch.randn(8, 2)  # the chapter's made-up batch
    public = {"class_names": list(splits.class_names),
              "y_train": np.asarray(splits.train["label"], dtype=np.int64),
              "logits": logits, "y": torch.tensor([0, 1, 1, 1, 0, 1, 1, 1]),
              "test_pred": load_predictions(NOTEBOOK, "test", profile)[0],
              "val_pred": load_predictions(NOTEBOOK, "val", profile)[0],
              "ablation": load_ablation(profile)[0]}
    print("training images per class:", dict(zip(splits.class_names, np.bincount(public["y_train"]).tolist())))
    return public, {}


def _cases(m: Any) -> list[np.ndarray]:
    """Label arrays the coding checks run on: the training labels, a 3-class set, a balanced one."""
    return [m.y_train.copy(), np.repeat([0, 1, 2], [5, 20, 75]), np.repeat([0, 1], [10, 10])]


def _arrays_close(got: list, ref: list) -> bool:
    return len(got) == len(ref) and all(g.shape == r.shape and np.allclose(g, r, rtol=1e-4) for g, r in zip(got, ref))


# --------------------------------------------------------------------------- q1: class weights for cross-entropy


def _run_class_weights(fn: Any, m: Any) -> list[np.ndarray]:
    out = []
    for labels in _cases(m):
        n_classes = int(labels.max()) + 1
        w = numeric(fn(labels.copy(), n_classes))
        if w is None or w.shape != (n_classes,):
            raise Wrong(f"return one weight per class (shape ({n_classes},)), not {w if w is None else w.shape}.")
        out.append(w)
    return out


def _counts(m: Any) -> list[np.ndarray]:
    return [np.bincount(c).astype(float) for c in _cases(m)]


def _same_ratios(got: list, ref: list) -> bool:
    return all(np.allclose(g / g.mean(), r / r.mean(), rtol=1e-4) for g, r in zip(got, ref))


q1 = coding(
    "q1", "class_weights",
    run=_run_class_weights, compare=_arrays_close,
    mistakes=[
        Mistake("the weights grow with the class counts: the rarer class must weigh MORE (inverse frequency, 1 / count).",
                when=lambda got, m: _same_ratios(got, _counts(m)),
                example="def class_weights(y, n_classes):\n    c = np.bincount(y, minlength=n_classes)\n    return c / c.mean()"),
        Mistake("the right ratios, but not scaled to mean 1: divide the weights by their mean.",
                when=lambda got, m: _same_ratios(got, [1 / c for c in _counts(m)]),
                example="def class_weights(y, n_classes):\n    return 1 / np.bincount(y, minlength=n_classes)"),
    ],
    describe=lambda got, ref: "the weights: " + "; ".join(
        f"{np.round(g, 3).tolist()} instead of {np.round(r, 3).tolist()}" for g, r in zip(got, ref)
        if g.shape != r.shape or not np.allclose(g, r, rtol=1e-4))[:300],
    hint="`counts = np.bincount(y, minlength=n_classes)`; `w = counts.sum() / (n_classes * counts)`; return `w / w.mean()`.",
    solution="""
    def class_weights(y, n_classes):
        counts = np.bincount(y, minlength=n_classes)
        w = counts.sum() / (n_classes * counts)
        return w / w.mean()
    """,
)

# --------------------------------------------------------------------------- q2: pos_weight


def _n(m: Any) -> tuple[int, int]:
    return int((m.y_train == 0).sum()), int((m.y_train == 1).sum())


q2 = Problem(
    "q2", "pos_weight",
    expected=lambda m: _n(m)[0] / _n(m)[1],
    mistakes=[Mistake("inverted: pos_weight is n_negative / n_positive (n_NORMAL / n_PNEUMONIA), below 1 here "
                      "because the positive class is the majority.",
                      value=lambda m: _n(m)[1] / _n(m)[0], example="pos_weight = (y_train == 1).sum() / (y_train == 0).sum()"),
              Mistake("that is the share of positives; pos_weight compares the two classes: n_NORMAL / n_PNEUMONIA.",
                      value=lambda m: _n(m)[1] / sum(_n(m)), example="pos_weight = (y_train == 1).mean()")],
    hint="Count the training images of each class: `(y_train == 0).sum()` NORMAL (negative), `(y_train == 1).sum()` PNEUMONIA.",
    solution="pos_weight = (y_train == 0).sum() / (y_train == 1).sum()",
)

# --------------------------------------------------------------------------- q3: weighted cross-entropy by hand


def _ce_cases(m: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    counts = np.bincount(m.y_train, minlength=2)
    w = counts.sum() / (2 * counts)
    gen = torch.Generator().manual_seed(m.seed)
    return [(m.logits.clone(), m.y.clone(), torch.tensor(w / w.mean(), dtype=torch.float32)),
            (torch.randn(12, 3, generator=gen), torch.tensor([0, 1, 2, 2, 2, 1, 2, 2, 0, 2, 2, 1]),
             torch.tensor([2.0, 1.0, 0.5]))]


def _run_weighted_ce(fn: Any, m: Any) -> np.ndarray:
    values = []
    for logits, y, w in _ce_cases(m):
        v = numeric(fn(logits, y, w))
        if v is None or v.size != 1:
            raise Wrong("return one number, the batch's loss (a 0-d tensor or a float), not one per image.")
        values.append(float(v.reshape(())))
    return np.array(values)


def _ce_variant(how: str) -> Any:
    def fn(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        per_image = nn.functional.cross_entropy(logits, y, reduction="none")
        if how == "mean":
            return (w[y] * per_image).mean()
        return per_image.mean()
    return fn


q3 = coding(
    "q3", "weighted_ce",
    run=_run_weighted_ce,
    mistakes=[
        Mistake("that divides by the number of images: a weighted cross-entropy is a weighted MEAN, "
                "sum(w[y] * loss) / sum(w[y]) (what nn.CrossEntropyLoss(weight=w) computes).",
                value=lambda m: _run_weighted_ce(_ce_variant("mean"), m),
                example="def weighted_ce(logits, y, w):\n    per_image = nn.functional.cross_entropy(logits, y, reduction='none')\n"
                        "    return (w[y] * per_image).mean()"),
        Mistake("that is the plain (unweighted) cross-entropy: multiply each image's loss by the weight of its class, w[y].",
                value=lambda m: _run_weighted_ce(_ce_variant("plain"), m),
                example="def weighted_ce(logits, y, w):\n    return nn.functional.cross_entropy(logits, y)"),
        Mistake("the sign: cross-entropy is MINUS the log-probability of the true class (a loss is >= 0).",
                when=lambda got, m: np.allclose(got, -q3.expected(m), rtol=1e-4),
                example="def weighted_ce(logits, y, w):\n    logp = torch.log_softmax(logits, 1)[torch.arange(len(y)), y]\n"
                        "    return (w[y] * logp).sum() / w[y].sum()"),
    ],
    hint="`per_image = nn.functional.cross_entropy(logits, y, reduction='none')` (or minus `log_softmax` at the true class); "
         "then `(w[y] * per_image).sum() / w[y].sum()`.",
    solution="""
    def weighted_ce(logits, y, w):
        per_image = nn.functional.cross_entropy(logits, y, reduction="none")
        return (w[y] * per_image).sum() / w[y].sum()
    """,
)

# --------------------------------------------------------------------------- q4: BCE with pos_weight by hand


def _bce_cases(m: Any) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    n_neg, n_pos = _n(m)
    gen = torch.Generator().manual_seed(m.seed + 1)
    return [(m.logits[:, 1] - m.logits[:, 0], m.y.float(), n_neg / n_pos),
            (torch.randn(10, generator=gen), torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 0, 0]), 3.0)]


def _run_bce(fn: Any, m: Any) -> np.ndarray:
    values = []
    for z, target, pw in _bce_cases(m):
        v = numeric(fn(z.clone(), target.clone(), pw))
        if v is None or v.size != 1:
            raise Wrong("return one number, the batch's loss (a 0-d tensor or a float), not one per image.")
        values.append(float(v.reshape(())))
    return np.array(values)


def _bce_variant(how: str) -> Any:
    def fn(z: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
        log_p, log_not_p = nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)
        if how == "negative":
            return -(target * log_p + pos_weight * (1 - target) * log_not_p).mean()
        if how == "plain":
            return -(target * log_p + (1 - target) * log_not_p).mean()
        w = torch.where(target == 1, torch.tensor(pos_weight), torch.tensor(1.0))
        return -(w * (target * log_p + (1 - target) * log_not_p)).sum() / w.sum()
    return fn


BCE_START = ("def bce_pos_weight(z, target, pos_weight):\n"
             "    log_p, log_not_p = nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)\n")
q4 = coding(
    "q4", "bce_pos_weight",
    run=_run_bce,
    mistakes=[
        Mistake("pos_weight multiplies the POSITIVE term (target * log p), not the negative one.",
                value=lambda m: _run_bce(_bce_variant("negative"), m),
                example=BCE_START + "    return -(target * log_p + pos_weight * (1 - target) * log_not_p).mean()"),
        Mistake("that is the plain BCE: multiply the positive term by pos_weight.",
                value=lambda m: _run_bce(_bce_variant("plain"), m),
                example=BCE_START + "    return -(target * log_p + (1 - target) * log_not_p).mean()"),
        Mistake("that is a weighted mean (divided by the sum of the weights, as cross-entropy's class weights do); "
                "BCEWithLogitsLoss(pos_weight=...) takes the plain mean over the images.",
                value=lambda m: _run_bce(_bce_variant("weighted_mean"), m),
                example=BCE_START + "    w = 1 + (pos_weight - 1) * target\n"
                        "    return -(w * (target * log_p + (1 - target) * log_not_p)).sum() / w.sum()"),
        Mistake("the sign: the loss is MINUS the log-likelihood (a loss is >= 0).",
                when=lambda got, m: np.allclose(got, -q4.expected(m), rtol=1e-4),
                example=BCE_START + "    return (pos_weight * target * log_p + (1 - target) * log_not_p).mean()"),
    ],
    hint="`log_p = nn.functional.logsigmoid(z)`, `log_not_p = nn.functional.logsigmoid(-z)`; the loss is "
         "`-(pos_weight * target * log_p + (1 - target) * log_not_p).mean()`.",
    solution="""
    def bce_pos_weight(z, target, pos_weight):
        log_p, log_not_p = nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)
        return -(pos_weight * target * log_p + (1 - target) * log_not_p).mean()
    """,
)

# --------------------------------------------------------------------------- q5: the sampler's per-image weights


def _run_sampler(fn: Any, m: Any) -> dict:
    """Per label set: whether there is one weight per image, and the expected draws per class in one
    epoch of len(y) draws with replacement (what WeightedRandomSampler does on average)."""
    lengths, draws = [], []
    for labels in _cases(m):
        w = numeric(fn(labels.copy()))
        if w is None:
            raise Wrong("return the weights as an array or tensor of numbers.")
        lengths.append(w.size)
        if w.shape != labels.shape:
            continue
        if (w < 0).any() or w.sum() <= 0:
            raise Wrong("sampler weights must be >= 0 and not all 0.")
        torch.utils.data.WeightedRandomSampler(w.tolist(), num_samples=len(labels))  # the sampler accepts them
        draws.append(np.array([w[labels == k].sum() for k in range(labels.max() + 1)]) / w.sum() * len(labels))
    return {"one_per_image": all(n == len(c) for n, c in zip(lengths, _cases(m))), "lengths": lengths, "draws": draws}


def _sampler_ok(got: dict, ref: dict) -> bool:
    return got["one_per_image"] and _arrays_close(got["draws"], ref["draws"])


def _describe_sampler(got: dict, ref: dict) -> str:
    if not got["one_per_image"]:
        return f"the number of weights: {got['lengths']} where one per image ({ref['lengths']}) is expected"
    return "the expected draws per class in one epoch: " + "; ".join(
        f"{np.round(g, 1).tolist()} instead of {np.round(r, 1).tolist()}" for g, r in zip(got["draws"], ref["draws"])
        if not np.allclose(g, r, rtol=1e-4))


q5 = coding(
    "q5", "sampler_weights",
    run=_run_sampler, compare=_sampler_ok, describe=_describe_sampler,
    mistakes=[
        Mistake("one weight per CLASS: WeightedRandomSampler needs one weight per IMAGE; index the class weights "
                "with the labels, (1 / counts)[y].",
                when=lambda got, m: not got["one_per_image"] and got["lengths"][0] == 2,
                example="def sampler_weights(y):\n    return 1 / np.bincount(y)"),
        Mistake("backwards: an image of a large class must get a SMALL weight, 1 / (images of its class); "
                "these weights draw the majority class even more often.",
                value=lambda m: _run_sampler(lambda y: np.bincount(y)[y].astype(float), m),
                example="def sampler_weights(y):\n    return np.bincount(y)[y].astype(float)"),
        Mistake("every image has the same weight: the sampler then draws the classes in their own proportions, "
                "the majority stays the majority.",
                value=lambda m: _run_sampler(lambda y: np.ones(len(y)), m),
                example="def sampler_weights(y):\n    return np.ones(len(y)) / len(y)"),
    ],
    hint="`counts = np.bincount(y)`; the weight of image i is `1 / counts[y[i]]`: `(1 / counts)[y]`.",
    solution="""
    def sampler_weights(y):
        counts = np.bincount(y)
        return (1.0 / counts)[y]
    """,
)

# --------------------------------------------------------------------------- q6: the 1- vs 2-logit head

q6 = Problem(
    "q6", "z_one",
    expected=lambda m: (m.logits[:, 1] - m.logits[:, 0]).numpy(),
    mistakes=[Mistake("the sign: that is the NORMAL score; sigmoid(z) must give P(PNEUMONIA) = softmax(logits)[:, 1], "
                      "so z = logits[:, 1] - logits[:, 0].",
                      value=lambda m: (m.logits[:, 0] - m.logits[:, 1]).numpy(), example="z_one = logits[:, 0] - logits[:, 1]"),
              Mistake("the PNEUMONIA logit alone: softmax depends only on the DIFFERENCE of the two logits.",
                      value=lambda m: m.logits[:, 1].numpy(), example="z_one = logits[:, 1]"),
              Mistake("that is P(PNEUMONIA) itself; the task asks for the one logit whose sigmoid gives it.",
                      value=lambda m: torch.softmax(m.logits, 1)[:, 1].numpy(), example="z_one = torch.softmax(logits, 1)[:, 1]")],
    hint="softmax([a, b])[1] = 1 / (1 + exp(a - b)) = sigmoid(b - a).",
    solution="z_one = logits[:, 1] - logits[:, 0]",
)

# --------------------------------------------------------------------------- q7: NORMAL recall of the chosen strategy


def recall(frame: pd.DataFrame, k: int) -> float:
    """The recall of class ``k`` at the argmax rule (threshold 0.5 for two classes)."""
    p, _ = probabilities(frame)
    y = frame["y_true"].to_numpy()
    return float(np.mean(p.argmax(1)[y == k] == k))


q7 = Problem(
    "q7", "normal_recall",
    expected=lambda m: recall(m.test_pred, 0),
    mistakes=[Mistake("that is the PNEUMONIA recall (sensitivity); NORMAL recall is the specificity, the share of "
                      "NORMAL images called NORMAL.", value=lambda m: recall(m.test_pred, 1),
                      example="normal_recall = float(np.mean(test_pred['prob_PNEUMONIA'][test_pred['y_true'] == 1] >= 0.5))"),
              Mistake("that is the accuracy over both classes; recall counts only the NORMAL images.",
                      value=lambda m: float(np.mean(probabilities(m.test_pred)[0].argmax(1) == m.test_pred["y_true"])),
                      example="normal_recall = float(np.mean(test_pred.filter(like='prob_').to_numpy().argmax(1) "
                              "== test_pred['y_true']))")],
    alternatives=lambda m: {"the validation split's NORMAL recall (the question is about test)": recall(m.val_pred, 0)},
    hint="Among the rows with `y_true == 0`, the share whose `prob_NORMAL` is larger than `prob_PNEUMONIA`.",
    solution="""
    normal = test_pred[test_pred["y_true"] == 0]
    normal_recall = float(np.mean(normal["prob_NORMAL"] > normal["prob_PNEUMONIA"]))
    """,
)

# --------------------------------------------------------------------------- q8: choose on validation, report test

q8 = Problem(
    "q8", "chosen_test_bacc",
    expected=lambda m: float(m.ablation.loc[m.ablation["val_balanced_accuracy"].idxmax(), "test_balanced_accuracy"]),
    mistakes=[Mistake("that strategy was chosen on TEST (the highest test balanced accuracy): choose on validation, "
                      "then report the chosen strategy's test number, even when another run scored higher on test.",
                      value=lambda m: float(m.ablation["test_balanced_accuracy"].max()),
                      example="chosen_test_bacc = ablation['test_balanced_accuracy'].max()"),
              Mistake("that is the chosen strategy's VALIDATION balanced accuracy; report its test number.",
                      value=lambda m: float(m.ablation["val_balanced_accuracy"].max()),
                      example="chosen_test_bacc = ablation['val_balanced_accuracy'].max()"),
              Mistake("that strategy was chosen by test accuracy: the chapter chooses by validation balanced accuracy "
                      "(plain accuracy favours the majority class).",
                      value=lambda m: float(m.ablation.loc[m.ablation["test_accuracy"].idxmax(), "test_balanced_accuracy"]),
                      example="chosen_test_bacc = ablation.loc[ablation['test_accuracy'].idxmax(), 'test_balanced_accuracy']")],
    hint="`best = ablation['val_balanced_accuracy'].idxmax()` (the strategy's name), then "
         "`ablation.loc[best, 'test_balanced_accuracy']`.",
    solution="""
    best = ablation["val_balanced_accuracy"].idxmax()
    chosen_test_bacc = ablation.loc[best, "test_balanced_accuracy"]
    """,
)

QUESTIONS = [
    Question("Name the three places the chapter fights class imbalance, and one tool for each.",
             "The loss (class weights for cross-entropy, pos_weight for BCE), the data (a class-balanced "
             "WeightedRandomSampler, stronger augmentation of the minority class) and the decision (the threshold, chapter 04)."),
    Question("Why are class weights, pos_weight and sampler weights computed on the training split only?",
             "They are part of training; computing them on validation or test lets those splits leak into the model, "
             "and the counts a deployed model meets are unknown anyway."),
    Question("pos_weight for this data is below 1. Why, and what does that do to the PNEUMONIA images' loss?",
             "pos_weight = n_NORMAL / n_PNEUMONIA and PNEUMONIA (the positive class) is the majority, so each "
             "positive image's term counts less, which balances the two classes' total contribution."),
    Question("A weighted cross-entropy divides by the sum of the weights used, not by the batch size. What would "
             "dividing by the batch size change?",
             "The loss scale would change from batch to batch with the batch's class mix (like a varying learning rate); "
             "the weighted mean keeps the loss an average per unit of weight."),
    Question("With a WeightedRandomSampler drawing len(y_train) images with replacement, what happens to the "
             "minority and the majority images in one epoch?",
             "Classes are drawn about equally often: minority images are drawn several times each, and some majority "
             "images are not drawn at all in that epoch (they may come back in the next one)."),
    Question("Why does the chapter give strong augmentation to NORMAL images only, and why no horizontal flip in it?",
             "Repeated minority images are seen in more varied forms instead of identical copies; a flip that only one "
             "class received would be a cue that belongs to that class (and X-rays are never taken mirrored)."),
    Question("A 2-logit softmax head and a 1-logit sigmoid head: can they represent the same classifiers?",
             "Yes: softmax over (a, b) gives P(class 1) = sigmoid(b - a), so one logit z = b - a carries all the "
             "information; the 2-logit head has one redundant output (and slightly more parameters)."),
    Question("Why does the chapter compare strategies at the fixed threshold 0.5?",
             "To compare the strategies as trained: re-tuning a threshold per run is itself an imbalance remedy and "
             "would hide what the loss or the sampler changed."),
    Question("Why is the checkpoint chosen by validation AUC rather than validation accuracy in this ablation?",
             "AUC does not depend on the threshold, so the checkpoint rule does not favour the strategies that move "
             "the 0.5 point; accuracy would favour predicting the majority class."),
    Question("The strategy with the highest test balanced accuracy is not the one chosen on validation. "
             "Which do you report, and why?",
             "The one chosen on validation, with its test numbers: choosing on test makes the test score optimistic "
             "and no longer an estimate for new patients."),
    Question("Two strategies' test intervals overlap broadly. What can you conclude?",
             "That this experiment does not show them to differ; a paired comparison on the same images or more "
             "seeds/data are needed before preferring one."),
    Question("Why can accuracy rise while NORMAL recall falls?",
             "PNEUMONIA is the majority: calling more images PNEUMONIA gains more correct majority images than it "
             "loses NORMAL ones, so accuracy rewards the bias the chapter is fighting."),
]

EXPERIMENTS = [
    Experiment("Stronger weights", "In chapter 05, square the class weights (or pos_weight) before training.",
               "Whether NORMAL recall keeps rising and PNEUMONIA recall starts to fall: the weights trade one class's "
               "errors for the other's, like a threshold."),
    Experiment("Sampler and weights together", "Add a strategy with balanced_sampler=True AND class weights.",
               "Whether it over-corrects: the two remedies both push towards NORMAL, so NORMAL recall may overshoot "
               "while balanced accuracy does not improve."),
    Experiment("Threshold instead of training", "Take plain_ce's validation predictions, choose a threshold on them "
               "(chapter 04's Youden rule), and apply it to test.",
               "How much of the gap to the best strategy's balanced accuracy a free threshold closes."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6, q7, q8], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
