"""Two-phase training and BatchNorm safety."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import digits

from kerastl.config import ModelConfig, TrainConfig
from kerastl.models.classifier import build_classifier
from kerastl.training.batchnorm import recalibrate_batchnorm
from kerastl.training.phases import train_classifier


def _batchnorm_state(model):
    return {
        w.path: w.numpy().copy()
        for layer in model.batchnorm_layers()
        for w in layer.weights
    }


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_fine_tuning_leaves_batchnorm_statistics_unchanged():
    data = digits(150, seed=42)
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32, from_scratch=False), 3)
    # give the BatchNorm layers statistics that differ from the initial 0/1, as pretrained ones would
    recalibrate_batchnorm(model, data.train.sample())
    before = _batchnorm_state(model)
    kernel_before = model.backbone.get_layer("Conv_1").kernel.numpy().copy()
    seen = []  # state at the end of every epoch, before KeepBest may restore earlier weights
    probe = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
        (_batchnorm_state(model), model.backbone.get_layer("Conv_1").kernel.numpy().copy())))
    result = train_classifier(
        model, data.train.batches(32, training=True), data.validation.batches(64),
        TrainConfig(min_steps=0, fine_tune_min_steps=0,
                    epochs=1, fine_tune_epochs=1, unfreeze_blocks=99, patience=5, fine_tune_lr_ratio=10.0),
        callbacks=[probe], verbose=0,
    )
    assert result.phase2 is not None and len(result.phase2.epoch) == 1 and len(seen) == 2
    for state in [seen[0][0], seen[1][0], _batchnorm_state(model)]:
        assert state.keys() == before.keys() and len(before) > 100
        for path, value in before.items():
            np.testing.assert_array_equal(state[path], value, err_msg=path)
    # ...while the fine-tuning epoch did train the convolutions around them
    assert np.array_equal(seen[0][1], kernel_before) and not np.allclose(seen[1][1], kernel_before)


def test_fine_tuning_never_ends_worse_than_phase_one():
    data = digits(150, seed=42)
    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=32, from_scratch=False), 3)
    validation = data.validation.batches(64)
    # a fine-tuning learning rate of 5 wrecks the weights (30 now overflows to NaN on Keras 3.15): phase 2 must
    # roll back to phase 1's best
    result = train_classifier(
        model, data.train.batches(32, training=True), validation,
        TrainConfig(min_steps=0, fine_tune_min_steps=0,
                    epochs=4, fine_tune_epochs=3, unfreeze_blocks=3, optimizer="sgd",
                    learning_rate=0.05, fine_tune_lr_ratio=100.0, patience=3),
        verbose=0,
    )
    phase1_best = min(result.phase1.history["val_loss"])
    assert min(result.phase2.history["val_loss"]) > phase1_best  # phase 2 really was worse
    final = model.evaluate(validation, return_dict=True, verbose=0)["loss"]
    np.testing.assert_allclose(final, phase1_best, rtol=1e-4)
    assert result.to_dict()["phase2"]["epoch"][0] == len(result.phase1.epoch)


def test_recalibration_makes_inference_match_training_statistics():
    data = digits(150, seed=42)
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32), 3)
    x, _ = data.train.arrays()
    x = tf.constant(x[:96], tf.float32)
    features = model.features_model()
    norms = model.batchnorm_layers()
    momenta = [layer.momentum for layer in norms]
    # untrained moving statistics (mean 0, variance 1) are far from the data's
    gap_before = np.abs(features(x, training=False) - features(x, training=True)).max()
    assert recalibrate_batchnorm(model, x, chunk_size=len(x)) == 52  # one chunk: the whole batch's statistics
    gap_after = np.abs(features(x, training=False) - features(x, training=True)).max()
    scale = np.abs(features(x, training=True)).max()  # float32 agreement relative to the features' size
    assert gap_after < 1e-3 * scale < gap_before
    assert [layer.momentum for layer in norms] == momenta  # restored after calibrating


@pytest.mark.slow  # about 25 s; CI runs it
def test_from_scratch_training_learns_and_evaluates_correctly():
    data = digits(150, seed=42)
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32), 3)
    result = train_classifier(
        model, data.train.batches(32, training=True), data.validation.batches(64),
        TrainConfig(min_steps=0, fine_tune_min_steps=0,
                    epochs=8, patience=8), calibration_images=data.train.sample(), verbose=0,
    )
    assert result.phase2 is None
    accuracy = model.evaluate(data.validation.batches(64), return_dict=True, verbose=0)["accuracy"]
    # Keras evaluates with moving statistics: these were recalibrated before every validation
    assert accuracy > 0.8


def test_recalibration_also_reaches_a_frozen_transfer_backbone():
    data = digits(150, seed=42)
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32, from_scratch=False), 3)
    norm = model.backbone.get_layer("bn_Conv1")
    assert not norm.trainable and np.allclose(norm.moving_mean.numpy(), 0)
    recalibrate_batchnorm(model, data.train.sample())
    assert not norm.trainable and not np.allclose(norm.moving_mean.numpy(), 0)


def test_label_smoothing_and_weight_decay_reach_the_compiled_model(tmp_path):
    from kerastl.training.compile import compile_classifier, make_loss

    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    smoothed = make_loss("auto", binary=False, label_smoothing=0.1)(y, p)
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p)
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-6)
    assert float(np.mean(make_loss("auto", binary=False)(y, p))) < float(smoothed)
    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16), 3)
    compile_classifier(model, TrainConfig(label_smoothing=0.1, weight_decay=1e-3, optimizer="adamw"))
    assert model.optimizer.weight_decay == pytest.approx(1e-3) and model.loss.label_smoothing == 0.1
    model.save(tmp_path / "m.keras")  # the smoothed loss is registered: the compiled model reloads safely
    assert keras.models.load_model(tmp_path / "m.keras", safe_mode=True).loss.label_smoothing == 0.1
