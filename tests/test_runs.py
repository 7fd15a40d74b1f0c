"""helpers.runs (a run's metrics.json and predictions) and coursebuild.records (results tables read
back from them): the schema, the files written, what a reader of them sees."""

from __future__ import annotations

import os
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from coursebuild import records
from helpers import evaluate as ev
from helpers import runs


def _random_case(seed: int, n_classes: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative but imperfect probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


SCHEMA_KEYS = [
    "notebook", "profile", "dataset", "data_dir", "model", "pretrained", "image_size",
    "class_names", "threshold", "val", "test", "timing", "device",
]


def _run(out_dir, notebook="04_mobilenetv2_two_stage", profile="smoke", image_size=None):
    """A `runs.Run` writing into ``out_dir`` (what `start_run` returns, without its side effects)."""
    cfg = runs.apply_profile(profile, image_size=image_size)
    return runs.Run(notebook, cfg, None, Path(out_dir), torch.device("cpu"), 42)


def test_save_metrics_schema_and_json(tmp_path) -> None:
    y, p = _random_case(0, 2, n=80)
    test_block = ev.compute_metrics(y, p, ["NORMAL", "PNEUMONIA"], threshold=0.4, n_bootstrap=100)
    splits = SimpleNamespace(root=tmp_path, class_names=["NORMAL", "PNEUMONIA"])
    run = _run(tmp_path / "assets" / "04", image_size=np.int64(64))
    record = runs.save_metrics(
        run, splits, dataset="pneumonia", model="mobilenet_v2", pretrained=np.bool_(False),
        threshold=np.float32(0.4), val={"accuracy": np.float64(0.5), "auc": float("nan")}, test=test_block,
        timing={"train_seconds": np.float32(1.5), "train_images_per_second": float("inf")},
        runs=[{"name": "a", "test": test_block}], epochs=2,
    )
    text = (tmp_path / "assets" / "04" / "metrics.json").read_text()
    loaded = json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    assert list(loaded)[: len(SCHEMA_KEYS)] == SCHEMA_KEYS
    assert list(loaded)[len(SCHEMA_KEYS):] == ["runs", "epochs", "figures", "run_id", "started_at",
                                               "written_at", "n_bootstrap"]
    assert loaded == record
    assert loaded["notebook"] == "04_mobilenetv2_two_stage" and loaded["profile"] == "smoke"
    assert loaded["run_id"] == run.run_id and loaded["started_at"] == run.started_at
    assert loaded["class_names"] == ["NORMAL", "PNEUMONIA"] and loaded["n_bootstrap"] == 200
    assert loaded["val"]["auc"] is None and loaded["timing"]["train_images_per_second"] is None
    assert loaded["pretrained"] is False and loaded["image_size"] == 64 and loaded["device"] == "cpu"
    assert loaded["threshold"] == pytest.approx(0.4) and (ROOT / loaded["data_dir"]).resolve() == tmp_path.resolve()
    for key in ("accuracy", "balanced_accuracy", "auc", "average_precision", "per_class", "confusion_matrix", "ci95"):
        assert key in loaded["test"]
    assert sorted(f.name for f in (tmp_path / "assets" / "04").iterdir()) == [runs.OUTPUTS_FILE, "metrics.json"]  # no temporary file


def test_metrics_json_counts_the_images_of_each_split(tmp_path) -> None:
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "split": ["train"] * 3 + ["val"] * 2 + ["test"],
                          "class_name": ["a"] * 6})
    splits = SimpleNamespace(root=tmp_path, class_names=["a"], train=frame[frame.split == "train"],
                             val=frame[frame.split == "val"], test=frame[frame.split == "test"])
    record = runs.save_metrics(_run(tmp_path / "out"), splits, dataset="x", model="resnet18")
    assert record["n_images"] == {"train": 3, "val": 2, "test": 1}
    no_frames = runs.save_metrics(_run(tmp_path / "out"), SimpleNamespace(root=tmp_path), dataset="x", model="m")
    assert "n_images" not in no_frames  # an object without split frames: no key, no error


