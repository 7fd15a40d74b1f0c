"""Chapter 08, from model to app: OOD scores (energy, Mahalanobis), the threshold that keeps 95% of
validation X-rays, rejection rates of outside sets, int8 agreement with fp32, and comparing latencies.

The material: a small real classifier (a linear head on backbone features of small chest X-ray
splits: MobileNetV2 with ImageNet weights when converted weights are here, else a small CNN),
its ``logits`` and ``feats`` on validation and test X-rays and on three outside sets (synthetic
landscapes, noise, clip-art shapes), ``train_feats``/``train_y``, the Mahalanobis statistics
``class_means``/``precision`` of the training features, the chosen score on every set ``scores``,
the head's fp32 and int8 (``torch.ao`` dynamic quantization: the head is all ``nn.Linear``)
validation probabilities ``p_fp32``/``p_int8`` and the validation ``threshold``; and
``val_pred``/``test_pred`` (the chapter's saved predictions, or the stand-in).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import (Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, differs,
                                    load_predictions, probabilities)

NOTEBOOK = "08_model_to_app"
KEEP_FRACTION = 0.95
OUTSIDE = ("landscapes", "noise", "shapes")


def _head(feats: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 200) -> nn.Module:
    """A linear head on the features, fitted full batch with Adam (eval mode)."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(feats.shape[1], 2))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(feats), y).backward()
        optimizer.step()
    return head.eval()


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    from helpers import evaluate, loading, ood, synthetic

    splits = mat.small_splits("pneumonia", profile, data_dir, seed, max_per_class=30)
    net, what = mat.backbone(seed)
    size = 32 if profile == "smoke" else 64
    feats = {s: mat.features(net, getattr(splits, s), size) for s in ("train", "val", "test")}
    makers = {"landscapes": synthetic.synthetic_landscapes, "noise": synthetic.synthetic_noise,
              "shapes": synthetic.synthetic_shapes}
    with torch.no_grad():
        for k, (name, make) in enumerate(makers.items()):
            feats[name] = net(loading.normalize(make(24, size, seed=seed + k), normalization=net)).float()
    print(f"features: {what}, {size} px")
    train_y = mat.labels(splits.train)
    head = _head(feats["train"], train_y, seed)
    with torch.no_grad():
        logits = {k: head(v).double().numpy() for k, v in feats.items() if k != "train"}
    feats = {k: v.double().numpy() for k, v in feats.items()}
    params = ood.fit_mahalanobis(feats["train"], train_y.numpy())
    scores = {k: ood.mahalanobis_score(v, params) for k, v in feats.items() if k != "train"}
    with warnings.catch_warnings():  # torch.ao's deprecation notice
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(head, {nn.Linear}, dtype=torch.qint8)
    val_x = torch.as_tensor(feats["val"]).float()
    with torch.no_grad():
        p_fp32 = torch.softmax(head(val_x), 1).double().numpy()
        p_int8 = torch.softmax(int8(val_x), 1).double().numpy()
    val_y = mat.labels(splits.val).numpy()
    public = {"logits": logits, "feats": {k: v for k, v in feats.items() if k != "train"},
              "train_feats": feats["train"], "train_y": train_y.numpy(), "val_y": val_y,
              "class_means": params["means"].double().numpy(), "precision": params["precision"].double().numpy(),
              "scores": scores, "KEEP_FRACTION": KEEP_FRACTION,
              "p_fp32": p_fp32, "p_int8": p_int8,
              "threshold": evaluate.choose_threshold(val_y, p_fp32[:, 1], method="youden"),
              "val_pred": load_predictions(NOTEBOOK, "val", profile)[0],
              "test_pred": load_predictions(NOTEBOOK, "test", profile)[0]}
    return public, {}


def _array(out: Any) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().double().numpy()
    return np.asarray(out, dtype=np.float64)


def _variant(source: str, name: str) -> Any:
    scope: dict = {"np": np, "torch": torch, "nn": nn}
    exec(source, scope)  # noqa: S102 - our own text
    return scope[name]


def _close(got: np.ndarray, ref: np.ndarray) -> bool:
    return got.shape == ref.shape and bool(np.allclose(got, ref, rtol=1e-4, atol=1e-6))


