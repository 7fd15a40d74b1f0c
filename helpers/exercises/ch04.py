"""Chapter 04, MobileNetV2 in two stages: pos_weight from the counts, freezing a MobileNetV2, the
two-stage switch (two fits, keep the better stage), P(PNEUMONIA) from one logit, Youden's threshold
from ``roc_curve`` on validation, and a paired bootstrap of an AUC difference.

The material: ``y_train``/``y_val``/``y_test`` (labels of small pneumonia splits, NORMAL = 0,
PNEUMONIA = 1, with the class mix of the real splits), ``new_model()`` (a fresh MobileNetV2 with the
chapter's head ``classifier = Dropout(0.5) -> Linear(1280, 1)``, random weights), ``tiny_net()`` and
``fit(net, optimizer)`` (a small real network of the same layout and a stand-in for ``train.fit``
to try the two stages on), ``STAGE1_LR``/``STAGE2_LR``, ``val_pred``/``test_pred`` (the chapter's
saved predictions, or the stand-in) and ``z_test`` (the test logits behind them).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from helpers.exercises import material as mat
from helpers.exercises.core import Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, load_predictions

NOTEBOOK = "04_mobilenetv2_two_stage"
STAGE1_LR, STAGE2_LR = 1e-3, 1e-5  # the full recipe's: head only, then every layer


def new_model(seed: int = 42) -> nn.Module:
    """A fresh MobileNetV2 with the chapter's one-logit head (random weights, seeded)."""
    from helpers import models

    torch.manual_seed(seed)
    return models.build_model("mobilenet_v2", 1, weights="random", head="gap_dropout")


class TinyNet(nn.Module):
    """MobileNetV2's layout in miniature: ``features`` (three conv-BN-ReLU stages), global average
    pooling, and the chapter's head ``classifier = Dropout(0.5) -> Linear(64, 1)``. It remembers
    whether ``load_state_dict`` was called (``restored``), for the two-stage check."""

    def __init__(self, seed: int = 42) -> None:
        super().__init__()
        cnn = mat.small_cnn(1, seed)
        self.features, self.pool = cnn.features, cnn.pool
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(cnn.fc.in_features, 1))
        self.restored = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - nn.Module's, counted
        self.restored += 1
        return super().load_state_dict(*args, **kwargs)


def tiny_net(seed: int = 42) -> TinyNet:
    """A fresh ``TinyNet`` (seeded)."""
    return TinyNet(seed)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    splits = mat.small_splits("pneumonia", profile, data_dir, seed)
    from helpers import loading

    size = 32
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:8]
    x = loading.normalize(loading.cache_images(splits.train.iloc[pick.numpy()], size))
    test_pred, _ = load_predictions(NOTEBOOK, "test", profile)
    val_pred, _ = load_predictions(NOTEBOOK, "val", profile)
    public = {"class_names": list(splits.class_names),
              **{f"y_{s}": np.asarray(getattr(splits, s)["label"], dtype=np.int64) for s in ("train", "val", "test")},
              "new_model": new_model, "tiny_net": tiny_net, "STAGE1_LR": STAGE1_LR, "STAGE2_LR": STAGE2_LR,
              "val_pred": val_pred, "test_pred": test_pred, "z_test": _logit(test_pred["prob_PNEUMONIA"].to_numpy())}
    private = {"x": x, "y": mat.labels(splits.train.iloc[pick.numpy()]).float()}
    public["fit"] = _fitter(x, private["y"], [0.5, 0.4], [], record=False)
    return public, private


# --------------------------------------------------------------------------- q1: pos_weight


def _ratio(y: np.ndarray) -> float:
    return float((y == 0).sum() / (y == 1).sum())


