"""helpers.data / helpers.loading / helpers.synthetic / helpers.runs: behaviour tests."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import data, datasets, loading, losses, runs, synthetic
from helpers.augment import BatchAugment
from helpers.images import load_image
from helpers.loading import TensorLoader, cache_images

PATIENT_PATTERN = re.compile(r"^(person\d+|(NORMAL\d*-)?IM-\d+)$")


# ----------------------------------------------------------------------------- profiles

def test_profiles_resolve_and_override():
    smoke = runs.apply_profile("smoke", recipe_epochs=12)
    full = runs.apply_profile("full", recipe_epochs=12, batch_size=64, image_size=None)
    assert (smoke.epochs, smoke.pretrained, smoke.image_size) == (1, False, 64)
    assert (full.epochs, full.batch_size, full.image_size, full.amp) == (12, 64, 224, True)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="smoke.*cpu.*full"):
        runs.apply_profile("fast")
    with pytest.raises(TypeError, match="image_size"):
        runs.apply_profile("smoke", img_size=32)


# ----------------------------------------------------------------------------- patient ids

@pytest.mark.parametrize("name, expected", [
    ("person123_bacteria_456.jpeg", "person123"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0429-0001-0002.jpeg", "IM-0429"),
    ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
    ("abc123_png.rf.0123456789abcdef.jpg", "abc123"),
    ("scan_42.png", "scan_42"),
])
def test_parse_patient_id(name, expected):
    assert data.parse_patient_id(name) == expected


@pytest.mark.realdata
def test_every_real_file_name_yields_a_patient_id(shared_pneumonia):
    names = [f.name for f in (shared_pneumonia / "train").rglob("*.jpeg")]
    assert len(names) == 5216
    ids = {n: data.parse_patient_id(n) for n in names}
    unparsed = [n for n, pid in ids.items() if not PATIENT_PATTERN.match(pid)]
    assert unparsed == []
    assert all(n.startswith(pid) for n, pid in ids.items())
    # Several images per patient is the whole reason for grouped splits.
    assert len(set(ids.values())) < 0.6 * len(names)


# ----------------------------------------------------------------------------- splits

def _assert_patient_disjoint(frame: pd.DataFrame) -> None:
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all(), splits_per_patient[splits_per_patient > 1].head()


@pytest.mark.realdata
def test_real_split_is_patient_disjoint_and_stratified(shared_pneumonia):
    """The official test/ (624 images) is kept; validation is carved from the 5,216 train images."""
    splits = data.load_splits("pneumonia", shared_pneumonia, seed=3)
    frame = splits.frame
    assert splits.skipped == [] and splits.carved == ("val",)
    counts = splits.counts()
    assert counts.loc["test"].to_dict() == {"NORMAL": 234, "PNEUMONIA": 390}
    from_train = frame[frame["split"] != "test"]
    assert len(from_train) == 5216
    _assert_patient_disjoint(from_train)
    whole = (from_train["label"] == 1).mean()
    for split in ("train", "val"):
        part = from_train[from_train["split"] == split]
        assert abs((part["label"] == 1).mean() - whole) < 0.02, split
    assert abs((from_train["split"] == "val").mean() - 0.15) < 0.02
    assert set(frame["subtype"]) == {"normal", "bacteria", "virus"}


def test_carve_splits_groups_patients_on_constructed_frame():
    rng = np.random.default_rng(0)
    rows = []
    for pid in range(400):
        label = int(rng.random() < 0.7)
        rows += [dict(path=f"p{pid}_{k}", label=label, split="train", patient_id=f"p{pid}")
                 for k in range(rng.integers(1, 6))]
    frame = data.carve_splits(pd.DataFrame(rows), val_fraction=0.2, test_fraction=0.1, seed=1)
    _assert_patient_disjoint(frame)
    whole = frame["label"].mean()
    for split, share in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        part = frame[frame["split"] == split]
        assert abs(len(part) / len(frame) - share) < 0.03
        assert abs(part["label"].mean() - whole) < 0.03


def test_synthetic_splits_are_patient_disjoint(synthetic_root):
    splits = data.load_splits("pneumonia", synthetic_root("pneumonia"), seed=0)
    _assert_patient_disjoint(splits.frame)
    assert splits.carved == ("val", "test")
    assert splits.frame.groupby("patient_id").size().max() > 1  # patients do have several images
    assert len(splits.val) and len(splits.test)


def test_provided_splits_are_kept_and_tiny_val_is_folded(tmp_path, synthetic_root):
    chest4 = data.load_splits("chest4", synthetic_root("chest4"))
    assert chest4.counts().loc["test"].tolist() == [12, 12, 12, 12]  # provided test kept as is
    assert chest4.counts().loc["val"].tolist() == [12, 12, 12, 12]
    assert chest4.carved == ()
    # The official pneumonia layout: a 16-image val/ beside a big train/.
    root = tmp_path / "chest_xray"
    shutil.copytree(synthetic_root("pneumonia") / "train", root / "train")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "val" / cls).mkdir(parents=True)
        for f in sorted((root / "train" / cls).iterdir())[:2]:
            f.rename(root / "val" / cls / f.name)
    splits = data.load_splits("pneumonia", root)
    assert any("too few to select a model" in n for n in splits.notes)
    assert len(splits.val) > 16
    _assert_patient_disjoint(splits.frame)


def test_subsample_caps_every_split_and_class(synthetic_root):
    splits = data.load_splits("chest4", synthetic_root("chest4"), max_per_class=5)
    counts = splits.counts()
    assert (counts.loc[["train", "val"]].to_numpy() == 5).all()
    assert (counts.loc["test"].to_numpy() == 12).all()  # the synthetic set's own test split, whole


# ----------------------------------------------------------------------------- scanning

def _jpeg(path: Path, value: int = 128, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_scan_ignores_nested_duplicate_macosx_and_junk(tmp_path):
    archive = tmp_path / "download"
    for tree in (archive / "chest_xray", archive / "chest_xray" / "chest_xray"):
        for split, n in (("train", 5), ("val", 2), ("test", 3)):
            for cls in ("NORMAL", "PNEUMONIA"):
                for i in range(n):
                    name = f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_virus_{i}.jpeg"
                    _jpeg(tree / split / cls / name)
    macosx = archive / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    macosx.mkdir(parents=True)
    (macosx / "._IM-0000-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (archive / "chest_xray" / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    (archive / "chest_xray" / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (archive / "chest_xray" / "train" / "NORMAL" / "._IM-0000-0001.jpeg").write_bytes(b"\x00")

    root = datasets.locate_dataset("pneumonia", archive)
    assert root == archive / "chest_xray"
    frame = data.scan_dataset(root, "pneumonia")
    assert len(frame) == 2 * (5 + 2 + 3)  # once, not twice
    assert frame.groupby(["split", "class_name"]).size().to_dict() == {
        ("test", "NORMAL"): 3, ("test", "PNEUMONIA"): 3, ("train", "NORMAL"): 5,
        ("train", "PNEUMONIA"): 5, ("val", "NORMAL"): 2, ("val", "PNEUMONIA"): 2}
    assert frame.attrs["skipped"] == []


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path):
    root = tmp_path / "fundus"
    for cls in ("disease", "normal"):
        for i in range(4):
            _jpeg(root / "train" / cls / f"img{i}.jpg", value=50 * i)
    good = root / "train" / "normal" / "img0.jpg"
    big = root / "train" / "normal" / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(big)
    (root / "train" / "normal" / "truncated.jpg").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (root / "train" / "disease" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "train" / "disease" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="Skipped 3 unreadable"):
        frame = data.scan_dataset(root, "fundus")
    assert len(frame) == 9 and str(good) in set(frame["path"])
    skipped = {Path(p).name for p, _ in frame.attrs["skipped"]}
    assert skipped == {"truncated.jpg", "garbage.jpg", "empty.png"}
    splits = data.load_splits("fundus", root)
    assert len(splits.skipped) == 3 and any("unreadable" in n for n in splits.notes)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / "train" / "disease" / f"{i}.jpg")
    (tmp_path / "train" / "normal").mkdir()
    with pytest.raises(ValueError, match=r"normal.*holds no images"):
        data.scan_dataset(tmp_path, "fundus")


def test_fundus_accepts_plain_disease_normal_folders(tmp_path):
    for cls in ("disease", "normal"):
        for i in range(3):
            _jpeg(tmp_path / "eyes" / cls / f"{i}.jpg")
    frame = data.scan_dataset(datasets.locate_dataset("fundus", tmp_path), "fundus")
    assert sorted(frame["class_name"].unique()) == ["disease", "normal"]
    assert (frame["split"] == "train").all()


# ----------------------------------------------------------------------------- locating

def test_locate_missing_dataset_fails_fast_and_lists_the_four_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "project_root", lambda: tmp_path)
    monkeypatch.setattr(datasets, "_online", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(datasets.DatasetNotFoundError) as err:
        datasets.locate_dataset("pneumonia", kaggle_input=tmp_path / "kaggle_input")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    for needle in ("DATA_DIR", "/kaggle/input", str(tmp_path / "data" / "pneumonia"),
                   "kagglehub", "synthetic"):
        assert needle in message


def test_locate_without_network_really_fails_within_seconds(tmp_path, monkeypatch):
    """No mocking of the network probe: in this offline workplace it must give up quickly."""
    monkeypatch.setattr(datasets, "project_root", lambda: tmp_path)
    start = time.perf_counter()
    try:
        datasets.locate_dataset("fundus", kaggle_input=tmp_path / "none")
    except datasets.DatasetNotFoundError:
        pass
    else:  # pragma: no cover - only on a machine with internet and a Kaggle download
        pytest.skip("online: the dataset was downloaded")
    assert time.perf_counter() - start < 10


def test_locate_wrong_data_dir_and_unknown_name(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match="does not hold the pneumonia dataset"):
        datasets.locate_dataset("pneumonia", tmp_path)
    with pytest.raises(ValueError, match="pneumonia, chest4, fundus"):
        datasets.locate_dataset("mnist")


@pytest.mark.parametrize("mount", ["{slug}", "datasets/{owner}/{slug}"])
def test_locate_finds_both_kaggle_mount_forms(tmp_path, synthetic_root, mount):
    owner, slug = datasets.DATASETS["chest4"].handle.split("/")
    target = tmp_path / "input" / mount.format(owner=owner, slug=slug) / "Chest X_Ray Dataset"
    shutil.copytree(synthetic_root("chest4"), target)
    assert datasets.locate_dataset("chest4", kaggle_input=tmp_path / "input") == target


def test_locate_uses_local_cache(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setattr(datasets, "project_root", lambda: tmp_path)
    shutil.copytree(synthetic_root("fundus"), tmp_path / "data" / "fundus" / "dr")
    assert datasets.locate_dataset("fundus", kaggle_input=tmp_path / "none") == tmp_path / "data" / "fundus" / "dr"


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic_and_has_the_kaggle_layout(tmp_path):
    a = synthetic.make_synthetic_dataset("fundus", tmp_path / "a", seed=5)
    b = synthetic.make_synthetic_dataset("fundus", tmp_path / "b", seed=5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert {p.parts[0] for p in files_a} == {"train", "valid", "test"}
    assert {p.parts[1] for p in files_a} == {"DR", "No_DR"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a[:10])
    c = synthetic.make_synthetic_dataset("fundus", tmp_path / "c", seed=6)
    assert (a / files_a[0]).read_bytes() != (c / files_a[0]).read_bytes()


def _tiny_cnn(num_classes: int) -> nn.Module:
    """Three conv blocks with BatchNorm."""
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


@pytest.mark.parametrize("name", ["pneumonia", "chest4", "fundus"])
def test_tiny_cnn_learns_each_synthetic_task(name, synthetic_root):
    torch.manual_seed(0)
    splits = data.load_splits(name, synthetic_root(name), seed=0)
    train_x, test_x = cache_images(splits.train, 64), cache_images(splits.test, 64)
    net = _tiny_cnn(len(splits.class_names))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = TensorLoader(train_x, splits.train["label"], batch_size=16, shuffle=True,
                          augment="light", seed=0)
    for _ in range(15):
        net.train()
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    # With ~100 images BatchNorm's running statistics lag behind the weights; recompute them
    # once on the (unaugmented) training images, as "precise BN" does.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for x, _ in TensorLoader(train_x, splits.train["label"], batch_size=16):
            net(x)
    net.eval()
    x, y = next(iter(TensorLoader(test_x, splits.test["label"], batch_size=len(test_x))))
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    chance = splits.test["label"].value_counts(normalize=True).max()
    assert accuracy > 0.9 > chance, (accuracy, chance)


# ----------------------------------------------------------------------------- loading

def test_tensor_cache_holds_each_file_read_and_normalised(synthetic_root, tmp_path):
    splits = data.load_splits("pneumonia", synthetic_root("pneumonia"))
    frame = splits.test
    fast = TensorLoader(cache_images(frame, 40), frame["label"], batch_size=8)
    x = torch.cat([xb for xb, _ in fast])
    per_image = torch.stack([load_image(p, 40) for p in frame["path"]])
    assert torch.allclose(x, loading.normalize(per_image), atol=1e-5)
    assert torch.equal(torch.cat([yb for _, yb in fast]), torch.tensor(frame["label"].to_numpy()))
    # Persisted next to the data and loaded back identically.
    first = cache_images(frame, 40, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert torch.equal(first, cache_images(frame, 40, cache_dir=tmp_path))


def test_grayscale_is_replicated_to_three_channels(synthetic_root):
    frame = data.load_splits("pneumonia", synthetic_root("pneumonia")).test.head(4)
    assert Image.open(frame["path"][0]).mode == "L"
    images = cache_images(frame, 32)
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_batch_augment_draws_parameters_per_image():
    x = torch.rand(1, 3, 32, 32).repeat(8, 1, 1, 1)
    out = BatchAugment.preset("strong")(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    diffs = [(out[0] - out[i]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3  # every copy of the same image was augmented differently
    assert torch.equal(BatchAugment.preset("none")(x.clone()), x)
    with pytest.raises(ValueError, match="light"):
        BatchAugment.preset("heavy")


def test_strong_augmentation_touches_only_the_named_classes():
    images = torch.full((6, 3, 16, 16), 100, dtype=torch.uint8)
    images[:, :, 4:12, 4:12] = 250
    labels = [0, 1, 0, 1, 0, 1]
    loader = TensorLoader(images, labels, batch_size=6, strong_classes=[0], seed=1)
    x, y = next(iter(loader))
    reference = loading.normalize(images[:1])
    for xi, yi in zip(x, y):
        same = torch.allclose(xi, reference[0], atol=1e-5)
        assert same == (yi.item() == 1)


def test_weighted_sampler_batches_are_balanced():
    labels = torch.tensor([0] * 90 + [1] * 10)
    loader = TensorLoader(torch.zeros(100, 3, 4, 4, dtype=torch.uint8), labels, batch_size=20,
                          sample_weights=loading.weighted_sampler_weights(labels), seed=0)
    shares = [y.float().mean().item() for _ in range(30) for _, y in loader]
    assert abs(np.mean(shares) - 0.5) < 0.03


def test_class_weights_and_pos_weight():
    labels = [0] * 30 + [1] * 10
    w = losses.class_weights(labels, 2)
    assert w[1] / w[0] == pytest.approx(3.0) and w.mean() == pytest.approx(1.0)
    assert losses.pos_weight(labels).tolist() == [3.0]
    with pytest.raises(ValueError, match="no training images"):
        losses.class_weights([0, 0, 2], 3)


def test_make_loaders_serve_every_image_of_each_split(synthetic_root):
    splits = data.load_splits("fundus", synthetic_root("fundus"), max_per_class=6)
    fast = loading.make_loaders(splits, 32, 4)
    xf = torch.cat([x for x, _ in fast["val"]])
    expected = loading.normalize(torch.stack([load_image(p, 32) for p in splits.val["path"]]))
    assert torch.allclose(xf, expected, atol=1e-5)
    assert sum(len(y) for _, y in fast["train"]) == len(splits.train)
    assert fast["train"].images.shape[0] == len(splits.train)


def test_start_run_output_dir(tmp_path, monkeypatch):
    assert runs.start_run("00_x", "smoke", output_dir=tmp_path / "o").out_dir == tmp_path / "o"
    assert (tmp_path / "o").is_dir()
    monkeypatch.setattr(runs, "project_root", lambda: tmp_path)
    assert runs.start_run("00_x", "smoke").out_dir == tmp_path / "assets" / "00_x"
    assert (tmp_path / "assets" / "00_x").is_dir()


def test_subsample_keeps_the_class_balance_of_each_split():
    frame = pd.DataFrame({"split": ["train"] * 400 + ["test"] * 40,
                          "label": [0] * 100 + [1] * 300 + [0] * 10 + [1] * 30})
    sub = data.subsample(frame, 60, seed=1)
    counts = sub.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", 0): 10, ("test", 1): 30, ("train", 0): 20, ("train", 1): 60}
    assert data.subsample(frame, None) is frame


@pytest.mark.parametrize("given, expected", [
    (None, None),
    ("synthetic", "synthetic"),
    ("/kaggle/input/chest-xray-pneumonia/chest_xray", "kaggle:chest-xray-pneumonia/chest_xray"),
    ("/kaggle/input/datasets/paultimothymooney/chest-xray-pneumonia/chest_xray",
     "kaggle:paultimothymooney/chest-xray-pneumonia/chest_xray"),
    ("/root/.cache/kagglehub/datasets/pkdarabi/diagnosis-of-diabetic-retinopathy/versions/1/data",
     "kaggle:pkdarabi/diagnosis-of-diabetic-retinopathy/data"),
])
def test_portable_data_dir_names_kaggle_data_by_handle(given, expected):
    assert runs.portable_data_dir(given) == expected


def test_portable_data_dir_is_relative_to_the_course():
    root = runs.project_root()
    assert runs.portable_data_dir(root / "data" / "synthetic" / "x") == "data/synthetic/x"
    shared = root.parent / "shared" / "data" / "chest_xray_pneumonia_224"
    assert runs.portable_data_dir(shared) == "../shared/data/chest_xray_pneumonia_224"


def test_portable_data_dir_resolves_a_folder_relative_to_the_working_directory(tmp_path, monkeypatch):
    root = runs.project_root()
    (root / "data").mkdir(exist_ok=True)
    monkeypatch.chdir(root / "data")  # like a notebook run from notebooks/ with DATA_DIR="../data"
    assert runs.portable_data_dir("../data") == "data"


def test_subsample_keeps_a_provided_test_split_whole(tmp_path):
    """The cpu profile caps train/val, but a dataset's own test split is evaluated whole."""
    for split, n_normal, n_pneu in (("train", 30, 60), ("test", 12, 20)):
        for cls, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneu)):
            for i in range(n):
                name = f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_virus_{i}.jpeg"
                _jpeg(tmp_path / split / cls / name, value=20 + 2 * i + (split == "test"))
    splits = data.load_splits("pneumonia", tmp_path, max_per_class=8, check_images=False)
    counts = splits.counts()
    assert counts.loc["test"].to_dict() == {"NORMAL": 12, "PNEUMONIA": 20}
    assert counts.loc["train"].max() == 8
    assert any("test split is kept whole" in n for n in splits.notes)