# --------------------------------------------------------------------------- q1: the energy score

HAND = np.array([[0.0, 0.0], [10.0, -10.0], [-3.0, 4.0], [1.0, 1.0]])


def _run_scores(fn: Any, m: Any) -> np.ndarray:
    """The student's score on validation X-rays, landscapes and four hand-made logit rows, one array."""
    parts = [m.logits["val"], m.logits["landscapes"], HAND]
    out = []
    for z in parts:
        s = _array(fn(z.copy()))
        if s.shape != (len(z),):
            raise Wrong(f"return one score per image, shape ({len(z)},), not {s.shape}.")
        out.append(s)
    return np.concatenate(out)


ENERGY = """
def energy_score(logits):
    return torch.logsumexp(torch.as_tensor(logits), dim=1).numpy()
"""

q1 = coding(
    "q1", "energy_score",
    run=_run_scores, compare=_close, describe=differs,
    mistakes=[
        Mistake("that is the energy E = -logsumexp(logits); the course's score is its negative, logsumexp, so that "
                "higher means more X-ray-like (as for MSP and Mahalanobis).",
                value=lambda m: -q1.expected(m), example=ENERGY.replace("return torch", "return -torch")),
        Mistake("that is the largest logit: the energy score is logsumexp over *all* logits (the maximum is "
                "only its lower bound).",
                value=lambda m: _run_scores(_variant(ENERGY.replace("torch.logsumexp(torch.as_tensor(logits), dim=1)",
                                                                    "torch.as_tensor(logits).max(dim=1).values"),
                                                     "energy_score"), m),
                example=ENERGY.replace("torch.logsumexp(torch.as_tensor(logits), dim=1)",
                                       "torch.as_tensor(logits).max(dim=1).values")),
        Mistake("that is the maximum softmax probability (MSP), another score: energy is logsumexp of the logits.",
                value=lambda m: _run_scores(_variant(ENERGY.replace("torch.logsumexp(torch.as_tensor(logits), dim=1)",
                                                                    "torch.softmax(torch.as_tensor(logits), 1).max(1).values"),
                                                     "energy_score"), m),
                example=ENERGY.replace("torch.logsumexp(torch.as_tensor(logits), dim=1)",
                                       "torch.softmax(torch.as_tensor(logits), 1).max(1).values")),
        Mistake("every score is 0: that is logsumexp of log-probabilities (or the log of summed probabilities). "
                "Use the raw logits: the softmax throws away exactly what energy measures.",
                when=lambda got, m: np.allclose(got, 0, atol=1e-6),
                example=ENERGY.replace("torch.as_tensor(logits)", "torch.log_softmax(torch.as_tensor(logits), 1)")),
    ],
    hint="`torch.logsumexp(torch.as_tensor(logits), dim=1)`: one number per image, log(sum_k exp(z_k)).",
    solution=ENERGY,
)

# --------------------------------------------------------------------------- q2: the Mahalanobis score

TOY_MEANS = np.array([[0.0, 0.0], [4.0, 0.0]])
TOY_PRECISION = np.linalg.inv(np.array([[4.0, 1.5], [1.5, 1.0]]))
TOY_FEATS = np.array([[0.0, 2.0], [3.0, 0.0], [4.0, -1.0], [6.0, 3.0], [-2.0, 0.5]])


def _run_mahalanobis(fn: Any, m: Any) -> np.ndarray:
    cases = [(m.feats["val"], m.class_means, m.precision), (m.feats["shapes"], m.class_means, m.precision),
             (TOY_FEATS, TOY_MEANS, TOY_PRECISION)]
    out = []
    for f, means, precision in cases:
        s = _array(fn(f.copy(), means.copy(), precision.copy()))
        if s.shape != (len(f),):
            raise Wrong(f"return one score per image, shape ({len(f)},), not {s.shape}.")
        out.append(s)
    return np.concatenate(out)


MAHALANOBIS = """
def mahalanobis_score(feats, class_means, precision):
    diff = feats[:, None, :] - class_means[None]          # (images, classes, features)
    d2 = ((diff @ precision) * diff).sum(axis=-1)         # squared distance to each class mean
    return -d2.min(axis=1)
"""