q1 = Problem(
    "q1", "pos_weight",
    expected=lambda m: _ratio(m.y_train),
    mistakes=[Mistake("inverted: pos_weight is n_negative / n_positive (here PNEUMONIA is the majority, so it is below 1).",
                      value=lambda m: 1 / _ratio(m.y_train), example="pos_weight = (y_train == 1).sum() / (y_train == 0).sum()"),
              Mistake("computed on the test labels: the loss weight comes from the training split (test is looked at once, at the end).",
                      value=lambda m: _ratio(m.y_test), example="pos_weight = (y_test == 0).sum() / (y_test == 1).sum()"),
              Mistake("that is the share of positives: pos_weight is the ratio n_negative / n_positive.",
                      value=lambda m: float((m.y_train == 1).mean()), example="pos_weight = (y_train == 1).mean()")],
    hint="Count the zeros (NORMAL) and the ones (PNEUMONIA) of `y_train`; `losses.pos_weight(y_train)` does the same.",
    solution="pos_weight = (y_train == 0).sum() / (y_train == 1).sum()",
)

# --------------------------------------------------------------------------- q2: freeze MobileNetV2's backbone


def _run_freeze(fn: Any, m: Any) -> dict:
    found = {}
    for name, fresh in (("MobileNetV2", new_model(m.seed)), ("TinyNet", tiny_net(m.seed))):
        fresh.train()
        try:
            out = fn(fresh)
        except AttributeError as error:
            if "fc" in str(error):
                raise Wrong("MobileNetV2 has no `fc`: its head is `model.classifier` (Dropout -> Linear).") from None
            raise
        after = out if isinstance(out, nn.Module) else fresh
        found[name] = {"trainable": sorted(n for n, p in after.named_parameters() if p.requires_grad),
                       "training": after.training}
    return found


def _some_backbone(got: dict) -> bool:
    return any(not n.startswith("classifier") for n in got["MobileNetV2"]["trainable"])


q2 = coding(
    "q2", "freeze_backbone",
    run=_run_freeze, compare=lambda got, ref: all(got[k]["trainable"] == ref[k]["trainable"] for k in ref),
    mistakes=[
        Mistake("model.eval() freezes nothing: it switches BatchNorm and Dropout to inference. Freezing is "
                "`requires_grad = False` on the backbone's parameters.",
                when=lambda got, m: _some_backbone(got) and not got["MobileNetV2"]["training"],
                example="def freeze_backbone(model):\n    model.eval()\n    return model"),
        Mistake("the head is frozen too: then stage 1 trains nothing. Switch `model.classifier`'s parameters back on.",
                when=lambda got, m: all(v["trainable"] == [] for v in got.values()),
                example="def freeze_backbone(model):\n    for p in model.parameters():\n        p.requires_grad = False\n    return model"),
        Mistake("only the last block of `features` was frozen: every parameter outside `model.classifier` must be frozen.",
                when=lambda got, m: "features.0.0.weight" in got["MobileNetV2"]["trainable"]
                and not any(n.startswith("features.18") for n in got["MobileNetV2"]["trainable"]),
                example="def freeze_backbone(model):\n    for p in model.features[-1].parameters():\n        p.requires_grad = False\n    return model"),
        Mistake("nothing was frozen: first set `requires_grad = False` for every parameter, then True for the head's.",
                when=lambda got, m: "features.0.0.weight" in got["MobileNetV2"]["trainable"],
                example="def freeze_backbone(model):\n    for p in model.classifier.parameters():\n        p.requires_grad = True\n    return model"),
    ],
    describe=lambda got, ref: "which parameters train: " + "; ".join(
        f"{k}: {', '.join(got[k]['trainable'][:3]) or 'none'}{' ...' if len(got[k]['trainable']) > 3 else ''} "
        f"instead of {', '.join(ref[k]['trainable'])}" for k in ref if got[k]["trainable"] != ref[k]["trainable"]),
    hint="Two loops, as in the chapter: every parameter `requires_grad = False`, then `model.classifier.parameters()` "
         "back to True; return the model.",
    solution="""
    def freeze_backbone(model):
        for p in model.parameters():
            p.requires_grad = False
        for p in model.classifier.parameters():
            p.requires_grad = True
        return model
    """,
)

# --------------------------------------------------------------------------- q3: the two-stage switch


