"""Augmentation presets built from Keras preprocessing layers.

Augmentation runs in the `tf.data` pipeline after the cache (see `kerastl.data.images`),
so every epoch draws new random transforms and the exported model carries none.
MixUp and CutMix (Keras's layers) also mix the labels: `build_mixer` gives the
one a spec names, and `kerastl.data.pipelines` applies it to batches of integer labels.
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
    "augmix": (lambda f, seed: layers.AugMix(value_range=_VALUE_RANGE, factor=f, seed=seed), 0.3),
}

# name -> (layer factory taking its factor and a seed, default factor); each mixes images and labels
MIXERS = {
    "mixup": (lambda f, seed: layers.MixUp(alpha=f, seed=seed), 0.2),  # Beta(alpha, alpha) mixing weights
    "cutmix": (lambda f, seed: layers.CutMix(factor=f, seed=seed), 1.0),  # Beta(factor, factor) patch areas
}

PRESETS = {
    "none": "",
    "light": "flip,rotate:0.05,zoom:0.1",
    "standard": "flip,rotate:0.1,zoom:0.15,translate:0.1,contrast:0.1",
    "strong": "flip,randaugment:0.5,zoom:0.2",
    "randaugment": "flip,randaugment:0.5",
    "augmix": "flip,augmix:0.3",
    "mixup": "flip,rotate:0.05,zoom:0.1,mixup:0.2",
    "cutmix": "flip,rotate:0.05,zoom:0.1,cutmix:1.0",
}


def parse_augment(spec: str) -> list[tuple[str, float]]:
    """Parses a preset name or a comma list like "flip,rotate:0.2" into (name, factor) pairs."""
    spec = PRESETS.get(spec, spec)
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, factor = item.partition(":")
        known = {**LAYERS, **MIXERS}
        if name not in known:
            raise KerastlError(
                f"unknown augmentation {name!r}; presets: {', '.join(PRESETS)}; "
                f"layers: {', '.join(known)}"
            )
        try:
            value = float(factor) if factor else known[name][1]
        except ValueError:
            raise KerastlError(f"augmentation factor {factor!r} for {name} is not a number") from None
        if value < 0:
            raise KerastlError(f"augmentation factor for {name} must be 0 or more, got {value}")
        if name in MIXERS and value <= 0:
            raise KerastlError(f"augmentation factor for {name} must be above 0, got {value}")
        pairs.append((name, value))
    if sum(name in MIXERS for name, _ in pairs) > 1:
        raise KerastlError(f"augmentation {spec!r} names more than one of {', '.join(MIXERS)}: choose one")
    return pairs


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
        LAYERS[name][0](factor, None if seed is None else seed + i) for i, (name, factor) in enumerate(pairs)
    ]
    return keras.Sequential(stack, name="augmentation")


def build_mixer(spec: str, seed: int | None = None) -> layers.Layer | None:
    """The MixUp or CutMix layer that `spec` names, or None. It takes {"images", "labels"} batches
    with one-hot labels and returns both mixed."""
    for name, factor in parse_augment(spec):
        if name in MIXERS:
            return MIXERS[name][0](factor, seed)
    return None


def mixes_labels(spec: str) -> bool:
    """Whether `spec` names MixUp or CutMix (training labels are then mixed rows, not integers)."""
    return any(name in MIXERS for name, _ in parse_augment(spec))
