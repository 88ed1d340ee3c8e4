"""Optimizers, losses and compiling: the one place a classifier is compiled.

Both phases and every search trial compile through `compile_classifier`, so the
optimizer, the loss and the metrics are the same wherever a model trains.
"""

from __future__ import annotations

import keras

from kerastl.config import TrainConfig
from kerastl.errors import KerastlError


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name ("adam", "sgd", "adamw", ...), with decoupled weight decay."""
    values = {"learning_rate": learning_rate}
    if weight_decay:
        values["weight_decay"] = weight_decay
    try:
        return keras.optimizers.get({"class_name": name, "config": values})
    except (ValueError, TypeError):
        raise KerastlError(f"unknown optimizer {name!r}; use a Keras optimizer name such as adam or sgd") from None


@keras.saving.register_keras_serializable(package="kerastl")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy on integer labels with label smoothing (Keras's sparse loss has none)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        depth = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), depth)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(name: str, binary: bool, label_smoothing: float = 0.0) -> keras.losses.Loss:
    """The loss by Keras name; "auto" is (sparse categorical or binary) cross-entropy, smoothed if asked."""
    if name == "auto" and label_smoothing:
        if binary:
            return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        return SparseSmoothedCrossentropy(label_smoothing)
    if label_smoothing:
        raise KerastlError("label_smoothing needs loss auto (cross-entropy)")
    if name == "auto":
        name = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
    try:
        return keras.losses.get(name)
    except (ValueError, TypeError):
        raise KerastlError(f"unknown loss {name!r}; use auto or a Keras loss name") from None


def compile_classifier(
    model: keras.Model, config: TrainConfig, learning_rate: float | None = None, steps_per_execution: int = 1
) -> None:
    """Compiles `model` (a classifier or its head model) with a fresh optimizer, the loss and accuracy.

    `learning_rate` defaults to `config.learning_rate` (phase 2 passes its lower rate).
    """
    binary = model.output_shape[-1] == 1
    rate = config.learning_rate if learning_rate is None else learning_rate
    model.compile(optimizer=make_optimizer(config.optimizer, rate, config.weight_decay),
                  loss=make_loss(config.loss, binary, config.label_smoothing),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
