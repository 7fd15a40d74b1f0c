"""Tests for helpers.plots and helpers.gradcam: every figure is a real PNG; Grad-CAM finds a planted pattern."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models import VisionTransformer  # noqa: E402

from helpers import evaluate as ev  # noqa: E402
from helpers import gradcam, plots  # noqa: E402


def assert_png(path) -> None:
    """The file exists, is larger than 1 KB and PIL reads it as a PNG with some content."""
    assert path.exists(), f"{path} was not written"
    assert path.stat().st_size > 1024, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 50 and img.height > 50
        extrema = img.convert("L").getextrema()
        assert extrema[0] < extrema[1], "the image is a single flat colour"


# ---------------------------------------------------------------------------------- toy models


def square_detector() -> nn.Sequential:
    """A hand-built, frozen CNN: class 1 = 'there is a bright square', class 0 = 'dark image'.

    Channel 0 of the conv fires where the local mean brightness exceeds 0.6 (the square);
    channel 1 fires on dark background. The classifier counts channel 0 for class 1 and
    channel 1 for class 0.
    """
    conv = nn.Conv2d(3, 2, kernel_size=5, stride=2, padding=2)
    with torch.no_grad():
        conv.weight[0].fill_(1 / 75)
        conv.bias[0] = -0.6
        conv.weight[1].fill_(-1 / 75)
        conv.bias[1] = 0.5
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-10.0, 1.0], [40.0, -1.0]]))
        head.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    model.requires_grad_(False)  # frozen, like a backbone in a head-only notebook
    return model


def images_with_squares(n: int = 6, size: int = 32, side: int = 8, seed: int = 0):
    """Dark noise images (values in [0, 0.4]) each with a bright square (value 1) at a random place."""
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.uniform(0, 0.4, size=(n, 3, size, size)), dtype=torch.float32)
    corners = rng.integers(3, size - side - 3, size=(n, 2))
    for i, (r, c) in enumerate(corners):
        x[i, :, r : r + side, c : c + side] = 1.0
    return x, corners


def tiny_vit(num_classes: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: no gradient at all
    return model


# ---------------------------------------------------------------------------------- Grad-CAM


def test_gradcam_peak_falls_inside_the_planted_square() -> None:
    model = square_detector()
    x, corners = images_with_squares()
    with torch.no_grad():
        assert (model(x).argmax(1) == 1).all()  # the toy model does see the squares
    heat = gradcam.grad_cam(model, x, target_layer=model[1])
    assert heat.shape == (6, 32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    side = 8
    for i, (r, c) in enumerate(corners):
        peak_r, peak_c = np.unravel_index(heat[i].argmax(), heat[i].shape)
        assert r <= peak_r < r + side and c <= peak_c < c + side, (i, (peak_r, peak_c), (r, c))
        inside = np.zeros((32, 32), bool)
        inside[r : r + side, c : c + side] = True
        assert heat[i][inside].mean() > 3 * heat[i][~inside].mean()


def test_gradcam_class_idx_explains_the_other_class() -> None:
    model = square_detector()
    x, corners = images_with_squares(n=3, seed=1)
    heat0 = gradcam.grad_cam(model, x, target_layer=model[1], class_idx=0)  # evidence for "dark image"
    for i, (r, c) in enumerate(corners):
        assert heat0[i, r + 2 : r + 6, c + 2 : c + 6].max() < 0.05  # the square is no evidence for class 0
        assert heat0[i].max() == pytest.approx(1.0)


def test_gradcam_works_frozen_in_inference_mode_and_restores_state() -> None:
    model = square_detector()
    model.train()
    x, _ = images_with_squares(n=2)
    with torch.inference_mode():
        heat = gradcam.grad_cam(model, x, target_layer=model[0])
    assert heat.max() == pytest.approx(1.0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_on_vit_tokens() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    heat = gradcam.grad_cam(model, x, target_layer=model.encoder.layers[-1].ln_1)
    assert heat.shape == (2, 32, 32)
    assert np.isfinite(heat).all() and heat.max() == pytest.approx(1.0)
    tokens = torch.randn(2, 1 + 16, 5)
    grid = gradcam.vit_tokens_to_map(tokens)  # what grad_cam applies to token outputs by itself
    assert not hasattr(gradcam, "vit_reshape_transform")
    assert grid.shape == (2, 5, 4, 4)
    assert torch.equal(grid[1, :, 0, 1], tokens[1, 2])  # patch 1 (row 0, col 1) is token 2


def test_default_target_layer_fallbacks() -> None:
    vit = tiny_vit()
    assert gradcam.default_target_layer(vit) is vit.encoder.layers[-1].ln_1
    cnn = square_detector()
    assert gradcam.default_target_layer(cnn) is cnn[0]
    with pytest.warns(UserWarning, match="ln_1"):
        assert gradcam.usable_target_layer(vit, vit.encoder.layers[-1]) is vit.encoder.layers[-1].ln_1


def test_overlay_blends_into_rgb() -> None:
    image = np.zeros((3, 10, 12), dtype=np.uint8)
    heat = np.zeros((10, 12))
    heat[5, 6] = 1.0
    out = plots.overlay(image, heat, alpha=0.5)
    assert out.shape == (10, 12, 3) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    assert out[5, 6, 0] > out[0, 0, 0]  # jet: hot = red, cold = blue
    with pytest.raises(ValueError):
        plots.overlay(image, np.zeros((5, 5)))


# ---------------------------------------------------------------------------------- every plot writes a PNG


@pytest.fixture
def binary_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p_pos = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 120), 0, 1)
    return y, np.stack([1 - p_pos, p_pos], axis=1)


def test_plot_history(tmp_path) -> None:
    history = pd.DataFrame({
        "epoch": [1, 2, 1, 2, 3], "stage": [1, 1, 2, 2, 2],
        "train_loss": [0.9, 0.7, 0.6, 0.5, 0.45], "val_loss": [0.8, 0.7, 0.65, 0.6, 0.62],
        "train_accuracy": [0.5, 0.6, 0.7, 0.75, 0.8], "val_accuracy": [0.55, 0.6, 0.66, 0.7, 0.7],
        "val_balanced_accuracy": [0.5, 0.58, 0.64, 0.69, 0.7], "val_auc": [0.6, 0.7, 0.75, 0.8, 0.79],
        "lr": [1e-3, 1e-3, 1e-5, 1e-5, 5e-6],
    })
    fig = plots.plot_history(history, tmp_path / "new_dir", best_epoch=2)
    assert_png(tmp_path / "new_dir" / "training_curves.png")
    assert len(fig.axes) == 3
    fig = plots.plot_history_comparison({"a": history, "b": history.assign(val_auc=0.5)}, tmp_path, "cmp.png")
    assert_png(tmp_path / "cmp.png") and len(fig.axes) == 2


def _annotations(ax) -> np.ndarray:
    """The numbers written on a heatmap, placed by their cell (row = y, column = x)."""
    cells = {(int(t.get_position()[1]), int(t.get_position()[0])): float(t.get_text()) for t in ax.texts}
    shape = (max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1)
    return np.array([[cells[(r, c)] for c in range(shape[1])] for r in range(shape[0])])


def test_plot_confusion_matrix(tmp_path) -> None:
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
    fig = plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path, name="cm.png")
    assert_png(tmp_path / "cm.png")
    counts, rates = [ax for ax in fig.axes if ax.texts]  # counts and row-normalised side by side
    assert np.array_equal(_annotations(counts), cm), "the counts written on the cells are the matrix"
    expected = np.round(cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), 2)  # an empty row shows zeros
    np.testing.assert_array_equal(_annotations(rates), expected)
    assert [t.get_text() for t in counts.get_xticklabels()] == ["a", "b", "c"]
    assert (counts.get_xlabel(), counts.get_ylabel()) == ("predicted", "true")


def test_plot_roc_pr_binary_and_multiclass(tmp_path, binary_case) -> None:
    y, probs = binary_case
    fig = plots.plot_roc_pr(y, probs, ["neg", "pos"], tmp_path)
    assert_png(tmp_path / "roc_pr.png")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"AUC {ev.compute_metrics(y, probs, ['neg', 'pos'], n_bootstrap=0)['auc']:.3f}" in t for t in labels)
    y4 = np.random.default_rng(1).integers(0, 4, 80)
    p4 = np.random.default_rng(2).dirichlet(np.ones(4), 80)
    fig4 = plots.plot_roc_pr(y4, p4, list("abcd"), tmp_path, name="roc4.png")
    assert_png(tmp_path / "roc4.png")
    assert len(fig4.axes[0].get_legend().get_texts()) == 5  # 4 classes + chance


def test_plot_threshold_sweep(tmp_path, binary_case) -> None:
    y, probs = binary_case
    chosen = ev.choose_threshold(y, probs[:, 1])
    plots.plot_threshold_sweep(y, probs[:, 1], tmp_path, chosen=chosen)
    assert_png(tmp_path / "threshold_sweep.png")


def test_plot_prediction_grid(tmp_path, binary_case) -> None:
    y, probs = binary_case
    images = torch.randint(0, 256, (20, 3, 24, 24), dtype=torch.uint8)
    plots.plot_prediction_grid(images[:20], y[:20], probs[:20], ["neg", "pos"], tmp_path, n=8)
    assert_png(tmp_path / "predictions.png")
    fig = plots.plot_prediction_grid(images[:20], y[:20], probs[:20], ["neg", "pos"], tmp_path, name="err.png",
                                     errors_only=True)
    assert_png(tmp_path / "err.png")
    n_errors = int(((probs[:20, 1] >= 0.5).astype(int) != y[:20]).sum())
    red_titles = [ax for ax in fig.axes if ax.get_title() and ax.title.get_color() == "red"]
    assert len(red_titles) == min(n_errors, 16)


def test_plot_run_comparison(tmp_path) -> None:
    runs = pd.DataFrame({
        "run": ["plain", "weighted", "sampler"], "model": ["resnet50"] * 3,
        "test_balanced_accuracy": [0.7, 0.8, 0.78], "test_balanced_accuracy_lo": [0.65, 0.75, 0.72],
        "test_balanced_accuracy_hi": [0.75, 0.85, 0.83], "test_auc": [0.85, 0.88, np.nan],
    })
    fig = plots.plot_run_comparison(runs, ["test_balanced_accuracy", "test_auc"], tmp_path)
    assert_png(tmp_path / "comparison.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["plain", "weighted", "sampler"]
    bar_groups = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    heights = [[bar.get_height() for bar in bars] for bars in bar_groups]
    np.testing.assert_allclose(heights, [[0.7, 0.8, 0.78], [0.85, 0.88, 0.0]])  # a missing AUC: no visible bar
    same_model = plots.plot_run_comparison(runs, ["test_auc"], tmp_path, name="c2.png", label_column="model")
    assert len(same_model.axes[0].containers[0]) == 3, "one bar per row, even when labels repeat"
    with pytest.raises(ValueError, match="Unknown metric"):
        plots.plot_run_comparison(runs, ["test_f1"], tmp_path)


def _image_frame(tmp_path) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for class_name in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                path = tmp_path / "img" / f"{split}_{class_name}_{i}.png"
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8), mode="L").save(path)
                rows.append({"path": str(path), "class_name": class_name, "split": split})
    return pd.DataFrame(rows)


def test_plot_sample_grid(tmp_path) -> None:
    frame = _image_frame(tmp_path)
    fig = plots.plot_sample_grid(frame, ["NORMAL", "PNEUMONIA"], tmp_path / "out", per_class=3)
    assert_png(tmp_path / "out" / "samples.png")
    assert sum(bool(ax.images) for ax in fig.axes) == 6


def test_plot_gradcam_cnn_and_vit(tmp_path) -> None:
    model = square_detector()
    x, _ = images_with_squares(n=3)
    images_u8 = (x * 255).to(torch.uint8)
    fig = plots.plot_gradcam(model, images_u8, ["dark", "square"], tmp_path, target_layer=model[1], y_true=[1, 1, 0])
    assert_png(tmp_path / "gradcam.png")
    assert sum(bool(ax.images) for ax in fig.axes) == 6  # image and overlay per column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained helpers.models layer for a bare ViT: fallback is used
        plots.plot_gradcam(tiny_vit(), images_u8[:2], ["a", "b", "c"], tmp_path, name="gradcam_vit.png")
    assert_png(tmp_path / "gradcam_vit.png")


def test_figures_are_not_kept_by_pyplot(tmp_path, binary_case) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    y, probs = binary_case
    for i in range(3):
        plots.plot_threshold_sweep(y, probs, tmp_path, name=f"t{i}.png")
    assert len(plt.get_fignums()) == before  # Agg: no figures pile up in loops


def test_sample_grid_shows_a_16_bit_xray_as_training_reads_it(tmp_path, monkeypatch):
    """A 12-bit X-ray in a 16-bit PNG is shown scaled (as `images.read_image` gives it), not clipped white."""
    import matplotlib.axes
    import pandas as pd
    from PIL import Image

    from helpers.images import read_image

    path = tmp_path / "xray16.png"
    Image.fromarray(np.tile(np.linspace(0, 4095, 60), (40, 1)).astype(np.uint16)).save(path)
    shown = []
    real_imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, x, *a, **k: (shown.append(np.asarray(x)), real_imshow(self, x, *a, **k))[1])
    frame = pd.DataFrame({"path": [str(path)], "class_name": ["NORMAL"]})
    plots.plot_sample_grid(frame, ["NORMAL"], tmp_path, per_class=1)
    assert len(shown) == 1
    assert (shown[0] == 255).mean() < 0.05  # Image.convert("RGB") clipped most of these pixels to 255
    assert np.array_equal(shown[0], np.asarray(read_image(path)))
