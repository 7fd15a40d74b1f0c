"""Exercises, Kaggle Learn's way: the notebook shows the task, a blank and ``qN.check()``; the
references, typical mistakes, hints and solutions live here, one module per chapter (``ch00`` ...).

    from helpers.exercises import ____, ch01
    ch01.setup(globals(), PROFILE, DATA_DIR, SEED)   # the snapshot; defines q1, q2, ... and the data
    n_trainable = ____
    q1.check()

The framework is in ``core`` (how to write a chapter: the docstrings of ``core.Problem``,
``core.coding`` and ``core.Chapter``); ``material`` makes the small real data and models. Importing
this package imports no chapter: ``from helpers.exercises import ch01`` loads one.
"""

from helpers.exercises.core import (
    ____,
    Blank,
    Chapter,
    Experiment,
    Mistake,
    Problem,
    Question,
    Wrong,
    coding,
    differs,
    is_blank,
    load_predictions,
    same,
)

__all__ = ["____", "Blank", "Chapter", "Experiment", "Mistake", "Problem", "Question", "Wrong", "coding",
           "differs", "is_blank", "load_predictions", "same"]
