"""Chapter 07, architectures, TTA and ensembles: TTA as a mean of views' probabilities, views that
respect anatomy, an ensemble by averaging probabilities, and a temperature fitted on validation.

The material: ``members`` (three small CNNs trained briefly on small chest X-ray splits, one seed
each: the "architectures" of an ensemble in miniature), ``x``/``y`` (their validation images,
normalised, and labels), and ``val_pred``/``test_pred`` (the chapter's saved predictions of the
candidate it chose, or the stand-in).
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

NOTEBOOK = "07_architectures_tta_ensembles"
MAX_ROTATION = 20.0  # the training augmentation's rotation range (degrees): plausible views stay inside it


def _trained_cnn(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 15) -> nn.Module:
    """A small CNN fitted for a few full-batch Adam steps (eval mode)."""
    net = mat.small_cnn(int(y.max()) + 1, seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    from helpers import loading

    splits = mat.small_splits("pneumonia", profile, data_dir, seed, max_per_class=20)
    size = 32 if profile == "smoke" else 64
    images = {s: loading.normalize(loading.cache_images(getattr(splits, s), size)) for s in ("train", "val")}
    labels = {s: mat.labels(getattr(splits, s)) for s in ("train", "val")}
    members = [_trained_cnn(images["train"], labels["train"], seed + k) for k in range(3)]
    public = {"members": members, "x": images["val"], "y": labels["val"], "log_probs": log_probs,
              "val_pred": load_predictions(NOTEBOOK, "val", profile)[0],
              "test_pred": load_predictions(NOTEBOOK, "test", profile)[0]}
    return public, {}


def _probs(out: Any) -> np.ndarray:
    """A function's output as a float array (tensor or array); a tensor that needs grad is refused."""
    if isinstance(out, torch.Tensor):
        if out.requires_grad:
            raise Wrong("the result still carries gradients: predict inside `with torch.no_grad():` "
                        "(or torch.inference_mode()).")
        return out.detach().double().numpy()
    return np.asarray(out, dtype=np.float64)


def _all_close(got: list, ref: list) -> bool:
    return len(got) == len(ref) and all(a.shape == b.shape and np.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))


def _describe_arrays(got: list, ref: list) -> str:
    from helpers.exercises.core import differs

    for a, b in zip(got, ref):
        if not (a.shape == b.shape and np.allclose(a, b, atol=1e-5)):
            return "the probabilities: " + differs(a, b)
    return "the number of results"


def _variant(source: str, name: str) -> Any:
    from helpers import tta  # noqa: F401 -- the variants' scope

    scope: dict = {"np": np, "torch": torch, "nn": nn}
    exec(source, scope)  # noqa: S102 - our own text
    return scope[name]


# --------------------------------------------------------------------------- q1: TTA written out


def _view_sets() -> list[list]:
    from helpers import tta

    return [[tta.identity, tta.rotate(-7), tta.rotate(7)], [tta.identity, tta.shift(0.04, 0.0)]]


def _run_tta(fn: Any, m: Any) -> list[np.ndarray]:
    """The student's TTA on a copy of the first member, handed over in TRAIN mode, for two view sets."""
    results = []
    for views in _view_sets():
        model = copy.deepcopy(m.members[0]).train()
        results.append(_probs(fn(model, m.x.clone(), list(views))))
    return results


TTA = """
def tta_predict(model, x, views):
    model.eval()
    with torch.no_grad():
        probs = [torch.softmax(model(view(x)), dim=1) for view in views]
    return torch.stack(probs).mean(dim=0)
"""

