"""LiteRT (TFLite) export (`kerastl.models.litert`, `kerastl export`): run by LiteRT's own
interpreter (ai-edge-litert), it gives what Keras gives."""

import shutil

import numpy as np
import pytest
from helpers import SMALL, frozen_cnn, tiny_run_folder

from kerastl.cli.main import main
from kerastl.errors import KerastlError
from kerastl.models.export import load_export
from kerastl.models.litert import export_litert, load_litert

IMAGES = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
# max |LiteRT - Keras| on a probability, per variant: float32 is the same arithmetic; float16 rounds
# the weights; dynamic and int8 quantize them (and int8 the activations, calibrated on IMAGES)
BOUNDS = {"none": 1e-4, "float16": 1e-3, "dynamic": 0.05, "int8": 0.1}


def keras_probabilities(model, images):
    probabilities = model.predict(images, verbose=0)
    return np.concatenate([1 - probabilities, probabilities], -1) if probabilities.shape[-1] == 1 else probabilities


@pytest.mark.parametrize("binary", [False, True])
def test_the_float32_file_gives_keras_probabilities_for_a_multi_block_head_and_a_binary_model(tmp_path, binary):
    model = frozen_cnn(2 if binary else 3, seed=0, binary=binary, features="1,3", hidden_units=4)
    names = ["a", "b"] if binary else ["a", "b", "c"]
    written = export_litert(model, tmp_path / "model.tflite", names)
    lite = load_litert(written.path)
    assert (tmp_path / "labels.txt").read_text().split() == names and lite.class_names == names
    probabilities = lite.predict(IMAGES)
    assert probabilities.shape == (32, len(names))
    np.testing.assert_allclose(probabilities, keras_probabilities(model, IMAGES), atol=1e-4)
    np.testing.assert_allclose(lite.predict(IMAGES[:1]), probabilities[:1], atol=1e-6)  # batch 1, then 32 again


