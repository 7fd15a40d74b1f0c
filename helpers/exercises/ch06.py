"""Chapter 06, fundus binary: the ROC AUC, sensitivity/specificity/PPV/NPV, a threshold for a target
sensitivity chosen with ``roc_curve`` on validation and what it gives on test, and PPV at another
prevalence (Bayes).

The material: ``val_pred``/``test_pred`` (the chapter's saved predictions: ``y_true`` with 1 = disease,
``prob_disease``; or the stand-in), ``z_val``/``z_test`` (the same predictions as the model's one
logit, log-odds of P(disease)), ``TARGET`` (the chapter's target sensitivity) and ``PREVALENCE``
(the share of diseased eyes in a screening population).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from helpers.exercises.core import Chapter, Experiment, Mistake, Problem, Question, Wrong, coding, load_predictions, numeric

NOTEBOOK = "06_fundus_binary"
TARGET, PREVALENCE = 0.90, 0.05


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    val_pred, _ = load_predictions(NOTEBOOK, "val", profile)
    test_pred, _ = load_predictions(NOTEBOOK, "test", profile)
    public = {"val_pred": val_pred, "test_pred": test_pred, "z_val": _logit(val_pred), "z_test": _logit(test_pred),
              "TARGET": TARGET, "PREVALENCE": PREVALENCE}
    return public, {}


def _logit(frame: pd.DataFrame) -> np.ndarray:
    p = np.clip(frame["prob_disease"].to_numpy(dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _yp(frame: pd.DataFrame, column: str = "prob_disease") -> tuple[np.ndarray, np.ndarray]:
    return frame["y_true"].to_numpy(), frame[column].to_numpy(dtype=float)


def four_numbers(y: np.ndarray, called: np.ndarray) -> np.ndarray:
    """(sensitivity, specificity, PPV, NPV) of the calls ``called`` (True = disease)."""
    tp, fn = np.sum(called & (y == 1)), np.sum(~called & (y == 1))
    tn, fp = np.sum(~called & (y == 0)), np.sum(called & (y == 0))
    return np.array([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)])


def threshold_for(y: np.ndarray, p: np.ndarray, target: float, drop: bool = False) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (the chapter's cell)."""
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=drop)
    return float(thresholds[int(np.argmax(tpr >= target))])


def ppv(sens: float, spec: float, prevalence: float) -> float:
    """PPV at ``prevalence`` (Bayes)."""
    return sens * prevalence / (sens * prevalence + (1 - spec) * (1 - prevalence))


# --------------------------------------------------------------------------- q1: the test AUC

q1 = Problem(
    "q1", "auc",
    expected=lambda m: roc_auc_score(*_yp(m.test_pred)),
    mistakes=[Mistake("that is 1 - AUC: it ranks by P(normal); the positive class (1) is disease, score by prob_disease.",
                      value=lambda m: roc_auc_score(*_yp(m.test_pred, "prob_normal")),
                      example="auc = roc_auc_score(test_pred['y_true'], test_pred['prob_normal'])"),
              Mistake("that is the AUC of the 0/1 calls at threshold 0.5 (a single point): the ROC AUC ranks by the "
                      "probabilities themselves, over all thresholds.",
                      value=lambda m: roc_auc_score(m.test_pred["y_true"], m.test_pred["prob_disease"] >= 0.5),
                      example="auc = roc_auc_score(test_pred['y_true'], test_pred['prob_disease'] >= 0.5)")],
    alternatives=lambda m: {"the validation split's AUC (the question is about test)": roc_auc_score(*_yp(m.val_pred))},
    hint="`sklearn.metrics.roc_auc_score(y_true, score)` with the score of the positive class, `prob_disease`.",
    solution="""
    from sklearn.metrics import roc_auc_score
    auc = roc_auc_score(test_pred["y_true"], test_pred["prob_disease"])
    """,
)

# --------------------------------------------------------------------------- q2: four numbers at 0.5


def _four_at(frame: pd.DataFrame, threshold: float) -> np.ndarray:
    y, p = _yp(frame)
    return four_numbers(y, p >= threshold)


