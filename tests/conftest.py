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
