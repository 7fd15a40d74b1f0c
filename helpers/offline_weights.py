"""Moved: offline ImageNet weights are loaded by `helpers.models` from a file converted once by
tools/convert_tflite_weights.py, whose BatchNorm statistics are always restored. This module stays
only for helpers/train.py's check until that check goes; then delete this file."""

from torch import nn


def batchnorm_is_folded(model: nn.Module) -> bool:
    """Does the model hold converted weights whose BatchNorm statistics are still folded away?"""
    return (getattr(model, "weights_info", None) or {}).get("batchnorm") == "folded"