def _maha_variant(old: str, new: str) -> str:
    return MAHALANOBIS.replace(old, new)


MAHA_MISTAKES = [
    ("that is the squared distance itself (higher = further): the score is *minus* it, so that higher means "
     "more X-ray-like, like every other score.", ("return -d2", "return d2")),
    ("that is the distance to the *farthest* class mean: an X-ray only needs to be near one class, so take "
     "the minimum over classes.", ("d2.min(axis=1)", "d2.max(axis=1)")),
    ("that is the Euclidean distance: weight the difference by the precision (the inverse covariance of the "
     "training features), diff @ precision @ diff.", ("((diff @ precision) * diff)", "(diff * diff)")),
    ("that averages the distances over the classes: take the distance to the nearest class mean (min).",
     ("d2.min(axis=1)", "d2.mean(axis=1)")),
    ("that is the distance, not its square: the chapter's score is minus the *squared* distance.",
     ("return -d2.min(axis=1)", "return -np.sqrt(d2.min(axis=1))")),
]

q2 = coding(
    "q2", "mahalanobis_score",
    run=_run_mahalanobis, compare=_close, describe=differs,
    mistakes=[Mistake(msg, value=lambda m, o=o, n=n: _run_mahalanobis(_variant(_maha_variant(o, n),
                                                                                "mahalanobis_score"), m),
                      example=_maha_variant(o, n)) for msg, (o, n) in MAHA_MISTAKES],
    hint="diff = feats[:, None, :] - class_means[None] has shape (images, classes, features); the squared "
         "distance to each mean is ((diff @ precision) * diff).sum(-1); keep the smallest per image, negated.",
    solution=MAHALANOBIS,
)

# --------------------------------------------------------------------------- q3: the keep-95% threshold


def _cases(m: Any) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(0)
    return [(m.scores["val"], 0.95), (m.scores["val"], 0.9), (rng.normal(size=100), 0.95),
            (np.arange(20.0), 0.95), (rng.normal(size=37), 0.8)]


def _run_keep(fn: Any, m: Any) -> np.ndarray:
    """The share of each case's scores that the student's threshold keeps (score >= threshold)."""
    kept = []
    for scores, keep in _cases(m):
        t = fn(scores.copy(), keep)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            t = t.item()
        if np.ndim(t) != 0:
            raise Wrong(f"return one threshold (a number), not an array of shape {np.shape(t)}.")
        kept.append(float(np.mean(scores >= float(t))))
    return np.array(kept)


KEEP = """
def threshold_keeping(scores, keep):
    s = np.sort(scores)
    k = int(np.floor((1 - keep) * len(s) + 1e-9))     # how many may fall below
    return float(s[k])
"""

q3 = coding(
    "q3", "threshold_keeping",
    run=_run_keep, compare=lambda got, ref: bool(np.allclose(got, ref)),
    mistakes=[
        Mistake("that keeps only the top share (about 5%): keep 95% means the threshold sits near the *lowest* "
                "5% of the scores (np.quantile(scores, 1 - keep)).",
                when=lambda got, m: bool(np.all(got < 0.5)),
                example="def threshold_keeping(scores, keep):\n    return float(np.quantile(scores, keep))"),
        Mistake("that keeps every image (the minimum score): the guard would reject no X-ray, and so nothing at all "
                "that scores like one; put the threshold at the (1 - keep) quantile.",
                when=lambda got, m: bool(np.all(got == 1.0)),
                example="def threshold_keeping(scores, keep):\n    return float(np.min(scores))"),
        Mistake("it keeps fewer than `keep` of the scores in some case: off by one in the sorted index "
                "(scores at or above the threshold are kept).",
                when=lambda got, m: any(g < k - 1e-9 for g, (_, k) in zip(got, _cases(m))),
                example=KEEP.replace("return float(s[k])", "return float(s[k + 1])")),
    ],
    describe=lambda got, ref: "the shares kept: " + ", ".join(
        f"{g:.3f} instead of {r:.3f}" for g, r in zip(got, ref) if not np.isclose(g, r)),
    hint="Sort the scores; floor((1 - keep) * n) of them may fall below the threshold, so the threshold is the "
         "score at that index (np.quantile(scores, 1 - keep) also works). `ood.threshold_keeping` is the saved version.",
    solution=KEEP,
)

