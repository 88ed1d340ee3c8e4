"""Classifier assembly, saving, freezing."""

import keras
import numpy as np
import pytest

from kerastl.config import ModelConfig
from kerastl.errors import KerastlError
from kerastl.model import build_classifier, get_backbone, unfreeze


def small(backbone="mobilenet_v2", **kwargs) -> ModelConfig:
    return ModelConfig(backbone=backbone, weights=None, image_size=32, from_scratch=False, **kwargs)


def test_any_input_size_gives_softmax_over_classes():
    model = build_classifier(small(hidden_units=8), num_classes=4)
    for shape in [(3, 32, 32, 3), (2, 57, 20, 3)]:
        probs = model.predict(np.random.default_rng(0).uniform(0, 255, shape), verbose=0)
        assert probs.shape == (shape[0], 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("hidden").units == 8


def test_binary_has_one_sigmoid_unit_and_needs_two_classes():
    model = build_classifier(small(binary=True), num_classes=2)
    assert model.output_shape == (None, 1)
    with pytest.raises(KerastlError, match="exactly two classes"):
        build_classifier(small(binary=True), num_classes=3)
    with pytest.raises(KerastlError, match="two or more classes"):
        build_classifier(small(), num_classes=1)


def test_no_lambda_and_keras_file_loads_in_safe_mode(tmp_path):
    model = build_classifier(small("resnet50"), num_classes=3)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())
    x = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_base_starts_frozen_and_unfreezes_by_blocks_keeping_batchnorm_frozen():
    model = build_classifier(small(), num_classes=3)
    backbone = get_backbone(model)
    assert not backbone.trainable and len(model.trainable_weights) == 2  # the softmax layer only
    unfreeze(model, blocks=1)
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert trainable[0] == "block_16_expand" and "Conv_1" in trainable
    assert not any(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in trainable)
    assert not backbone.get_layer("block_15_project").trainable
    unfreeze(model, from_layer="block_10_expand")
    assert backbone.get_layer("block_10_expand").trainable and not backbone.get_layer("block_9_project").trainable
    unfreeze(model, blocks=0)
    assert not backbone.trainable
    with pytest.raises(KerastlError, match="not in backbone"):
        unfreeze(model, from_layer="no_such_layer")


def test_unfreezing_more_blocks_than_exist_unfreezes_everything():
    model = build_classifier(small("vgg16"), num_classes=3)
    unfreeze(model, blocks=99)
    convs = [layer for layer in get_backbone(model).layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(layer.trainable for layer in convs)


def test_from_scratch_trains_everything():
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32), num_classes=3)
    assert get_backbone(model).trainable
    assert len(model.trainable_weights) > 100