q1 = coding(
    "q1", "tta_predict",
    run=_run_tta, compare=_all_close, describe=_describe_arrays,
    mistakes=[
        Mistake("that averages the logits, then applies softmax: TTA averages the views' *probabilities* "
                "(softmax per view, then the mean).",
                value=lambda m: _run_tta(_variant(TTA.replace(
                    "[torch.softmax(model(view(x)), dim=1) for view in views]\n    return torch.stack(probs).mean(dim=0)",
                    "[model(view(x)) for view in views]\n    return torch.softmax(torch.stack(probs).mean(dim=0), dim=1)"),
                    "tta_predict"), m),
                example=TTA.replace("[torch.softmax(model(view(x)), dim=1) for view in views]\n"
                                    "    return torch.stack(probs).mean(dim=0)",
                                    "[model(view(x)) for view in views]\n"
                                    "    return torch.softmax(torch.stack(probs).mean(dim=0), dim=1)")),
        Mistake("those are mean logits, not probabilities: apply softmax to each view's output before averaging.",
                value=lambda m: _run_tta(_variant(TTA.replace("torch.softmax(model(view(x)), dim=1)", "model(view(x))"),
                                                  "tta_predict"), m),
                example=TTA.replace("torch.softmax(model(view(x)), dim=1)", "model(view(x))")),
        Mistake("that is one array per view (views x images x classes): return their mean over the views (dim=0).",
                when=lambda got, m: got[0].ndim == 3,
                example=TTA.replace("torch.stack(probs).mean(dim=0)", "torch.stack(probs)")),
        Mistake("the model stayed in training mode (BatchNorm used each batch's statistics): call model.eval() first.",
                value=lambda m: _run_tta(_variant(TTA.replace("    model.eval()\n", ""), "tta_predict"), m),
                example=TTA.replace("    model.eval()\n", "")),
        Mistake("that is the first view alone: loop over every view in `views` and average.",
                value=lambda m: _run_tta(_variant(TTA.replace("for view in views]", "for view in views[:1]]"),
                                                  "tta_predict"), m),
                example=TTA.replace("for view in views]", "for view in views[:1]]")),
    ],
    hint="model.eval(); inside torch.no_grad(): for each view, softmax(model(view(x)), dim=1); "
         "stack them and take the mean over the views (dim=0).",
    solution=TTA,
)

# --------------------------------------------------------------------------- q2: views that respect anatomy


