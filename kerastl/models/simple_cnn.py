"""`simple_cnn`: the registry's small from-scratch base, and its preprocessing."""

from __future__ import annotations

import keras
from keras import layers


def scale_to_unit(x):
    """Maps 0-255 pixels to 0-1 (the preprocessing of `simple_cnn`)."""
    return x / 255.0


def simple_cnn(include_top: bool = False, weights=None, input_shape=(64, 64, 3), name="simple_cnn") -> keras.Model:
    """A small from-scratch convolutional base, as in the classic Keras tutorial.

    Three blocks of Conv2D(3x3, ReLU) + MaxPool; the classifier head adds pooling,
    dropout and the softmax. It takes the `keras.applications` arguments so the
    registry can treat it like any other family.
    """
    del include_top  # the head is always kerastl's own
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model
