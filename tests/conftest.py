"""Shared fixtures: synthetic datasets (generated once per session) and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on 2 shared cores, spinning threads of the test
# process and of each notebook kernel (which inherits this) made runs 2-3x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Two pytest-xdist workers share the 2 cores: one thread each, for them and the kernels they start.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")
torch.set_num_threads(1 if WORKERS > 1 else 2)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_PNEUMONIA = SHARED_DATA / "chest_xray_pneumonia_224"
SHARED_CHEST4 = SHARED_DATA / "chest_xray_4class_224"
SHARED_FUNDUS = SHARED_DATA / "fundus_dr_224"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Factory: the root folder of a synthetic dataset, written once per test session."""
    from helpers.synthetic import make_synthetic_dataset

    base = tmp_path_factory.mktemp("synthetic")
    return lambda name, seed=0: make_synthetic_dataset(name, base / f"{name}-{seed}", seed=seed)


def _shared(folder: Path) -> Path:
    if not (folder / "train").is_dir():
        pytest.skip(f"real data not present at {folder}")
    return folder


@pytest.fixture(scope="session")
def shared_pneumonia() -> Path:
    """The real Kaggle pneumonia training split beside the project; skip when absent."""
    return _shared(SHARED_PNEUMONIA)


@pytest.fixture(scope="session")
def shared_chest4() -> Path:
    """The real 4-class chest X-ray set (train/ only) beside the project; skip when absent."""
    return _shared(SHARED_CHEST4)


@pytest.fixture(scope="session")
def shared_fundus() -> Path:
    """The real fundus DR set (train/ and valid/) beside the project; skip when absent."""
    return _shared(SHARED_FUNDUS)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """(model, path) of a tiny app model file (test_bundle.py, test_serve.py): MobileNetV2 at 32 px,
    random weights, a Mahalanobis guard whose threshold (-1e9) accepts everything."""
    import numpy as np

    from app.bundle import save_bundle
    from helpers.models import build_model
    from helpers.ood import fit_mahalanobis

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32).eval()
    feats = np.random.default_rng(0).normal(size=(20, 1280))
    params = fit_mahalanobis(feats, np.repeat([0, 1], 10))
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    save_bundle(path, model, class_names=["NORMAL", "PNEUMONIA"], image_size=32, profile="smoke",
                threshold=0.5, synthetic_data=True,
                ood={"method": "mahalanobis", "threshold": -1e9, "keep_fraction": 0.95, "params": params},
                metrics={"test_auc": np.float64(0.5)})
    return model, path


# Offline ImageNet MobileNetV2: TensorFlow Lite file beside the project ($COURSE_SHARED_WEIGHTS moves it).
SHARED_WEIGHTS = Path(os.environ.get("COURSE_SHARED_WEIGHTS", ROOT.parent / "shared" / "weights"))
SHARED_TFLITE = SHARED_WEIGHTS / "mobilenet_v2_1.0_224_quant.tflite"


@pytest.fixture(scope="session")
def converted_weights(tmp_path_factory) -> Path:
    """tools/convert_tflite_weights.py run once per session into a temporary folder: the weights
    file's path (calibrated on 120 of the shared pneumonia X-rays when present). Skips without the .tflite."""
    if not SHARED_TFLITE.is_file():
        pytest.skip(f"offline weights not present at {SHARED_TFLITE}")
    from tools.convert_tflite_weights import convert

    out = tmp_path_factory.mktemp("weights") / "mobilenet_v2_imagenet.pt"
    xrays = SHARED_WEIGHTS.parent / "data" / "chest_xray_pneumonia_224" / "train"
    convert(SHARED_TFLITE, out, calibration_dir=xrays if xrays.is_dir() else None, n_images=120)
    return out


@pytest.fixture()
def offline_weights_dir(converted_weights, monkeypatch) -> Path:
    """$COURSE_WEIGHTS_DIR pointing at the converted file's folder, for this test."""
    monkeypatch.setenv("COURSE_WEIGHTS_DIR", str(converted_weights.parent))
    return converted_weights.parent