# --------------------------------------------------------------------------- q4: rejection rates


def _keep_t(scores: np.ndarray, keep: float = KEEP_FRACTION) -> float:
    from helpers import ood

    return ood.threshold_keeping(scores, keep)


def _rates(m: Any, fit_on: str = "val", first: str = "test") -> tuple[float, float]:
    t = _keep_t(m.scores[fit_on])
    return (float(np.mean(m.scores[first] < t)), float(np.mean(m.scores["shapes"] < t)))


q4 = Problem(
    "q4", "rejected",
    expected=lambda m: _rates(m),
    mistakes=[
        Mistake("the threshold was set on the test X-rays: it is set on validation (KEEP_FRACTION of validation "
                "X-rays kept), and test shows what it does to new X-rays.",
                value=lambda m: _rates(m, fit_on="test"),
                example="t = threshold_keeping(scores['test'], KEEP_FRACTION)\n"
                        "rejected = (np.mean(scores['test'] < t), np.mean(scores['shapes'] < t))"),
        Mistake("the first number is the *validation* X-rays' rejection (1 - KEEP_FRACTION by construction): "
                "the question asks for test X-rays, the price of the guard on new images.",
                value=lambda m: _rates(m, first="val"),
                example="t = threshold_keeping(scores['val'], KEEP_FRACTION)\n"
                        "rejected = (np.mean(scores['val'] < t), np.mean(scores['shapes'] < t))"),
    ],
    hint="t = threshold_keeping(scores['val'], KEEP_FRACTION) (q3); an image is rejected when its score is below "
         "t: np.mean(scores['test'] < t), then the same for scores['shapes'].",
    solution="""
    t = threshold_keeping(scores["val"], KEEP_FRACTION)
    rejected = (np.mean(scores["test"] < t), np.mean(scores["shapes"] < t))
    """,
)

# --------------------------------------------------------------------------- q5: MSP on the chapter's predictions


def _msp(frame: Any) -> np.ndarray:
    return probabilities(frame)[0].max(axis=1)


def _msp_rejected(m: Any, fit_on: str = "val") -> float:
    t = _keep_t(_msp(getattr(m, f"{fit_on}_pred")))
    return float(np.mean(_msp(m.test_pred) < t))


q5 = Problem(
    "q5", "msp_test_rejected",
    expected=lambda m: _msp_rejected(m),
    mistakes=[
        Mistake("the MSP threshold was set on test X-rays: set it on validation, then count test X-rays below it.",
                value=lambda m: _msp_rejected(m, fit_on="test"),
                example="msp_test = test_pred.filter(like='prob_').to_numpy().max(1)\n"
                        "msp_test_rejected = np.mean(msp_test < threshold_keeping(msp_test, KEEP_FRACTION))"),
        Mistake("that is the share of test X-rays *accepted* (at or above the threshold): the question asks for "
                "the share rejected (below it).",
                value=lambda m: 1 - _msp_rejected(m),
                example="msp_val = val_pred.filter(like='prob_').to_numpy().max(1)\n"
                        "msp_test = test_pred.filter(like='prob_').to_numpy().max(1)\n"
                        "msp_test_rejected = np.mean(msp_test >= threshold_keeping(msp_val, KEEP_FRACTION))"),
    ],
    alternatives=lambda m: {"the validation X-rays' rejected share (1 - KEEP_FRACTION by construction)":
                            float(np.mean(_msp(m.val_pred) < _keep_t(_msp(m.val_pred))))},
    hint="MSP = the row-wise max of the prob_ columns; threshold on validation's MSP (q3), then the share of test "
         "MSPs below it.",
    solution="""
    msp_val = val_pred.filter(like="prob_").to_numpy().max(axis=1)
    msp_test = test_pred.filter(like="prob_").to_numpy().max(axis=1)
    msp_test_rejected = np.mean(msp_test < threshold_keeping(msp_val, KEEP_FRACTION))
    """,
)

# --------------------------------------------------------------------------- q6: int8 agreement

