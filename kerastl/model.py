"""Classifier assembly and freezing.

raw pixels (0-255, any size) -> Resizing -> the backbone's own preprocessing ->
backbone (training=False) -> pooling -> Dropout -> [Dense hidden] -> softmax.
No Lambda layers: every model saves to `.keras` and loads with `safe_mode=True`.
"""

from __future__ import annotations

import logging

import keras
from keras import layers

from kerastl.backbones import block_boundaries, build_backbone, get_spec, resolve_size
from kerastl.config import ModelConfig
from kerastl.errors import KerastlError

log = logging.getLogger(__name__)

HEAD_LAYERS = ("dropout", "hidden", "probabilities")  # the layers after "pool", in order


@keras.saving.register_keras_serializable(package="kerastl")
class BackbonePreprocessing(layers.Layer):
    """Applies the preprocessing that the registry names for `backbone` (0-255 RGB in)."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        spec = get_spec(backbone)
        self.backbone = spec.name
        self._preprocess = spec.preprocess

    def call(self, inputs):
        return self._preprocess(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model inside a kerastl classifier."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise KerastlError(f"model {model.name} has no backbone sub-model")


def build_classifier(config: ModelConfig, num_classes: int, seed: int | None = None) -> keras.Model:
    """Builds backbone + head from `config` for `num_classes` classes.

    The backbone is called with `training=False` (BatchNorm stays in inference
    mode through fine-tuning) unless the config trains from scratch, where
    BatchNorm must learn its statistics. The base starts frozen unless from scratch.
    `seed` fixes the head's initial weights and dropout masks (see `head_layers`).
    """
    config.validate()
    if num_classes < 2:
        raise KerastlError(f"a classifier needs two or more classes, got {num_classes}")
    if config.binary and num_classes != 2:
        raise KerastlError(f"binary=True needs exactly two classes, got {num_classes}")
    spec = get_spec(config.backbone)
    size = resolve_size(spec, config.image_size)
    backbone = build_backbone(spec.name, size, config.weights)
    scratch = config.trains_from_scratch
    backbone.trainable = scratch

    inputs = keras.Input(shape=(None, None, 3), name="images")
    x = layers.Resizing(size, size, name="resize")(inputs)
    x = BackbonePreprocessing(spec.name, name="preprocess")(x)
    x = backbone(x) if scratch else backbone(x, training=False)
    pool = layers.GlobalAveragePooling2D if config.pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name="pool")(x)
    for layer in head_layers(config, num_classes, seed):
        x = layer(x)
    return keras.Model(inputs, x, name=f"kerastl_{spec.name}")


def head_layers(config: ModelConfig, num_classes: int, seed: int | None = None) -> list[layers.Layer]:
    """The head after pooling: Dropout -> [Dense hidden] -> float32 softmax (or one sigmoid unit).

    With `seed`, the head's initial weights and dropout masks depend on it alone, not
    on how much randomness building the backbone used: a head built alone on cached
    features then starts exactly like the head of the full classifier.
    """
    def init(offset: int):
        return "glorot_uniform" if seed is None else keras.initializers.GlorotUniform(seed + offset)

    head = [layers.Dropout(config.dropout, seed=seed, name="dropout")]
    if config.hidden_units:
        head.append(layers.Dense(config.hidden_units, activation="relu", kernel_initializer=init(1), name="hidden"))
    units, activation = (1, "sigmoid") if config.binary else (num_classes, "softmax")
    head.append(layers.Dense(units, activation=activation, dtype="float32", kernel_initializer=init(2),
                             name="probabilities"))
    return head


def build_head(config: ModelConfig, num_classes: int, feature_dim: int, seed: int | None = None) -> keras.Model:
    """The head alone, on pooled backbone features (what phase 1 trains on cached features)."""
    return head_on_features(head_layers(config, num_classes, seed), feature_dim)


def head_on_features(head: list[layers.Layer], feature_dim: int) -> keras.Model:
    """A model applying the head layers, in order, to `feature_dim` pooled features."""
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = inputs
    for layer in head:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def image_size_of(model: keras.Model) -> int:
    """The square size the classifier resizes its input to."""
    return int(model.get_layer("resize").height)


def backbone_name_of(model: keras.Model) -> str:
    """The registry name of the classifier's backbone."""
    return model.get_layer("preprocess").backbone


def freeze_base(model: keras.Model) -> None:
    """Freezes the whole backbone."""
    get_backbone(model).trainable = False


def unfreeze(model: keras.Model, blocks: int = 0, from_layer: str | None = None) -> int:
    """Makes the top of the backbone trainable; BatchNormalization layers stay frozen.

    Args:
        model: a kerastl classifier.
        blocks: unfreeze the last `blocks` blocks (registry boundaries); 0 keeps the base frozen.
        from_layer: alternatively, unfreeze every layer from this one (by name) on.

    Returns:
        The number of backbone layers now trainable.
    """
    backbone = get_backbone(model)
    names = [layer.name for layer in backbone.layers]
    if from_layer is not None:
        if from_layer not in names:
            raise KerastlError(f"layer {from_layer!r} is not in backbone {backbone.name}")
        start = names.index(from_layer)
    elif blocks <= 0:
        freeze_base(model)
        return 0
    else:
        bounds = block_boundaries(backbone, backbone_name_of(model))
        start = 0 if blocks >= len(bounds) else bounds[-blocks - 1] + 1
    backbone.trainable = True
    count = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start and not isinstance(layer, layers.BatchNormalization)
        count += int(layer.trainable and bool(layer.weights))
    log.info("unfroze %d weighted layers of %s from %s on", count, backbone.name, names[start])
    return count
