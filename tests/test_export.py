"""Train -> export -> reload: files, signatures, parity with plain TensorFlow."""

import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import digits
from PIL import Image

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import from_arrays
from kerastl.models.classifier import build_classifier
from kerastl.models.export import export_saved_model, load_export
from kerastl.runs.folder import load_model
from kerastl.runs.run import run_training


def test_run_writes_every_file_and_a_config_that_round_trips(trained_run):
    result = trained_run.result
    folder = result.export_dir
    for name in ("saved_model.pb", "labels.txt", "config.json", "model.keras", "backbone.weights.h5",
                 "history.json", "metrics.json", "metadata.json"):
        assert (folder / name).is_file(), name
    assert (folder / "labels.txt").read_text() == "blue\ngreen\nred\n"
    config = RunConfig.from_json(folder / "config.json")
    assert config == result.config and config.model.image_size == 32
    history = json.loads((folder / "history.json").read_text())
    assert set(history) == {"phase1", "phase2"} and "val_loss" in history["phase1"]


def test_run_folder_reloads_as_the_same_keras_model(trained_run):
    result = trained_run.result
    images = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    reloaded = load_model(result.export_dir)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), result.model.predict(images, verbose=0), atol=1e-6)


def test_exported_model_predicts_the_right_labels(trained_run):
    exported = load_export(trained_run.export)
    assert exported.class_names == ["blue", "green", "red"]
    files = [trained_run.images / name / f"{i}.{ext}" for name in exported.class_names
             for i, ext in ((0, "png"), (1, "jpg"), (2, "bmp"), (3, "gif"))]
    probabilities = exported.predict_files(files)
    predicted = [exported.class_names[i] for i in probabilities.argmax(axis=1)]
    assert predicted == [f.parent.name for f in files]


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_plain_tensorflow_gets_the_keras_probabilities(trained_run, tmp_path):
    result = trained_run.result
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, 45, 37, 3)).astype(np.float32)  # any size: resized inside
    np.save(tmp_path / "images.npy", images)
    encoded = io.BytesIO()
    Image.fromarray(images[0].round().astype(np.uint8)).save(encoded, "PNG")
    (tmp_path / "image.png").write_bytes(encoded.getvalue())
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(result.export_dir)!r})
        images = np.load({str(tmp_path / 'images.npy')!r})
        out = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()
        data = open({str(tmp_path / 'image.png')!r}, "rb").read()
        from_bytes = loaded.signatures["serve_bytes"](image_bytes=tf.constant([data]))["probabilities"].numpy()
        np.save({str(tmp_path / 'out.npy')!r}, out)
        np.save({str(tmp_path / 'bytes.npy')!r}, from_bytes)
        assert "kerastl" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    expected = result.model.predict(images, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    png_pixels = np.asarray(Image.open(tmp_path / "image.png"), np.float32)[None]
    np.testing.assert_allclose(np.load(tmp_path / "bytes.npy"), result.model.predict(png_pixels, verbose=0), atol=1e-5)


def test_binary_export_returns_both_class_probabilities(tmp_path):
    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16, binary=True), 2)
    export_saved_model(model, tmp_path / "binary", ["cat", "dog"])
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    probabilities = load_export(tmp_path / "binary").predict(images)
    p = model.predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(probabilities, np.stack([1 - p, p], axis=1), atol=1e-6)


def test_backbone_weights_start_the_next_run(trained_run):
    result = trained_run.result
    weights = str(result.export_dir / "backbone.weights.h5")
    model = build_classifier(ModelConfig("simple_cnn", weights=weights, image_size=32), 3)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    every = list(range(1, model.block_count() + 1))  # every block, whichever the trained head reads
    features = lambda m: m.features_model(every).predict(x, verbose=0)  # noqa: E731
    np.testing.assert_allclose(features(model), features(result.model), atol=1e-5)


def test_run_refuses_a_non_empty_export_folder_and_writes_nothing_on_bad_input(trained_run, tmp_path):
    full = tmp_path / "run"  # a copy: the session's run folder stays as it is
    shutil.copytree(trained_run.export, full)
    x = np.zeros((6, 8, 8, 3), np.uint8)
    data = from_arrays(x, np.array([0, 1] * 3), 16, ["a", "b"])
    config = RunConfig(model=ModelConfig("simple_cnn", weights=None, image_size=16), export_dir=str(full))
    with pytest.raises(Exception, match="not empty"):
        run_training(config, data=data)
    config.export_dir = str(tmp_path / "new")
    config.model.image_size = 8
    with pytest.raises(Exception, match="too small"):
        run_training(config, data=data)
    assert not (tmp_path / "new").exists()


def _digit_run(tmp_path, fine_tune_epochs=0, weights=None):
    data = digits(90, 16, seed=42, validation_split=0.2)
    config = RunConfig(DataConfig(augment="none", batch_size=16),
                       ModelConfig("simple_cnn", weights=weights, image_size=16, from_scratch=False, hidden_units=4),
                       TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0, epochs=2,
                                   fine_tune_epochs=fine_tune_epochs, unfreeze_blocks=1,
                                   cache_dir=str(tmp_path / "cache")),
                       export_dir=str(tmp_path / "run"))
    return run_training(config, data, verbose=0, save="weights")


@pytest.mark.parametrize("fine_tune_epochs, weights_file", [(0, "head.weights.h5"), (1, "model.weights.h5")])
def test_weights_only_run_folders_load_as_the_same_model(tmp_path, fine_tune_epochs, weights_file):
    result = _digit_run(tmp_path, fine_tune_epochs)
    folder = result.export_dir
    assert (folder / weights_file).is_file() and not (folder / "saved_model.pb").exists()
    assert (result.history.phase2 is not None) == bool(fine_tune_epochs)
    images = np.random.default_rng(3).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(load_model(folder).predict(images, verbose=0), result.model.predict(images, verbose=0),
                               atol=1e-6)


def test_a_head_whose_backbone_file_changed_is_refused(tmp_path):
    from kerastl.errors import KerastlError

    start = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16), 3)
    start.backbone.save_weights(tmp_path / "b.weights.h5")
    _digit_run(tmp_path, weights=str(tmp_path / "b.weights.h5"))
    other = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16), 3)
    other.backbone.save_weights(tmp_path / "b.weights.h5")  # the file the head's backbone came from, replaced
    with pytest.raises(KerastlError, match="differs from the one its head was trained on"):
        load_model(tmp_path / "run")


def test_pipelines_need_their_model_and_write_nothing(tmp_path):
    from kerastl.errors import KerastlError

    data = from_arrays(np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1] * 3), 16, ["a", "b"])
    config = RunConfig(model=ModelConfig("simple_cnn", weights=None, image_size=16), export_dir=str(tmp_path / "e"))
    pipelines = (data.train.batches(2), data.validation.batches(2))
    with pytest.raises(KerastlError, match="needs the model built for them"):
        run_training(config, pipelines)
    model = build_classifier(config.model, 2)
    with pytest.raises(KerastlError, match="save='none'"):
        run_training(config, pipelines, model=model, save="export")
    assert not (tmp_path / "e").exists()
