"""app.bundle: the app's model file round trip, refusing other files, and finding the model."""

from __future__ import annotations

import pytest
import torch

from app.bundle import BUNDLE_FORMAT, MODEL_PATH_ENV, MODEL_URL_ENV, BundleError, load_bundle, locate_model


def test_bundle_round_trip(tiny_bundle):
    model, path = tiny_bundle
    loaded = load_bundle(path)
    raw = torch.load(path, weights_only=True)  # safe loading works: only tensors and plain data
    assert raw["format"] == BUNDLE_FORMAT
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
    with pytest.raises(BundleError, match="not a course model bundle"):
        load_bundle(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="Could not read"):
        load_bundle(tmp_path / "junk.pt")


def test_locate_model_order_and_messages(tmp_path, tiny_bundle, monkeypatch):
    _, bundle = tiny_bundle
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    monkeypatch.delenv(MODEL_URL_ENV, raising=False)
    missing_default = tmp_path / "nothing.pt"
    found = locate_model(str(bundle), "", default=missing_default)
    assert found.path == bundle and found.source == "env"
    none = locate_model("", "", default=missing_default)
    assert none.path is None and any("not set" in m for m in none.messages)
    monkeypatch.setenv(MODEL_PATH_ENV, str(tmp_path / "typo.pt"))
    fallback = locate_model(default=bundle)
    assert fallback.source == "default" and "does not point to a file" in fallback.messages[0]
    # A URL that cannot be reached: a message, no exception (file:// keeps it offline and fast).
    failed = locate_model("", (tmp_path / "absent.pt").as_uri(), default=missing_default,
                          download_dir=tmp_path / "dl")
    assert failed.path is None and "failed" in failed.messages[-1]
    fetched = locate_model("", bundle.as_uri(), default=missing_default, download_dir=tmp_path / "dl")
    assert fetched.source == "download" and load_bundle(fetched.path).image_size == 32
    again = locate_model("", bundle.as_uri(), default=missing_default, download_dir=tmp_path / "dl")
    assert again.source == "cache"
