"""Shared fixtures: synthetic datasets (generated once per session) and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on 2 shared cores, spinning threads of the test
# process and of each notebook kernel (which inherits this) made runs 2-3x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
SHARED_PNEUMONIA = ROOT.parent / "shared" / "data" / "chest_xray_pneumonia_224"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Factory: the root folder of a synthetic dataset, written once per test session."""
    from helpers.synthetic import make_synthetic_dataset

    base = tmp_path_factory.mktemp("synthetic")
    return lambda name, seed=0: make_synthetic_dataset(name, base / f"{name}-{seed}", seed=seed)


@pytest.fixture(scope="session")
def shared_pneumonia() -> Path:
    """The real Kaggle pneumonia training split beside the project; skip when absent."""
    if not (SHARED_PNEUMONIA / "train").is_dir():
        pytest.skip(f"real data not present at {SHARED_PNEUMONIA}")
    return SHARED_PNEUMONIA
