"""The course's demo app (notebook 08, "From model to app"): a chest X-ray pneumonia classifier, or
whatever the model file was trained on (its page speaks of its own dataset and classes).

Start it from the course folder with one command:

    uv run streamlit run app/streamlit_app.py

The model file (a bundle written by notebook 08 with `app.bundle.save_bundle`) is found at
`$COURSE_MODEL_PATH`, else at `assets/08_model_to_app/pneumonia_app_model.pt`, else downloaded
once from `$COURSE_MODEL_URL`. The page says clearly when none of these works.

All the logic lives beside this file and is unit-tested: finding and loading the model file in
`app/bundle.py`; upload validation, prediction, out-of-distribution check and Grad-CAM in
`app/serve.py` (with the course's `helpers`). This file only lays out the page.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain checkout without `uv sync`/`pip install`
    sys.path.insert(0, str(ROOT))

from app import bundle, serve  # noqa: E402

UPLOAD = "Upload your own image"
UPLOAD_TYPES = None  # any file: read_upload identifies it by its content (DICOM with or without .dcm)
DISPLAY_PX = 320


@st.cache_resource(show_spinner="Looking for the model file ...")
def find_model(path_env: str, url_env: str, default_exists: bool, env_exists: bool) -> bundle.ModelLocation:
    """Cached per configuration, so a failed download is not retried on every click."""
    return bundle.locate_model(path_env, url_env)


@st.cache_resource(show_spinner="Loading the model ...")
def load_model(path: str, mtime: float) -> bundle.AppModel:
    return bundle.load_bundle(path)


def _short(path: Path) -> str:
    """A path relative to the course folder when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def show_missing_model(location: bundle.ModelLocation) -> None:
    tried = "\n".join(f"- {m}" for m in location.messages)
    st.error(
        "**No model file found, so the app cannot make predictions yet.**\n\n"
        f"What was tried:\n{tried}\n\n"
        "To fix it, do one of these and reload the page:\n"
        "1. run notebook `08_model_to_app` (any profile): it saves the model to "
        f"`{_short(bundle.default_model_path())}`;\n"
        f"2. start the app with `{bundle.MODEL_PATH_ENV}=/path/to/pneumonia_app_model.pt`;\n"
        f"3. set `{bundle.MODEL_URL_ENV}` to a URL of a model file (downloaded once and checked; add "
        f"`#sha256=<hex>` to the URL or set `{bundle.MODEL_SHA256_ENV}` to insist on its checksum)."
    )


def samples(kind: str) -> dict[str, str]:
    """Query parameter value -> label of the generated samples (app.serve) that fit the model's images."""
    found = {"xray": "Sample: synthetic chest X-ray"} if kind == "chest X-ray" else {}
    return {**found, "landscape": f"Sample: synthetic landscape (not a {kind})"}


def show_model_card(app: bundle.AppModel) -> None:
    meta, kind = app.meta, serve.image_kind(app)
    st.sidebar.header("Model")
    st.sidebar.write(app.describe())
    metrics = meta.get("metrics") or {}
    if metrics.get("test_auc") is not None:
        st.sidebar.write(f"Test AUC when it was trained: {metrics['test_auc']:.3f} "
                         f"(profile '{app.profile}')")
    ood = meta.get("ood") or {}
    if ood:
        keep = ood.get("keep_fraction")  # checked at load: None or a fraction
        st.sidebar.write(f"Out-of-distribution check: `{ood['method']}` score"
                         + (f", threshold set to keep {keep:.0%} of validation {kind}s." if keep is not None else "."))
    st.sidebar.caption(f"File: {app.path}")
    if app.profile == "smoke" or meta.get("synthetic_data") or not meta.get("pretrained"):
        st.error(
            f"**This model comes from the '{app.profile}' profile** "
            f"({'synthetic images' if meta.get('synthetic_data') else 'real images'}, "
            f"{'ImageNet weights' if meta.get('pretrained') else 'random initialisation'}). "
            f"It proves that the app works; its answers mean nothing about real {kind}s."
        )
    else:
        st.info(f"Model from the '{app.profile}' profile of notebook 08.")


def choose_image(kind: str) -> tuple[str, bytes] | None:
    """(name, bytes) of the image to analyse, or None while nothing is chosen."""
    offered = samples(kind)
    options = [UPLOAD] + list(offered.values())
    preset = st.query_params.get("sample")  # e.g. ?sample=xray preselects a sample
    index = options.index(offered[preset]) if preset in offered else 0
    choice = st.radio("Image", options, index=index, horizontal=True)
    if choice == UPLOAD:
        uploaded = st.file_uploader(f"Upload a {kind} (PNG, JPEG, BMP, TIFF or DICOM, up to 20 MB)",
                                    type=UPLOAD_TYPES, max_upload_size=20)
        return None if uploaded is None else (uploaded.name, uploaded.getvalue())
    sample = next(name for name, label in offered.items() if label == choice)
    return f"sample_{sample}.png", serve.sample_image_bytes(sample)


