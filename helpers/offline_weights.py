"""Moved: offline ImageNet weights are loaded by `helpers.models` (converted once by
tools/convert_tflite_weights.py). This name stays only for helpers/train.py's import until
that module stops checking for folded BatchNorm; then delete this file."""

from helpers.models import batchnorm_is_folded

__all__ = ["batchnorm_is_folded"]