def test_quantized_files_stay_within_their_bounds_agree_with_keras_and_are_smaller(trained_run, tmp_path):
    from kerastl.data.images import load_data
    from kerastl.models.litert import float_ops

    model = trained_run.result.model  # trained: its probabilities spread, so agreement means something
    images = load_data(trained_run.result.config.data, 32).train.arrays()[0].astype(np.float32)
    expected = keras_probabilities(model, images)
    assert expected.max(axis=1).mean() > 0.6 and len(set(expected.argmax(1))) == 3
    sizes = {}
    for quantize in ("none", "float16", "dynamic", "int8"):
        written = export_litert(model, tmp_path / quantize / "model.tflite", trained_run.result.class_names,
                                quantize, representative=images)
        sizes[quantize] = written.size_bytes
        probabilities = load_litert(written.path).predict(images)
        assert np.abs(probabilities - expected).max() <= BOUNDS[quantize], quantize
        assert (probabilities.argmax(1) == expected.argmax(1)).mean() >= 0.9, quantize
    assert sizes["float16"] < 0.6 * sizes["none"] and sizes["dynamic"] < 0.35 * sizes["none"]
    assert any(op.startswith("CONV_2D") for op in float_ops(tmp_path / "none" / "model.tflite"))
    assert written.float_ops == float_ops(written.path) and not any(op.startswith("CONV_2D")
                                                                   for op in written.float_ops)  # int8 kernels


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    model = frozen_cnn(3, seed=0)
    with pytest.raises(KerastlError, match="quantize must be one of none, float16, dynamic, int8"):
        export_litert(model, tmp_path / "model.tflite", ["a", "b", "c"], "int4")
    with pytest.raises(KerastlError, match="int8 quantization calibrates on training images"):
        export_litert(model, tmp_path / "model.tflite", ["a", "b", "c"], "int8")
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")  # another model's export in the same folder
    with pytest.raises(KerastlError, match="holds another model's class names"):
        export_litert(model, tmp_path / "model.tflite", ["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]
    assert (tmp_path / "labels.txt").read_text() == "cat\ndog\nfox\n"


def test_a_file_that_is_not_a_kerastl_litert_export_is_refused_in_one_line(tmp_path, fails_cleanly):
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(KerastlError, match="is not a LiteRT model"):
        load_litert(tmp_path / "model.tflite")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    fails_cleanly(["predict", "--model", str(tmp_path / "model.tflite"), str(image)], "is not a LiteRT model")
    foreign = tmp_path / "foreign"  # a real LiteRT model, of the same shape, that kerastl did not write
    foreign.mkdir()
    frozen_cnn(3, seed=0).export(str(foreign / "model.tflite"), format="litert", verbose=False)
    (foreign / "labels.txt").write_text("a\nb\nc\n")
    fails_cleanly(["predict", "--model", str(foreign / "model.tflite"), str(image)], "no kerastl metadata")
    fails_cleanly(["evaluate", "--model", str(foreign / "model.tflite"), "--data", "digits", "--json",
                   str(tmp_path / "e.json")], "no kerastl metadata")
    assert not (tmp_path / "e.json").exists()


def test_kerastl_export_writes_a_file_that_predict_and_evaluate_take(trained_run, tmp_path, capsys, fails_cleanly):
    run = tmp_path / "run"
    shutil.copytree(trained_run.export, run)
    assert main(["export", str(run)]) == 0
    assert "model.tflite (none," in capsys.readouterr().out
    images = sorted(str(p) for p in trained_run.images.rglob("*.png"))[:3]
    assert main(["predict", "--model", str(run / "model.tflite"), "--json", *images]) == 0
    lite = capsys.readouterr().out
    assert main(["predict", "--model", str(run), "--json", *images]) == 0
    saved = capsys.readouterr().out
    top = [line.split('"top"')[1][:40] for line in lite.splitlines()]  # the same top class, image by image
    assert top == [line.split('"top"')[1][:40] for line in saved.splitlines()]
    np.testing.assert_allclose(load_litert(run / "model.tflite").predict_files(images),
                               load_export(run).predict_files(images), atol=1e-4)
    assert main(["evaluate", "--model", str(run / "model.tflite"), "--data", trained_run.csv]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["export", str(run), "--quantize", "int8", "--out", str(tmp_path / "int8.tflite")]) == 0
    assert load_litert(tmp_path / "int8.tflite").class_names == (run / "labels.txt").read_text().split()
    capsys.readouterr()
    fails_cleanly(["export", str(run), "--quantize", "int4"], "invalid choice: 'int4'")
    fails_cleanly(["train", "--data", str(trained_run.images), "--quantize", "int8"], "add --format tflite")
    fails_cleanly(["export", str(tmp_path)], "is not a kerastl run folder (no config.json)")
    fails_cleanly(["export", str(run), "--out", str(tmp_path / "model.onnx")], "--out must name a .tflite file")
    in_memory = tiny_run_folder(tmp_path / "in-memory")  # trained on arrays: no source to calibrate on
    fails_cleanly(["export", str(in_memory), "--quantize", "int8"], "trained on in-memory images")
    assert not (in_memory / "model.tflite").exists()


def test_train_with_format_tflite_writes_the_file_beside_the_saved_model(image_folder, tmp_path, capsys):
    export = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--export", str(export), *SMALL, "--fine-tune-epochs", "0",
                 "--format", "tflite", "--quantize", "float16"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {export / 'model.tflite'} (float16," in out and "model.tflite    the LiteRT file" in out
    assert (export / "saved_model.pb").is_file()
    images = sorted(str(p) for p in image_folder.rglob("*.png"))[:4]
    np.testing.assert_allclose(load_litert(export / "model.tflite").predict_files(images),
                               load_export(export).predict_files(images), atol=1e-3)


def test_a_weights_only_trial_folder_exports_as_its_model(tmp_path, capsys):
    import keras

    from kerastl.config import DataConfig, ModelConfig, RunConfig
    from kerastl.runs.folder import write_run_folder
    from kerastl.training.phases import TrainResult

    config = RunConfig(DataConfig(seed=0), ModelConfig("simple_cnn", None, 32, from_scratch=False))
    model = frozen_cnn(2, seed=0)  # as a search trial builds it: the same config and seed
    history = keras.callbacks.History()
    history.history, history.epoch = {"loss": [1.0]}, [0]
    trial = write_run_folder(tmp_path / "trial", model, ["a", "b"], config, TrainResult(history),
                             {"val_accuracy": 0.5}, export=False)
    assert not (trial / "model.keras").exists()  # the head's weights alone
    assert main(["export", str(trial)]) == 0
    np.testing.assert_allclose(load_litert(trial / "model.tflite").predict(IMAGES), keras_probabilities(model, IMAGES),
                               atol=1e-4)
