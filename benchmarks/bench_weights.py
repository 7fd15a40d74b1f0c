"""The offline ImageNet MobileNetV2: conversion time, load time and agreement with TensorFlow.

    uv run python benchmarks/bench_weights.py
    uv run python benchmarks/bench_weights.py --tflite path/to/mobilenet_v2_1.0_224_quant.tflite

Converts the .tflite file with tools/convert_tflite_weights.py (default BatchNorm calibration: real
training X-rays from ../shared/data) into a temporary folder (goal: <= 120 s), loads the weights file
through build_model(weights="imagenet") with $COURSE_WEIGHTS_DIR pointing there (goal: <= 2 s), and
prints the agreement of the converted network with TensorFlow's interpreter (ai-edge-litert) on
scikit-image's sample photos and on chest X-rays: mean per-image logit correlation (goal >= 0.99)
and top-1 agreement (goal >= 85%). No assertions: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tools/ is not installed

from helpers import models  # noqa: E402
from tools import convert_tflite_weights as tool  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflite", type=Path, default=tool.DEFAULT_TFLITE)
    parser.add_argument("--calibration-dir", type=Path, default=None, help="default: the tool's")
    parser.add_argument("--xrays", type=Path, default=tool.DEFAULT_CALIBRATION.parent / "test")
    parser.add_argument("--xrays-per-class", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def _offline_only(arch: str):
    raise urllib.error.URLError("benchmark: torchvision's weight server is not asked")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.tflite.is_file():
        raise SystemExit(f"No {args.tflite}: pass --tflite.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"weights: {args.tflite}\ntorch threads: {torch.get_num_threads()}, load average before: {load:.1f}")
    models._load_pretrained = _offline_only  # time the offline path, not a download attempt
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / models.OFFLINE_FILES["mobilenet_v2"]
        start = time.perf_counter()
        info = tool.convert(args.tflite, out, args.calibration_dir)
        print(f"conversion with BatchNorm restoration: {time.perf_counter() - start:.1f} s (goal <= 120 s); "
              f"calibration: {info['calibration']}")
        if info["agreement"]:
            a = info["agreement"]
            print(f"  agreement measured at conversion ({a['on']}): "
                  f"correlation {a['logit_correlation']:.4f}, top-1 {a['top1_agreement']:.1%}")
        os.environ[models.WEIGHTS_DIR_ENV] = folder
        start = time.perf_counter()
        model = models.build_model("mobilenet_v2", 2, weights="imagenet")
        print(f"load (build_model, weights='imagenet', offline): {time.perf_counter() - start:.2f} s (goal <= 2 s); "
              f"source {model.weights_info['source']}")
        reference, _ = models.load_weights_file("mobilenet_v2", out)  # with its ImageNet head
    _agreement_report(reference, args)


def _agreement_report(model: torch.nn.Module, args: argparse.Namespace) -> None:
    sets = {"natural images (scikit-image samples)": tool.natural_images(224)}
    if args.xrays.is_dir():
        files = [f for c in sorted(p for p in args.xrays.iterdir() if p.is_dir())
                 for f in sorted(c.glob("*.jp*g"))[:args.xrays_per_class]]
        sets[f"chest X-rays ({args.xrays.parent.name}/{args.xrays.name})"] = tool.read_images(files, 224)
    for name, u8 in sets.items():
        start = time.perf_counter()
        result = tool.agreement(tool.torch_logits(model, u8), tool.interpreter_logits(args.tflite, u8))
        print(f"{name}: {result['images']} images, logit correlation mean {result['logit_correlation']:.4f} "
              f"(min {result['min_logit_correlation']:.4f}), top-1 agreement {result['top1_agreement']:.1%} "
              f"({result['top1_agreement_ties']:.1%} counting the interpreter's 8-bit ties) "
              f"[{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
