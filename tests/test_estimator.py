"""`kerastl.ImageClassifier`: fit, evaluate, predict, export and load over the one run path."""

import gc
import json
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import write_class_folder

import kerastl
from kerastl.cli.main import main
from kerastl.config import ModelConfig
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier, build_classifier

FAST = dict(image_size=16, epochs=3, fine_tune_epochs=1, unfreeze_blocks=1, validation="holdout", min_steps=0,
            fine_tune_min_steps=0, batch_size=8, learning_rate=0.01)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A simple_cnn backbone's weights file, as a pretrained start."""
    path = tmp_path_factory.mktemp("weights") / "backbone.weights.h5"
    keras.utils.set_random_seed(0)
    build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16, from_scratch=False), 3
                     ).backbone.save_weights(path)
    return str(path)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, weights):
    """An estimator fitted on a class folder of three colours, without an export folder."""
    images = tmp_path_factory.mktemp("est") / "images"
    write_class_folder(images)
    clf = kerastl.ImageClassifier("simple_cnn", weights=weights, **FAST)
    history = clf.fit(images, verbose=0)
    return clf, history, images


def test_fit_trains_both_phases_into_a_run_folder(fitted):
    clf, history, _ = fitted
    assert isinstance(clf.model, TransferClassifier) and isinstance(clf.model, keras.Model)
    assert history is clf.history and history.phase2 is not None  # both phases' Keras histories
    assert len(history.phase1.epoch) >= 1 and len(history.phase2.epoch) == 1
    assert clf.class_names == ["blue", "green", "red"] and 0 <= clf.metrics["val_accuracy"] <= 1
    assert (clf.folder / "saved_model.pb").is_file() and (clf.folder / "report.html").is_file()
    assert clf.config.train.epochs == 3 and clf.config.model.image_size == 16  # the keywords reached the run


def test_evaluate_scores_as_the_command_does(fitted, capsys):
    clf, _, images = fitted
    evaluation = clf.evaluate(images)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(clf.folder), "--data", str(images)]) == 0
    assert capsys.readouterr().out.startswith(evaluation.format())  # the same images, the same scores
    x = np.stack([np.full((16, 16, 3), colour, np.uint8) for colour in ((0, 0, 255), (0, 255, 0), (255, 0, 0))])
    on_arrays = clf.evaluate((x, np.array([0, 1, 2])))
    assert on_arrays.count == 3 and on_arrays.class_names == clf.class_names


def test_predict_names_classes_of_files_folders_and_pixels(fitted, tmp_path):
    clf, _, images = fitted
    (tmp_path / "notes.jpg").write_text("not an image")
    files = sorted((images / "red").iterdir())
    predictions = clf.predict([files[0], images / "green", tmp_path / "notes.jpg"])
    assert predictions.paths[0] == str(files[0]) and len(predictions) == 1 + 8
    assert [f.path for f in predictions.skipped] == [str(tmp_path / "notes.jpg")]
    assert predictions.classes[0] == "red" and predictions.classes[1:].count("green") >= 6  # it learned the colours
    assert np.allclose(predictions.probabilities.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(KerastlError, match="notes.jpg"):
        clf.predict([tmp_path / "notes.jpg"], strict=True)
    pixels = clf.predict(np.zeros((5, 40, 40, 3), np.float32), batch_size=2)  # resized by the export
    assert len(pixels) == 5 and pixels.paths == []


def test_export_then_load_gives_the_same_classifier(fitted, tmp_path):
    clf, _, images = fitted
    out = clf.export(tmp_path / "flowers")
    assert json.loads((out / "config.json").read_text())["export_dir"] == str(out)
    assert str(out.resolve()) in (out / "MODEL_CARD.md").read_text()  # the card says where to load it from
    loaded = kerastl.ImageClassifier.load(out)
    files = sorted((images / "blue").iterdir())[:3]
    assert np.allclose(loaded.predict(files).probabilities, clf.predict(files).probabilities, atol=1e-5)
    assert loaded.class_names == clf.class_names and loaded.metrics == pytest.approx(clf.metrics)
    assert len(loaded.history.phase2.epoch) == 1
    with pytest.raises(KerastlError, match="not empty"):
        clf.export(tmp_path / "flowers")


@pytest.mark.slow  # three fits, over 10 s on 2 cores
def test_fit_takes_arrays_and_datasets(weights, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    colours = np.array([(255, 0, 0), (0, 255, 0)], np.float32)
    y = np.repeat([0, 1], 12)
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 10, (24, 16, 16, 3)), 0, 255).astype(np.uint8)
    fast = {**FAST, "fine_tune_epochs": 0}
    clf = kerastl.ImageClassifier("simple_cnn", weights=weights, **fast)
    clf.fit((x, y), class_names=["red", "green"], export_dir=tmp_path / "arrays", verbose=0)
    assert clf.class_names == ["red", "green"] and (tmp_path / "arrays" / "saved_model.pb").is_file()
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(KerastlError, match="class_names"):
        kerastl.ImageClassifier("simple_cnn", weights=weights, **fast).fit(dataset)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))  # where fit keeps its run folder
    (tmp_path / "temporary").mkdir()
    with pytest.raises(KerastlError, match="data must be"):
        kerastl.ImageClassifier("simple_cnn", weights=weights, **fast).fit(42)
    assert not list((tmp_path / "temporary").iterdir())  # a refused fit leaves no temporary folder
    other = kerastl.ImageClassifier("simple_cnn", weights=weights, **fast)
    other.fit(dataset, class_names=["red", "green"], verbose=0)
    assert other.class_names == ["red", "green"] and other.predict(x[:4]).probabilities.shape == (4, 2)
    assert other.predict(x[:0]).probabilities.shape == (0, 2)
    folder = other.folder
    assert folder.parent.parent == tmp_path / "temporary" and folder.is_dir()
    del other
    gc.collect()
    assert not folder.parent.exists()  # removed with the estimator, since it was never exported


def test_bad_use_is_one_line_naming_the_parameter():
    with pytest.raises(KerastlError, match=r"lr=0.1 \(did you mean learning_rate\?\)"):
        kerastl.ImageClassifier("simple_cnn", lr=0.1)
    with pytest.raises(KerastlError, match="has not been fitted"):
        kerastl.ImageClassifier("simple_cnn").predict(["a.jpg"])
    with pytest.raises(KerastlError, match="data must be"):
        kerastl.ImageClassifier("simple_cnn", weights=None).fit(42)
