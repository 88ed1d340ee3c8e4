"""Untrusted and misfit model files: refused in one line, never run."""

from __future__ import annotations

import keras
import pytest

from kerastl.errors import KerastlError


def test_a_keras_file_holding_a_lambda_layer_is_refused_in_one_line(tmp_path):
    from kerastl.runs.folder import load_model

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Dense(2)])
    (tmp_path / "crafted").mkdir()
    model.save(tmp_path / "crafted" / "model.keras")
    with pytest.raises(KerastlError, match="holds Python code") as caught:
        load_model(tmp_path / "crafted")
    assert "\n" not in str(caught.value)


def test_a_legacy_h5_full_model_is_refused(tmp_path, image_folder, fails_cleanly):

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "full.h5")
    fails_cleanly(["train", "--data", str(image_folder), "--weights", str(tmp_path / "full.h5")],
                  "legacy .h5 full model")


def test_a_weights_file_that_does_not_fit_names_the_file_the_backbone_and_the_first_mismatch(tmp_path):
    from kerastl.models.backbones import build_backbone

    path = tmp_path / "cnn.weights.h5"
    build_backbone("simple_cnn", 16, None).save_weights(path)
    with pytest.raises(KerastlError) as caught:
        build_backbone("mobilenet_v2", 32, str(path))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(path) in message and "mobilenet_v2" in message and "Conv1" in message
