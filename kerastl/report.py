"""Evaluation: class probabilities -> the scores kerastl reports and searches on."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Validation metrics of predicted probabilities: every objective kerastl offers.

    `val_loss` is plain cross-entropy (no label smoothing), so trials with
    different smoothing compare fairly. `val_auc` is the mean one-vs-rest ROC AUC
    over the classes present; `val_macro_f1` the unweighted mean F1 over classes.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    p = np.asarray(probabilities, np.float64)
    if p.shape[1] == 1:  # one sigmoid unit: P(class 1)
        p = np.concatenate([1.0 - p, p], axis=1)
    p = np.clip(p, 1e-7, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.asarray(labels).astype(int)
    predicted = p.argmax(axis=1)
    present = np.unique(labels)
    aucs = [roc_auc_score(labels == c, p[:, c]) for c in present] if len(present) > 1 else [np.nan]
    return {
        "val_loss": float(-np.mean(np.log(p[np.arange(len(labels)), labels]))),
        "val_accuracy": float(np.mean(predicted == labels)),
        "val_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "val_auc": float(np.mean(aucs)),
    }


def predict_split(model: keras.Model, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of batched (images, labels), in order (`batches` must not shuffle)."""
    probabilities = model.predict(batches.map(lambda images, labels: images), verbose=0)
    return probabilities, np.concatenate([labels.numpy() for _, labels in batches])
