"""The losses `TrainConfig.loss` names (`kerastl.config.LOSSES`), and the accuracy that goes with them.

Labels come in two forms: integer class indices (every split, as the data gives
them) and one-hot or mixed rows (training batches under MixUp or CutMix, see
`kerastl.data.augment`). The categorical losses here take either, one-hot encoding
integer labels inside the loss, so validation keeps its integer labels while
training mixes. Each is Keras's own loss function on one-hot labels; focal loss is
Keras's `categorical_focal_crossentropy` / `BinaryFocalCrossentropy`.
"""

from __future__ import annotations

import keras
from keras import ops

from kerastl.config import LOSSES
from kerastl.errors import KerastlError

BINARY_LOSSES = ("binary_crossentropy", "binary_focal")


def as_one_hot(y_true, y_pred):
    """`y_true` as rows matching `y_pred` [batch, classes]: integer labels ([batch] or [batch, 1])
    are one-hot encoded; one-hot or mixed rows are returned as they are (as floats)."""
    depth = y_pred.shape[-1]
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == depth and depth != 1:
        return ops.cast(y_true, y_pred.dtype)
    return ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), depth, dtype=y_pred.dtype)


@keras.saving.register_keras_serializable(package="kerastl")
class OneHotCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy or focal loss on integer, one-hot or mixed labels.

    Args:
        focal: Keras's categorical focal loss, alpha * (1 - p_t)^gamma * -log(p_t),
            instead of cross-entropy.
        label_smoothing: mixes the one-hot labels with the uniform distribution.
        gamma, alpha: the focal loss's focusing and weighting (Keras's defaults).
    """

    def __init__(self, focal: bool = False, label_smoothing: float = 0.0, gamma: float = 2.0, alpha: float = 0.25,
                 name: str | None = None, **kwargs):
        super().__init__(name=name or ("focal" if focal else "categorical_crossentropy"), **kwargs)
        self.focal, self.label_smoothing, self.gamma, self.alpha = focal, label_smoothing, gamma, alpha

    def call(self, y_true, y_pred):
        rows = as_one_hot(y_true, y_pred)
        if self.focal:
            return keras.losses.categorical_focal_crossentropy(rows, y_pred, alpha=self.alpha, gamma=self.gamma,
                                                               label_smoothing=self.label_smoothing)
        return keras.losses.categorical_crossentropy(rows, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "focal": self.focal, "label_smoothing": self.label_smoothing,
                "gamma": self.gamma, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="kerastl")
class SparseSmoothedCrossentropy(OneHotCrossentropy):
    """Kept so that run folders written by kerastl 0.2 load: cross-entropy with label smoothing."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs):
        kwargs.pop("focal", None)
        super().__init__(False, label_smoothing, name=name, **kwargs)


def make_loss(name: str, binary: bool, label_smoothing: float = 0.0, mixed: bool = False) -> keras.losses.Loss:
    """The loss `name` (one of `kerastl.config.LOSSES`) for a binary or softmax model.

    "auto" is Keras's sparse categorical cross-entropy, or binary cross-entropy for a
    one-unit model; with `label_smoothing` or `mixed` labels (MixUp, CutMix) it is
    `OneHotCrossentropy`, which takes them. A loss that does not fit the model, or
    Keras's sparse loss with mixed labels, is a `KerastlError`.
    """
    if name not in LOSSES:
        raise KerastlError(f"unknown loss {name!r}; losses: {', '.join(LOSSES)}")
    if name == "auto":
        name = "binary_crossentropy" if binary else (
            "categorical_crossentropy" if label_smoothing or mixed else "sparse_categorical_crossentropy")
    if binary != (name in BINARY_LOSSES):
        model = "a binary (one-unit sigmoid) model" if binary else "a softmax model"
        fits = BINARY_LOSSES if binary else [n for n in LOSSES if n not in BINARY_LOSSES and n != "auto"]
        raise KerastlError(f"loss {name} does not fit {model}; use auto or one of {', '.join(fits)}")
    if name == "sparse_categorical_crossentropy":
        if label_smoothing or mixed:
            raise KerastlError("sparse_categorical_crossentropy takes integer labels only: with label smoothing or "
                               "MixUp/CutMix use categorical_crossentropy (or auto)")
        return keras.losses.SparseCategoricalCrossentropy()
    if name == "binary_crossentropy":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    if name == "binary_focal":
        return keras.losses.BinaryFocalCrossentropy(label_smoothing=label_smoothing)
    return OneHotCrossentropy(focal=name == "focal", label_smoothing=label_smoothing)


def label_accuracy(y_true, y_pred):
    """Accuracy on integer, one-hot or mixed labels: a mixed label's class is its largest share
    (for a one-unit model, a label above 0.5 is the positive class). `y_pred` is [batch, classes],
    or several models' stacked, [models, batch, classes]: then each model's, [models, batch]."""
    if y_pred.shape[-1] == 1:
        truth = ops.cast(ops.reshape(y_true, (-1,)) > 0.5, "int32")
        guess = ops.cast(y_pred[..., 0] > 0.5, "int32")
    else:
        truth = ops.argmax(as_one_hot(y_true, y_pred if len(y_pred.shape) == 2 else y_pred[0]), axis=-1)
        guess = ops.argmax(y_pred, axis=-1)
    return ops.cast(ops.equal(ops.cast(truth, "int32"), ops.cast(guess, "int32")), "float32")


@keras.saving.register_keras_serializable(package="kerastl")
class LabelAccuracy(keras.metrics.MeanMetricWrapper):
    """"accuracy" for training on mixed labels and validating on integer labels with one metric."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(label_accuracy, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}