q2 = Problem(
    "q2", "four",
    expected=lambda m: _four_at(m.test_pred, 0.5),
    mistakes=[Mistake("the confusion matrix was read transposed (rows are the truth, columns the prediction): "
                      "that swaps sensitivity with PPV and specificity with NPV.",
                      value=lambda m: _four_at(m.test_pred, 0.5)[[2, 3, 0, 1]],
                      example="from sklearn.metrics import confusion_matrix\n"
                              "cm = confusion_matrix((test_pred['prob_disease'] >= 0.5).astype(int), test_pred['y_true'])\n"
                              "tn, fp, fn, tp = cm.ravel()\n"
                              "four = (tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn))"),
              Mistake("sensitivity and specificity are swapped: sensitivity is the share of DISEASED eyes called disease.",
                      value=lambda m: _four_at(m.test_pred, 0.5)[[1, 0, 2, 3]],
                      example="from sklearn.metrics import confusion_matrix\n"
                              "tn, fp, fn, tp = confusion_matrix(test_pred['y_true'], (test_pred['prob_disease'] >= 0.5).astype(int)).ravel()\n"
                              "four = (tn / (tn + fp), tp / (tp + fn), tp / (tp + fp), tn / (tn + fn))"),
              Mistake("PPV and NPV are swapped: PPV = TP / (TP + FP), the share of disease calls that are right.",
                      value=lambda m: _four_at(m.test_pred, 0.5)[[0, 1, 3, 2]],
                      example="from sklearn.metrics import confusion_matrix\n"
                              "tn, fp, fn, tp = confusion_matrix(test_pred['y_true'], (test_pred['prob_disease'] >= 0.5).astype(int)).ravel()\n"
                              "four = (tp / (tp + fn), tn / (tn + fp), tn / (tn + fn), tp / (tp + fp))")],
    alternatives=lambda m: {"the validation split's numbers (the question is about test)": _four_at(m.val_pred, 0.5)},
    hint="`tn, fp, fn, tp = confusion_matrix(y_true, prob_disease >= 0.5).ravel()`; sensitivity = tp / (tp + fn), "
         "specificity = tn / (tn + fp), PPV = tp / (tp + fp), NPV = tn / (tn + fn).",
    solution="""
    from sklearn.metrics import confusion_matrix
    tn, fp, fn, tp = confusion_matrix(test_pred["y_true"], (test_pred["prob_disease"] >= 0.5).astype(int)).ravel()
    four = (tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn))
    """,
)

# --------------------------------------------------------------------------- q3: the threshold for a target sensitivity

# (labels, scores, target): the validation predictions, and small cases where the choice is delicate:
# the target reached exactly, several positives at one false-positive rate, ties between scores
SMALL = [(np.array([0, 0, 1, 1, 0, 1, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]), 0.75),
         (np.array([0, 1, 1, 1, 1, 0, 1, 0, 0, 0]), np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2]), 0.6),
         (np.array([0, 1, 1, 0, 1, 0]), np.array([0.2, 0.7, 0.7, 0.7, 0.4, 0.1]), 0.5)]


def _threshold_cases(m: Any) -> list[tuple[np.ndarray, np.ndarray, float]]:
    y, p = _yp(m.val_pred)
    return [(y, p, m.TARGET), (y, p, 0.8), (y, p, 1.0), *SMALL]


def _run_threshold(fn: Any, m: Any) -> np.ndarray:
    out = []
    for y, p, target in _threshold_cases(m):
        t = numeric(fn(y.copy(), p.copy(), target))
        if t is None or t.size != 1:
            raise Wrong("return one threshold (a float), not an array.")
        out.append(float(t.reshape(())))
    return np.array(out)


def _sens(m: Any, thresholds: np.ndarray) -> np.ndarray:
    return np.array([np.mean(p[y == 1] >= t) for (y, p, _), t in zip(_threshold_cases(m), thresholds)])


def _describe_threshold(got: np.ndarray, ref: np.ndarray) -> str:
    i = int(np.argmax(~np.isclose(got, ref)))
    return f"the threshold of case {i + 1} of {len(ref)}: {got[i]:.4g} instead of {ref[i]:.4g}"


ROC_START = ("def threshold_for_sensitivity(y, p, target):\n"
             "    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)\n")
