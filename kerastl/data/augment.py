"""Augmentation presets built from Keras preprocessing layers.

Augmentation runs in the `tf.data` pipeline after the cache (see `kerastl.data.images`),
so every epoch draws new random transforms and the exported model carries none.
MixUp and CutMix (Keras's layers) also mix the labels: `build_mixer` gives the
one a spec names, and `kerastl.data.pipelines` applies it to batches of integer labels.
"""

from __future__ import annotations

import keras
from keras import layers

from kerastl.choices import parse_augment

_VALUE_RANGE = (0.0, 255.0)

# name -> layer factory taking a strength factor and a seed (the names, defaults and presets: `kerastl.choices`)
LAYERS = {
    "flip": lambda f, seed: layers.RandomFlip("horizontal", seed=seed),
    "vflip": lambda f, seed: layers.RandomFlip("vertical", seed=seed),
    "rotate": lambda f, seed: layers.RandomRotation(f, seed=seed),
    "zoom": lambda f, seed: layers.RandomZoom(f, seed=seed),
    "translate": lambda f, seed: layers.RandomTranslation(f, f, seed=seed),
    "contrast": lambda f, seed: layers.RandomContrast(f, value_range=_VALUE_RANGE, seed=seed),
    "brightness": lambda f, seed: layers.RandomBrightness(f, value_range=_VALUE_RANGE, seed=seed),
    "randaugment": lambda f, seed: layers.RandAugment(value_range=_VALUE_RANGE, factor=f, seed=seed),
    "augmix": lambda f, seed: layers.AugMix(value_range=_VALUE_RANGE, factor=f, seed=seed),
}

# name -> layer factory taking its factor and a seed; each mixes images and labels
MIXERS = {
    "mixup": lambda f, seed: layers.MixUp(alpha=f, seed=seed),  # Beta(alpha, alpha) mixing weights
    "cutmix": lambda f, seed: layers.CutMix(factor=f, seed=seed),  # Beta(factor, factor) patch areas
}


def image_layers(spec: str) -> list[tuple[str, float]]:
    """The (name, factor) pairs of `spec` that augment images one by one (not MixUp or CutMix)."""
    return [(name, factor) for name, factor in parse_augment(spec) if name in LAYERS]


def build_augmenter(spec: str, seed: int | None = None) -> keras.Sequential | None:
    """A `keras.Sequential` of the random image layers of `spec` (not its mixer), or None when it has none.

    Images go in and come out as float32 0-255, batched [batch, height, width, 3].
    """
    pairs = image_layers(spec)
    if not pairs:
        return None
    stack = [
        LAYERS[name](factor, None if seed is None else seed + i) for i, (name, factor) in enumerate(pairs)
    ]
    return keras.Sequential(stack, name="augmentation")


def build_mixer(spec: str, seed: int | None = None) -> layers.Layer | None:
    """The MixUp or CutMix layer that `spec` names, or None. It takes {"images", "labels"} batches
    with one-hot labels and returns both mixed."""
    for name, factor in parse_augment(spec):
        if name in MIXERS:
            return MIXERS[name](factor, seed)
    return None


def mixes_labels(spec: str) -> bool:
    """Whether `spec` names MixUp or CutMix (training labels are then mixed rows, not integers)."""
    return any(name in MIXERS for name, _ in parse_augment(spec))