def _fitter(x: torch.Tensor, y: torch.Tensor, best_values: list[float], calls: list, record: bool = True) -> Any:
    """A stand-in for ``train.fit(net, ..., optimizer=optimizer)``: three full-batch steps of the given
    optimizer with BCE on a small batch; records what trained, and returns an object whose
    ``best_value`` (the stage's best validation loss) is scripted: ``best_values[i % len(best_values)]``
    at call i. ``record``: keep what each call trained in ``calls`` (the check's runs)."""

    def fit(net: nn.Module, optimizer: torch.optim.Optimizer) -> types.SimpleNamespace:
        names = {id(p): n for n, p in net.named_parameters()}
        lrs = {names.get(id(p), "?"): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        net.train()
        for _ in range(3):
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
            loss.backward()
            optimizer.step()
        value = best_values[len(calls) % len(best_values)]
        if record:
            calls.append({"trainable": sorted(n for n, p in net.named_parameters() if p.requires_grad), "lrs": lrs,
                          "weights": {k: v.detach().clone() for k, v in net.state_dict().items()}})
        else:  # the notebook's `fit`: only counts its calls, so that stage 1 and 2 alternate
            calls.append(None)
        return types.SimpleNamespace(best_value=value, best_epoch=1, history=None)

    return fit


SCENARIOS = {"stage 2 better (val loss 0.5 then 0.4)": [0.5, 0.4], "stage 2 worse (val loss 0.4 then 0.5)": [0.4, 0.5]}


def _run_two_stages(fn: Any, m: Any) -> dict:
    found = {}
    for scenario, values in SCENARIOS.items():
        net, calls = tiny_net(m.seed), []
        torch.manual_seed(m.seed)
        fn(net, _fitter(m.x.clone(), m.y.clone(), values, calls))
        if len(calls) != 2:
            raise Wrong(f"`fit` was called {len(calls)} time(s): the recipe is two fits, stage 1 then stage 2.")
        head = sorted(n for n, _ in net.named_parameters() if n.startswith("classifier"))
        every = sorted(n for n, _ in net.named_parameters())
        final = net.state_dict()
        kept = [i + 1 for i, c in enumerate(calls) if all(torch.equal(final[k], c["weights"][k]) for k in final)]
        first, second = calls
        found[scenario] = {
            "stage 1 trains the head only": first["trainable"] == head,
            "stage 1 lr": sorted({first["lrs"].get(n) for n in head}, key=str),
            "stage 2 trains everything": second["trainable"] == every,
            "stage 2 optimises everything": sorted(second["lrs"]) == every,
            "stage 2 lr": sorted(set(second["lrs"].values()), key=str),
            "kept stage": kept[-1] if kept else None,
            "restored": net.restored > 0,
        }
    return found


def _all(got: dict, key: str) -> list:
    return [v[key] for v in got.values()]


def _describe_stages(got: dict, ref: dict) -> str:
    return "; ".join(f"{s}: " + ", ".join(f"{k} {g[k]} instead of {ref[s][k]}" for k in g if k != "restored" and g[k] != ref[s][k])
                     for s, g in got.items() if any(g[k] != ref[s][k] for k in g if k != "restored"))


TWO = '''
def two_stages(net, fit):
    for p in net.parameters():
        p.requires_grad = False
    for p in net.classifier.parameters():
        p.requires_grad = True
    first = fit(net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=STAGE1_LR))
    kept = copy.deepcopy(net.state_dict())
    for p in net.parameters():
        p.requires_grad = True
    second = fit(net, torch.optim.AdamW(net.parameters(), lr=STAGE2_LR))
    if second.best_value >= first.best_value:
        net.load_state_dict(kept)
    return first, second
'''

q3 = coding(
    "q3", "two_stages",
    run=_run_two_stages,
    compare=lambda got, ref: all({k: v for k, v in got[s].items() if k != "restored"}
                                 == {k: v for k, v in ref[s].items() if k != "restored"} for s in ref),
    mistakes=[
        Mistake("stage 1 trained the backbone too: freeze every parameter but `net.classifier`'s before the first fit.",
                when=lambda got, m: not all(_all(got, "stage 1 trains the head only")),
                example=TWO.replace("    for p in net.parameters():\n        p.requires_grad = False\n", "", 1)),
        Mistake("stage 2 still trained the head only: set `requires_grad = True` on every parameter before the second fit.",
                when=lambda got, m: not all(_all(got, "stage 2 trains everything")),
                example=TWO.replace("    for p in net.parameters():\n        p.requires_grad = True\n", "")),
        Mistake("stage 2 reused stage 1's optimizer, which holds only the head's parameters: make a NEW optimizer "
                "over `net.parameters()` for stage 2.",
                when=lambda got, m: not all(_all(got, "stage 2 optimises everything")),
                example=TWO.replace("    first = fit(net, torch.optim.AdamW(", "    opt = torch.optim.AdamW(")
                .replace("lr=STAGE1_LR))", "lr=STAGE1_LR)\n    first = fit(net, opt)")
                .replace("torch.optim.AdamW(net.parameters(), lr=STAGE2_LR)", "opt")),
        Mistake("stage 2 used the large learning rate: every layer trains at the small STAGE2_LR, so the ImageNet "
                "features are adjusted gently instead of destroyed.",
                when=lambda got, m: _all(got, "stage 2 lr")[0] == [STAGE1_LR],
                example=TWO.replace("lr=STAGE2_LR", "lr=STAGE1_LR")),
        Mistake("the comparison is the wrong way round: best_value is a validation LOSS, lower is better. Keep stage 2 "
                "only when its best_value is lower than stage 1's.",
                when=lambda got, m: _all(got, "kept stage") == [1, 2],
                example=TWO.replace("second.best_value >= first.best_value", "second.best_value <= first.best_value")),
        Mistake("the stage-1 weights came back as stage 2's: `net.state_dict()` holds the live tensors, which stage 2 "
                "changes in place. Keep `copy.deepcopy(net.state_dict())`.",
                when=lambda got, m: _all(got, "kept stage") == [2, 2] and any(_all(got, "restored")),
                example=TWO.replace("copy.deepcopy(net.state_dict())", "net.state_dict()")),
        Mistake("stage 2 was always kept: when its best validation loss is not lower than stage 1's, restore the "
                "stage-1 weights (saved before stage 2) with `net.load_state_dict`.",
                when=lambda got, m: _all(got, "kept stage") == [2, 2],
                example=TWO.replace("    if second.best_value >= first.best_value:\n        net.load_state_dict(kept)\n", "")),
    ],
    describe=_describe_stages,
    hint="Freeze all but `net.classifier`; `first = fit(net, torch.optim.AdamW(<trainable params>, lr=STAGE1_LR))`; "
         "save `copy.deepcopy(net.state_dict())`; unfreeze everything; `second = fit(net, <a new AdamW over "
         "net.parameters()>, lr=STAGE2_LR)`; if `second.best_value >= first.best_value`, load the saved weights.",
    solution="import copy\n" + TWO,
)

# --------------------------------------------------------------------------- q4: P(PNEUMONIA) from one logit


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


q4 = Problem(
    "q4", "p_test",
    expected=lambda m: _sigmoid(m.z_test),
    mistakes=[Mistake("these are the logits themselves: a probability is sigmoid(logit).",
                      value=lambda m: m.z_test, example="p_test = z_test"),
              Mistake("all ones: a softmax over ONE logit is always 1; a one-logit head needs the sigmoid.",
                      when=lambda got, m: np.allclose(np.asarray(got, dtype=float), 1.0),
                      example="p_test = torch.softmax(torch.as_tensor(z_test)[:, None], dim=1)[:, 0].numpy()"),
              Mistake("that is P(NORMAL): the one logit belongs to the positive class, PNEUMONIA (label 1).",
                      value=lambda m: 1 - _sigmoid(m.z_test), example="p_test = 1 / (1 + np.exp(z_test))"),
              Mistake("one probability per image is needed: shape (N,), not (N, 1).",
                      when=lambda got, m: np.ndim(got) == 2, example="p_test = (1 / (1 + np.exp(-z_test)))[:, None]")],
    hint="sigmoid(z) = 1 / (1 + exp(-z)); `torch.sigmoid` does the same on a tensor.",
    solution="p_test = 1 / (1 + np.exp(-z_test))",
)

# --------------------------------------------------------------------------- q5, q6: Youden's threshold on validation

YOUDEN = '''
def youden_threshold(y, p):
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    j = (tpr - fpr)[1:]
    return float(thresholds[1 + int(np.argmax(j))])
'''


def _cases(m: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    val_y, val_p = m.val_pred["y_true"].to_numpy(), m.val_pred["prob_PNEUMONIA"].to_numpy()
    return [(val_y, val_p),
            (np.array([0, 0, 1, 0, 1, 1]), np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])),
            (np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]))]  # a model that is wrong everywhere