q3 = coding(
    "q3", "threshold_for_sensitivity",
    run=_run_threshold,
    mistakes=[
        Mistake("roc_curve dropped the intermediate points (drop_intermediate=True by default), so the first point "
                "left that reaches the target can have a lower threshold: pass drop_intermediate=False.",
                value=lambda m: _run_threshold(lambda y, p, t: threshold_for(y, p, t, drop=True), m),
                example="def threshold_for_sensitivity(y, p, target):\n    fpr, tpr, thresholds = roc_curve(y, p)\n"
                        "    return thresholds[np.argmax(tpr >= target)]"),
        Mistake("that is the LOWEST threshold reaching the target (the last point): it reaches it too, with more "
                "false alarms; thresholds fall along roc_curve, so take the first point with tpr >= target.",
                value=lambda m: _run_threshold(lambda y, p, t: float(roc_curve(y, p, drop_intermediate=False)[2][
                    roc_curve(y, p, drop_intermediate=False)[1] >= t][-1]), m),
                example=ROC_START + "    return thresholds[tpr >= target][-1]"),
        Mistake("tpr > target misses a threshold that reaches the target exactly: the target is reached when tpr >= target.",
                value=lambda m: _run_threshold(lambda y, p, t: float(roc_curve(y, p, drop_intermediate=False)[2][
                    np.argmax(roc_curve(y, p, drop_intermediate=False)[1] > t)]), m),
                example=ROC_START + "    return thresholds[np.argmax(tpr > target)]"),
        Mistake("that returns a position in roc_curve's arrays, not the threshold: index `thresholds` with it.",
                when=lambda got, m: np.all(np.isfinite(got)) and np.all(got == np.round(got)) and np.any(got > 1),
                example=ROC_START + "    return int(np.argmax(tpr >= target))"),
        Mistake("some of these thresholds do not reach the target: fewer than `target` of the positives have p >= the "
                "threshold. Compare the true-positive rate (tpr, the sensitivity) with the target, not 1 - fpr.",
                when=lambda got, m: np.any(_sens(m, got) < np.array([t for *_, t in _threshold_cases(m)]) - 1e-12),
                example=ROC_START + "    return thresholds[np.argmax(1 - fpr >= target)]"),
    ],
    describe=_describe_threshold,
    hint="`fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)` lists the thresholds from the highest to the "
         "lowest; `np.argmax(tpr >= target)` is the first point reaching the target; return `thresholds` there.",
    solution="""
    from sklearn.metrics import roc_curve

    def threshold_for_sensitivity(y, p, target):
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        return float(thresholds[np.argmax(tpr >= target)])
    """,
)

# --------------------------------------------------------------------------- q4, q5: the chapter's threshold, then test


def _chosen(m: Any) -> float:
    return threshold_for(*_yp(m.val_pred), m.TARGET)


q4 = Problem(
    "q4", "threshold",
    expected=_chosen,
    mistakes=[Mistake("that threshold was chosen on the TEST split: choose it on validation, then use test once to "
                      "see what it gives.", value=lambda m: threshold_for(*_yp(m.test_pred), m.TARGET),
                      example="threshold = threshold_for_sensitivity(test_pred['y_true'], test_pred['prob_disease'], TARGET)"),
              Mistake("that is a threshold on the logit (z_val), not on P(disease): the chapter's threshold is a "
                      "probability; convert with the sigmoid, or choose it on prob_disease.",
                      value=lambda m: threshold_for(m.val_pred["y_true"].to_numpy(), m.z_val, m.TARGET),
                      example="threshold = threshold_for_sensitivity(val_pred['y_true'], z_val, TARGET)"),
              Mistake("that is Youden's threshold (the largest sensitivity + specificity); the task asks for the highest "
                      "threshold reaching the target sensitivity.",
                      value=lambda m: _youden(m.val_pred),
                      example="from sklearn.metrics import roc_curve\n"
                              "fpr, tpr, th = roc_curve(val_pred['y_true'], val_pred['prob_disease'])\n"
                              "threshold = th[np.argmax(tpr - fpr)]")],
    hint="Your `threshold_for_sensitivity` of q3 (or the chapter's cell) on `val_pred['y_true']` and "
         "`val_pred['prob_disease']` with `TARGET`.",
    solution="threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)",
)


def _youden(frame: pd.DataFrame) -> float:
    fpr, tpr, th = roc_curve(*_yp(frame))
    return float(th[np.argmax(tpr - fpr)])


