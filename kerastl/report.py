"""Evaluation: class probabilities -> the scores kerastl reports and searches on.

One vocabulary everywhere: Keras's `val_` names for the validation split
(`val_loss`, `val_accuracy`, `val_macro_f1`, `val_auc`) and `test_` for the test split.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
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
