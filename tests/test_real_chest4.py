"""The 4-class chest X-ray set: patient/source ids and grayscale input.

The real-data tests use `../shared/data/chest_xray_4class_224` (train/ only) and skip when it is
absent. Notebooks 01-03 run on these images in the reference run (assets/); the suite runs them in
the smoke profile (tests/test_notebooks.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import data, loading
from helpers.loading import to_grayscale



# ----------------------------------------------------------------------------- patient/source ids

@pytest.mark.parametrize("name, expected", [
    ("COVID-1004.jpg", "COVID-1004"),
    ("COVID-12.png", "COVID-12"),
    ("Tuberculosis-1.jpg", "Tuberculosis-001-010"),
    ("Tuberculosis-10.jpg", "Tuberculosis-001-010"),
    ("Tuberculosis-11.jpg", "Tuberculosis-011-020"),
    ("Tuberculosis-659.png", "Tuberculosis-651-660"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
])
def test_parse_patient_id_knows_the_4class_names(name, expected):
    assert data.parse_patient_id(name) == expected


def test_neighbouring_tb_numbers_share_a_group():
    ids = [data.parse_patient_id(f"Tuberculosis-{n}.jpg") for n in range(1, 101)]
    assert len(set(ids)) == 100 // data.TB_BLOCK
    # n and n + 1 are one group except across a block edge
    same = [a == b for a, b in zip(ids, ids[1:])]
    assert sum(same) == len(same) - (100 // data.TB_BLOCK - 1)


@pytest.mark.realdata
def test_real_4class_carving_never_splits_a_group(shared_chest4):
    splits = data.load_splits("chest4", shared_chest4, seed=7, check_images=False)
    frame = splits.frame
    assert splits.carved == ("val", "test")
    per_group = frame.groupby("patient_id")["split"].nunique()
    assert (per_group == 1).all(), per_group[per_group > 1].head()
    ids = frame.set_index(frame["path"].map(lambda p: Path(p).name))["patient_id"]
    tb = ids[ids.index.str.startswith("Tuberculosis-")]
    assert tb.str.fullmatch(r"Tuberculosis-\d{3}-\d{3}").all()
    assert tb.nunique() < len(tb) / 5  # grouped in blocks, not one id per file
    covid = ids[ids.index.str.startswith("COVID-")]
    assert (covid == covid.index.str.replace(r"\.\w+$", "", regex=True)).all()
    # The Guangzhou classes keep their patient ids, and every class reaches every split.
    assert ids[ids.index.str.startswith("person")].str.fullmatch(r"person\d+").all()
    counts = splits.counts()
    assert (counts.to_numpy() > 0).all(), counts


# ----------------------------------------------------------------------------- grayscale input

def test_to_grayscale_matches_pil_and_the_per_image_path(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    path = tmp_path / "tinted.png"
    Image.fromarray(pixels).save(path)
    gray = to_grayscale(torch.from_numpy(pixels).permute(2, 0, 1))
    expected = np.array(Image.fromarray(pixels).convert("L"))
    assert torch.equal(gray[0], torch.from_numpy(expected))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    frame = __import__("pandas").DataFrame({"path": [str(path)], "label": [0]})
    cached = loading.cache_images(frame, 16, grayscale=True)[0]
    pil_gray = Image.open(path).convert("RGB").resize((16, 16), Image.BILINEAR).convert("L")
    expected = torch.from_numpy(np.asarray(pil_gray)).float()  # PIL's ITU-R 601-2 luma
    assert (cached.float() - expected).abs().max() <= 1.0  # the same gray, up to rounding
    assert not torch.equal(loading.cache_images(frame, 16)[0], cached)  # colour really was removed
