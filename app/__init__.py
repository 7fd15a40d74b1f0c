"""The course's demo app: the Streamlit page (`streamlit_app.py`) and its backend.

`bundle` saves and finds the model file notebook 08 writes; `serve` checks an upload and answers it
(prediction, out-of-distribution check, Grad-CAM). Notebook 08: ``from app import bundle, serve``.
"""
