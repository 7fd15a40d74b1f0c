"""Bad inputs of issue 29 on the run, output and app side: more rows of the table of
`tests/test_bad_inputs.py`, run by the same rules (`Case`: an error whose message names what to fix,
or a handled result that `check` accepts).

Outputs are never the user's files (a run moves only what it recorded as its own), never inside a
dataset, and land in the working directory when the course copy is read-only; metrics refuse logits;
every results row names one run; training, the feature cache, model bundles and the app handle the
smaller cases of item 9. Everything is built in tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook, new_output
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from app import bundle, serve
from coursebuild import records, reference
from helpers import evaluate, runs, train
from test_bad_inputs import Case

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
    "53de0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082")


# ----------------------------------------------------------------------------- builders

def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (40, 32), 40 + 10 * i).save(folder / f"img{i}.png")
    return folder


def _read_only_folder(tmp: Path) -> Path:
    """A folder nobody may write in; as root (who may write anyway) a read-only sysfs folder."""
    folder = tmp / "course_copy"
    folder.mkdir()
    folder.chmod(0o555)
    return folder if not os.access(folder, os.W_OK) else Path("/sys/kernel")


def _quiet(call, *args, **kwargs) -> tuple[Any, str]:
    """(result, printed text) of call(*args, **kwargs)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        return call(*args, **kwargs), out.getvalue()


def _executed_copy(path: Path, run_id: str | None, seconds: float = 123.0) -> Path:
    """An executed notebook as run_all keeps it: start_run's printed line names its run."""
    text = f"04_x: profile 'cpu' | outputs -> somewhere | run {run_id}\n" if run_id else "no run line\n"
    cell = new_code_cell("run = start_run(...)", outputs=[new_output("stream", name="stdout", text=text)])
    nb = new_notebook(cells=[cell], metadata={"papermill": {"duration": seconds}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# ----------------------------------------------------------------------------- item 1: the user's files

def _run_user_pngs_over_runs(tmp, mp):
    """OUTPUT_DIR = a working folder holding the user's own pictures; three runs, each saving figures."""
    work = tmp / "working"
    for name in ("my_upload.png", "roc_of_my_own.png"):
        _images(work, 0)
        (work / name).write_bytes(PNG + name.encode())
    for _ in range(3):
        run, _ = _quiet(runs.start_run, "04_x", "smoke", output_dir=str(work))
        (work / "roc.png").write_bytes(PNG + run.run_id.encode())
        runs.save_metrics(run, None, dataset="pneumonia", model="m", pretrained=False, figures=["roc.png"])
    return work, run


def _check_user_pngs_over_runs(result):
    work, last = result
    for name in ("my_upload.png", "roc_of_my_own.png"):
        assert (work / name).read_bytes() == PNG + name.encode()  # never moved, never deleted
    assert (work / "roc.png").read_bytes().endswith(last.run_id.encode())
    assert sorted(p.name for p in (work / runs.PREVIOUS_RUN_DIR).iterdir()) == [runs.OUTPUTS_FILE, "metrics.json",
                                                                              "roc.png"]


def _run_old_figure_list_names_user_file(tmp, mp):
    """An old metrics.json whose figures list points outside the folder or at a missing file."""
    out = tmp / "out"
    (tmp / "precious.png").write_bytes(PNG)
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"figures": ["../precious.png", "/etc/hostname", "gone.png"]}))
    _quiet(runs.start_run, "nb", "smoke", output_dir=str(out))
    return tmp


def _check_old_figure_list(tmp):
    assert (tmp / "precious.png").read_bytes() == PNG and Path("/etc/hostname").exists()
    assert sorted(p.name for p in (tmp / "out" / runs.PREVIOUS_RUN_DIR).iterdir()) == [runs.OUTPUTS_FILE,
                                                                                     "metrics.json"]


def _run_output_dir_in_data_dir(tmp, mp):
    data = tmp / "pn"
    _images(data / "train" / "NORMAL")
    return runs.start_run("nb", "smoke", data_dir=str(data), output_dir=str(data / "figures"))