def enlarge(image: np.ndarray) -> Image.Image:
    """Upscale the small model input for display (the model itself sees the small one)."""
    arr = np.clip(image * 255 if image.dtype != np.uint8 else image, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize((DISPLAY_PX, DISPLAY_PX), Image.BILINEAR)


def show_analysis(analysis: serve.Analysis, app: bundle.AppModel) -> None:
    if analysis.ood_method is None:
        st.warning("This model file has no out-of-distribution check: any image gets a prediction.")
    elif analysis.in_distribution:
        st.success(f"Input check: the image {analysis.verdict} "
                   f"({analysis.ood_method} score {analysis.ood_score:.4g} ≥ threshold {analysis.ood_threshold:.4g}).")
    else:
        st.error(f"**Input check failed:** the image {analysis.verdict} "
                 f"({analysis.ood_method} score {analysis.ood_score:.4g} < threshold {analysis.ood_threshold:.4g}). "
                 f"The model can only answer {' or '.join(app.class_names)}, whatever it is shown.")
    left, right = st.columns(2)
    with left:
        st.metric("Prediction" + ("" if analysis.in_distribution else " (not trustworthy)"), analysis.predicted)
        st.metric(f"Probability of {analysis.predicted}", f"{analysis.probability:.1%}")
        if analysis.threshold is not None and len(app.class_names) == 2:
            st.caption(f"{app.class_names[1]} is predicted when its probability is at least "
                       f"{analysis.threshold:.2f} (threshold chosen on validation images).")
        st.dataframe({"class": list(analysis.probs), "probability": [round(p, 4) for p in analysis.probs.values()]},
                     hide_index=True)
        st.image(enlarge(analysis.image_u8), caption=f"What the model sees ({app.image_size} x {app.image_size} px)")
    with right:
        st.image(enlarge(analysis.overlay), caption=f"Grad-CAM: where the evidence for {analysis.predicted} is")
        st.caption("Red = regions that pushed the model towards its answer. A heatmap shows *where*, "
                   "not *why*, and a confident model can look at the wrong place.")
    if analysis.notes:
        st.info("Converted before analysis: " + "; ".join(analysis.notes) + ".")


def main() -> None:
    st.set_page_config(page_title="Medical image classifier (course demo)", layout="wide")
    heading = st.empty()  # the title names the model's images and classes once the model is loaded
    heading.title("Medical image classifier")
    st.caption("Course demo: medical image classification with transfer learning, notebook 08 "
               "\"From model to app\".")
    st.warning("**Not for clinical use.** A teaching demo: it has not been validated on patients and "
               "must not be used for diagnosis or treatment decisions.")

    path_env = os.environ.get(bundle.MODEL_PATH_ENV, "")
    url_env = os.environ.get(bundle.MODEL_URL_ENV, "")
    location = find_model(path_env, url_env, bundle.default_model_path().is_file(),
                          bool(path_env) and Path(path_env).is_file())
    if location.path is None:
        show_missing_model(location)
        return
    try:
        app = load_model(str(location.path), location.path.stat().st_mtime)
    except (bundle.BundleError, OSError) as err:
        st.error(f"**The model file could not be loaded.** {err}")
        return
    except Exception as err:  # never a stack trace, whatever the file holds
        st.error(f"**The model file could not be loaded.** {location.path} is not a usable model "
                 f"bundle ({type(err).__name__}). Save it again with notebook 08.")
        return
    kind = serve.image_kind(app)
    heading.title(f"{kind[0].upper() + kind[1:]} classifier: {' / '.join(app.class_names)}")
    show_model_card(app)

    chosen = choose_image(kind)
    if chosen is None:
        st.write("Upload an image, or pick one of the samples above.")
        return
    name, payload = chosen
    try:
        analysis = serve.analyse_upload(app, payload)
    except serve.UploadError as err:
        st.error(f"**{name}: {err}**")
        return
    except Exception as err:  # never show a stack trace to the user, and do not blame the image
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        st.error(f"**The analysis of {name} failed** ({type(err).__name__}{': ' + reason if reason else ''}). "
                 "The image passed the upload checks, so the fault lies in the model file "
                 f"{_short(location.path)} or in the app: save the model again with notebook 08, and "
                 "report this message if it persists.")
        return
    st.subheader(f"Result for {name}")
    show_analysis(analysis, app)


main()
