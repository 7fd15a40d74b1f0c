"""helpers.deploy: upload validation, OOD score direction, int8 export, model bundle, app prediction path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import deploy
from helpers.models import build_model


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gray(size=(80, 64)) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
    return Image.fromarray(ramp, mode="L")


# ----------------------------------------------------------------------------- uploads

def test_good_jpeg_and_png_pass():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        checked = deploy.read_upload(_encode(rgb, fmt))
        assert checked.image.mode == "RGB" and checked.image.size == (60, 50)
        assert checked.format == fmt


@pytest.mark.parametrize("payload, phrase", [
    (b"", "empty"),
    (b"hello, this is a text file and not an image\n" * 10, "not an image"),
    (b"%PDF-1.4\n" + bytes(500), "not an image"),
])
def test_not_an_image_gets_a_clear_message(payload, phrase):
    with pytest.raises(deploy.UploadError, match=phrase):
        deploy.read_upload(payload)


def test_truncated_files_are_rejected():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        full = _encode(image, fmt)
        with pytest.raises(deploy.UploadError, match="truncated or corrupt"):
            deploy.read_upload(full[: len(full) // 2])


def test_too_many_bytes_is_rejected_before_decoding():
    payload = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    with pytest.raises(deploy.UploadError, match="file is 21.0 MB; the limit is 20 MB"):
        deploy.read_upload(payload)


def test_too_many_pixels_is_rejected_from_the_header():
    big = Image.new("1", (10_000, 5_100))  # 51 MP, a few kB as PNG
    payload = _encode(big)
    assert len(payload) < deploy.MAX_UPLOAD_BYTES
    with pytest.raises(deploy.UploadError, match="megapixels"):
        deploy.read_upload(payload)


def test_tiny_image_is_rejected():
    with pytest.raises(deploy.UploadError, match="at least 32 pixels"):
        deploy.read_upload(_encode(Image.new("L", (20, 200))))


def test_grayscale_is_replicated_to_rgb():
    checked = deploy.read_upload(_encode(_gray()))
    arr = np.asarray(checked.image)
    assert checked.original_mode == "L" and arr.shape == (64, 80, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert any("grayscale" in n for n in checked.notes)


def test_rgba_is_flattened_onto_black():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    checked = deploy.read_upload(_encode(Image.fromarray(rgba, mode="RGBA")))
    arr = np.asarray(checked.image)
    assert checked.image.mode == "RGB"
    assert arr[5, 5].tolist() == [200, 0, 0] and arr[5, 35].tolist() == [0, 0, 0]
    assert any("transparent" in n for n in checked.notes)


def test_16bit_png_is_rescaled_not_clipped():
    values = np.tile(np.linspace(0, 4095, 64), (48, 1)).astype(np.uint16)  # a 12-bit X-ray in 16 bits
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    payload = _encode(image)
    assert Image.open(io.BytesIO(payload)).mode.startswith("I")
    arr = np.asarray(deploy.read_upload(payload).image)[..., 0]
    # Proper conversion keeps the ramp: black on the left, white on the right, monotone, not all white.
    assert arr[0, 0] == 0 and arr[0, -1] == 255
    assert (np.diff(arr[0].astype(int)) >= 0).all() and len(np.unique(arr)) > 40


def test_palette_and_cmyk_are_converted():
    palette = _gray().convert("P")
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    assert deploy.read_upload(_encode(palette)).image.mode == "RGB"
    assert deploy.read_upload(_encode(cmyk, "JPEG")).image.mode == "RGB"


# ----------------------------------------------------------------------------- OOD scores

def test_softmax_scores_prefer_confident_logits():
    confident = np.array([[8.0, -8.0], [-6.0, 6.0]])
    unsure = np.array([[0.1, 0.0], [0.0, 0.05]])
    assert (deploy.msp_score(confident) > deploy.msp_score(unsure).max()).all()
    assert (deploy.energy_score(confident) > deploy.energy_score(unsure).max()).all()
    # a 1-logit model is treated as logits [0, z]
    assert np.allclose(deploy.msp_score(np.array([[3.0]])), torch.sigmoid(torch.tensor(3.0)).item())


def test_mahalanobis_scores_far_points_lower():
    rng = np.random.default_rng(0)
    dim = 16
    means = np.stack([np.zeros(dim), np.full(dim, 3.0)])
    labels = np.repeat([0, 1], 100)
    train = means[labels] + rng.normal(0, 1, (200, dim))
    params = deploy.fit_mahalanobis(train, labels)
    near = means[[0, 1] * 10] + rng.normal(0, 1, (20, dim))
    far = rng.normal(0, 1, (20, dim)) + 12.0
    near_s, far_s = deploy.mahalanobis_score(near, params), deploy.mahalanobis_score(far, params)
    assert near_s.min() > far_s.max()
    assert deploy.ood_auroc(near_s, far_s) == 1.0
    assert deploy.ood_auroc(far_s, near_s) == 0.0  # the direction matters


def test_threshold_keeps_the_requested_share():
    scores = np.arange(100, dtype=float)
    t = deploy.threshold_keeping(scores, 0.95)
    assert deploy.rejection_rate(scores, t) == pytest.approx(0.05)
    assert deploy.invalid_class_score(np.array([[0.1, 0.2, 0.7]]), 2)[0] == pytest.approx(0.3)


def test_outside_generators_shapes_and_determinism():
    for make in (deploy.synthetic_landscapes, deploy.synthetic_noise, deploy.synthetic_shapes):
        a, b = make(3, 40, seed=5), make(3, 40, seed=5)
        assert a.dtype == torch.uint8 and a.shape == (3, 3, 40, 40)
        assert torch.equal(a, b) and a.float().std() > 5


# ----------------------------------------------------------------------------- int8 export

class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.features(x))


def test_int8_static_quantization_gives_close_predictions(tmp_path):
    torch.manual_seed(0)
    model = _TinyNet().eval()
    images = deploy.synthetic_landscapes(24, 32, seed=0)
    fp32 = deploy.export_onnx(model, tmp_path / "m.onnx", 32)
    int8 = deploy.quantize_onnx_static(fp32, tmp_path / "m_int8.onnx", images[:16])
    dyn = deploy.quantize_onnx_dynamic(fp32, tmp_path / "m_dyn.onnx")
    with torch.inference_mode():
        from helpers.loading import normalize
        from helpers.train import logits_to_probs

        ref = logits_to_probs(model(normalize(images))).numpy()
    p32 = deploy.onnx_predict(deploy.onnx_session(fp32, 1), images)
    p8 = deploy.onnx_predict(deploy.onnx_session(int8, 1), images)
    pd8 = deploy.onnx_predict(deploy.onnx_session(dyn, 1), images)
    assert np.abs(p32 - ref).max() < 1e-4
    assert np.abs(p8 - ref).max() < 0.05 and np.abs(pd8 - ref).max() < 0.05
    assert not (tmp_path / "m_prep.onnx").exists()  # the pre-processed intermediate is cleaned up
    timing = deploy.measure_latency(lambda: None, n_runs=5, warmup=1)
    assert timing["runs"] == 5 and timing["median_ms"] >= 0


# ----------------------------------------------------------------------------- bundle and app path

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32).eval()
    feats = np.random.default_rng(0).normal(size=(20, 1280))
    params = deploy.fit_mahalanobis(feats, np.repeat([0, 1], 10))
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    deploy.save_bundle(path, model, class_names=["NORMAL", "PNEUMONIA"], image_size=32, profile="smoke",
                       threshold=0.5, synthetic_data=True,
                       ood={"method": "mahalanobis", "threshold": -1e9, "keep_fraction": 0.95, "params": params},
                       metrics={"test_auc": np.float64(0.5)})
    return model, path


def test_bundle_round_trip(tiny_bundle):
    model, path = tiny_bundle
    loaded = deploy.load_bundle(path)
    raw = torch.load(path, weights_only=True)  # safe loading works: only tensors and plain data
    assert raw["format"] == deploy.BUNDLE_FORMAT
    assert loaded.class_names == ["NORMAL", "PNEUMONIA"] and loaded.image_size == 32
    assert loaded.profile == "smoke" and loaded.meta["pretrained"] is False
    assert loaded.meta["ood"]["method"] == "mahalanobis"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-6)
    assert "smoke" in loaded.describe()


def test_load_bundle_rejects_other_files(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(deploy.BundleError, match="not a course model bundle"):
        deploy.load_bundle(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(deploy.BundleError, match="Could not read"):
        deploy.load_bundle(tmp_path / "junk.pt")


def test_analyse_upload_end_to_end(tiny_bundle):
    _, path = tiny_bundle
    app = deploy.load_bundle(path)
    payload = _encode(_gray((70, 60)))
    result = deploy.analyse_upload(app, payload)
    assert result.predicted in app.class_names
    assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.probability == pytest.approx(result.probs[result.predicted])
    assert result.in_distribution  # threshold -1e9 accepts everything
    assert result.heatmap.shape == (32, 32) and result.overlay.shape == (32, 32, 3)
    assert any("grayscale" in n for n in result.notes)
    app.meta["ood"] = dict(app.meta["ood"], threshold=1e9)  # now nothing passes
    assert not deploy.analyse_upload(app, payload).in_distribution
    with pytest.raises(deploy.UploadError):
        deploy.analyse_upload(app, b"not an image")


def test_locate_model_order_and_messages(tmp_path, tiny_bundle, monkeypatch):
    _, bundle = tiny_bundle
    monkeypatch.delenv(deploy.MODEL_PATH_ENV, raising=False)
    monkeypatch.delenv(deploy.MODEL_URL_ENV, raising=False)
    missing_default = tmp_path / "nothing.pt"
    found = deploy.locate_model(str(bundle), "", default=missing_default)
    assert found.path == bundle and found.source == "env"
    none = deploy.locate_model("", "", default=missing_default)
    assert none.path is None and any("not set" in m for m in none.messages)
    monkeypatch.setenv(deploy.MODEL_PATH_ENV, str(tmp_path / "typo.pt"))
    fallback = deploy.locate_model(default=bundle)
    assert fallback.source == "default" and "does not point to a file" in fallback.messages[0]
    # A URL that cannot be reached: a message, no exception (file:// keeps it offline and fast).
    failed = deploy.locate_model("", (tmp_path / "absent.pt").as_uri(), default=missing_default,
                                 download_dir=tmp_path / "dl")
    assert failed.path is None and "failed" in failed.messages[-1]
    fetched = deploy.locate_model("", bundle.as_uri(), default=missing_default, download_dir=tmp_path / "dl")
    assert fetched.source == "download" and deploy.load_bundle(fetched.path).image_size == 32
    again = deploy.locate_model("", bundle.as_uri(), default=missing_default, download_dir=tmp_path / "dl")
    assert again.source == "cache"