def _run_output_dir_class_folder(tmp, mp):
    _images(tmp / "chest_xray" / "train" / "NORMAL")
    _images(tmp / "chest_xray" / "train" / "PNEUMONIA")
    return runs.start_run("nb", "smoke", output_dir=str(tmp / "chest_xray" / "train" / "NORMAL"))


def _run_output_dir_split_folder(tmp, mp):
    _images(tmp / "eyes" / "Train" / "DR")
    return runs.start_run("nb", "smoke", output_dir=str(tmp / "eyes" / "Train" / "out"))


# ----------------------------------------------------------------------------- item 4: a read-only course copy

def _run_read_only_course(tmp, mp):
    read_only = _read_only_folder(tmp)
    mp.setattr(runs, "project_root", lambda: read_only)
    (tmp / "kaggle_working").mkdir()
    mp.chdir(tmp / "kaggle_working")
    run, printed = _quiet(runs.start_run, "04_x", "smoke")
    return tmp, run, printed


def _check_read_only_course(result):
    tmp, run, printed = result
    assert run.out_dir == tmp / "kaggle_working" / "assets" / "04_x" and run.out_dir.is_dir()
    assert "is read-only: outputs and generated data go to" in printed and str(tmp / "kaggle_working") in printed


def _run_synthetic_in_read_only_course(tmp, mp):
    from helpers.synthetic import make_synthetic_dataset

    read_only = _read_only_folder(tmp)
    mp.setattr(runs, "project_root", lambda: read_only)
    (tmp / "kaggle_working").mkdir()
    mp.chdir(tmp / "kaggle_working")
    return tmp, make_synthetic_dataset("pneumonia", counts={"train": {"NORMAL": 2, "PNEUMONIA": 2}}, image_size=32)


def _check_synthetic_in_read_only_course(result):
    tmp, root = result
    assert root.is_relative_to(tmp / "kaggle_working") and len(list(root.rglob("*.jpeg"))) == 4


# ----------------------------------------------------------------------------- item 6: probabilities, not logits

LOGITS = np.array([-2.3, 1.7, 0.4, -0.9, 3.1, -1.2])
LABELS = np.array([0, 1, 1, 0, 1, 0])
_SIGMOID_OR_SOFTMAX = r"probabilities in \[0, 1\].*look like logits\. Apply the sigmoid .* or the softmax"


# ----------------------------------------------------------------------------- item 8: rows never mix runs

def _run_rerun_beside_old_copy(tmp, mp):
    """assets/<nb>/ after a notebook was re-run by hand: new metrics.json, the old executed copy."""
    assets, notebooks = tmp / "assets", tmp / "notebooks"
    _executed_copy(notebooks / "04_x.ipynb", None)
    folder = assets / "04_x"
    _executed_copy(folder / "04_x.ipynb", "20261201T0000Z-aaaaaa", seconds=600)
    folder.mkdir(exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({
        "notebook": "04_x", "profile": "cpu", "run_id": "20261205T0000Z-bbbbbb", "figures": [],
        "test": {"auc": 0.9, "balanced_accuracy": 0.8}}))
    return reference.reference_rows(assets, notebooks), records.results_table(folder)


def _check_rerun_beside_old_copy(result):
    (row,), table = result
    assert row["time"] == "" and "20261201T0000Z-aaaaaa" in row["run"] and "20261205T0000Z-bbbbbb" in row["run"]
    assert row["run"].startswith("mixed")
    assert "executed copy 04_x.ipynb is from run 20261201T0000Z-aaaaaa" in table["check"].iloc[0]


def _run_copy_without_run_line(tmp, mp):
    folder = tmp / "04_x"
    _executed_copy(folder / "04_x.ipynb", None)
    (folder / "metrics.json").write_text(json.dumps({"notebook": "04_x", "run_id": "20261205T0000Z-bbbbbb"}))
    return records.output_problems(folder)