def test_results_table_flattens_files_and_runs(tmp_path) -> None:
    y, p = _random_case(0, 2, n=80)
    block = ev.compute_metrics(y, p, ["NORMAL", "PNEUMONIA"], n_bootstrap=100)
    common = dict(dataset="pneumonia", pretrained=False, class_names=["NORMAL", "PNEUMONIA"], threshold=0.5,
                  timing={})
    runs.save_metrics(_run(tmp_path / "a", "04_x"), None, model="mobilenet_v2", val=block, test=block, **common)
    with_runs = runs.save_metrics(
        _run(tmp_path / "b", "05_y"), None, model="resnet50", val=None, test=block,
        runs=[{"name": "plain_ce", "test": block}, {"strategy": "sampler", "model": "resnet18", "val": block, "test": block}],
        **common,
    )
    table = records.results_table([tmp_path / "a" / "metrics.json", tmp_path / "b"])
    assert len(table) == 3
    assert table["run"].tolist()[1:] == ["plain_ce", "sampler"]
    assert table["model"].tolist() == ["mobilenet_v2", "resnet50", "resnet18"]
    assert table["notebook"].tolist() == ["04_x", "05_y", "05_y"]
    for column in ("profile", "dataset", "pretrained", "image_size", "test_accuracy", "test_balanced_accuracy",
                   "test_auc", "test_auc_lo", "test_auc_hi", "test_recall_NORMAL", "test_recall_PNEUMONIA"):
        assert column in table
    assert table["test_auc"].iloc[0] == pytest.approx(block["auc"])
    assert table["test_auc_lo"].iloc[0] == pytest.approx(block["ci95"]["auc"][0])
    assert table["test_recall_PNEUMONIA"].iloc[0] == pytest.approx(block["sensitivity"])
    assert len(records.results_table([with_runs], include_main=True)) == 3
    assert not math.isnan(table["val_auc"].iloc[0])


def test_results_table_names_each_runs_own_weights():
    """A run trained from random weights is not labelled with its notebook's ImageNet weights."""
    block = {"auc": 0.9, "ci95": {}}
    record = {"notebook": "04_x", "pretrained": True, "weights": {"source": "tflite-converted:m.tflite"},
              "runs": [{"name": "imagenet", "pretrained": True, "test": block},
                       {"name": "random", "pretrained": False, "test": block}]}
    table = records.results_table(record).set_index("run")
    assert table.loc["imagenet", "weights"] == "ImageNet (TFLite, converted)"
    assert table.loc["random", "weights"] == "random"



def _frame(root: Path, names: list[str], y: list[int]) -> pd.DataFrame:
    """A split as `data.DataSplits.val` gives it: one row per image, absolute paths under `root`."""
    paths = [root / "val" / names[k] / f"img{i}.png" for i, k in enumerate(y)]
    return pd.DataFrame({"path": [str(p) for p in paths], "class_name": [names[k] for k in y], "split": "val"})