def _run_youden(fn: Any, m: Any) -> list[float]:
    out = []
    for y, p in _cases(m):
        value = fn(y.copy(), p.copy())
        if np.ndim(value) != 0:
            raise Wrong(f"return one threshold (a float), not {type(value).__name__} of shape {np.shape(value)}.")
        out.append(float(value))
    return out


def _variant(source: str, name: str) -> Any:
    scope = {"np": np, "roc_curve": roc_curve, "roc_auc_score": roc_auc_score}
    exec(source, scope)  # noqa: S102 - our own text
    return scope[name]


q5 = coding(
    "q5", "youden_threshold",
    run=_run_youden, compare=lambda got, ref: np.allclose(got, ref),
    mistakes=[
        Mistake("the first point of roc_curve (threshold +inf, nothing called positive) was kept: leave it out, "
                "or a model worse than chance gets an infinite threshold.",
                when=lambda got, m: np.isinf(got[-1]),
                example="def youden_threshold(y, p):\n    fpr, tpr, thresholds = roc_curve(y, p)\n"
                        "    return float(thresholds[np.argmax(tpr - fpr)])"),
        Mistake("off by one: after dropping point 0, index `argmax(j)` of `j` is index `1 + argmax(j)` of `thresholds`.",
                value=lambda m: _run_youden(_variant(YOUDEN.replace("1 + int(", "int("), "youden_threshold"), m),
                example=YOUDEN.replace("1 + int(", "int(")),
        Mistake("that is Youden's J itself (sensitivity + specificity - 1); return the threshold where it is largest.",
                value=lambda m: [float(np.max((t - f)[1:])) for f, t, _ in (roc_curve(y, p, drop_intermediate=False)
                                                                          for y, p in _cases(m))],
                example="def youden_threshold(y, p):\n    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)\n"
                        "    return float(np.max((tpr - fpr)[1:]))"),
    ],
    describe=lambda got, ref: "the thresholds: " + ", ".join(
        f"case {i + 1}: {g:.4g} instead of {r:.4g}" for i, (g, r) in enumerate(zip(got, ref)) if not np.isclose(g, r)),
    hint="`fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)`; J = tpr - fpr without point 0; "
         "return the threshold at 1 + argmax.",
    solution="from sklearn.metrics import roc_curve\n" + YOUDEN,
)


