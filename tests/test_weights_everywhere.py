"""The weights' normalisation and padding go everywhere the model goes (issue 19, items 2-4).

A model from `build_model` carries `input_mean` / `input_std` (and converted TensorFlow weights
SAME padding): the loaders, the feature cache, Grad-CAM, the OOD scores, the bundle and the app
all read them from the model (so do notebook 08's ONNX predictions and int8 calibration, which assert
that ONNX Runtime gives PyTorch's probabilities). Tiny models, tiny images; the tests
that need the real converted weights skip where ../shared/weights is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from app import bundle, serve
from conftest import SHARED_WEIGHTS
from coursebuild import records
from helpers import core, evaluate, gradcam, images, loading, models, ood, plots, runs, train

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
XRAYS = SHARED_WEIGHTS.parent / "data" / "chest_xray_pneumonia_224"


def _converted_like(num_outputs: int = 2, size: int = 32) -> nn.Module:
    """A random MobileNetV2 dressed as converted TensorFlow weights: SAME padding, [-1, 1] input."""
    torch.manual_seed(0)
    model = models.build_model("mobilenet_v2", num_outputs, weights="random", head="gap_dropout", image_size=size)
    info = dict(models.random_info(), source="tflite-converted:test.tflite", padding="tf_same",
                input_mean=HALF[0], input_std=HALF[1], sha256="0" * 64, batchnorm="restored from 8 images")
    models.apply_weights_info(model, info)
    return model.eval()


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _half(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # TensorFlow's [-1, 1]: what the converted weights need


@pytest.fixture(scope="module")
def splits(synthetic_root):
    from helpers.data import load_splits

    return load_splits("pneumonia", synthetic_root("pneumonia"), max_per_class=6, seed=0)


# --------------------------------------------------------------------------- loaders


def test_normalize_takes_a_model_a_pair_or_mean_and_std():
    u8 = _images()
    model = _converted_like()
    for spec in (dict(normalization=model), dict(normalization=HALF), dict(mean=HALF[0], std=HALF[1])):
        torch.testing.assert_close(loading.normalize(u8, **spec), _half(u8))
    imagenet = loading.normalize(u8)
    assert not torch.allclose(imagenet, _half(u8))
    torch.testing.assert_close(loading.denormalize(loading.normalize(u8, normalization=model), model), u8 / 255.0)
    assert core.as_normalization(nn.Linear(2, 2)) == (core.IMAGENET_MEAN, core.IMAGENET_STD)


def test_make_loaders_normalises_as_the_model_needs(splits):
    model = _converted_like()
    loaders = loading.make_loaders(splits, 32, 4, augment="none", normalization=model)
    x, _ = next(iter(loaders["val"]))
    u8 = torch.stack([loading.load_image(p, 32) for p in splits.val["path"][:len(x)]])
    torch.testing.assert_close(x, _half(u8), atol=1e-5, rtol=0)
    assert loaders["train"].normalization == HALF and loaders["train"].ordered().normalization == HALF
    default = loading.make_loaders(splits, 32, 4, augment="none")
    assert default["val"].normalization == (core.IMAGENET_MEAN, core.IMAGENET_STD)


def test_with_normalization_gives_views_that_share_the_images():
    model = _converted_like()
    loaders = {"val": loading.TensorLoader(_images(4), [0, 1, 0, 1], batch_size=4)}
    views = loading.with_normalization(loaders, model)
    assert views["val"].normalization == HALF and loaders["val"].normalization != HALF
    assert views["val"].images.data_ptr() == loaders["val"].images.data_ptr()
    torch.testing.assert_close(next(iter(views["val"]))[0], _half(_images(4)))


def test_a_loader_normalised_for_other_weights_is_refused_by_fit_predict_and_the_feature_cache():
    model = _converted_like()
    wrong = loading.TensorLoader(_images(8), [0, 1] * 4, batch_size=4)  # ImageNet's normalisation
    right = loading.TensorLoader(_images(8), [0, 1] * 4, batch_size=4, normalization=model)
    optimizer = torch.optim.SGD(models.head_parameters(model), lr=0.0)
    criterion = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"normalization=model"):
        train.fit(model, wrong, None, epochs=1, criterion=criterion, optimizer=optimizer, progress=False)
    with pytest.raises(ValueError, match=r"\(tflite-converted:test.tflite\) need mean \(0\.5, 0\.5, 0\.5\)"):
        evaluate.predict(model, wrong)
    backbone, _ = models.backbone_and_head(model)
    with pytest.raises(ValueError, match=r"weights need mean \(0\.5"):
        train.extract_features(backbone, wrong, "cpu", progress=False)
    with pytest.raises(ValueError, match="normalization=model"):
        train.fit_head_only(model, wrong, None, epochs=1, criterion=criterion, optimizer=optimizer, progress=False)
    probs, _ = evaluate.predict(model, right)
    assert probs.shape == (8, 2)


def test_the_feature_cache_sees_the_pixels_the_model_needs():
    model = _converted_like()
    u8 = _images(6)
    loader = loading.TensorLoader(u8, [0, 1] * 3, batch_size=4, normalization=model)
    backbone, _ = models.backbone_and_head(model)
    feats, _ = train.extract_features(backbone, loader, "cpu", amp=False, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone(_half(u8)), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- Grad-CAM, OOD, the app


def test_gradcam_and_ood_normalise_as_the_model_needs():
    model = _converted_like()
    u8 = _images(3)
    with torch.no_grad():
        expected = model(_half(u8))
    probs, _, heatmaps = gradcam.explain(model, u8)
    torch.testing.assert_close(torch.from_numpy(probs), core.logits_to_probs(expected), atol=1e-5, rtol=1e-4)
    assert heatmaps.shape == (3, 32, 32)
    logits, _ = ood.logits_and_features(model, u8)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-5, rtol=1e-4)


def _save(model: nn.Module, path) -> None:
    bundle.save_bundle(path, model, class_names=["NORMAL", "PNEUMONIA"], image_size=32, profile="smoke",
                       threshold=0.5, synthetic_data=True)


def test_the_bundle_brings_back_same_padding_and_normalisation(tmp_path):
    model = _converted_like()
    _save(model, tmp_path / "m.pt")
    app = bundle.load_bundle(tmp_path / "m.pt")
    assert any(isinstance(m, models.TFSamePadConv2d) for m in app.model.modules())
    assert core.as_normalization(app.model) == HALF and app.model.weights_info["source"].startswith("tflite")
    assert app.meta["weights_info"]["padding"] == "tf_same"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(app.model(x), model(x))


def test_the_app_feeds_a_converted_weights_bundle_exactly_the_pixels_training_feeds_it(tmp_path):
    from PIL import Image

    _save(_converted_like(), tmp_path / "m.pt")
    app = bundle.load_bundle(tmp_path / "m.pt")
    image = Image.fromarray(_images(1, 48)[0].permute(1, 2, 0).numpy())
    seen = []
    handle = app.model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
    try:
        serve.analyse_image(app, image)
    finally:
        handle.remove()
    u8 = images.resized_tensor(image, 32)[None]
    batch, _ = next(iter(loading.TensorLoader(u8, [0], normalization=app.model)))  # what training feeds it
    assert seen and all(torch.equal(x, batch) for x in seen)
    torch.testing.assert_close(batch, _half(u8))


# --------------------------------------------------------------------------- provenance


def test_metrics_json_gets_the_weights_block_and_results_name_them(tmp_path):
    run = runs.start_run("nb", "smoke", output_dir=str(tmp_path))
    model = _converted_like()
    record = runs.save_metrics(run, None, dataset="pneumonia", model=model)
    assert record["model"] == "mobilenet_v2" and record["pretrained"] is True
    weights = json.loads(run.metrics_path.read_text())["weights"]
    assert weights["source"] == "tflite-converted:test.tflite" and weights["padding"] == "tf_same"
    assert weights["input_mean"] == [0.5, 0.5, 0.5] and weights["batchnorm"].startswith("restored")
    table = records.results_table([record, {**record, "weights": models.random_info(), "pretrained": False}])
    assert list(table["weights"]) == ["ImageNet (TFLite, converted)", "random"]
    from coursebuild.results import summary_frame

    assert "weights" in summary_frame(table).columns
    assert runs.weights_label({"source": "torchvision"}) == "torchvision ImageNet"
    # A comparison run may record its weights as a label already (chapters 01 and 03).
    compared = {**record, "runs": [{"label": "MobileNetV2, ImageNet", "weights": "ImageNet (TFLite, converted)",
                                    "test": record.get("test")}]}
    assert "ImageNet (TFLite, converted)" in list(records.results_table([compared])["weights"])


def test_figures_carry_the_stamp_when_given(tmp_path):
    run = runs.start_run("nb", "smoke", output_dir=str(tmp_path))
    stamp = runs.figure_stamp(run, None, _converted_like())
    assert stamp == "profile smoke | data synthetic | weights ImageNet (TFLite, converted)"
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7],
                            "train_accuracy": [0.5, 0.7], "val_accuracy": [0.5, 0.6]})
    plots.set_stamp(stamp)
    try:
        fig = plots.plot_history(history, tmp_path)
    finally:
        plots.set_stamp(None)
    assert [t.get_text() for t in fig.texts].count(stamp) == 1
    assert stamp not in [t.get_text() for t in plots.plot_history(history, tmp_path).texts]


# --------------------------------------------------------------------------- BatchNorm of converted weights


@pytest.fixture()
def converted(converted_weights):
    """build_model(weights=<the file tools/convert_tflite_weights.py wrote>)."""
    return lambda **kw: models.build_model("mobilenet_v2", 1, weights=converted_weights, head="gap_dropout", **kw)


def _xray_loaders(model: nn.Module, size: int = 64, per_class: int = 16) -> dict:
    if not (XRAYS / "train").is_dir():
        pytest.skip("real data not present")
    from helpers.data import load_splits

    splits = load_splits("pneumonia", XRAYS, max_per_class=per_class, seed=0)
    return loading.make_loaders(splits, size, 16, augment="none", normalization=model, seed=0)


def test_converted_weights_come_with_their_batchnorm_statistics(converted):
    model = converted(freeze="head")
    assert model.weights_info["batchnorm"].startswith("restored from") and model.pretrained
    loaders = _xray_loaders(model)
    x, _ = next(iter(loaders["val"]))
    model.eval()
    with torch.no_grad():
        before = model(x)
    assert models.estimate_frozen_batchnorm(model, loaders["train"]) == 0  # nothing to estimate
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_a_converted_model_fine_tunes_in_train_mode_without_collapsing(converted):
    """All layers in train mode (BatchNorm on batch statistics): the loss falls and the validation
    AUC is far from the 0.5 where folded BatchNorm statistics used to leave it."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    model = converted(freeze="none")
    loaders = _xray_loaders(model, size=96, per_class=24)
    head = list(models.head_parameters(model))
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.Adam([{"params": head, "lr": 1e-3}, {"params": rest, "lr": 1e-4}])
    criterion = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(4):
        model.train()
        for x, y in loaders["train"]:
            optimizer.zero_grad()
            loss = criterion(model(x).squeeze(1), y.float())
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    probs, labels = evaluate.predict(model, loaders["val"])
    assert np.mean(losses[-3:]) < min(0.6, losses[0]), losses  # collapsed BatchNorm sits at 0.69
    assert roc_auc_score(labels, np.asarray(probs).reshape(len(labels), -1)[:, -1]) > 0.7