def _run_rerun_retires_the_old_copy(tmp, mp):
    """A run's executed copy is one of its outputs: the next run (by hand) moves it aside."""
    out = tmp / "assets" / "04_x"
    first, _ = _quiet(runs.start_run, "04_x", "smoke", output_dir=str(out))
    runs.save_metrics(first, None, dataset="pneumonia", model="m", pretrained=False)
    copy = _executed_copy(out / "04_x.ipynb", first.run_id)
    runs.record_outputs(out, records.executed_run_id(copy), [copy.name])
    second, _ = _quiet(runs.start_run, "04_x", "smoke", output_dir=str(out))
    runs.save_metrics(second, None, dataset="pneumonia", model="m", pretrained=False)
    return out, records.output_problems(out)


def _check_rerun_retires_the_old_copy(result):
    out, problems = result
    assert not (out / "04_x.ipynb").exists() and (out / runs.PREVIOUS_RUN_DIR / "04_x.ipynb").is_file()
    assert problems == []


# ----------------------------------------------------------------------------- item 9: training

class _Images(Dataset):
    """Four 16 px images through a transform (a torchvision pipeline or None)."""

    def __init__(self, transform=None):
        self.images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8))
                       for i in range(4)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from torchvision.transforms.functional import to_tensor

        image = self.images[i] if self.transform is None else self.transform(self.images[i])
        return (image if isinstance(image, torch.Tensor) else to_tensor(image)), i % 2


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _one_epoch(batch_size: int, n: int):
    x, y = torch.rand(n, 3, 16, 16), torch.arange(n) % 2
    loader = DataLoader(list(zip(x, y)), batch_size=batch_size)
    model = _bn_model()
    return _quiet(train.train_one_epoch, model, loader, nn.CrossEntropyLoss(),
                  torch.optim.SGD(model.parameters(), lr=0.1))


def _check_last_batch_of_one(result):
    stats, printed = result
    assert stats["images"] == 4 and "left out 1 training batch(es) of one image" in printed


def _head_only(augment: bool):
    from torchvision import transforms

    from helpers.models import build_model, head_parameters

    pipeline = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ColorJitter(0.5, 0.5)]) \
        if augment else transforms.Compose([transforms.Resize(16)])
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=16)
    loader = DataLoader(_Images(pipeline), batch_size=2, shuffle=True)
    return _quiet(train.fit_head_only, model, loader, None, epochs=1, criterion=nn.CrossEntropyLoss(),
                  optimizer=torch.optim.SGD(head_parameters(model), lr=0.01), amp=False, progress=False)


# ----------------------------------------------------------------------------- item 9: bundles and the app

_BUNDLES: dict[str, Path] = {}


def _saved_bundle(tmp: Path, dataset: str = "pneumonia") -> Path:
    """A tiny bundle saved by save_bundle (MobileNetV2 at 32 px), copied into tmp."""
    from helpers.models import build_model

    if dataset not in _BUNDLES:
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32)
        names = ["normal", "disease"] if dataset == "fundus" else ["NORMAL", "PNEUMONIA"]
        _BUNDLES[dataset] = bundle.save_bundle(tmp / f"{dataset}_bundle.pt", model, class_names=names,
                                               image_size=32, profile="smoke", threshold=0.5, dataset=dataset,
                                               ood={"method": "msp", "threshold": 0.0, "keep_fraction": 0.95})
    target = tmp / "model.pt"
    target.write_bytes(_BUNDLES[dataset].read_bytes())
    return target


def _edited_bundle(tmp: Path, **changes: Any) -> bundle.AppModel:
    path = _saved_bundle(tmp)
    contents = torch.load(path, weights_only=True)
    contents.update(changes)
    torch.save(contents, path)
    return bundle.load_bundle(path)


