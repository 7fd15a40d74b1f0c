"""helpers.export: ONNX export and int8 quantization give (nearly) the predictions of the model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from helpers import export, synthetic
from helpers.core import logits_to_probs
from helpers.loading import normalize


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.features(x))


def test_int8_static_quantization_gives_close_predictions(tmp_path):
    torch.manual_seed(0)
    model = _TinyNet().eval()
    images = synthetic.synthetic_landscapes(24, 32, seed=0)
    fp32 = export.export_onnx(model, tmp_path / "m.onnx", 32)
    int8 = export.quantize_onnx_static(fp32, tmp_path / "m_int8.onnx", images[:16])
    dyn = export.quantize_onnx_dynamic(fp32, tmp_path / "m_dyn.onnx")
    with torch.inference_mode():
        ref = logits_to_probs(model(normalize(images))).numpy()
    p32 = export.onnx_predict(export.onnx_session(fp32, 1), images)
    p8 = export.onnx_predict(export.onnx_session(int8, 1), images)
    pd8 = export.onnx_predict(export.onnx_session(dyn, 1), images)
    assert np.abs(p32 - ref).max() < 1e-4
    assert np.abs(p8 - ref).max() < 0.05 and np.abs(pd8 - ref).max() < 0.05
    assert not (tmp_path / "m_prep.onnx").exists()  # the pre-processed intermediate is cleaned up
    timing = export.measure_latency(lambda: None, n_runs=5, warmup=1)
    assert timing["runs"] == 5 and timing["median_ms"] >= 0