def _probe(size: int = 48, seed: int = 7) -> torch.Tensor:
    """A smooth, asymmetric test image (1, 3, size, size): its mirror looks nothing like it, a small
    rotation of it still does."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, 6, 6, generator=g)
    image = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = (image - image.mean()) / image.std()
    return image.repeat(1, 3, 1, 1)


def _disk(size: int) -> torch.Tensor:
    r = torch.linspace(-1, 1, size)
    return (r[None, :] ** 2 + r[:, None] ** 2) < 0.6  # the middle: corners are filled in by rotations


def _corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[..., mask].flatten().double(), b[..., mask].flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm() + 1e-12))


def _view_report(views: Any, m: Any = None) -> np.ndarray:
    """[has identity, views, mirrored, upside-down, sideways, rotated beyond MAX_ROTATION], by what
    each view does to the probe image."""
    from helpers import tta

    if not isinstance(views, (list, tuple)) or not all(callable(v) for v in views):
        raise Wrong("differs in type: `VIEWS` should be a list of view functions (tta.identity, tta.rotate(5), ...), "
                    f"not {type(views).__name__}.")
    x = _probe()
    mask = _disk(x.shape[-1])
    angles = np.arange(-60, 61, 2.5)
    rotated = {a: tta.rotate(float(a))(x) for a in angles}
    counts = np.zeros(6)
    counts[1] = len(views)
    for view in views:
        out = view(x.clone())
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise Wrong("differs in what a view returns: a view takes a batch (N, 3, H, W) and returns one of the same shape.")
        if torch.equal(out, x):
            counts[0] = 1
        plain = max(_corr(out, r, mask) for r in rotated.values())
        flips = {2: _corr(out, tta.hflip(x), mask), 3: max(_corr(out, tta.vflip(x), mask), _corr(out, x.flip(-1, -2), mask)),
                 4: max(_corr(out, torch.rot90(x, k, dims=[-2, -1]), mask) for k in (1, 3))}
        worst = max(flips, key=flips.get)
        if flips[worst] > plain - 1e-6 and flips[worst] > 0.5:
            counts[worst] += 1
            continue
        best_angle = max(angles, key=lambda a: _corr(out, rotated[a], mask))
        if abs(best_angle) > MAX_ROTATION:
            counts[5] += 1
    return counts


def _views_ok(got: np.ndarray, ref: np.ndarray) -> bool:
    return got[0] == 1 and got[1] >= 2 and got[2:].sum() == 0


VIEWS_SOLUTION = """
from helpers import tta
VIEWS = [tta.identity, tta.rotate(-7), tta.rotate(7)]
"""

q2 = Problem(
    "q2", "VIEWS",
    expected=lambda m: _view_report(_variant(VIEWS_SOLUTION, "VIEWS")),
    result=lambda views, m: _view_report(views), compare=_views_ok,
    mistakes=[
        Mistake("a view is a mirrored chest (heart on the right): no chest X-ray looks like that, and the model never "
                "saw one in training. Leave tta.hflip out.", when=lambda got, m: got[2] > 0,
                example="from helpers import tta\nVIEWS = [tta.identity, tta.hflip, tta.rotate(7)]"),
        Mistake("a view turns the chest upside down (diaphragm on top): not an image the model will meet. "
                "Leave tta.vflip out.", when=lambda got, m: got[3] > 0,
                example="from helpers import tta\nVIEWS = [tta.identity, tta.vflip]"),
        Mistake("a view turns the chest sideways (rot90): radiographs are displayed upright. Leave tta.rot90 out.",
                when=lambda got, m: got[4] > 0, example="from helpers import tta\nVIEWS = [tta.identity, tta.rot90]"),
        Mistake(f"a rotation goes beyond the training augmentation's ±{MAX_ROTATION:g}°: the model never saw such a tilt. "
                "Keep rotations small (the chapter uses ±7°).", when=lambda got, m: got[5] > 0,
                example="from helpers import tta\nVIEWS = [tta.identity, tta.rotate(-45), tta.rotate(45)]"),
        Mistake("the image itself is missing: every set starts from tta.identity.", when=lambda got, m: got[0] == 0,
                example="from helpers import tta\nVIEWS = [tta.rotate(-7), tta.rotate(7)]"),
        Mistake("one view is no TTA: add at least one plausible view (a small rotation or shift).",
                when=lambda got, m: got[1] < 2, example="from helpers import tta\nVIEWS = [tta.identity]"),
    ],
    describe=lambda got, ref: f"the views: {int(got[1])} view(s), identity {'in' if got[0] else 'missing'}",
    hint="Start with tta.identity; add small rotations (tta.rotate(degrees)) or shifts (tta.shift(dx, dy)); "
         "ask of each view: could a chest X-ray in the clinic look like this?",
    solution=VIEWS_SOLUTION,
)

# --------------------------------------------------------------------------- q3: an ensemble by averaging probabilities


def _run_ensemble(fn: Any, m: Any) -> list[np.ndarray]:
    """The student's ensemble on copies of the members (handed over in TRAIN mode): two, then three."""
    results = []
    for k in (2, 3):
        members = [copy.deepcopy(net).train() for net in m.members[:k]]
        results.append(_probs(fn(members, m.x.clone())))
    return results


ENSEMBLE = """
def ensemble_predict(members, x):
    probs = []
    for model in members:
        model.eval()
        with torch.no_grad():
            probs.append(torch.softmax(model(x), dim=1))
    return torch.stack(probs).mean(dim=0)
"""

