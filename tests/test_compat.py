"""Run folders and exports written by kerastl 0.1 still load, or fail with one line saying what to do."""

import json

import keras
import numpy as np
import pytest

from kerastl.config import RunConfig
from kerastl.errors import KerastlError
from kerastl.models.backbones import build_backbone
from kerastl.models.classifier import TransferClassifier
from kerastl.models.layers import BackbonePreprocessing
from kerastl.runs.folder import load_model, read_config

V01_CONFIG = {
    "data": {"source": "digits", "augment": "none"},
    "model": {"backbone": "mobilenet_v2", "weights": None, "image_size": 32, "hidden_units": 8},
    "train": {"epochs": 2, "fine_tune_epochs": 0},
    "name": "old", "export_dir": "saved_models/old",
    "tune": {"tuner": "random", "max_trials": 4}, "best_trial": "2",  # what a 0.1 search export added
}


def write_version_0_1_folder(folder, hidden_units=8):
    """What 0.1 wrote: a plain functional model with named layers, labels and a config with search keys."""
    inputs = keras.Input(shape=(None, None, 3), name="images")
    x = keras.layers.Resizing(32, 32, name="resize")(inputs)
    x = BackbonePreprocessing("mobilenet_v2", name="preprocess")(x)
    x = build_backbone("mobilenet_v2", 32, weights=None)(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="kerastl_mobilenet_v2")
    for weight in model.weights:  # trained weights (BatchNorm statistics included), unlike any fresh start
        values = np.random.default_rng(len(weight.path)).normal(0, 0.2, weight.shape)
        weight.assign((np.abs(values) + 0.5 if "variance" in weight.path else values).astype(np.float32))
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.txt").write_text("a\nb\nc\n")
    (folder / "config.json").write_text(json.dumps(V01_CONFIG))
    return model


@pytest.mark.parametrize("weights, from_scratch", [pytest.param("imagenet", False, marks=pytest.mark.slow),
                                                   (None, True)])
def test_a_version_0_1_run_folder_loads_as_a_classifier_with_equal_outputs(tmp_path, monkeypatch, weights,
                                                                         from_scratch):
    monkeypatch.setitem(V01_CONFIG, "model", {**V01_CONFIG["model"], "weights": weights})
    old = write_version_0_1_folder(tmp_path / "old")
    loaded = load_model(tmp_path / "old")  # never downloads: the saved weights replace the start
    assert isinstance(loaded, TransferClassifier) and loaded.hidden_units == 8
    assert loaded.from_scratch == from_scratch and loaded.backbone.trainable == from_scratch
    images = np.random.default_rng(0).uniform(0, 255, (3, 20, 20, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), old.predict(images, verbose=0), atol=1e-6)


def test_a_version_0_1_search_config_is_accepted_for_reproducing_the_run(tmp_path):
    write_version_0_1_folder(tmp_path / "old")
    config = read_config(tmp_path / "old")
    assert config == RunConfig.from_dict({k: v for k, v in V01_CONFIG.items() if k not in ("tune", "best_trial")})
    with pytest.raises(KerastlError, match="unknown config keys"):  # other unknown keys are still refused
        RunConfig.from_dict({**V01_CONFIG, "tunes": {}})


def test_a_version_0_1_folder_that_cannot_be_read_fails_with_one_line_saying_what_to_do(tmp_path):
    write_version_0_1_folder(tmp_path / "old", hidden_units=0)  # its config.json says 8 hidden units
    with pytest.raises(KerastlError) as error:
        load_model(tmp_path / "old")
    message = str(error.value)
    assert "written by kerastl 0.1" in message and "keras.saving.load_model" in message
    assert "kerastl train --config" in message and "\n" not in message
