"""Figures for the notebooks: every function saves a PNG into `out_dir` and returns the Figure (write
`fig = plots.plot_x(...)` so Jupyter shows it once). Outside Jupyter figures bypass pyplot (no leaks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from helpers import gradcam
from helpers.core import predict_labels, to_numpy
from helpers.evaluate import as_probs
from helpers.images import read_image


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4), **kwargs: Any):
    """`fig, axes` like `plt.subplots`; a pyplot-free Figure when the backend cannot show windows."""
    if matplotlib.get_backend().lower() in {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}:
        from matplotlib.figure import Figure
        fig = Figure(figsize=figsize, layout=kwargs.pop("layout", "constrained"))
        return fig, fig.subplots(nrows, ncols, **kwargs)
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=figsize, layout=kwargs.pop("layout", "constrained"), **kwargs)


_STAMP: dict[str, str | None] = {"text": None}  # the footer of every saved figure, set by set_stamp


def set_stamp(text: str | None) -> None:
    """Print `text` (e.g. `runs.figure_stamp(run, splits, model)`) in small grey letters under every figure saved
    from now on; None: no footer."""
    _STAMP["text"] = text


def save_figure(fig, out_dir: str | Path, name: str):
    """Save `fig` as out_dir/name (PNG, folder created) with `set_stamp`'s footer under it; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (stamp := _STAMP["text"]) and getattr(fig, "_course_stamp", None) != stamp:
        fig._course_stamp = stamp
        fig.text(0.5, 0.0, stamp, ha="center", va="top", fontsize=6.5, color="0.45")
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    return fig


