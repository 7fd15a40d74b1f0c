"""app.serve: upload validation and the app's prediction path from uploaded bytes to an answer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app import bundle, serve


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
        checked = serve.read_upload(_encode(rgb, fmt))
        assert checked.image.mode == "RGB" and checked.image.size == (60, 50)
        assert checked.format == fmt


@pytest.mark.parametrize("payload, phrase", [
    (b"", "empty"),
    (b"hello, this is a text file and not an image\n" * 10, "not an image"),
    (b"%PDF-1.4\n" + bytes(500), "not an image"),
])
def test_not_an_image_gets_a_clear_message(payload, phrase):
    with pytest.raises(serve.UploadError, match=phrase):
        serve.read_upload(payload)


def test_truncated_files_are_rejected():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        full = _encode(image, fmt)
        with pytest.raises(serve.UploadError, match="truncated or corrupt"):
            serve.read_upload(full[: len(full) // 2])


def test_too_many_bytes_is_rejected_before_decoding():
    payload = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    with pytest.raises(serve.UploadError, match="file is 21.0 MB; the limit is 20 MB"):
        serve.read_upload(payload)


def test_too_many_pixels_is_rejected_from_the_header():
    big = Image.new("1", (10_000, 5_100))  # 51 MP, a few kB as PNG
    payload = _encode(big)
    assert len(payload) < serve.MAX_UPLOAD_BYTES
    with pytest.raises(serve.UploadError, match="megapixels"):
        serve.read_upload(payload)


def test_tiny_image_is_rejected():
    with pytest.raises(serve.UploadError, match="at least 32 pixels"):
        serve.read_upload(_encode(Image.new("L", (20, 200))))


def test_grayscale_is_replicated_to_rgb():
    checked = serve.read_upload(_encode(_gray()))
    arr = np.asarray(checked.image)
    assert checked.original_mode == "L" and arr.shape == (64, 80, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert any("grayscale" in n for n in checked.notes)


def test_rgba_is_flattened_onto_black():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    checked = serve.read_upload(_encode(Image.fromarray(rgba, mode="RGBA")))
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
    arr = np.asarray(serve.read_upload(payload).image)[..., 0]
    # Proper conversion keeps the ramp: black on the left, white on the right, monotone, not all white.
    assert arr[0, 0] == 0 and arr[0, -1] == 255
    assert (np.diff(arr[0].astype(int)) >= 0).all() and len(np.unique(arr)) > 40


def test_palette_and_cmyk_are_converted():
    palette = _gray().convert("P")
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    assert serve.read_upload(_encode(palette)).image.mode == "RGB"
    assert serve.read_upload(_encode(cmyk, "JPEG")).image.mode == "RGB"


# ----------------------------------------------------------------------------- app path

def test_analyse_upload_end_to_end(tiny_bundle):
    _, path = tiny_bundle
    app = bundle.load_bundle(path)
    payload = _encode(_gray((70, 60)))
    result = serve.analyse_upload(app, payload)
    assert result.predicted in app.class_names
    assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.probability == pytest.approx(result.probs[result.predicted])
    assert result.in_distribution  # threshold -1e9 accepts everything
    assert result.heatmap.shape == (32, 32) and result.overlay.shape == (32, 32, 3)
    assert any("grayscale" in n for n in result.notes)
    app.meta["ood"] = dict(app.meta["ood"], threshold=1e9)  # now nothing passes
    assert not serve.analyse_upload(app, payload).in_distribution
    with pytest.raises(serve.UploadError):
        serve.analyse_upload(app, b"not an image")



def test_the_app_feeds_the_model_the_pixels_training_feeds_it(tiny_bundle, tmp_path):
    """One resize for both paths: the app's model input equals the tensor cache's image of the same file."""
    from helpers.loading import load_image

    _, path = tiny_bundle
    app = bundle.load_bundle(path)
    rng = np.random.default_rng(1)
    picture = tmp_path / "xray.png"
    Image.fromarray(rng.integers(0, 256, (97, 131), dtype=np.uint8), mode="L").save(picture)
    analysis = serve.analyse_upload(app, picture.read_bytes())
    cached = load_image(picture, app.image_size).permute(1, 2, 0).numpy()
    assert analysis.image_u8.shape == (app.image_size, app.image_size, 3)
    np.testing.assert_array_equal(analysis.image_u8, cached)


# ----------------------------------------------------------------------------- several sessions at once

@pytest.fixture(scope="module")
def cam_app(tmp_path_factory) -> bundle.AppModel:
    """A loaded app model whose Grad-CAM maps are not blank: MobileNetV2 at 64 px (a 2 x 2 map at
    the target layer; at 32 px it is 1 x 1, so every heatmap is flat) with a random, non-zero head."""
    import torch

    from helpers.models import build_model, get_head

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=64).eval()
    for layer in get_head(model).modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)
    path = tmp_path_factory.mktemp("cam_bundle") / "model.pt"
    bundle.save_bundle(path, model, class_names=["NORMAL", "PNEUMONIA"], image_size=64, profile="smoke",
                       threshold=0.5)
    return bundle.load_bundle(path)


def _concurrent_analyses(app: bundle.AppModel, images: list, n_threads: int) -> list[tuple[int, object]]:
    """(image index, Analysis or exception) of every call, each thread analysing every image, all at once."""
    import threading

    barrier, results, lock = threading.Barrier(n_threads), [], threading.Lock()

    def session(t: int) -> None:
        barrier.wait()
        for i in range(len(images)):
            k = (t + i) % len(images)
            try:
                out: object = serve.analyse_image(app, images[k])
            except Exception as err:  # a wrong answer and a crash both count as wrong
                out = err
            with lock:
                results.append((k, out))

    threads = [threading.Thread(target=session, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_sessions_get_the_heatmap_of_their_own_image(cam_app, recwarn):
    """Two app sessions share one cached model (st.cache_resource): each must get the Grad-CAM of
    its own image, exactly as when it runs alone (issue 17: 25 of 48 were wrong)."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(6)]
    alone = [serve.analyse_image(cam_app, image) for image in images]
    assert all(a.heatmap.std() > 0.05 for a in alone)  # real maps, so a mix-up shows
    assert not any(np.allclose(alone[0].heatmap, a.heatmap) for a in alone[1:])
    results = _concurrent_analyses(cam_app, images, n_threads=8)

    def same(a: object, b: serve.Analysis) -> bool:
        return (isinstance(a, serve.Analysis) and np.allclose(a.heatmap, b.heatmap, atol=1e-5)
                and a.predicted == b.predicted and a.probability == pytest.approx(b.probability, abs=1e-6))

    wrong = [k for k, a in results if not same(a, alone[k])]
    assert len(results) == 48 and not wrong, f"{len(wrong)} of {len(results)} heatmaps wrong"
    assert not [w for w in recwarn if "Grad-CAM" in str(w.message)]  # no blank-map warning leaks out
