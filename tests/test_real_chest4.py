"""The 4-class chest X-ray set: patient/source ids, grayscale input, and notebooks 01-03 on real images.

The real-data tests use `../shared/data/chest_xray_4class_224` (train/ only) and skip when it is
absent. The notebooks run in a reduced setting (smoke profile: 64 px, 1 epoch, random
initialisation, few images per class): they check what holds without ImageNet weights, not an
accuracy of the full recipe.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import torch
from PIL import Image

from conftest import ROOT
from helpers import data, loading
from helpers.loading import to_grayscale

NOTEBOOKS = {p.name[:2]: p for p in (ROOT / "notebooks").glob("0[123]_*.ipynb")}


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


# ----------------------------------------------------------------------------- notebooks 01-03

def _run(key: str, out_dir: Path, **parameters) -> tuple[dict, nbformat.NotebookNode]:
    notebook = NOTEBOOKS.get(key)
    if notebook is None:
        pytest.skip(f"notebook {key} not present")
    executed = out_dir / f"executed_{notebook.name}"
    papermill.execute_notebook(
        str(notebook), str(executed), cwd=str(notebook.parent), kernel_name="python3",
        progress_bar=False, parameters=dict(PROFILE="smoke", OUTPUT_DIR=str(out_dir), **parameters))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert not Path(metrics["data_dir"]).is_absolute()
    assert metrics["class_names"] == ["COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"]
    assert all((out_dir / name).stat().st_size > 1000 for name in metrics["figures"])
    return metrics, nbformat.read(executed, as_version=4)


def _markdown_output(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))


def _check_head_only(metrics: dict, nb: nbformat.NotebookNode) -> None:
    """What holds without ImageNet weights: the cache is exact, metrics are written, the text says so."""
    check = metrics["feature_cache_check"]
    assert check["allclose"] and check["max_abs_difference"] < 1e-3
    assert metrics["pretrained"] is False
    assert sum(metrics["test"]["per_class"][c]["support"] for c in metrics["class_names"]) == metrics["test"]["n"]
    assert all(metrics["test"]["per_class"][c]["support"] > 0 for c in metrics["class_names"])
    text = _markdown_output(nb)
    assert "frozen random backbone" in text and "not transfer learning" in text.lower()


@pytest.mark.notebook
@pytest.mark.realdata
def test_notebook_01_on_real_4class_images(shared_chest4, tmp_path):
    metrics, nb = _run("01", tmp_path, DATA_DIR=str(shared_chest4), MAX_PER_CLASS=12)
    _check_head_only(metrics, nb)


@pytest.mark.notebook
@pytest.mark.realdata
def test_notebook_02_on_real_4class_images(shared_chest4, tmp_path):
    """Every layer trained from random weights, on grayscale images, and the text says so.

    Per-class recall above chance is not asserted here: the smallest setting in which it showed
    (48 px, at most 150 images per class and split, 3 epochs, LR 1e-3, balanced sampler) trains for
    3-8 minutes on the shared 2-core machine; the committed cpu run in assets/ reports it.
    """
    metrics, nb = _run("02", tmp_path, DATA_DIR=str(shared_chest4), MAX_PER_CLASS=12, LR=1e-3,
                       BALANCED_SAMPLER=True)
    assert metrics["trainable_parameters"] == metrics["total_parameters"] > 20_000_000
    assert metrics["pretrained"] is False
    assert metrics["recipe"]["grayscale"] is True and metrics["recipe"]["balanced_sampler"] is True
    assert all(metrics["test"]["per_class"][c]["support"] > 0 for c in metrics["class_names"])
    assert "trained from scratch" in _markdown_output(nb)


@pytest.mark.notebook
@pytest.mark.realdata
def test_notebook_03_on_real_4class_images(shared_chest4, tmp_path):
    metrics, nb = _run("03", tmp_path, DATA_DIR=str(shared_chest4), MAX_PER_CLASS=12)
    _check_head_only(metrics, nb)
    probe = metrics["shortcut_probe"]
    text = _markdown_output(nb)
    border = probe["border_only"]
    assert 0.0 <= border["balanced_accuracy"] <= 1.0 and 0.0 <= border["source_balanced_accuracy"] <= 1.0
    assert f"balanced accuracy {border['balanced_accuracy']:.2f}" in text  # the conclusion prints what it scored
    assert set(probe["colour_cast"]["tinted_share"]) == set(metrics["class_names"])
