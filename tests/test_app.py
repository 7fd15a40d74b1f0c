"""The Streamlit app, headless: AppTest for the page logic, and one real browser screenshot.

AppTest (streamlit.testing.v1) runs app/streamlit_app.py in-process, so `app.bundle` can be
monkeypatched (the default model path points into tmp_path: a model saved in assets/ by a real
notebook run must not change what these tests see). The browser test starts `streamlit run` on
a free port and takes a screenshot with headless Chromium; it is skipped when Chromium is absent.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from app import bundle, serve
from helpers import ood
from helpers.models import build_model

APP = ROOT / "app" / "streamlit_app.py"
pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    """A tiny smoke bundle (MobileNetV2 at 32 px, random weights, Mahalanobis guard)."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32).eval()
    params = ood.fit_mahalanobis(np.random.default_rng(0).normal(size=(20, 1280)), np.repeat([0, 1], 10))
    path = tmp_path_factory.mktemp("app_model") / "pneumonia_app_model.pt"
    bundle.save_bundle(path, model, class_names=["NORMAL", "PNEUMONIA"], image_size=32, profile="smoke",
                       threshold=0.5, synthetic_data=True, metrics={"test_auc": 0.5},
                       ood={"method": "mahalanobis", "threshold": -1e12, "keep_fraction": 0.95, "params": params})
    return path


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env vars, and a default model path that does not exist."""
    monkeypatch.delenv(bundle.MODEL_PATH_ENV, raising=False)
    monkeypatch.delenv(bundle.MODEL_URL_ENV, raising=False)
    monkeypatch.setattr(bundle, "default_model_path", lambda: tmp_path / "assets" / "absent.pt")
    return monkeypatch


def _texts(at: AppTest) -> str:
    parts = [e.value for kind in ("error", "warning", "info", "success", "markdown", "caption", "subheader")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _ok(at: AppTest) -> AppTest:
    """The script ran to the end without an exception (the page shows no stack trace)."""
    assert not at.exception, [(e.message, e.stack_trace) for e in at.exception]
    return at


def _run(at: AppTest) -> AppTest:
    return _ok(at.run())


def test_no_model_gives_a_clear_message(isolated):
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    assert at.title[0].value == "Medical image classifier"
    errors = " ".join(e.value for e in at.error)
    assert "No model file found" in errors and bundle.MODEL_PATH_ENV in errors and bundle.MODEL_URL_ENV in errors
    assert "Not for clinical use" in _texts(at)
    assert not at.file_uploader  # nothing to upload to without a model


def test_unreachable_url_is_reported(isolated, tmp_path):
    isolated.setenv(bundle.MODEL_URL_ENV, (tmp_path / "nowhere.pt").as_uri())
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    assert "failed" in " ".join(e.value for e in at.error)


def test_model_page_sample_and_uploads(isolated, bundle_path):
    isolated.setenv(bundle.MODEL_PATH_ENV, str(bundle_path))
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    text = _texts(at)
    assert "'smoke' profile" in text and "Not for clinical use" in text
    assert at.file_uploader, "the upload widget should be shown when a model is loaded"

    # a sample image through the radio button
    sample = next(o for o in at.radio[0].options if "chest X-ray" in o)
    _ok(at.radio[0].set_value(sample).run())
    assert "Result for sample_xray.png" in _texts(at)
    labels = [m.label for m in at.metric]
    assert any(label.startswith("Prediction") for label in labels)
    assert at.metric[0].value in ("NORMAL", "PNEUMONIA")
    assert "Input check" in " ".join(s.value for s in at.success)

    # back to uploads: a good grayscale PNG, then a file that is not an image
    _ok(at.radio[0].set_value(at.radio[0].options[0]).run())
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), mode="L").save(buffer, format="PNG")
    _ok(at.file_uploader[0].set_value(("my_xray.png", buffer.getvalue(), "image/png")).run())
    assert "Result for my_xray.png" in _texts(at)
    assert "grayscale" in " ".join(i.value for i in at.info)

    _ok(at.file_uploader[0].set_value(("notes.png", b"this is not an image at all", "image/png")).run())
    errors = " ".join(e.value for e in at.error)
    assert "notes.png" in errors and "not an image" in errors
    assert "Result for" not in _texts(at)


def test_bundle_with_bad_contents_gives_a_message_not_a_traceback(isolated, tmp_path):
    """A valid format key but an architecture that does not exist: an error box, no stack trace."""
    bad = tmp_path / "bad_model.pt"
    torch.save({"format": bundle.BUNDLE_FORMAT, "arch": "no_such_net", "head": "linear", "num_outputs": 2,
                "class_names": ["NORMAL", "PNEUMONIA"], "image_size": 32, "state_dict": {}}, bad)
    isolated.setenv(bundle.MODEL_PATH_ENV, str(bad))
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    errors = " ".join(e.value for e in at.error)
    assert "could not be loaded" in errors and "no_such_net" in errors
    assert not at.file_uploader


def test_bundle_with_classes_in_another_order_is_refused_at_load(isolated, tmp_path, bundle_path):
    """Weights fine, class names swapped: the page refuses the file (it would name every answer wrong)."""
    contents = torch.load(bundle_path, weights_only=True)
    contents["class_names"] = ["PNEUMONIA", "NORMAL"]
    bad = tmp_path / "swapped.pt"
    torch.save(contents, bad)
    isolated.setenv(bundle.MODEL_PATH_ENV, str(bad))
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    errors = " ".join(e.value for e in at.error)
    assert "could not be loaded" in errors and "another order" in errors and "notebook 08" in errors
    assert not at.file_uploader


def test_a_failed_analysis_does_not_blame_the_image(isolated, bundle_path):
    isolated.setenv(bundle.MODEL_PATH_ENV, str(bundle_path))

    def broken(app, payload, **limits):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    isolated.setattr(serve, "analyse_upload", broken)
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    sample = next(o for o in at.radio[0].options if "chest X-ray" in o)
    _ok(at.radio[0].set_value(sample).run())
    errors = " ".join(e.value for e in at.error)
    assert "analysis of sample_xray.png failed" in errors and "shapes cannot be multiplied" in errors
    assert "model file" in errors and "another image" not in errors


def test_app_prediction_matches_the_helper(bundle_path):
    """The page only lays out what serve.analyse_upload computes: same bytes, same answer."""
    app = bundle.load_bundle(bundle_path)
    payload = serve.sample_image_bytes("landscape")
    first, second = serve.analyse_upload(app, payload), serve.analyse_upload(app, payload)
    assert first.predicted == second.predicted and first.probability == pytest.approx(second.probability)


def test_a_fundus_model_page_speaks_of_fundus_photographs_and_its_own_classes(isolated, tmp_path):
    """Issue 29.9: the page takes its wording from the bundle's dataset and class names."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 2, pretrained=False, head="gap_dropout", image_size=32).eval()
    path = bundle.save_bundle(tmp_path / "fundus.pt", model, class_names=["normal", "disease"], image_size=32,
                              profile="smoke", threshold=0.5, dataset="fundus", synthetic_data=True,
                              ood={"method": "msp", "threshold": 2.0, "keep_fraction": 0.95})  # rejects all
    isolated.setenv(bundle.MODEL_PATH_ENV, str(path))
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    assert not any("X-ray" in o for o in at.radio[0].options)
    _ok(at.radio[0].set_value(next(o for o in at.radio[0].options if "landscape" in o)).run())
    text = "\n".join([_texts(at), at.title[0].value, *at.radio[0].options, *(m.label for m in at.metric)])
    assert "Result for sample_landscape.png" in text and "fundus photograph" in text
    assert "normal or disease" in text
    for word in ("X-ray", "NORMAL", "PNEUMONIA"):
        assert word not in text, word


