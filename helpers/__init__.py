"""Plumbing shared by the course notebooks: data, models, training, evaluation and plots."""

__version__ = "0.1.0"