q3 = coding(
    "q3", "ensemble_predict",
    run=_run_ensemble, compare=_all_close, describe=_describe_arrays,
    mistakes=[
        Mistake("that averages the members' logits: an ensemble averages their *probabilities* (the chapter's "
                "evaluate.ensemble_probs); logits of different models are not on a common scale.",
                value=lambda m: _run_ensemble(_variant(ENSEMBLE.replace("torch.softmax(model(x), dim=1)", "model(x)").replace(
                    "torch.stack(probs).mean(dim=0)", "torch.softmax(torch.stack(probs).mean(dim=0), dim=1)"),
                    "ensemble_predict"), m),
                example=ENSEMBLE.replace("torch.softmax(model(x), dim=1)", "model(x)").replace(
                    "torch.stack(probs).mean(dim=0)", "torch.softmax(torch.stack(probs).mean(dim=0), dim=1)")),
        Mistake("the rows sum to the number of members: take the mean, not the sum.",
                value=lambda m: _run_ensemble(_variant(ENSEMBLE.replace(".mean(dim=0)", ".sum(dim=0)"), "ensemble_predict"), m),
                example=ENSEMBLE.replace(".mean(dim=0)", ".sum(dim=0)")),
        Mistake("that is a vote of hard decisions (shares of argmax): average the probabilities, which keeps how "
                "sure each member is (and gives a ranking for the AUC).",
                when=lambda got, m: all(np.all(np.isin(np.round(a * 6, 6), np.arange(7))) for a in got)
                and not _all_close(got, q3.expected(m)),
                example=ENSEMBLE.replace("torch.softmax(model(x), dim=1)",
                                         "nn.functional.one_hot(model(x).argmax(1), 2).float()")),
        Mistake("a member stayed in training mode (BatchNorm used the batch's statistics): call model.eval() on each.",
                value=lambda m: _run_ensemble(_variant(ENSEMBLE.replace("        model.eval()\n", ""), "ensemble_predict"), m),
                example=ENSEMBLE.replace("        model.eval()\n", "")),
        Mistake("that is the first member alone: loop over every model in `members`.",
                value=lambda m: _run_ensemble(_variant(ENSEMBLE.replace("in members:", "in members[:1]:"),
                                                       "ensemble_predict"), m),
                example=ENSEMBLE.replace("in members:", "in members[:1]:")),
    ],
    hint="For each model: eval(), then softmax(model(x), dim=1) under torch.no_grad(); the ensemble is the mean "
         "of these (N, C) arrays over the members.",
    solution=ENSEMBLE,
)

# --------------------------------------------------------------------------- q4: the ensemble's validation AUC


def _member_probs(m: Any) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.softmax(net.eval()(m.x), dim=1).double().numpy() for net in copy.deepcopy(m.members)]


def _auc(y: Any, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), p[:, 1]))


q4 = Problem(
    "q4", "ensemble_auc",
    expected=lambda m: _auc(m.y, np.mean(_member_probs(m), axis=0)),
    mistakes=[
        Mistake("that is the mean of the members' AUCs: the ensemble's AUC is the AUC of the averaged "
                "probabilities (it can beat every member when their mistakes differ).",
                value=lambda m: float(np.mean([_auc(m.y, p) for p in _member_probs(m)])),
                example="from sklearn.metrics import roc_auc_score\n"
                        "ensemble_auc = np.mean([roc_auc_score(y, ensemble_predict([net], x)[:, 1]) for net in members])"),
        Mistake("that is the best member's AUC, not the ensemble's: average the three members' probabilities first.",
                value=lambda m: max(_auc(m.y, p) for p in _member_probs(m)),
                example="from sklearn.metrics import roc_auc_score\n"
                        "ensemble_auc = max(roc_auc_score(y, ensemble_predict([net], x)[:, 1]) for net in members)"),
    ],
    hint="`p = ensemble_predict(members, x)` (q3); `sklearn.metrics.roc_auc_score(y, p[:, 1])`: the score is "
         "P(PNEUMONIA), the second column.",
    solution="""
    from sklearn.metrics import roc_auc_score
    p = ensemble_predict(members, x)
    ensemble_auc = roc_auc_score(y.numpy(), p[:, 1].numpy())
    """,
)

# --------------------------------------------------------------------------- q5: fitting a temperature


def _calibrated_case(seed: int = 3, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, 2) that are calibrated by construction (T = 1) and their labels."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(np.int64)
    return np.stack([np.zeros(n), s], axis=1), y


