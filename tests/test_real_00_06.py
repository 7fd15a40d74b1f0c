"""Notebooks 00 (data tour) and 06 (fundus) on the real shared data, in a reduced setting.

Each notebook runs once (smoke-sized: 64 px, 1 epoch, a capped number of images per class) on the
folders in ../shared/data and must show what its lesson claims: 00 measures the tuberculosis
colour cast and a shortcut probe that beats chance without pathology, and prints the numbers it
saves; 06 chooses a threshold on the real validation split that reaches the target sensitivity
there, with a test split carved from train by APTOS id. Skipped when ../shared is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from conftest import ROOT

pytestmark = pytest.mark.realdata
NOTEBOOKS = ROOT / "notebooks"


def _run(stem: str, out_dir: Path, **parameters) -> tuple[dict, str]:
    """Execute a notebook into out_dir; return its metrics.json and all its text output."""
    executed = out_dir / f"executed_{stem}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{stem}.ipynb"), str(executed), cwd=str(NOTEBOOKS), kernel_name="python3",
        progress_bar=False, parameters=dict(PROFILE="smoke", OUTPUT_DIR=str(out_dir), **parameters))
    texts = []
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(output.get("data", {}).get("text/markdown", ""))
    return json.loads((out_dir / "metrics.json").read_text()), "\n".join(texts)


def test_fundus_splits_keep_valid_and_carve_test_by_aptos_id(shared_fundus):
    from helpers import data

    splits = data.load_splits("fundus", shared_fundus, seed=42, check_images=False)
    counts = splits.counts()
    assert splits.carved == ("test",)  # valid/ is the validation split; only test is carved
    assert counts.loc["val"].sum() == len(list((shared_fundus / "valid").rglob("*.jpg")))
    assert splits.frame["patient_id"].str.fullmatch(r"[0-9a-f]{12}").all()  # APTOS ids, not file stems
    ids = {s: set(splits.frame.loc[splits.frame["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert 0.10 < counts.loc["test"].sum() / (counts.loc["train"].sum() + counts.loc["test"].sum()) < 0.20


@pytest.mark.notebook
def test_00_on_real_data_measures_tint_and_shortcut(shared_pneumonia, shared_chest4, shared_fundus, tmp_path):
    metrics, text = _run("00_data_tour", tmp_path, MAX_PER_CLASS=150, PNEUMONIA_DIR=str(shared_pneumonia),
                         CHEST4_DIR=str(shared_chest4), FUNDUS_DIR=str(shared_fundus))
    assert metrics["covered"] == ["pneumonia", "chest4", "fundus"] and not metrics["missing"]
    assert all(not Path(d).is_absolute() for d in metrics["data_dir"].values())
    assert (ROOT / metrics["data_dir"]["chest4"]).resolve() == shared_chest4.resolve()
    # the colour cast: a large share of tuberculosis images, no image of any other class
    shares = {c: v["tinted_share"] for c, v in metrics["tint"]["per_class"].items()}
    assert shares["TURBERCULOSIS"] > 0.3, shares
    assert all(v == 0 for c, v in shares.items() if c != "TURBERCULOSIS"), shares
    # the shortcut probe gets far above chance without pathology, and prints what it saved
    for variant, probe in metrics["pixel_probe"].items():
        assert probe["evaluated_on"] == "test"
        assert probe["balanced_accuracy"] > 0.25 + 0.15, (variant, probe["balanced_accuracy"])
        printed = re.search(rf"pixel statistics, {variant.replace('_', ' ')}: (\d\.\d{{3}})", text)
        assert printed and float(printed.group(1)) == round(probe["balanced_accuracy"], 3)
    # the random image-level split leaks patients; the grouped split does not
    leak = metrics["leakage"]["pneumonia"]
    assert leak["naive_random_split"]["val_images_with_patient_in_train"] > 0.1  # even in a 150-per-class subset
    assert leak["patient_grouped_split"]["patients_in_both"] == 0
    for name in metrics["figures"]:
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.notebook
def test_06_on_real_fundus_threshold_reaches_target_on_validation(shared_fundus, tmp_path):
    metrics, text = _run("06_fundus_binary", tmp_path, DATA_DIR=str(shared_fundus), MAX_PER_CLASS=24)
    target = metrics["target_sensitivity"]
    assert metrics["val"]["sensitivity"] >= target  # chosen on validation for exactly this
    assert metrics["val"]["threshold"] == metrics["threshold"]
    assert metrics["test"]["threshold"] == metrics["threshold"]
    assert metrics["test_at_0.5"]["auc"] == pytest.approx(metrics["test"]["auc"])  # the ranking is unchanged
    # lowering the threshold can only catch more diseased eyes
    if metrics["threshold"] <= 0.5:
        assert metrics["test"]["sensitivity"] >= metrics["test_at_0.5"]["sensitivity"]
    assert "Carved test out of train/" in text and "random initialisation" in text
    assert (ROOT / metrics["data_dir"]).resolve() == shared_fundus.resolve()