def _youden(frame: Any, column: str = "prob_PNEUMONIA") -> float:
    return _variant(YOUDEN, "youden_threshold")(frame["y_true"].to_numpy(), frame[column].to_numpy())


q6 = Problem(
    "q6", "threshold",
    expected=lambda m: _youden(m.val_pred),
    mistakes=[Mistake("that threshold was chosen on the TEST predictions: choose it on validation, then apply it to "
                      "test once (a test-chosen threshold makes the test score optimistic).",
                      value=lambda m: _youden(m.test_pred),
                      example="threshold = youden_threshold(test_pred['y_true'], test_pred['prob_PNEUMONIA'])"),
              Mistake("0.5 is the default rule, not the threshold Youden's J picks on validation.",
                      value=lambda m: 0.5, example="threshold = 0.5"),
              Mistake("that is a threshold on P(NORMAL): use the PNEUMONIA probability, the positive class.",
                      value=lambda m: _youden(m.val_pred, "prob_NORMAL"),
                      example="threshold = youden_threshold(val_pred['y_true'], val_pred['prob_NORMAL'])")],
    hint="Which split chooses things? `youden_threshold(<its y_true>, <its prob_PNEUMONIA>)` (your q5), or "
         "`evaluate.choose_threshold(..., method='youden')`.",
    solution='threshold = youden_threshold(val_pred["y_true"], val_pred["prob_PNEUMONIA"])',
)

