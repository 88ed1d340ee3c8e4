"""The checks every registry entry must pass (keras-hub's shared model saving test, for kerastl).

`check_contract(name, folder)`: at a small size, the classifier builds, its
backbone splits into blocks, it saves to `.keras` and reloads in safe mode with
equal outputs, and its SavedModel export (read by plain TensorFlow) gives the
same probabilities.
"""

from __future__ import annotations

import keras
import numpy as np

from kerastl.config import ModelConfig
from kerastl.models.backbones import get_spec
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.models.export import export_saved_model, load_export


def contract_size(name: str) -> int:
    """The smallest size the entry allows, at least 32."""
    return max(get_spec(name).min_size, 32)


def check_contract(name: str, folder) -> None:
    size = contract_size(name)
    model = build_classifier(ModelConfig(name, weights=None, image_size=size, from_scratch=False, hidden_units=4),
                             num_classes=3, seed=0)
    maps = model.backbone(np.zeros((1, size, size, 3), np.float32))
    assert len(maps.shape) == 4 and maps.shape[-1] == model.feature_dim > 0
    bounds = model.block_boundaries()
    assert len(bounds) >= 3, "fine-tuning needs several blocks to choose from"
    assert bounds == sorted(set(bounds)) and bounds[-1] < len(model.backbone.layers)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in [*model.layers, *model.backbone.layers])

    images = np.random.default_rng(0).uniform(0, 255, (2, size + 5, size - 3, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    model.save(folder / "model.keras")
    loaded = keras.saving.load_model(folder / "model.keras", safe_mode=True)
    assert isinstance(loaded, TransferClassifier) and loaded.backbone_name == get_spec(name).name
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)

    export_saved_model(model, folder / "export", ["a", "b", "c"])
    np.testing.assert_allclose(load_export(folder / "export").predict(images), expected, rtol=1e-5, atol=1e-5)
