"""Evaluation: class probabilities -> the scores kerastl reports and searches on; and plots.

One vocabulary everywhere: Keras's `val_` names for the validation split
(`val_loss`, `val_accuracy`, `val_macro_f1`, `val_auc`), `test_` for the test split
and `cv_` for a cross-validated estimate (see `kerastl.crossval`).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from sklearn.metrics import f1_score, roc_auc_score

METRICS = ("loss", "accuracy", "macro_f1", "auc")


def score(probabilities: np.ndarray, labels: np.ndarray, prefix: str = "val_") -> dict[str, float]:
    """The metrics of predicted probabilities: every objective kerastl offers, named `prefix` + metric.

    The loss is plain cross-entropy (no label smoothing), so runs with different
    smoothing compare fairly. The AUC is the mean one-vs-rest ROC AUC over the
    classes present; macro F1 the unweighted mean F1 over classes.
    """
    p = np.asarray(probabilities, np.float64)
    if p.shape[1] == 1:  # one sigmoid unit: P(class 1)
        p = np.concatenate([1.0 - p, p], axis=1)
    p = np.clip(p, 1e-7, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.asarray(labels).astype(int)
    predicted = p.argmax(axis=1)
    present = np.unique(labels)
    aucs = [roc_auc_score(labels == c, p[:, c]) for c in present] if len(present) > 1 else [np.nan]
    values = (
        float(-np.mean(np.log(p[np.arange(len(labels)), labels]))),
        float(np.mean(predicted == labels)),
        float(f1_score(labels, predicted, average="macro", zero_division=0)),
        float(np.mean(aucs)),
    )
    return {prefix + name: value for name, value in zip(METRICS, values)}


def predict_split(model: keras.Model, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of batched (images, labels), in order (`batches` must not shuffle)."""
    probabilities = model.predict(batches.map(lambda images, labels: images), verbose=0)
    return probabilities, np.concatenate([labels.numpy() for _, labels in batches])


def split_scores(model: keras.Model, batches: tf.data.Dataset, prefix: str) -> dict[str, float]:
    """`score` of a model's predictions on batched (images, labels)."""
    return score(*predict_split(model, batches), prefix)


def plot_probe_curve(accuracy: list[float], all_accuracy: float, chosen: list[int], folds: int,
                     path: str | Path) -> Path:
    """A PNG of the probe accuracy per block, all blocks as a line, and the blocks the head reads.

    Drawn on a `Figure` of its own (no pyplot state), so it runs headless anywhere.
    """
    blocks = np.arange(1, len(accuracy) + 1)
    figure = Figure(figsize=(max(5.0, 0.35 * len(blocks) + 2), 3.2), dpi=100)
    axes = figure.subplots()
    axes.plot(blocks, accuracy, marker="o", label="one block")
    axes.axhline(all_accuracy, color="tab:green", linestyle="--", label="all blocks")
    axes.scatter(chosen, [accuracy[b - 1] for b in chosen], s=120, facecolors="none", edgecolors="tab:red",
                 label="read by the head", zorder=3)
    axes.set_xlabel("block (the last is the backbone's output)")
    axes.set_ylabel(f"{folds}-fold probe accuracy")
    axes.set_xticks(blocks)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