A = np.array([[0.60, 0.40], [0.30, 0.70], [0.55, 0.45], [0.50, 0.50]])
B = np.array([[0.58, 0.42], [0.32, 0.68], [0.62, 0.38], [0.50, 0.50]])
EDGE = np.array([[0.58, 0.42], [0.32, 0.68], [0.62, 0.38], [0.49, 0.51]])  # row 4: A sits on 0.5


def _run_agreement(fn: Any, m: Any) -> np.ndarray:
    cases = [(m.p_fp32, m.p_int8, m.threshold), (A, B, 0.44), (A, B, 0.5), (A, EDGE, 0.5), (A, A, 0.3)]
    out = []
    for a, b, t in cases:
        v = fn(a.copy(), b.copy(), float(t))
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if np.ndim(v) != 0:
            raise Wrong(f"return one number (the share of equal decisions), not an array of shape {np.shape(v)}.")
        out.append(float(v))
    return np.array(out)


AGREE = """
def agreement(p_fp32, p_int8, threshold):
    decide_fp32 = p_fp32[:, 1] >= threshold     # PNEUMONIA when P(PNEUMONIA) reaches the threshold
    decide_int8 = p_int8[:, 1] >= threshold
    return float(np.mean(decide_fp32 == decide_int8))
"""

q6 = coding(
    "q6", "agreement",
    run=_run_agreement, compare=lambda got, ref: bool(np.allclose(got, ref)),
    mistakes=[
        Mistake("that compares the argmax (a 0.5 threshold): the app decides at the validation threshold, so "
                "compare decisions at `threshold`.",
                value=lambda m: _run_agreement(_variant(AGREE.replace("p_fp32[:, 1] >= threshold", "p_fp32.argmax(1)")
                                                        .replace("p_int8[:, 1] >= threshold", "p_int8.argmax(1)"),
                                                        "agreement"), m),
                example=AGREE.replace("p_fp32[:, 1] >= threshold", "p_fp32.argmax(1)").replace(
                    "p_int8[:, 1] >= threshold", "p_int8.argmax(1)")),
        Mistake("that compares the probabilities themselves: int8 almost never gives the exact same float; what "
                "matters is whether the *decision* is the same.",
                value=lambda m: _run_agreement(_variant(
                    "def agreement(p_fp32, p_int8, threshold):\n    return float(np.mean(p_fp32[:, 1] == p_int8[:, 1]))",
                    "agreement"), m),
                example="def agreement(p_fp32, p_int8, threshold):\n    return float(np.mean(p_fp32[:, 1] == p_int8[:, 1]))"),
        Mistake("that is a count: return the share (a fraction between 0 and 1).",
                value=lambda m: _run_agreement(_variant(AGREE.replace("np.mean(", "np.sum("), "agreement"), m),
                example=AGREE.replace("np.mean(", "np.sum(")),
        Mistake("that is the share of *changed* decisions: the agreement is the share of equal ones.",
                value=lambda m: 1 - q6.expected(m), example=AGREE.replace("==", "!=")),
        Mistake("a probability exactly at the threshold counts as positive (>=), as in the chapter.",
                value=lambda m: _run_agreement(_variant(AGREE.replace(">=", ">"), "agreement"), m),
                example=AGREE.replace(">=", ">")),
    ],
    describe=lambda got, ref: "the agreement: " + ", ".join(
        f"{g:.3f} instead of {r:.3f}" for g, r in zip(got, ref) if not np.isclose(g, r)),
    hint="Decisions: p[:, 1] >= threshold for each model; the agreement is np.mean(decisions_fp32 == decisions_int8).",
    solution=AGREE,
)

# --------------------------------------------------------------------------- q7: comparing latencies

LATENCY_CHOICES = {
    "A": "ONNX Runtime int8 against PyTorch fp32",
    "B": "ONNX Runtime int8 against ONNX Runtime fp32",
    "C": "PyTorch fp32 against ONNX Runtime fp32",
}

q7 = Problem(
    "q7", "quantization_speedup",
    expected=lambda m: "B", choices=LATENCY_CHOICES,
    mistakes=[Mistake("that ratio mixes two changes, the engine (PyTorch -> ONNX Runtime) and the numbers (fp32 -> int8): "
                      "you cannot tell which one made it faster.", when=lambda got, m: got == "A",
                      example='quantization_speedup = "A"'),
              Mistake("that compares the engines (runtime against runtime, both fp32): the right question for "
                      "the runtime, not for quantization.", when=lambda got, m: got == "C",
                      example='quantization_speedup = "C"')],
    hint="Change one thing at a time: the same engine, fp32 against int8.",
    solution='quantization_speedup = "B"',
)