def test_save_predictions_writes_one_row_per_image_and_one_column_per_class(tmp_path) -> None:
    names = ["COVID19", "NORMAL", "PNEUMONIA"]
    y = [0, 2, 1, 2]
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5]])
    run = _run(tmp_path / "out")
    path = runs.save_predictions(run, "val", _frame(tmp_path / "data", names, y), torch.tensor(y), probs, names,
                                 root=tmp_path / "data")
    assert path == tmp_path / "out" / "val_predictions.csv"
    table = pd.read_csv(path)
    assert list(table.columns) == ["image", "label", "y_true", "prob_COVID19", "prob_NORMAL", "prob_PNEUMONIA"]
    assert table["image"].tolist()[:2] == ["val/COVID19/img0.png", "val/PNEUMONIA/img1.png"]
    assert table["label"].tolist() == ["COVID19", "PNEUMONIA", "NORMAL", "PNEUMONIA"]
    assert table["y_true"].tolist() == y
    np.testing.assert_allclose(table[[f"prob_{n}" for n in names]].to_numpy(), probs.numpy(), rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [runs.OUTPUTS_FILE, "val_predictions.csv"]  # no temporary file


def test_save_predictions_of_a_one_logit_run_still_gives_every_class_a_column(tmp_path) -> None:
    names = ["NORMAL", "PNEUMONIA"]
    data = tmp_path / "data"
    data.mkdir()
    run = runs.Run("06_x", runs.apply_profile("smoke"), str(data), tmp_path, torch.device("cpu"), 42)
    for probs in (np.array([0.2, 0.9]), np.array([[0.2], [0.9]])):
        path = runs.save_predictions(run, "test", _frame(data, names, [0, 1]), [0, 1], probs, names)
        table = pd.read_csv(path)
        assert table["image"].tolist() == ["val/NORMAL/img0.png", "val/PNEUMONIA/img1.png"]  # under DATA_DIR
        np.testing.assert_allclose(table["prob_PNEUMONIA"], [0.2, 0.9])
        np.testing.assert_allclose(table["prob_NORMAL"], [0.8, 0.1])


def test_save_predictions_refuses_mismatched_inputs(tmp_path) -> None:
    names = ["NORMAL", "PNEUMONIA"]
    run = _run(tmp_path)
    frame = _frame(tmp_path, names, [0, 1, 1])
    with pytest.raises(ValueError, match="3 images, 2 labels"):
        runs.save_predictions(run, "val", frame, [0, 1], np.full((2, 2), 0.5), names)
    with pytest.raises(ValueError, match="one column per class"):
        runs.save_predictions(run, "val", frame, [0, 1, 1], np.full((3, 3), 0.3), names)


def test_save_predictions_outside_every_root_keeps_the_path_as_it_prints(tmp_path) -> None:
    run = _run(tmp_path / "out")
    frame = pd.DataFrame({"path": ["/nowhere/x.png"], "class_name": ["NORMAL"]})
    path = runs.save_predictions(run, "val", frame, [0], [[0.6, 0.4]], ["NORMAL", "PNEUMONIA"])
    assert pd.read_csv(path)["image"].tolist() == ["/nowhere/x.png"]


def test_start_run_names_folders_under_the_working_directory_relatively(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    runs.start_run("04_x", "smoke", data_dir=str(tmp_path / "shared" / "data"), output_dir=str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "| data ../shared/data |" in printed and "outputs -> ../out |" in printed
    assert str(tmp_path) not in printed


def test_start_run_moves_an_earlier_runs_predictions_aside(tmp_path, capsys) -> None:
    run = runs.start_run("04_x", "smoke", output_dir=str(tmp_path))
    runs.save_predictions(run, "val", pd.DataFrame({"path": ["a.png"]}), [1], [[0.1, 0.9]], ["a", "b"])
    capsys.readouterr()
    runs.start_run("04_x", "smoke", output_dir=str(tmp_path))
    assert runs.PREVIOUS_RUN_DIR not in capsys.readouterr().out  # housekeeping, not for the page
    assert not (tmp_path / "val_predictions.csv").exists()
    assert (tmp_path / runs.PREVIOUS_RUN_DIR / "val_predictions.csv").is_file()


def test_paths_print_relative_when_short_else_as_given(tmp_path, monkeypatch):
    from helpers.images import display_path

    deep = tmp_path / "a" / "b" / "c" / "notebooks"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert display_path(deep / "x.png") == "x.png"
    assert display_path(tmp_path / "a" / "b" / "data") == os.path.join("..", "..", "data")
    assert display_path(deep) == str(deep)  # "." would say nothing
    assert display_path(tmp_path / "far") == str(tmp_path / "far")  # three levels up: as given
