"""Augmentation presets built from Keras preprocessing layers.

Augmentation runs in the `tf.data` pipeline after the cache (see `kerastl.data`),
so every epoch draws new random transforms and the exported model carries none.
"""

from __future__ import annotations

import keras
from keras import layers

from kerastl.errors import KerastlError

_VALUE_RANGE = (0.0, 255.0)

# name -> (layer factory taking a strength factor and a seed, default factor)
LAYERS = {
    "flip": (lambda f, seed: layers.RandomFlip("horizontal", seed=seed), 0.0),
    "vflip": (lambda f, seed: layers.RandomFlip("vertical", seed=seed), 0.0),
    "rotate": (lambda f, seed: layers.RandomRotation(f, seed=seed), 0.1),
    "zoom": (lambda f, seed: layers.RandomZoom(f, seed=seed), 0.1),
    "translate": (lambda f, seed: layers.RandomTranslation(f, f, seed=seed), 0.1),
    "contrast": (lambda f, seed: layers.RandomContrast(f, value_range=_VALUE_RANGE, seed=seed), 0.2),
    "brightness": (lambda f, seed: layers.RandomBrightness(f, value_range=_VALUE_RANGE, seed=seed), 0.2),
    "randaugment": (lambda f, seed: layers.RandAugment(value_range=_VALUE_RANGE, factor=f, seed=seed), 0.5),
}

PRESETS = {
    "none": "",
    "light": "flip,rotate:0.05,zoom:0.1",
    "standard": "flip,rotate:0.1,zoom:0.15,translate:0.1,contrast:0.1",
    "strong": "flip,randaugment:0.5,zoom:0.2",
}


def parse_augment(spec: str) -> list[tuple[str, float]]:
    """Parses a preset name or a comma list like "flip,rotate:0.2" into (name, factor) pairs."""
    spec = PRESETS.get(spec, spec)
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, factor = item.partition(":")
        if name not in LAYERS:
            raise KerastlError(
                f"unknown augmentation {name!r}; presets: {', '.join(PRESETS)}; "
                f"layers: {', '.join(LAYERS)}"
            )
        try:
            value = float(factor) if factor else LAYERS[name][1]
        except ValueError:
            raise KerastlError(f"augmentation factor {factor!r} for {name} is not a number") from None
        if value < 0:
            raise KerastlError(f"augmentation factor for {name} must be 0 or more, got {value}")
        pairs.append((name, value))
    return pairs


def build_augmenter(spec: str, seed: int | None = None) -> keras.Sequential | None:
    """A `keras.Sequential` of random layers for `spec`, or None when it is empty.

    Images go in and come out as float32 0-255, batched [batch, height, width, 3].
    """
    pairs = parse_augment(spec)
    if not pairs:
        return None
    stack = [
        LAYERS[name][0](factor, None if seed is None else seed + i) for i, (name, factor) in enumerate(pairs)
    ]
    return keras.Sequential(stack, name="augmentation")
