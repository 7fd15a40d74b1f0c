"""Notebook 08's lesson: export to ONNX, int8 quantization with ONNX Runtime, size and latency."""

from __future__ import annotations

import copy
import importlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.core import as_normalization, logits_to_probs
from helpers.loading import normalize


def _from_deploy_extra(module: str, *names: str) -> Any:
    """`from module import names` (or the module) of ONNX / ONNX Runtime, saying how to install them."""
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f'{error}: notebook 08 needs ONNX and ONNX Runtime. Run `pip install ".[deploy]"` in the '
                          "course folder, or `pip install onnx onnxruntime` (`uv sync` installs them).") from error
    return [getattr(imported, name) for name in names] if names else imported


def export_onnx(model: nn.Module, path: str | Path, image_size: int, opset: int = 17) -> Path:
    """Export `model` (CPU copy, eval mode) to ONNX ("input" (N, 3, S, S) -> "logits", its normalisation in the
    metadata) with the TorchScript exporter (the dynamo one needs onnxscript)."""
    _from_deploy_extra("onnx")  # torch's exporter needs it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the TorchScript exporter
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), (torch.zeros(1, 3, image_size, image_size),), str(path),
                          dynamo=False, opset_version=opset, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    _write_normalization(path, as_normalization(model))
    return path


def _write_normalization(path: Path, normalization: tuple) -> None:
    """Store (mean, std) in an ONNX file's metadata_props."""
    graph = (onnx := _from_deploy_extra("onnx")).load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    props.update(input_mean=json.dumps(list(normalization[0])), input_std=json.dumps(list(normalization[1])))
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(path))


def onnx_normalization(source: Any) -> tuple:
    """(mean, std) stored by `export_onnx` in an ONNX file (a path) or session; ImageNet's when absent."""
    props = ({p.key: p.value for p in _from_deploy_extra("onnx").load(str(source)).metadata_props}
             if isinstance(source, (str, Path)) else source.get_modelmeta().custom_metadata_map)
    stored = (json.loads(props["input_mean"]), json.loads(props["input_std"])) if "input_mean" in props else None
    return as_normalization(stored)


def _quantize(src: Path, dst: Path, quantize: Callable[[str, str], Any], normalization: tuple) -> Path:
    """`quantize(prep, dst)` of ONNX Runtime's recommended pre-processing `prep` of `src` (shape inference, graph
    optimisation) with its warnings silenced; `dst` keeps `normalization`."""
    (quant_pre_process,) = _from_deploy_extra("onnxruntime.quantization.shape_inference", "quant_pre_process")
    prep = src.with_name(src.stem + "_prep.onnx")
    quant_pre_process(str(src), str(prep))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize(str(prep), str(dst))
    finally:
        prep.unlink(missing_ok=True)
    _write_normalization(dst, normalization)
    return dst


def quantize_onnx_static(src: str | Path, dst: str | Path, calibration_images_u8: torch.Tensor) -> Path:
    """Static int8 quantization (QDQ, MinMax ranges from the calibration images normalised as `export_onnx` stored
    in `src`, per-channel weight scales)."""
    CalibrationMethod, QuantFormat, QuantType, quantize_static = _from_deploy_extra(
        "onnxruntime.quantization", "CalibrationMethod", "QuantFormat", "QuantType", "quantize_static")
    normalization = onnx_normalization(src)
    batches = iter([{"input": normalize(x[None], normalization=normalization).numpy()} for x in calibration_images_u8])
    reader = SimpleNamespace(get_next=partial(next, batches, None))  # ONNX Runtime's data reader: None when done
    return _quantize(Path(src), Path(dst), lambda prep, out: quantize_static(
        prep, out, reader, quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax), normalization)


def quantize_onnx_dynamic(src: str | Path, dst: str | Path) -> Path:
    """Post-training dynamic int8 quantization: int8 weights, activations quantized on the fly."""
    QuantType, quantize_dynamic = _from_deploy_extra("onnxruntime.quantization", "QuantType", "quantize_dynamic")
    return _quantize(Path(src), Path(dst), lambda prep, out: quantize_dynamic(prep, out, weight_type=QuantType.QInt8),
                     onnx_normalization(src))


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session (`threads`: default torch's) without thread spinning (which would burn CPU)."""
    ort = _from_deploy_extra("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any, images_u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) of uint8 images (N, 3, S, S), normalised as the file's metadata says."""
    normalization = onnx_normalization(session)
    outs = []
    for start in range(0, len(images_u8), batch_size):
        x = normalize(images_u8[start:start + batch_size], normalization=normalization).numpy()
        outs.append(torch.from_numpy(session.run(["logits"], {"input": x})[0]))
    return logits_to_probs(torch.cat(outs)).numpy().astype(np.float64)


def measure_latency(run_once: Callable[[], Any], n_runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median and 90th percentile wall time (ms) of `run_once()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(n_runs):
        start = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": n_runs}


def file_size_mb(path: str | Path) -> float:
    """Size of a file in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6


def linear_parameter_share(model: nn.Module) -> float:
    """Share of the parameters that sit in nn.Linear layers (what dynamic Linear quantization touches)."""
    total = sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return linear / max(total, 1)
