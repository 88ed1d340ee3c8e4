"""The classifier object: its parts, saving, freezing, and the models that share its layers."""

import keras
import numpy as np
import pytest

from kerastl.config import ModelConfig
from kerastl.data.images import from_arrays
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier, build_classifier


def small(backbone="mobilenet_v2", **kwargs) -> ModelConfig:
    return ModelConfig(backbone=backbone, weights=None, image_size=32, from_scratch=False, **kwargs)


def test_any_input_size_gives_softmax_over_classes():
    model = build_classifier(small(hidden_units=8), num_classes=4)
    for shape in [(3, 32, 32, 3), (2, 57, 20, 3)]:
        probs = model.predict(np.random.default_rng(0).uniform(0, 255, shape), verbose=0)
        assert probs.shape == (shape[0], 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.hidden.units == 8


def test_the_classifier_resolves_its_entry_once_and_keeps_its_parts():
    model = build_classifier(ModelConfig("MobileNetV2", weights=None, from_scratch=False), num_classes=3)
    assert isinstance(model, TransferClassifier) and isinstance(model, keras.Model)
    assert model.spec.name == model.backbone_name == "mobilenet_v2"
    assert model.image_size == 224 and model.resizing.height == 224  # the registry default, resolved once
    assert model.preprocessing.backbone == "mobilenet_v2"
    assert isinstance(model.pooler, keras.layers.GlobalAveragePooling2D) and model.hidden is None
    assert model.output_dense.units == 3 and model.output_dense.dtype_policy.name == "float32"
    assert model.feature_dim == 1280


def test_binary_has_one_sigmoid_unit_and_needs_two_classes():
    model = build_classifier(small(binary=True), num_classes=2)
    assert model.output_shape == (None, 1)
    with pytest.raises(KerastlError, match="exactly two classes"):
        build_classifier(small(binary=True), num_classes=3)
    with pytest.raises(KerastlError, match="two or more classes"):
        build_classifier(small(), num_classes=1)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_no_lambda_and_keras_file_loads_in_safe_mode_with_every_argument(tmp_path):
    model = build_classifier(small("resnet50", hidden_units=4, pooling="max", dropout=0.3), num_classes=3, seed=5)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in [*model.layers, *model.backbone.layers])
    x = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded, TransferClassifier)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    config, reloaded = model.get_config(), loaded.get_config()
    for key in ("backbone_name", "num_classes", "image_size", "pooling", "dropout", "hidden_units", "binary",
                "from_scratch", "seed"):
        assert reloaded[key] == config[key], key
    assert config["pooling"] == "max" and config["hidden_units"] == 4 and config["seed"] == 5


def test_features_and_head_models_share_the_classifier_layers():
    model = build_classifier(small(hidden_units=8), num_classes=3)
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    features = model.features_model()(images)
    assert features.shape == (4, model.feature_dim)
    head = model.head_model()
    np.testing.assert_allclose(head(features, training=False), model(images, training=False), atol=1e-5)
    for weight in head.trainable_weights:  # training the head model changes the classifier in place
        weight.assign(weight + 0.5)
    np.testing.assert_allclose(model.output_dense.kernel.numpy(), head.get_layer("probabilities").kernel.numpy())
    np.testing.assert_allclose(head(features, training=False), model(images, training=False), atol=1e-5)
    assert {id(w) for w in head.weights} <= {id(w) for w in model.weights}


def test_the_head_reads_pooled_features_of_one_or_several_blocks():
    model = build_classifier(small(), num_classes=3)
    one = model.pool_features([keras.Input((4, 4, 8))])
    several = model.pool_features([keras.Input((4, 4, 8)), keras.Input((2, 2, 16))])
    assert one.shape == (None, 8) and several.shape == (None, 24)  # pooled, then concatenated


def test_base_starts_frozen_and_unfreezes_by_blocks_keeping_batchnorm_frozen():
    model = build_classifier(small(), num_classes=3)
    backbone = model.backbone
    assert not backbone.trainable and len(model.trainable_weights) == 2  # the softmax layer only
    model.unfreeze(blocks=1)
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert trainable[0] == "block_16_expand" and "Conv_1" in trainable
    assert not any(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in trainable)
    assert not backbone.get_layer("block_15_project").trainable
    model.unfreeze(from_layer="block_10_expand")
    assert backbone.get_layer("block_10_expand").trainable and not backbone.get_layer("block_9_project").trainable
    model.unfreeze(blocks=0)
    assert not backbone.trainable
    with pytest.raises(KerastlError, match="not in backbone"):
        model.unfreeze(from_layer="no_such_layer")


def test_unfreezing_more_blocks_than_exist_unfreezes_everything():
    model = build_classifier(small("vgg16"), num_classes=3)
    model.unfreeze(blocks=99)
    convs = [layer for layer in model.backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(layer.trainable for layer in convs)


def test_from_scratch_trains_everything():
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32), num_classes=3)
    assert model.from_scratch and model.backbone.trainable
    assert len(model.trainable_weights) > 100


def test_the_data_side_takes_its_image_size_from_the_classifier():
    model = build_classifier(small(), num_classes=2)
    x = np.random.default_rng(0).integers(0, 255, (8, 10, 12, 3)).astype(np.uint8)
    data = from_arrays(x, np.array([0, 1] * 4), model)
    assert data.train.image_size == 32 and data.train.arrays()[0].shape[1:] == (32, 32, 3)


def test_a_seed_fixes_the_head_whatever_the_backbone_used():
    first = build_classifier(small(hidden_units=4), 3, seed=9)
    keras.utils.set_random_seed(77)  # other global randomness before the second build
    second = build_classifier(small(hidden_units=4), 3, seed=9)
    for a, b in zip(first.head_model().weights, second.head_model().weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