def _run_fundus_app(tmp, mp):
    app = bundle.load_bundle(_saved_bundle(tmp, "fundus"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return serve.analyse_upload(app, buffer.getvalue())


def _check_fundus_app(analysis):
    words = f"{analysis.verdict} {analysis.predicted} {list(analysis.probs)}"
    assert "X-ray" not in words and "NORMAL" not in words and "PNEUMONIA" not in words
    assert "retinal fundus photographs" in analysis.verdict and analysis.predicted in ("normal", "disease")


def _dicom_bytes(tmp: Path, **window: Any) -> bytes:
    from test_bad_inputs_data import _dicom

    return _dicom(tmp / "scan.dcm", np.tile(np.linspace(0, 4095, 64), (64, 1)), **window).read_bytes()


def _upload_outcome(data: bytes) -> str:
    """"read" or the UploadError message: never another exception (the app would blame the model)."""
    try:
        serve.read_upload(data)
    except serve.UploadError as err:
        return f"refused: {err}"
    return "read"


def _check_dicom_outcome(outcome):
    assert outcome == "read" or ("DICOM" in outcome and "model" not in outcome), outcome


CASES = [
    # ------------------------------------------------------------------ item 1
    Case("folders", "OUTPUT_DIR holding the user's own PNGs, over three runs", _run_user_pngs_over_runs,
         check=_check_user_pngs_over_runs, id="output-dir-user-pngs"),
    Case("folders", "an old metrics.json whose figures list points outside OUTPUT_DIR",
         _run_old_figure_list_names_user_file, check=_check_old_figure_list, id="output-dir-figures-outside"),
    Case("folders", "OUTPUT_DIR inside DATA_DIR", _run_output_dir_in_data_dir, ValueError,
         r"OUTPUT_DIR .* lies inside the dataset folder .*pn'.*Set OUTPUT_DIR to a folder outside the data",
         id="output-dir-in-data-dir"),
    Case("folders", "OUTPUT_DIR = a class folder of a split (train/NORMAL)", _run_output_dir_class_folder,
         ValueError, r"lies inside the dataset folder .*train'.*read as images of the dataset",
         id="output-dir-class-folder"),
    Case("folders", "OUTPUT_DIR below a capitalised split folder (Train/out)", _run_output_dir_split_folder,
         ValueError, r"lies inside the dataset folder .*Train'", id="output-dir-split-folder"),
    # ------------------------------------------------------------------ item 4
    Case("folders", "course copy read-only (attached under /kaggle/input), OUTPUT_DIR = None",
         _run_read_only_course, check=_check_read_only_course, id="read-only-course-outputs"),
    Case("folders", 'DATA_DIR = "synthetic" with a read-only course copy', _run_synthetic_in_read_only_course,
         check=_check_synthetic_in_read_only_course, id="read-only-course-synthetic"),
    # ------------------------------------------------------------------ item 6
    Case("parameters", "compute_metrics given one-logit outputs", lambda tmp, mp: evaluate.compute_metrics(
         LABELS, LOGITS, ["NORMAL", "PNEUMONIA"], n_bootstrap=0), ValueError, _SIGMOID_OR_SOFTMAX,
         id="metrics-logits"),
    Case("parameters", "compute_metrics given two-logit rows", lambda tmp, mp: evaluate.compute_metrics(
         LABELS, np.stack([-LOGITS, LOGITS], 1), ["NORMAL", "PNEUMONIA"], n_bootstrap=0), ValueError,
         _SIGMOID_OR_SOFTMAX, id="metrics-two-logits"),
    Case("parameters", "choose_threshold given logits", lambda tmp, mp: evaluate.choose_threshold(LABELS, LOGITS),
         ValueError, r"p_pos must be probabilities.*Apply the sigmoid", id="threshold-logits"),
    Case("parameters", "expected_calibration_error given logits",
         lambda tmp, mp: evaluate.expected_calibration_error(LABELS, np.stack([-LOGITS, LOGITS], 1)), ValueError,
         _SIGMOID_OR_SOFTMAX, id="ece-logits"),
    Case("parameters", "3-class rows of independent sigmoids (do not sum to 1)",
         lambda tmp, mp: evaluate.compute_metrics([0, 1, 2], [[0.9, 0.8, 0.1], [0.2, 0.7, 0.3], [0.1, 0.2, 0.9]],
                                                  ["a", "b", "c"], n_bootstrap=0), ValueError,
         r"row 0 sums to 1\.8.*Apply the softmax", id="metrics-rows-not-summing"),
    Case("parameters", "choose_threshold given NaN scores",
         lambda tmp, mp: evaluate.choose_threshold(LABELS, [0.1, np.nan, 0.5, 0.2, 0.9, 0.3]), ValueError,
         r"p_pos must be probabilities", id="threshold-nan"),
    # ------------------------------------------------------------------ item 8
    Case("folders", "notebook re-run by hand beside an executed copy of an earlier run", _run_rerun_beside_old_copy,
         check=_check_rerun_beside_old_copy, id="rows-mixed-executed-copy"),
    Case("folders", "executed copy that names no run beside a metrics.json", _run_copy_without_run_line,
         check=lambda problems: any("from run (unknown)" in p for p in problems), id="rows-copy-without-run"),
    Case("folders", "notebook re-run by hand after run_all kept its executed copy", _run_rerun_retires_the_old_copy,
         check=_check_rerun_retires_the_old_copy, id="rows-rerun-retires-copy"),
    # ------------------------------------------------------------------ item 9
    Case("parameters", "training batch of one image (5 images, batch 4) under BatchNorm",
         lambda tmp, mp: _one_epoch(4, 5), check=_check_last_batch_of_one, id="batch-of-one-left-out"),
    Case("parameters", "BATCH_SIZE = 1 with trainable BatchNorm", lambda tmp, mp: _one_epoch(1, 3), ValueError,
         r"Every training batch held one image .*Set BATCH_SIZE to 2 or more", id="batch-size-1-batchnorm"),
    Case("parameters", "head-only feature cache with an augmenting torchvision DataLoader",
         lambda tmp, mp: _head_only(augment=True), ValueError,
         r"training loader augments images .*cached features would freeze one random view", id="cache-augmenting-dataloader"),
    Case("model files", "bundle whose image_size was edited by hand (32 -> 64)",
         lambda tmp, mp: _edited_bundle(tmp, image_size=64), bundle.BundleError,
         r"model\.pt was changed after it was saved: field\(s\) image_size \(now 64\).*Do not edit a bundle by hand",
         id="bundle-image-size-edited"),
    Case("model files", "bundle whose threshold was edited by hand (0.5 -> 0.3)",
         lambda tmp, mp: _edited_bundle(tmp, threshold=0.3), bundle.BundleError,
         r"field\(s\) threshold \(now 0\.3\)", id="bundle-threshold-edited"),
    Case("model files", "an unedited saved bundle still loads (baseline of the rows above)",
         lambda tmp, mp: _edited_bundle(tmp), check=lambda app: app.image_size == 32, id="bundle-unedited"),
    Case("uploads", "fundus bundle in the app: the verdict and answers name its own images and classes",
         _run_fundus_app, check=_check_fundus_app, id="app-fundus-wording"),
    Case("uploads", "DICOM upload whose window centre/width hold several values",
         lambda tmp, mp: _upload_outcome(_dicom_bytes(tmp, window=([2048, 1024], [4096, 2048]))),
         check=_check_dicom_outcome, id="upload-dicom-multi-window"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            case.run(tmp_path, monkeypatch)
    else:
        assert case.check(case.run(tmp_path, monkeypatch)) in (None, True)


def test_a_deterministic_torchvision_loader_still_uses_the_feature_cache():
    """The augmentation probe refuses only loaders that augment (no false alarm on a fixed transform)."""
    result, printed = _head_only(augment=False)
    assert "Feature cache: 4 train images" in printed and result.best_epoch == 1


def test_every_case_is_named():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all((c.error is None) != (c.check is None) for c in CASES)