def _dicom_payload(tmp_path: Path, **window) -> bytes:
    from test_bad_inputs_data import _dicom

    return _dicom(tmp_path / "scan.dcm", np.tile(np.linspace(0, 4095, 64), (64, 1)), **window).read_bytes()


def test_the_uploader_takes_dicom_with_and_without_extension_and_never_blames_the_model(isolated, bundle_path,
                                                                                        tmp_path):
    """Issue 29.5/29.9: files are identified by content; a DICOM the reader cannot handle is the file's
    problem (an upload message), never the model file's."""
    isolated.setenv(bundle.MODEL_PATH_ENV, str(bundle_path))
    at = _run(AppTest.from_file(str(APP), default_timeout=60))
    accepted = list(at.file_uploader[0].proto.type)
    assert not accepted or {".dcm", ".png"} <= set(accepted)
    plain = _dicom_payload(tmp_path, window=(2048.0, 4096.0))
    for name in ("scan.dcm", "IM0001"):
        _ok(at.file_uploader[0].set_value((name, plain, "application/dicom")).run())
        assert f"Result for {name}" in _texts(at)
    several = _dicom_payload(tmp_path, window=([2048, 1024], [4096, 2048]))
    _ok(at.file_uploader[0].set_value(("hospital_export", several, "application/octet-stream")).run())
    errors = " ".join(e.value for e in at.error)
    assert "Result for hospital_export" in _texts(at) or ("DICOM" in errors and "model file" not in errors)


# ----------------------------------------------------------------------------- real browser

def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


def test_screenshot_in_headless_chromium(bundle_path, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): browser screenshot test skipped")
    port = _free_port()
    env = {**os.environ, bundle.MODEL_PATH_ENV: str(bundle_path)}
    env.pop(bundle.MODEL_URL_ENV, None)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shot = tmp_path / "shot.png"
    try:
        _wait_healthy(port, server)
        # Virtual time runs ahead of the server: the first page load only triggers the slow first
        # script run (imports, model loading). Later loads find everything cached, so retry a few
        # times until the page is no longer blank.
        deadline = time.monotonic() + 150  # a cold first run (imports, model) can be slow on CI
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            shot.unlink(missing_ok=True)
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                 "--run-all-compositor-stages-before-draw", f"--user-data-dir={tmp_path / f'profile{attempt}'}",
                 "--virtual-time-budget=15000", "--window-size=1200,900", f"--screenshot={shot}",
                 f"http://127.0.0.1:{port}/?sample=xray"],
                check=True, timeout=60, capture_output=True)
            if shot.exists() and np.asarray(Image.open(shot).convert("L")).std() > 15:
                break
            time.sleep(2)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    assert shot.exists(), "Chromium wrote no screenshot"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    pixels = np.asarray(image).astype(np.float32)
    assert pixels.std() > 15, "the screenshot is (nearly) uniform: the page did not render"
    gray = pixels.mean(axis=2)
    title_band = gray[:250, :]
    assert (title_band < 80).mean() > 0.002, "no dark text in the top of the page (title missing?)"