q5 = Problem(
    "q5", "test_sensitivity",
    expected=lambda m: _four_at(m.test_pred, _chosen(m))[0],
    mistakes=[Mistake("that is the sensitivity on VALIDATION, where the threshold was chosen (it reaches the target "
                      "there by construction); apply the threshold to the test split.",
                      value=lambda m: _four_at(m.val_pred, _chosen(m))[0],
                      example="threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)\n"
                              "test_sensitivity = np.mean(val_pred['prob_disease'][val_pred['y_true'] == 1] >= threshold)"),
              Mistake("that is the test sensitivity at 0.5: use the threshold chosen on validation (q4).",
                      value=lambda m: _four_at(m.test_pred, 0.5)[0],
                      example="test_sensitivity = np.mean(test_pred['prob_disease'][test_pred['y_true'] == 1] >= 0.5)"),
              Mistake("that is the specificity (healthy eyes called normal); sensitivity is the share of DISEASED test "
                      "eyes called disease.", value=lambda m: _four_at(m.test_pred, _chosen(m))[1],
                      example="threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)\n"
                              "test_sensitivity = np.mean(test_pred['prob_disease'][test_pred['y_true'] == 0] < threshold)")],
    hint="Among the test rows with `y_true == 1`, the share whose `prob_disease` is >= the threshold of q4.",
    solution="""
    threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)
    is_disease = test_pred["y_true"] == 1
    test_sensitivity = np.mean(test_pred["prob_disease"][is_disease] >= threshold)
    """,
)

# --------------------------------------------------------------------------- q6, q7: PPV at another prevalence

PPV_CASES = [(0.9, 0.8, 0.05), (0.9, 0.8, 0.5), (0.75, 0.95, 0.01), (0.99, 0.6, 0.3), (0.6, 0.99, 0.2)]


def _run_ppv(fn: Any, m: Any) -> np.ndarray:
    out = []
    for sens, spec, prev in PPV_CASES:
        v = numeric(fn(sens, spec, prev))
        if v is None or v.size != 1:
            raise Wrong("return one number, the PPV.")
        out.append(float(v.reshape(())))
    return np.array(out)


q6 = coding(
    "q6", "ppv_at",
    run=_run_ppv,
    mistakes=[
        Mistake("sensitivity and specificity are swapped: true positives are sensitivity x prevalence, false positives "
                "(1 - specificity) x (1 - prevalence).",
                value=lambda m: _run_ppv(lambda se, sp, pr: ppv(sp, se, pr), m),
                example="def ppv_at(sensitivity, specificity, prevalence):\n"
                        "    tp, fp = specificity * prevalence, (1 - sensitivity) * (1 - prevalence)\n    return tp / (tp + fp)"),
        Mistake("the false positives come from the HEALTHY eyes: weight (1 - specificity) by (1 - prevalence).",
                value=lambda m: _run_ppv(lambda se, sp, pr: se * pr / (se * pr + (1 - sp)), m),
                example="def ppv_at(sensitivity, specificity, prevalence):\n"
                        "    return sensitivity * prevalence / (sensitivity * prevalence + (1 - specificity))"),
        Mistake("that is the NPV (the share of normal calls that are right); PPV is the share of disease calls that are right.",
                value=lambda m: _run_ppv(lambda se, sp, pr: sp * (1 - pr) / (sp * (1 - pr) + (1 - se) * pr), m),
                example="def ppv_at(sensitivity, specificity, prevalence):\n"
                        "    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence\n    return tn / (tn + fn)"),
    ],
    describe=lambda got, ref: "the PPV of (sensitivity, specificity, prevalence) " + "; ".join(
        f"{c}: {g:.4f} instead of {r:.4f}" for c, g, r in zip(PPV_CASES, got, ref) if not np.isclose(g, r))[:300],
    hint="Per eye screened: true positives = sensitivity x prevalence, false positives = (1 - specificity) x "
         "(1 - prevalence); PPV = TP / (TP + FP).",
    solution="""
    def ppv_at(sensitivity, specificity, prevalence):
        tp = sensitivity * prevalence
        fp = (1 - specificity) * (1 - prevalence)
        return tp / (tp + fp)
    """,
)

q7 = Problem(
    "q7", "ppv_screening",
    expected=lambda m: ppv(*_four_at(m.test_pred, _chosen(m))[:2], m.PREVALENCE),
    mistakes=[Mistake("that is the PPV at the test set's own prevalence (its share of diseased eyes); recompute it for "
                      "PREVALENCE with Bayes (q6).", value=lambda m: _four_at(m.test_pred, _chosen(m))[2],
                      example="threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)\n"
                              "called = test_pred['prob_disease'] >= threshold\n"
                              "ppv_screening = np.mean(test_pred['y_true'][called] == 1)"),
              Mistake("those are the sensitivity and specificity at 0.5; use the threshold chosen on validation (q4).",
                      value=lambda m: ppv(*_four_at(m.test_pred, 0.5)[:2], m.PREVALENCE),
                      example="ppv_screening = ppv_at(four[0], four[1], PREVALENCE)")],
    alternatives=lambda m: {"the PPV from the VALIDATION sensitivity and specificity (use test's, measured once)":
                            ppv(*_four_at(m.val_pred, _chosen(m))[:2], m.PREVALENCE)},
    hint="The test sensitivity (q5) and specificity at the threshold of q4, then `ppv_at(sens, spec, PREVALENCE)` (q6).",
    solution="""
    threshold = threshold_for_sensitivity(val_pred['y_true'], val_pred['prob_disease'], TARGET)
    y, called = test_pred["y_true"].to_numpy(), test_pred["prob_disease"].to_numpy() >= threshold
    sens, spec = np.mean(called[y == 1]), np.mean(~called[y == 0])
    ppv_screening = ppv_at(sens, spec, PREVALENCE)
    """,
)

