"""The offline ImageNet MobileNetV2: conversion time, cached load time and agreement with TensorFlow.

    uv run python benchmarks/bench_weights.py
    uv run python benchmarks/bench_weights.py --tflite path/to/mobilenet_v2_1.0_224_quant.tflite

Converts the .tflite file with the course's default BatchNorm calibration (real training X-rays
from ../shared/data) into a fresh cache folder (goal: <= 60 s), loads it again from the cache
through build_model (goal: <= 2 s), and prints the agreement of the converted network with
TensorFlow's interpreter (ai-edge-litert) on scikit-image's sample photos and on chest X-rays:
mean per-image logit correlation (goal >= 0.99) and top-1 agreement (goal >= 85%).
No assertions: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import urllib.error
from pathlib import Path

import torch

from helpers import models, offline_weights, tflite_weights
from helpers.runs import project_root


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflite", type=Path, default=None, help="default: the first offline copy found")
    parser.add_argument("--xrays", type=Path, default=project_root().parent / "shared" / "data"
                        / "chest_xray_pneumonia_224" / "test")
    parser.add_argument("--xrays-per-class", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def _offline_only(arch: str):
    raise urllib.error.URLError("benchmark: torchvision's weight server is not asked")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.tflite or offline_weights.find_offline("mobilenet_v2")
    if path is None:
        raise SystemExit("No mobilenet_v2_1.0_224_quant.tflite found (COURSE_WEIGHTS_DIR, data/weights/, "
                         "../shared/weights): pass --tflite.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"weights: {path}\ntorch threads: {torch.get_num_threads()}, load average before: {load:.1f}")
    models._load_pretrained = _offline_only  # time the offline path, not a download attempt
    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home
        start = time.perf_counter()
        model = models.build_model("mobilenet_v2", 2, weights=path)
        convert_s = time.perf_counter() - start
        info = model.weights_info
        print(f"conversion with BatchNorm restoration: {convert_s:.1f} s (goal <= 60 s); cache {info['cache']}; "
              f"calibration: {info['calibration']} ({info['calibration_images']} images)")
        if info["agreement"]:
            a = info["agreement"]
            print(f"  agreement measured at conversion ({a['images']} calibration images): "
                  f"correlation {a['logit_correlation']:.4f}, top-1 {a['top1_agreement']:.1%}")
        start = time.perf_counter()
        again = models.build_model("mobilenet_v2", 2, weights=path)
        print(f"cached load (build_model): {time.perf_counter() - start:.2f} s (goal <= 2 s); "
              f"cache {again.weights_info['cache']}")
        cached = next((Path(home) / "hub" / "converted").glob("*.pt"))
        reference = tflite_weights.model_from_payload(tflite_weights.load_converted(cached))  # ImageNet head
    _agreement_report(reference, path, args)


def _agreement_report(model: torch.nn.Module, path: Path, args: argparse.Namespace) -> None:
    sets = {"natural images (scikit-image samples)": offline_weights.natural_images(224)}
    if args.xrays.is_dir():
        sets[f"chest X-rays ({args.xrays.parent.name}/{args.xrays.name})"] = offline_weights.xray_images(
            args.xrays, per_class=args.xrays_per_class)
    for name, u8 in sets.items():
        start = time.perf_counter()
        result = tflite_weights.agreement(tflite_weights.torch_logits(model, u8),
                                          tflite_weights.interpreter_logits(path, u8))
        print(f"{name}: {result['images']} images, logit correlation mean {result['logit_correlation']:.4f} "
              f"(min {result['min_logit_correlation']:.4f}), top-1 agreement {result['top1_agreement']:.1%} "
              f"({result['top1_agreement_ties']:.1%} counting the interpreter's 8-bit ties) "
              f"[{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