QUESTIONS = [
    Question("Why can a 2-class X-ray model not say 'this is not an X-ray' by itself?", "Its softmax spreads "
             "probability over NORMAL and PNEUMONIA only: the two sum to one, whatever the input; a landscape "
             "can get 0.99 for one of them."),
    Question("What are MSP, energy and the Mahalanobis score, and which of them looks beyond the logits?",
             "MSP: the largest softmax probability; energy: logsumexp of the logits; Mahalanobis: minus the "
             "squared distance of the backbone's pooled features to the nearest class mean, with the training "
             "features' covariance. Only Mahalanobis uses the features."),
    Question("Why is energy often better than MSP at spotting outside inputs?", "Softmax divides out the "
             "logits' overall size; logsumexp keeps it, and inputs unlike the training images tend to excite "
             "the learned features less (smaller logits)."),
    Question("Why does the Mahalanobis score use a shrunk (Ledoit-Wolf) covariance?", "With fewer training "
             "images than feature dimensions the sample covariance is singular (not invertible); shrinkage "
             "towards a scaled identity makes it invertible and stable."),
    Question("What does 'a threshold keeping 95% of validation X-rays' promise, and what does it cost?",
             "That about 5% of real X-rays from the same source will be wrongly rejected: the guard's price, "
             "fixed in advance and checked on test."),
    Question("Why is the INVALID class evaluated on fundus photographs, noise and shapes, never on landscapes?",
             "It was trained on landscapes: testing on more of them measures whether it recognises its own "
             "training generator, not whether it protects against inputs nobody anticipated."),
    Question("Why is the OOD score chosen on validation X-rays against the development landscapes, and the "
             "evaluation outside sets never used for a decision?", "A choice made on the evaluation sets would "
             "make their rejection rates optimistic, like tuning on test."),
    Question("What does int8 quantization change, and why is 'agreement of decisions' the number to watch?",
             "Weights (and for static quantization activations) are stored as 8-bit integers: about 4x smaller "
             "and often faster; the probabilities shift slightly, and what the app's user sees is whether the "
             "decision at the threshold changes."),
    Question("Why can an fp32 ONNX model disagree with PyTorch on an image although both are fp32?",
             "Different kernels round differently (tiny differences); an image whose probability sits within that "
             "difference of the threshold (Youden's threshold is a validation image's own score) flips."),
    Question("Why does torch.ao's dynamic quantization barely shrink MobileNetV2, while it shrinks a linear "
             "head on features entirely?", "It quantizes only nn.Linear layers: in MobileNetV2 almost every "
             "weight is in convolutions; a head on cached features is all nn.Linear."),
    Question("How should latencies be compared?", "One change at a time on the same machine and run: runtime "
             "against runtime (both fp32), then fp32 against int8 on the same runtime; batch 1, median after a "
             "warm-up, a fixed number of threads."),
    Question("Why does the app load the bundle with torch.load(weights_only=True)?", "A pickled file can run "
             "code when loaded; weights_only refuses anything but tensors and plain data, which matters for a "
             "downloaded model."),
]

EXPERIMENTS = [
    Experiment("A fourth score", "In chapter 08, add a k-nearest-neighbour distance on L2-normalised features "
               "(to the training features) next to MSP, energy and Mahalanobis.", "Its AUROC on each evaluation "
               "outside set and its false rejection on test X-rays at the same keep-95% rule: does it beat the "
               "chosen score on the set it is weakest on?"),
    Experiment("Swap the outside sets", "Train the INVALID class on fundus photographs and evaluate it on "
               "landscapes.", "Whether the ranking of the two guards flips: a reason to distrust any single "
               "'invalid' set."),
    Experiment("Quantize another architecture", "Set ARCH = 'resnet18' and rerun the quantization section.",
               "Agreement of decisions with fp32 and the int8/fp32 latency ratio on the same runtime, against "
               "MobileNetV2's (depthwise convolutions are hard to quantize)."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6, q7], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