QUESTIONS = [
    Question("What does the ROC AUC measure, in one sentence about two eyes?",
             "The probability that a randomly chosen diseased eye gets a higher P(disease) than a randomly chosen "
             "healthy one: a property of the ranking, not of any threshold."),
    Question("A model has AUC 0.93 but catches only 60% of diseased eyes at threshold 0.5. What is wrong, "
             "and what is the fix?",
             "The threshold, not the ranking: the scores of diseased eyes sit below 0.5 while still ranking above "
             "the healthy ones. Choose a lower threshold on validation."),
    Question("Why is the threshold chosen on validation and not on test?",
             "A threshold fitted to the test images reaches the target there by construction, so test no longer "
             "says what the threshold does on new eyes."),
    Question("The threshold reached sensitivity 0.90 on validation and 0.86 on test. Is something broken?",
             "No: the threshold was fitted to one sample; on another sample of diseased eyes the share above it "
             "varies (with few diseased eyes, by several points)."),
    Question("Why take the HIGHEST threshold that reaches the target sensitivity?",
             "Every lower threshold reaches it too, but calls more healthy eyes diseased: the highest one has the "
             "fewest false alarms (the best specificity) among those meeting the target."),
    Question("Which of sensitivity, specificity, PPV and NPV change when the disease becomes rarer, the model "
             "unchanged?",
             "PPV (falls) and NPV (rises); sensitivity and specificity are rates within the diseased and the healthy "
             "eyes and do not depend on how many of each there are."),
    Question("With sensitivity 0.9 and specificity 0.9, what is the PPV at prevalence 1%? What does that mean for "
             "a screening programme?",
             "0.009 / (0.009 + 0.099) = about 8%: most positive calls are healthy eyes, so a positive call means "
             "'look again' (a second test or a grader), not a diagnosis."),
    Question("Why can a threshold chosen for a lower prevalence population not simply be taken from this test set's "
             "PPV?",
             "This test set's PPV reflects its own share of diseased eyes; in screening that share is far lower, so "
             "PPV must be recomputed from sensitivity and specificity with Bayes' rule."),
    Question("Why does the chapter keep the checkpoint with the best validation AUC, not the best accuracy at 0.5?",
             "The threshold is chosen afterwards: what training must deliver is a good ranking, which AUC measures "
             "independently of where 0.5 falls."),
    Question("Wilson intervals for sensitivity are much wider than for accuracy on the same test set. Why?",
             "Sensitivity is a proportion of the diseased eyes only, a fraction of the test set; fewer eyes, wider "
             "interval."),
    Question("Does reweighting the loss (pos_weight) change the AUC?",
             "Mostly it moves where the 0.5 threshold falls (the scores shift); the ranking, hence the AUC, changes "
             "little. A threshold chosen on validation can do the same job after training."),
]

EXPERIMENTS = [
    Experiment("The cost of a stricter target", "Run q4 and q5 with TARGET = 0.8, 0.9, 0.95 and 0.98 (or read the "
               "chapter's table of targets).",
               "How many false alarms each extra point of sensitivity costs on test, and from which target the "
               "test sensitivity starts to miss it."),
    Experiment("PPV against prevalence", "Plot ppv_at(sens, spec, prevalence) for prevalence from 0.005 to 0.5, at "
               "threshold 0.5 and at the chosen threshold.",
               "Where the PPV falls below 50%: the prevalence under which most positive calls are false alarms."),
    Experiment("Youden or a target", "Choose the threshold with Youden's J on validation (evaluate.choose_threshold, "
               "method='youden') and apply it to test.",
               "Where it lands relative to 0.5 and to the target threshold, and which of sensitivity or specificity "
               "it gives up."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6, q7], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