# --------------------------------------------------------------------------- q7: a paired bootstrap difference

PAIRED = '''
def paired_auc_difference(y, p_a, p_b, n_boot=1000, seed=0):
    rng = np.random.default_rng(seed)
    diff = roc_auc_score(y, p_a) - roc_auc_score(y, p_b)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) == 2:
            diffs.append(roc_auc_score(y[i], p_a[i]) - roc_auc_score(y[i], p_b[i]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return diff, low, high
'''


def _pair(m: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chapter's test probabilities (model A) and a twin B: the same logits with seeded noise."""
    y, p_a = m.test_pred["y_true"].to_numpy(), m.test_pred["prob_PNEUMONIA"].to_numpy()
    noise = np.random.default_rng(m.seed).normal(0, 1.0, len(y))
    return y, p_a, _sigmoid(m.z_test + noise)


N_BOOT = 200  # resamples in the check: enough to tell a paired interval (about 3 times narrower here) from an unpaired one


def _run_paired(fn: Any, m: Any) -> dict:
    y, a, b = _pair(m)
    out = fn(y.copy(), a.copy(), b.copy(), N_BOOT, m.seed + 1)
    if np.shape(out) != (3,):
        raise Wrong("return three numbers: (difference, low, high).")
    diff, low, high = (float(v) for v in out)
    return {"diff": diff, "low": low, "high": high, "width": high - low}


def _reference(m: Any) -> dict:
    """q7's reference (a bootstrap: computed once per setup, kept on the material)."""
    if not hasattr(m, "_q7_reference"):
        m._q7_reference = _run_paired(_variant("from sklearn.metrics import roc_auc_score\n" + PAIRED,
                                               "paired_auc_difference"), m)
    return m._q7_reference


def _paired_ok(got: dict, ref: dict) -> bool:
    return (abs(got["diff"] - ref["diff"]) < 1e-9 and got["low"] <= got["diff"] <= got["high"]
            and 0.6 * ref["width"] <= got["width"] <= 1.5 * ref["width"])


q7 = coding(
    "q7", "paired_auc_difference",
    run=_run_paired, compare=_paired_ok, expected=_reference,
    mistakes=[
        Mistake("the difference is B minus A: return AUC(a) - AUC(b), with the interval of that same difference.",
                when=lambda got, m: abs(got["diff"] + _reference(m)["diff"]) < 1e-9,
                example=PAIRED.replace("roc_auc_score(y, p_a) - roc_auc_score(y, p_b)", "roc_auc_score(y, p_b) - roc_auc_score(y, p_a)")
                .replace("roc_auc_score(y[i], p_a[i]) - roc_auc_score(y[i], p_b[i])", "roc_auc_score(y[i], p_b[i]) - roc_auc_score(y[i], p_a[i])")),
        Mistake("an interval of width 0: resample WITH replacement (`rng.integers(0, n, n)`); a permutation "
                "holds the same images every time.",
                when=lambda got, m: got["width"] < 1e-9,
                example=PAIRED.replace("rng.integers(0, len(y), len(y))", "rng.permutation(len(y))")),
        Mistake("the interval is too wide for a paired bootstrap: each resample must draw the SAME images for "
                "both models (one index `i` for p_a and p_b), so the difficulty they share cancels.",
                when=lambda got, m: got["width"] > 1.5 * _reference(m)["width"],
                example=PAIRED.replace("roc_auc_score(y[i], p_b[i])", "roc_auc_score(y[j], p_b[j])")
                .replace("        if len(np.unique(y[i])) == 2:", "        j = rng.integers(0, len(y), len(y))\n"
                         "        if len(np.unique(y[i])) == 2 and len(np.unique(y[j])) == 2:")),
    ],
    describe=lambda got, ref: (f"the result (diff {got['diff']:.4f}, interval [{got['low']:.4f}, {got['high']:.4f}]) where "
                               f"the difference is {ref['diff']:.4f} with an interval about [{ref['low']:.3f}, {ref['high']:.3f}]"),
    hint="One `i = rng.integers(0, n, n)` per resample, used for both models; skip resamples with one class only; "
         "`np.percentile(diffs, [2.5, 97.5])`.",
    solution="from sklearn.metrics import roc_auc_score\n" + PAIRED,
)

QUESTIONS = [
    Question("Why train the head alone first, before unfreezing everything?",
             "A new head starts random: its large early gradients, sent through an unfrozen backbone, would wreck the "
             "ImageNet features before the head has learnt anything. With the backbone frozen the head first learns to "
             "read the features; then every layer can be adjusted gently."),
    Question("Why does stage 2 use a learning rate 100 times smaller (1e-5 against 1e-3)?",
             "The pretrained weights are already good: small steps adapt them to X-rays without destroying them."),
    Question("Why does stage 2 need a new optimizer?",
             "The stage-1 optimizer holds only the head's parameters (and their Adam state): the unfrozen backbone "
             "would get gradients but never be updated."),
    Question("Why keep a deep copy of the stage-1 weights, and when are they restored?",
             "`state_dict()` returns the live tensors, which stage 2 changes in place; a deep copy freezes them. They "
             "come back when stage 2's best validation loss is not lower than stage 1's: fine-tuning did not help."),
    Question("What does `pos_weight = n_negative / n_positive` do, and why is it below 1 here?",
             "It multiplies the loss of every positive (PNEUMONIA) image, so both classes contribute the same total "
             "weight; PNEUMONIA is the majority in this dataset, so each of its images counts less."),
    Question("Why one logit and a sigmoid rather than two logits and a softmax?",
             "For two classes they are equivalent: sigmoid(z) = softmax([0, z])[1]. One logit is the natural head for "
             "BCE with pos_weight; a softmax over ONE logit is always 1."),
    Question("Why choose the threshold on validation and never on test?",
             "Choosing on test fits the threshold to the test images: the test score becomes optimistic and no longer "
             "estimates performance on new patients."),
    Question("What does Youden's J maximise, and what does it ignore?",
             "Sensitivity + specificity - 1: both errors weighed equally. It ignores their costs and the prevalence: a "
             "screening test may prefer a target sensitivity (notebook 06)."),
    Question("Why is roc_curve's first point left out when choosing a threshold?",
             "It is the threshold +inf, where nothing is called positive (J = 0); a model worse than chance would pick it."),
    Question("Why does a weighted loss make the 0.5 threshold arbitrary?",
             "pos_weight shifts the logits the model learns; 0.5 is no longer where the classes balance, so the "
             "threshold has to be chosen from data (validation)."),
    Question("Why is a paired bootstrap interval narrower than two separate ones?",
             "Each resample draws the same images for both models; easy and hard images move both AUCs together, so "
             "that shared variation cancels in the difference."),
    Question("What does a linear probe on frozen features show that fine-tuning does not?",
             "How much the features are worth before training adapts them: ImageNet features can beat random ones "
             "clearly in a probe and less so after fine-tuning, which lets random weights catch up partly."),
]

EXPERIMENTS = [
    Experiment("One stage or two", "Set STAGE1_EPOCHS = 0 in the chapter (fine-tune everything from the start at "
               "STAGE2_LR), then the reverse (stage 1 only).",
               "The validation curves: whether the first epochs of a direct fine-tune jump (damaged features), and how "
               "much stage 2 adds over the head alone."),
    Experiment("Without pos_weight", "Train with `losses.make_criterion('bce')` without pos_weight, and compare the "
               "Youden threshold and NORMAL recall at 0.5.",
               "How far the threshold moves from 0.5, and whether the threshold chosen on validation recovers most of "
               "what the weight bought."),
    Experiment("A target sensitivity", "Choose the threshold for a sensitivity of 0.98 on validation instead of Youden's J.",
               "How much NORMAL recall (specificity) that costs on test, and whether test sensitivity really reaches 0.98."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6, q7], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