def plot_history(history: Any, out_dir: str | Path, name: str = "training_curves.png", best_epoch: int | None = None):
    """Loss, accuracy/AUC and learning rate per epoch of a `train.FitResult` (best epoch marked) or a history
    DataFrame; dashed lines mark where a new `stage` starts."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator
    if hasattr(history, "history"):  # a FitResult
        history, best_epoch = history.history, history.best_epoch if best_epoch is None else best_epoch
    frame = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
    if frame.empty:
        raise ValueError("history is empty: nothing to plot")
    x = np.arange(1, len(frame) + 1)  # running epoch count
    fig, axes = new_figure(1, 3, figsize=(14, 3.8))
    panels = [(axes[0], "loss", ["train_loss", "val_loss"]),
              (axes[1], "accuracy / AUC", ["train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auc"]),
              (axes[2], "learning rate", ["lr"])]
    for ax, title, columns in panels:
        for column in columns:
            if column in frame and frame[column].notna().any():
                ax.plot(x, frame[column].astype(float), marker="o", markersize=3, label=column)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if "lr" in frame and (frame["lr"].astype(float) > 0).all():
        axes[2].set_yscale("log")
    _mark_stages(axes, frame, x)
    if best_epoch and "epoch" in frame:
        rows = np.flatnonzero(frame["epoch"].to_numpy() == best_epoch)
        if len(rows):
            axes[0].axvline(x[rows[-1]], color="green", linestyle=":", linewidth=1, label="best")
    return save_figure(fig, out_dir, name)


def _mark_stages(axes: Any, frame: Any, x: np.ndarray) -> None:
    """A dashed line where the `stage` column (if any) changes."""
    stages = frame["stage"].astype(str).tolist() if "stage" in frame else []
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for ax in np.ravel(axes):
                ax.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=1)


def plot_history_comparison(histories: dict[str, Any], out_dir: str | Path, name: str = "history_comparison.png"):
    """Validation loss and AUC per epoch, one line per run (`FitResult`s or history DataFrames)."""
    fig, axes = new_figure(1, 2, figsize=(11, 3.8))
    for label, history in histories.items():
        history = getattr(history, "history", history)
        x = np.arange(1, len(history) + 1)
        for ax, column in zip(axes, ("val_loss", "val_auc")):
            if column in history:
                ax.plot(x, history[column].astype(float), marker="o", markersize=3, label=label)
        _mark_stages(axes, history, x)
    for ax, title in zip(axes, ("validation loss", "validation AUC")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def _heatmap(ax, matrix: np.ndarray, class_names: Sequence[str], fmt: str, title: str, vmax: float) -> None:
    """One annotated seaborn heatmap: rows = true class, columns = predicted class."""
    import seaborn as sns
    sns.heatmap(matrix, ax=ax, annot=True, fmt=fmt, cmap="Blues", vmin=0, vmax=vmax, square=True,
                linewidths=0.5, linecolor="white", annot_kws={"fontsize": 9}, cbar_kws={"shrink": 0.8},
                xticklabels=list(class_names), yticklabels=list(class_names))
    ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set(xlabel="predicted", ylabel="true", title=title)


def plot_confusion_matrix(cm: Any, class_names: Sequence[str], out_dir: str | Path, name: str = "confusion_matrix.png"):
    """Counts (left) and row-normalised rates (right: the diagonal is each class's recall)."""
    counts = to_numpy(cm).astype(np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)
    size = 3 + 0.9 * len(class_names)
    fig, axes = new_figure(1, 2, figsize=(2 * size + 1, size))
    _heatmap(axes[0], counts, class_names, "d", "counts", vmax=max(int(counts.max()), 1))
    _heatmap(axes[1], rates, class_names, ".2f", "row-normalised (recall on diagonal)", vmax=1.0)
    return save_figure(fig, out_dir, name)


def plot_roc_pr(y_true: Any, probs: Any, class_names: Sequence[str], out_dir: str | Path, name: str = "roc_pr.png"):
    """ROC (left) and precision-recall (right) curves of the positive class (binary) or of each class (one-vs-rest)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve
    y, p = to_numpy(y_true).astype(np.int64), as_probs(probs)
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    fig, (ax_roc, ax_pr) = new_figure(1, 2, figsize=(11, 4.5))
    for c in classes:
        positive = y == c
        if positive.all() or not positive.any():
            continue  # curve undefined when the class is absent (or alone)
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        precision, recall, _ = precision_recall_curve(positive, p[:, c])
        ap = average_precision_score(positive, p[:, c])
        line = ax_roc.plot(fpr, tpr, label=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})")[0]
        ax_pr.plot(recall, precision, color=line.get_color(), label=f"{class_names[c]} (AP {ap:.3f})")
        ax_pr.axhline(positive.mean(), color=line.get_color(), linestyle=":", linewidth=1)
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax_roc.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
               title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (dotted: prevalence)",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    return save_figure(fig, out_dir, name)


def plot_threshold_sweep(y_true: Any, p_pos: Any, out_dir: str | Path, chosen: float | None = None,
                         name: str = "threshold_sweep.png"):
    """Sensitivity and specificity against the threshold on P(positive) (scikit-learn's `roc_curve`)."""
    from sklearn.metrics import roc_curve
    y, p = to_numpy(y_true).astype(np.int64), to_numpy(p_pos).astype(np.float64)
    p = p[:, 1] if p.ndim == 2 else p
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    thresholds = np.clip(thresholds, 0, 1)
    fig, ax = new_figure(figsize=(6.5, 4))
    ax.step(thresholds, tpr, where="post", label="sensitivity (recall of positives)")
    ax.step(thresholds, 1 - fpr, where="post", label="specificity (recall of negatives)")
    if chosen is not None:
        sens, spec = (p[y == 1] >= chosen).mean(), (p[y == 0] < chosen).mean()
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1,
                   label=f"chosen {chosen:.3f}: sens {sens:.2f}, spec {spec:.2f}")
    ax.set(xlabel="threshold on P(positive)", ylabel="rate", xlim=(0, 1), ylim=(0, 1.02),
           title="sensitivity / specificity trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return save_figure(fig, out_dir, name)


def to_display(image: Any) -> np.ndarray:
    """An image as (H, W, 3) floats in [0, 1] for `imshow`; takes uint8 or float, CHW or HWC, tensor or array."""
    img = to_numpy(image)
    img = img[..., None] if img.ndim == 2 else img
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return np.clip(np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img, 0.0, 1.0)


def overlay(image: Any, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap (H, W), coloured with `cmap`, over an image; returns RGB floats (H, W, 3)."""
    img = to_display(image)
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {img.shape[:2]} differ in size")
    colored = matplotlib.colormaps[cmap](heat)[..., :3]
    return np.clip((1 - alpha) * img + alpha * colored, 0.0, 1.0).astype(np.float32)


def plot_prediction_grid(images_u8: Any, y_true: Any, probs: Any, class_names: Sequence[str], out_dir: str | Path,
                         name: str = "predictions.png", n: int = 16, errors_only: bool = False,
                         threshold: float | None = None):
    """Images with true and predicted label (`threshold` on P(class 1) if given, else argmax) and its
    probability; errors get a red title and border."""
    images, y, p = to_numpy(images_u8), to_numpy(y_true).astype(np.int64), as_probs(probs)
    pred = predict_labels(p, threshold)
    indices = (np.flatnonzero(pred != y) if errors_only else np.arange(len(y)))[:n]
    if len(indices) == 0:
        fig, ax = new_figure(figsize=(4, 1.5))
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, out_dir, name)
    cols = max(1, min(len(indices), 4 if len(indices) <= 16 else 8))
    rows = int(np.ceil(len(indices) / cols))
    fig, axes = new_figure(rows, cols, figsize=(2.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(indices):]:
        ax.axis("off")
    for ax, i in zip(axes.ravel(), indices):
        wrong = pred[i] != y[i]
        ax.imshow(to_display(images[i]))
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set_color("red" if wrong else "lightgrey")
            spine.set_linewidth(3 if wrong else 1)
        ax.set_title(f"true {class_names[y[i]]}\npred {class_names[pred[i]]} ({p[i, pred[i]]:.2f})",
                     fontsize=8, color="red" if wrong else "black")
    return save_figure(fig, out_dir, name)


def plot_sample_grid(frame: Any, class_names: Sequence[str], out_dir: str | Path, name: str = "samples.png",
                     per_class: int = 6, seed: int = 0, thumb_size: int = 256, title: str | None = None):
    """A few random images per class (one row each) from a DataFrame with `path` and `class_name` columns."""
    rows = len(class_names)
    fig, axes = new_figure(rows, per_class, figsize=(1.9 * per_class, 2.1 * rows), squeeze=False)
    for r, class_name in enumerate(class_names):
        subset = frame[frame["class_name"] == class_name]
        chosen = subset.sample(n=min(per_class, len(subset)), random_state=seed) if len(subset) else subset
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(chosen):
                continue
            img = read_image(chosen["path"].iloc[c])  # the pixel reader of training and the app
            img.thumbnail((thumb_size, thumb_size))
            ax.imshow(np.asarray(img))
            if c == 0:
                ax.set_title(f"{class_name} (n={len(subset)})", fontsize=9, loc="left")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_dir, name)


def plot_gradcam(model: Any, images_u8: Any, class_names: Sequence[str], out_dir: str | Path,
                 name: str = "gradcam.png", target_layer: Any = None, y_true: Sequence[int] | None = None, n: int = 8,
                 threshold: float | None = None):
    """Up to `n` images (uint8 (N, 3, H, W)) above their Grad-CAM overlays (`gradcam.explain`), titled with the
    predicted class (`threshold` for a binary model, else argmax); with `y_true` also the true one, errors red."""
    import torch
    images = (images_u8 if isinstance(images_u8, torch.Tensor) else torch.as_tensor(np.asarray(images_u8)))[:n]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images_u8 must have shape (N, 3, H, W), got {tuple(images.shape)}")
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    probs, pred, heatmaps = gradcam.explain(model, images, target_layer=target_layer, threshold=threshold)
    cols, groups = min(4, len(images)), -(-len(images) // 4)  # at most 4 panels a row, each about 3 inches
    fig, axes = new_figure(nrows=2 * groups, ncols=cols, figsize=(3 * cols, 6.6 * groups), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        top, col = 2 * (i // cols), i % cols
        title, color = f"pred {class_names[pred[i]]} ({probs[i, pred[i]]:.2f})", "black"
        if y_true is not None:
            title = f"true {class_names[int(y_true[i])]}\n" + title
            color = "black" if int(y_true[i]) == pred[i] else "red"
        axes[top, col].imshow(to_display(image))
        axes[top, col].set_title(title, fontsize=10, color=color)
        axes[top + 1, col].imshow(overlay(image, heatmaps[i]))
        axes[top + 1, col].set_title("Grad-CAM", fontsize=10)
    fig.suptitle("Grad-CAM: where the evidence for the predicted class is", fontsize=12)
    return save_figure(fig, out_dir, name)


def plot_run_comparison(runs: Any, metrics: Sequence[str], out_dir: str | Path, name: str = "comparison.png",
                        label_column: str | None = None):
    """Grouped bars of `metrics` per row of `runs` (a DataFrame), whiskers from `<metric>_lo`/`_hi` columns;
    labelled by `label_column` (default: "run" where filled, else "model")."""
    import pandas as pd
    import seaborn as sns
    frame = runs if isinstance(runs, pd.DataFrame) else pd.DataFrame(runs)
    if missing := [m for m in metrics if m not in frame]:
        raise ValueError(f"Unknown metric column(s) {missing}. Available: {list(frame.columns)}")
    if label_column is None:
        label_column = "run" if "run" in frame and frame["run"].notna().all() else "model"
    labels = frame[label_column].astype(str).tolist() if label_column in frame else [str(i) for i in range(len(frame))]
    long = pd.DataFrame([{"row": i, "metric": metric, "score": float(frame[metric].iloc[i]),
                          "lo": float(frame[f"{metric}_lo"].iloc[i]) if f"{metric}_lo" in frame else np.nan,
                          "hi": float(frame[f"{metric}_hi"].iloc[i]) if f"{metric}_hi" in frame else np.nan}
                         for metric in metrics for i in range(len(labels))])  # one bar per row, even for equal labels
    fig, ax = new_figure(figsize=(max(6, 1.1 * len(frame) * max(1, len(metrics) / 1.5)), 4.2))
    sns.barplot(data=long.fillna({"score": 0.0}), x="row", y="score", hue="metric", order=range(len(labels)),
                hue_order=list(metrics), errorbar=None, ax=ax)  # a missing score: a bar of height 0
    for bars, metric in zip(list(ax.containers), metrics):  # the bootstrap intervals as whiskers, where known
        rows = long[long["metric"] == metric]
        known = rows[["score", "lo", "hi"]].notna().all(axis=1).to_numpy()
        centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in bars])[known]
        score, lo, hi = (rows[c].to_numpy()[known] for c in ("score", "lo", "hi"))
        ax.errorbar(centres, score, yerr=np.vstack([score - lo, hi - score]).clip(min=0), fmt="none",
                    ecolor="black", capsize=3, linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set(xlabel="", ylabel="score", ylim=(0, 1.05), title="comparison (whiskers: bootstrap 95% interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title=None)
    return save_figure(fig, out_dir, name)
