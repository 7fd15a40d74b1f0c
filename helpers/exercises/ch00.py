"""Chapter 00, the data tour: patient ids, a grouped split, the leak of a random split, the imbalance.

The material: the pneumonia set (synthetic in the smoke profile), at most 30 images per class and
split; ``names`` (file names), ``frame`` (one row per image), ``splits``, a naive random split
(``naive_train``, ``naive_val``) and ``split_counts`` (images per split and class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import data
from helpers.exercises.core import Chapter, Experiment, Mistake, Problem, Question, Wrong, coding
from helpers.exercises.material import small_splits

NOTEBOOK = "00_data_tour"

# File names whose patient is known: (name, patient id). Each family of the pneumonia set, twice.
NAMES = [("person123_bacteria_456.jpeg", "person123"), ("person7_virus_13.jpeg", "person7"),
         ("IM-0115-0001.jpeg", "IM-0115"), ("IM-0003-0002.jpeg", "IM-0003"),
         ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"), ("NORMAL2-IM-1345-0002.jpeg", "NORMAL2-IM-1345")]


def prepare(profile: str, data_dir: Any, seed: int) -> tuple[dict, dict]:
    splits = small_splits("pneumonia", profile, data_dir, seed)
    frame = splits.frame.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    to_val = rng.random(len(frame)) < 0.2
    public = {"splits": splits, "frame": frame, "names": [Path(p).name for p in frame["path"]],
              "naive_train": frame[~to_val].reset_index(drop=True), "naive_val": frame[to_val].reset_index(drop=True),
              "split_counts": splits.counts()}
    return public, {}


# --------------------------------------------------------------------------- q1: parse a patient id


def _ids(fn: Any, m: Any) -> list[str]:
    return [str(fn(name)) for name, _ in NAMES]


def _which_names(got: list[str], ref: list[str]) -> str:
    return "the ids: " + "; ".join(f"{n!r} -> {g!r}, not {r!r}" for (n, _), g, r in zip(NAMES, got, ref) if g != r)


q1 = coding(
    "q1", "patient_id",
    run=_ids,
    expected=lambda m: [pid for _, pid in NAMES],
    mistakes=[
        Mistake("`IM-0115-0001.jpeg` became 'IM': cutting at the first '-' loses the number that names the patient; keep `IM-0115`.",
                when=lambda got, m: got[2] == "IM",
                example="def patient_id(name):\n    return name.replace('_', '-').split('-')[0]"),
        Mistake("the NORMAL2- prefix is part of the id: `NORMAL2-IM-0007` and `IM-0007` are different patients.",
                when=lambda got, m: got[4] == "IM-0007",
                example="import re\ndef patient_id(name):\n    m = re.search(r'(person\\d+)_', name) or re.search(r'(IM-\\d+)-', name)\n    return m.group(1)"),
        Mistake("that keeps the image number (or the extension): one patient has several images, so the id stops before them.",
                when=lambda got, m: got[2].startswith("IM-0115-") or got[0].startswith("person123_"),
                example="def patient_id(name):\n    return name.rsplit('-', 1)[0] if 'IM-' in name else name.rsplit('_', 1)[0]"),
    ],
    hint="Two families: `person<digits>_...` and `[NORMAL2-]IM-<digits>-<image>`. "
         "`re.match(r'^(person\\d+)_', name)` or `re.match(r'^((?:NORMAL\\d*-)?IM-\\d+)-', name)`.",
    solution=r'''
    import re

    def patient_id(name):
        m = re.match(r"^(person\d+)_", name) or re.match(r"^((?:NORMAL\d*-)?IM-\d+)-", name)
        return m.group(1) if m else Path(name).stem
    ''',
    compare=lambda got, ref: got == ref,
    describe=_which_names,
)


# --------------------------------------------------------------------------- q2: count patients

q2 = Problem(
    "q2", "n_patients",
    expected=lambda m: len({data.parse_patient_id(n) for n in m.names}),
    mistakes=[Mistake("that is the number of images: several images belong to one patient, so count distinct ids.",
                      value=lambda m: len(m.names), example="n_patients = len(names)"),
              Mistake("that is the number of classes or splits, not of patients: put every name's id in a set.",
                      when=lambda got, m: float(got) <= 3, example="n_patients = 2")],
    hint="`len({patient_id(n) for n in names})`, with your function of q1.",
    solution="n_patients = len({patient_id(n) for n in names})",
)

# --------------------------------------------------------------------------- q3: the leak of a random split


def _leaked(m: Any) -> int:
    return len(set(m.naive_train["patient_id"]) & set(m.naive_val["patient_id"]))


q3 = Problem(
    "q3", "n_leaked",
    expected=_leaked,
    mistakes=[Mistake("that counts validation images whose patient is in train; the question asks for patients.",
                      value=lambda m: int(m.naive_val["patient_id"].isin(set(m.naive_train["patient_id"])).sum()),
                      example="n_leaked = int(naive_val['patient_id'].isin(set(naive_train['patient_id'])).sum())"),
              Mistake("that is every validation patient, not only those who also have images in train.",
                      value=lambda m: m.naive_val["patient_id"].nunique(), example="n_leaked = naive_val['patient_id'].nunique()"),
              Mistake("0 holds for the course's patient-grouped split, not for this random one: intersect the two sets of ids.",
                      value=lambda m: 0, example="n_leaked = 0")],
    hint="A set of the patient ids of each side, then the size of their intersection (`&`).",
    solution='n_leaked = len(set(naive_train["patient_id"]) & set(naive_val["patient_id"]))',
)

# --------------------------------------------------------------------------- q4: a grouped split


def _run_split(fn: Any, m: Any) -> dict[str, Any]:
    frame = m.frame[["path", "patient_id", "class_name", "label"]].copy()
    parts = fn(frame.copy(), 0.25, 0)
    if not (isinstance(parts, tuple) and len(parts) == 2 and all(isinstance(p, pd.DataFrame) for p in parts)):
        raise Wrong("return two DataFrames: (train_part, val_part).")
    train, val = parts
    again = fn(frame.copy(), 0.25, 0)
    paths_t, paths_v = list(train["path"]), list(val["path"])
    both = set(train["patient_id"]) & set(val["patient_id"])
    n_patients = frame["patient_id"].nunique()
    return {"rows": sorted(paths_t + paths_v) == sorted(frame["path"]),
            "leaked": len(both), "val_share": val["patient_id"].nunique() / n_patients,
            "same_again": list(again[1]["path"]) == paths_v, "val_empty": len(val) == 0}


def _split_ok(got: dict, ref: dict) -> bool:
    return (got["rows"] and got["leaked"] == 0 and got["same_again"] and not got["val_empty"]
            and abs(got["val_share"] - 0.25) <= 0.1)


q4 = coding(
    "q4", "grouped_split",
    run=_run_split,
    compare=_split_ok,
    mistakes=[
        Mistake("patients have images on both sides: that splits images. Draw the validation *patients*, "
                "then take every image of theirs (`frame['patient_id'].isin(val_ids)`).",
                when=lambda got, m: got["leaked"] > 0,
                example="def grouped_split(frame, val_fraction, seed):\n    val = frame.sample(frac=val_fraction, random_state=seed)\n"
                        "    return frame.drop(val.index), val"),
        Mistake("images are lost or counted twice: every row of `frame` must be in exactly one part.",
                when=lambda got, m: not got["rows"],
                example="def grouped_split(frame, val_fraction, seed):\n    ids = frame['patient_id'].unique()\n"
                        "    val_ids = ids[: int(len(ids) * val_fraction)]\n    v = frame['patient_id'].isin(val_ids)\n"
                        "    return frame[~v], frame[v].iloc[: len(frame[v]) // 2]"),
        Mistake("the validation part holds about 1 - val_fraction of the patients: the parts are swapped.",
                when=lambda got, m: abs(got["val_share"] - 0.75) <= 0.1,
                example="def grouped_split(frame, val_fraction, seed):\n    rng = np.random.default_rng(seed)\n"
                        "    ids = rng.permutation(frame['patient_id'].unique())\n    v = frame['patient_id'].isin(ids[: round(len(ids) * val_fraction)])\n"
                        "    return frame[v], frame[~v]"),
        Mistake("two calls with the same seed give different splits: draw with `np.random.default_rng(seed)`.",
                when=lambda got, m: not got["same_again"],
                example="def grouped_split(frame, val_fraction, seed):\n    ids = np.random.permutation(frame['patient_id'].unique())\n"
                        "    v = frame['patient_id'].isin(ids[: round(len(ids) * val_fraction)])\n    return frame[~v], frame[v]"),
    ],
    hint="`ids = frame['patient_id'].unique()`; shuffle them with `np.random.default_rng(seed).permutation`; "
         "the first `round(len(ids) * val_fraction)` are validation; `v = frame['patient_id'].isin(val_ids)`.",
    solution="""
    def grouped_split(frame, val_fraction, seed):
        rng = np.random.default_rng(seed)
        ids = rng.permutation(frame["patient_id"].unique())
        val_ids = set(ids[: round(len(ids) * val_fraction)])
        is_val = frame["patient_id"].isin(val_ids)
        return frame[~is_val], frame[is_val]
    """,
)

# --------------------------------------------------------------------------- q5: the imbalance


def _ratio(frame: pd.DataFrame) -> float:
    counts = frame["class_name"].value_counts()
    return float(counts.max() / counts.min())


q5 = Problem(
    "q5", "imbalance",
    expected=lambda m: _ratio(m.splits.train),
    mistakes=[Mistake("a ratio below 1: divide the largest class by the smallest.",
                      when=lambda got, m: 0 < float(got) < 1,
                      example="c = splits.train['class_name'].value_counts(); imbalance = c.min() / c.max()")],
    alternatives=lambda m: {"the ratio over all splits together (the question is about train)": _ratio(m.frame),
                            "the validation split's ratio": _ratio(m.splits.val),
                            "the test split's ratio": _ratio(m.splits.test)},
    hint="`splits.train['class_name'].value_counts()` gives the images per class.",
    solution="""
    counts = splits.train["class_name"].value_counts()
    imbalance = counts.max() / counts.min()
    """,
)

# --------------------------------------------------------------------------- q6: read the figure


def _larger(m: Any) -> str:
    c = m.split_counts
    return ("A" if (c["PNEUMONIA"] > c["NORMAL"]).all() else "B" if (c["NORMAL"] > c["PNEUMONIA"]).all() else "C")


q6 = Problem(
    "q6", "larger_class",
    expected=_larger,
    choices={"A": "PNEUMONIA larger in every split", "B": "NORMAL larger in every split", "C": "it changes"},
    mistakes=[Mistake("not what the bars show: compare the two bars of each split once more.",
                      when=lambda got, m: True, example="larger_class = 'B'")],
    hint="For each split (train, val, test), compare the NORMAL bar with the PNEUMONIA bar.",
    solution="""
    pneumonia_larger = split_counts["PNEUMONIA"] > split_counts["NORMAL"]   # one True/False per split
    normal_larger = split_counts["NORMAL"] > split_counts["PNEUMONIA"]
    larger_class = "A" if pneumonia_larger.all() else "B" if normal_larger.all() else "C"
    """,
)

QUESTIONS = [
    Question("Why does a split by image leak information when a patient has several images?",
             "Images of one patient share anatomy, positioning and scanner: a model can recognise the patient and "
             "score well on validation images of patients it trained on, which says nothing about new patients."),
    Question("Why is the official 16-image validation set of the pneumonia data not used to choose models?",
             "One image moves its accuracy by about 6 points: choices made on it follow noise. The course carves a "
             "patient-grouped validation split from train instead."),
    Question("What does a naive recursive scan of the pneumonia archive get wrong?",
             "The archive holds a nested duplicate chest_xray/chest_xray/ (and __MACOSX/): every image is counted twice, "
             "and copies can land in different splits."),
    Question("The train split has about three pneumonia images per normal one. What accuracy does a model that always "
             "says PNEUMONIA reach, and why is that a problem for reading accuracy?",
             "About 75% on train-like data (the share of the majority class): accuracy rewards the majority, so compare "
             "with that baseline or use balanced accuracy / AUC."),
    Question("Why keep the test split untouched until the end?",
             "Every decision made while looking at test results (epoch, threshold, model) fits the test set; its "
             "score then overestimates what happens on new data."),
    Question("How can image sizes and tints differ between classes, and why does that matter?",
             "If the classes come from different sources they can differ in size, borders or colour; a network can "
             "learn these shortcuts instead of the disease (chapter 00's shortcut probe shows it)."),
    Question("What is a patient id in the file name `NORMAL2-IM-0007-0001.jpeg`, and why not `IM-0007`?",
             "`NORMAL2-IM-0007`: the NORMAL2 series numbers its patients separately, so IM-0007 and NORMAL2-IM-0007 "
             "are different people."),
    Question("Why is a stratified split (same class mix in each part) also useful, besides grouping?",
             "With few images, a random split can give a validation set with very few of one class, whose metrics "
             "then rest on a handful of images."),
    Question("What does the 4-class set's folder name TURBERCULOSIS tell you about reading datasets?",
             "Class names come from folder names as they are: map them explicitly (aliases) rather than trusting spelling."),
    Question("Why look at sample images of each class before training anything?",
             "To see labels, orientation, text markers, borders and sizes: problems a model will exploit or suffer "
             "from, and which metrics will not reveal."),
]

EXPERIMENTS = [
    Experiment("Leak on purpose", "Split the real pneumonia train set by image (random rows) and by patient, train "
               "the same small model (chapter 01's head) on each, and evaluate both on the grouped validation split.",
               "How much higher the by-image validation score is, and whether the test score follows it (it should not)."),
    Experiment("Images per patient", "Plot how many images each patient has, per class.",
               "Whether the counts differ between NORMAL and PNEUMONIA; a class with many images per patient leaks more."),
    Experiment("A shortcut probe", "Train a classifier on image size and mean brightness alone (no pixels).",
               "Any accuracy clearly above the majority share means the classes differ in something other than disease."),
]

CHAPTER = Chapter(NOTEBOOK, prepare, [q1, q2, q3, q4, q5, q6], QUESTIONS, EXPERIMENTS)
setup, questions, experiments = CHAPTER.setup, CHAPTER.questions, CHAPTER.experiments