def log_probs(p: np.ndarray) -> np.ndarray:
    """The chapter's log_probs: log p as logits (softmax(log p) = p), for averaged predictions."""
    return np.log(np.clip(p, 1e-30, 1.0))


def _run_temperature(fn: Any, m: Any) -> np.ndarray:
    """T for: the chapter's validation log-probabilities, an over-confident and an under-confident case."""
    z, y = _calibrated_case()
    p_val, _ = probabilities(m.val_pred)
    cases = [(log_probs(p_val), m.val_pred["y_true"].to_numpy()), (3.0 * z, y), (0.3 * z, y)]
    out = []
    for logits, labels in cases:
        t = fn(logits.copy(), labels.copy())
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            t = t.item()
        if not isinstance(t, (float, int, np.floating, np.integer)):
            raise Wrong(f"return the temperature as one number (a float), not {type(t).__name__}.")
        if t <= 0:
            raise Wrong(f"T = {float(t):.3g}: a temperature must be positive; a negative T reverses every decision "
                        "(the accuracy would change), T = 0 divides by zero.")
        out.append(float(t))
    return np.array(out)


TEMPERATURE = """
def fit_temperature(logits, y):
    z, y = torch.tensor(logits), torch.tensor(y)
    grid = np.geomspace(0.05, 20.0, 2001)
    nll = [torch.nn.functional.cross_entropy(z / t, y).item() for t in grid]
    return float(grid[int(np.argmin(nll))])
"""

q5 = coding(
    "q5", "fit_temperature",
    run=_run_temperature, compare=lambda got, ref: bool(np.allclose(got, ref, rtol=0.03)),
    mistakes=[
        Mistake("those are the reciprocals: you multiplied the logits by T; temperature scaling *divides* them "
                "(softmax(logits / T)).",
                value=lambda m: 1 / q5.expected(m), example=TEMPERATURE.replace("z / t", "z * t")),
        Mistake("the same T whatever the data: the accuracy (or any count of right decisions) does not change "
                "with T. Minimise the negative log-likelihood (cross-entropy) instead.",
                when=lambda got, m: np.allclose(got, got[0]),
                example=TEMPERATURE.replace("torch.nn.functional.cross_entropy(z / t, y).item()",
                                            "-((z / t).argmax(1) == y).float().mean().item()")),
        Mistake("the under-confident case needs T < 1 (sharpening): search below 1 too (e.g. 0.05 to 20).",
                when=lambda got, m: np.isclose(got[2], 1.0, rtol=1e-3) and not np.isclose(q5.expected(m)[2], 1, rtol=0.03),
                example=TEMPERATURE.replace("np.geomspace(0.05, 20.0, 2001)", "np.geomspace(1.0, 20.0, 2001)")),
        Mistake("that scales probabilities: divide the *logits* (here log-probabilities) by T, then softmax.",
                value=lambda m: _run_temperature(_variant(TEMPERATURE.replace(
                    "cross_entropy(z / t, y)", "cross_entropy(torch.softmax(z, 1) / t, y)"), "fit_temperature"), m),
                example=TEMPERATURE.replace("cross_entropy(z / t, y)", "cross_entropy(torch.softmax(z, 1) / t, y)")),
    ],
    describe=lambda got, ref: "the temperatures: " + ", ".join(
        f"{w} {g:.3g} instead of {r:.3g}" for w, g, r in zip(("chapter's validation", "over-confident", "under-confident"),
                                                             got, ref) if not np.isclose(g, r, rtol=0.03)),
    hint="NLL(T) = torch.nn.functional.cross_entropy(logits / T, y); evaluate it on a grid "
         "np.geomspace(0.05, 20, ...) and return the T with the smallest value.",
    solution=TEMPERATURE,
)

# --------------------------------------------------------------------------- q6, q7: applying it to test


def _split(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    p, _ = probabilities(frame)
    return p, frame["y_true"].to_numpy()


def _fitted(m: Any, split: str = "val") -> float:
    import warnings

    from helpers import evaluate

    p, y = _split(getattr(m, f"{split}_pred"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate.fit_temperature(log_probs(p), y)


def _scaled(p: np.ndarray, t: float) -> np.ndarray:
    z = log_probs(p) / t
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _test_probs(m: Any) -> np.ndarray:
    return _split(m.test_pred)[0]


q6 = Problem(
    "q6", "test_calibrated",
    expected=lambda m: _scaled(_test_probs(m), _fitted(m)), rtol=1e-2,
    mistakes=[
        Mistake("that temperature was fitted on the test split: fit T on validation, apply it to test.",
                value=lambda m: _scaled(_test_probs(m), _fitted(m, "test")),
                example="T = fit_temperature(log_probs(test_pred.filter(like='prob_').to_numpy()), test_pred['y_true'].to_numpy())\n"
                        "test_calibrated = torch.softmax(torch.as_tensor(log_probs(test_pred.filter(like='prob_').to_numpy())) / T, 1).numpy()"),
        Mistake("that divides the probabilities by T (and renormalises): divide log p (the logits) by T, then softmax.",
                value=lambda m: (lambda q: q / q.sum(1, keepdims=True))(_test_probs(m) / _fitted(m)),
                example="T = fit_temperature(log_probs(val_pred.filter(like='prob_').to_numpy()), val_pred['y_true'].to_numpy())\n"
                        "q = test_pred.filter(like='prob_').to_numpy() / T\ntest_calibrated = q / q.sum(1, keepdims=True)"),
        Mistake("that multiplies log p by T: temperature scaling divides by it.",
                value=lambda m: _scaled(_test_probs(m), 1 / _fitted(m)),
                example="T = fit_temperature(log_probs(val_pred.filter(like='prob_').to_numpy()), val_pred['y_true'].to_numpy())\n"
                        "test_calibrated = torch.softmax(torch.as_tensor(log_probs(test_pred.filter(like='prob_').to_numpy())) * T, 1).numpy()"),
    ],
    alternatives=lambda m: {"the test probabilities before scaling": _test_probs(m)},
    hint="T = fit_temperature(log_probs(p_val), y_val) with p_val the prob_ columns of val_pred; then "
         "softmax(log_probs(p_test) / T) row by row. `evaluate.apply_temperature(log_probs(p_test), T)` is the saved version.",
    solution="""
    p_val, y_val = val_pred.filter(like="prob_").to_numpy(), val_pred["y_true"].to_numpy()
    T = fit_temperature(log_probs(p_val), y_val)
    z_test = torch.as_tensor(log_probs(test_pred.filter(like="prob_").to_numpy()))
    test_calibrated = torch.softmax(z_test / T, dim=1).numpy()
    """,
)


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    from helpers import evaluate

    return evaluate.expected_calibration_error(y, p)


def _eces(m: Any, split: str = "test") -> tuple[float, float]:
    p, y = _split(getattr(m, f"{split}_pred"))
    return (_ece(y, p), _ece(y, _scaled(p, _fitted(m))))


q7 = Problem(
    "q7", "eces",
    expected=lambda m: _eces(m), rtol=2e-2,
    mistakes=[
        Mistake("those are the validation split's ECEs (where T was fitted, so they flatter it): the question is the test split.",
                value=lambda m: _eces(m, "val"),
                example="from helpers import evaluate\np_val, y_val = val_pred.filter(like='prob_').to_numpy(), val_pred['y_true'].to_numpy()\n"
                        "T = fit_temperature(log_probs(p_val), y_val)\n"
                        "eces = (evaluate.expected_calibration_error(y_val, p_val),\n"
                        "        evaluate.expected_calibration_error(y_val, torch.softmax(torch.as_tensor(log_probs(p_val)) / T, 1).numpy()))"),
    ],
    hint="`evaluate.expected_calibration_error(y_test, probs)` (15 bins), once with the test probabilities "
         "as saved, once with `test_calibrated` (q6); the order is (before, after).",
    solution="""
    from helpers import evaluate
    y_test = test_pred["y_true"].to_numpy()
    eces = (evaluate.expected_calibration_error(y_test, test_pred.filter(like="prob_").to_numpy()),
            evaluate.expected_calibration_error(y_test, test_calibrated))
    """,
)

QUESTIONS = [
    Question("Why does the chapter train ResNet-50, ResNet-101 and DenseNet-121 with exactly the same recipe "
             "(and even the same batches)?", "So that a difference in the results can be attributed to the "
             "backbone, not to a different head, schedule, loss or augmentation draw."),
    Question("What does a TTA prediction compute?", "The mean, over the views, of the model's softmax "
             "probabilities for each view of the image (not the mean of logits, not a vote)."),
    Question("Why are horizontal flips a wrong TTA view (and a wrong augmentation) for chest X-rays, when they "
             "are standard for photographs?", "A mirrored chest has the heart on the right: no real radiograph "
             "looks like that (images are displayed in one orientation, a marker fixes the side). The model would "
             "be asked about, or taught, an impossible anatomy."),
    Question("The mirrored view did not lower the validation AUC in some run. Does that make it acceptable?",
             "No: one validation score on few images does not make an impossible image plausible; the set is "
             "excluded by what it is, and only plausible sets are candidates."),
    Question("When can TTA help at all?", "When each view is an image the model could meet (so each prediction "
             "is about as good as the original's) and the views' errors are partly independent, so averaging "
             "cancels some of them."),
    Question("Why are the TTA policy and the ensemble chosen on validation, and test run only once?",
             "Every choice made by looking at test makes the test score optimistic; the rejected sets are not "
             "even evaluated on test, to avoid the temptation to change one's mind."),
    Question("Why average probabilities rather than logits across the members of an ensemble?",
             "Different models' logits are not on a common scale (one may be much more confident); probabilities "
             "are, and their mean is again a probability."),
    Question("What does an ensemble of three models cost at inference, with a three-view TTA?",
             "Nine forward passes per X-ray (members x views), and three models' memory."),
    Question("What is temperature scaling, and what does T > 1 mean?", "Dividing the logits by one number T "
             "before the softmax; T > 1 softens an over-confident model, T < 1 sharpens an under-confident one."),
    Question("Why can temperature scaling not change accuracy, AUC or the confusion matrix at 0.5?",
             "Dividing by a positive T keeps the order of the logits within an image (same argmax) and the order of "
             "the scores across images (same ranking); only the probabilities' values move."),
    Question("Why is T fitted on validation and not on test?", "Fitting is choosing: a T fitted on test makes "
             "the test ECE optimistic, like any choice made on test."),
    Question("An ensemble has no logits. How does the chapter apply a temperature to it?",
             "It uses log p as logits: softmax(log p) = p, so log-probabilities can be divided by T like logits."),
    Question("What does ECE measure, and why can a small validation set make temperature scaling over-correct?",
             "The bin-size-weighted mean gap between confidence and accuracy; a T fitted on few images is noisy, "
             "so the test ECE can go up after scaling."),
]

EXPERIMENTS = [
    Experiment("A wrong view in numbers", "In a copy of chapter 07, add tta.hflip and tta.vflip to VIEWS (not to "
               "VIEW_SETS, so they are never chosen) and rerun the per-view table.", "Whether the upside-down "
               "view's validation AUC falls further from the identity view's than the mirror's; the chapter itself "
               "never mirrors a chest."),
    Experiment("Calibrate before you average", "Fit a temperature for each member on validation, average the "
               "calibrated probabilities, and compare the ensemble's test ECE with the chapter's.",
               "Whether calibrating members first lowers the ensemble's ECE, and whether its AUC moves (it may: "
               "a per-member T changes how members are weighted)."),
    Experiment("What TTA and ensembles cost", "Time evaluate.predict with no TTA, with the plausible set, and "
               "with one, two and three models.", "Seconds per image against the validation AUC gained: would an "
               "app (chapter 08) pay nine forward passes for it?"),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6, q7], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
