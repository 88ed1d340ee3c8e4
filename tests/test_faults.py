"""Faulty inputs: bad image files never crash training, and `check_data` reports every one."""

from __future__ import annotations

import copy
import errno
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageFile

from kerastl.config import DataConfig
from kerastl.data import _decode_in_tensorflow, from_folder, load_data
from kerastl.errors import KerastlError
from kerastl.imagefiles import IGNORED, SKIPPED, USED, check_data, list_class_folder

RED, BLUE = (230, 30, 20), (20, 40, 230)  # class "cat" is red, class "dog" blue


def _pixels(rgb, size: int = 16, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 8, (size, size, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_faulty_folder(root) -> dict[str, tuple[str, str]]:
    """Two classes with every kind of problem file; returns {name: (action, finding)} for each one."""
    cat, dog = root / "cat", root / "dog"
    (cat / ".thumbnails").mkdir(parents=True)
    dog.mkdir()
    red, blue = Image.fromarray(_pixels(RED)), Image.fromarray(_pixels(BLUE, seed=1))
    for i, name in enumerate(("0.jpg", "1.png", "2.JPG", "3.PNG")):  # ordinary images, upper-case extensions
        Image.fromarray(_pixels(RED, seed=10 + i)).save(cat / name, "JPEG" if "j" in name.lower() else "PNG")
    for i, name in enumerate(("0.jpg", "1.png", "2.jpeg")):
        Image.fromarray(_pixels(BLUE, seed=20 + i)).save(dog / name, "JPEG" if "j" in name else "PNG")
    (cat / "truncated.jpg").write_bytes(_encoded(red, "JPEG")[:300])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "png_named.jpg").write_bytes(_encoded(red, "PNG"))
    red.convert("L").save(cat / "gray.png")
    red.convert("RGBA").save(cat / "rgba.png")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / ".thumbnails" / "0.jpg").write_bytes(_encoded(red, "JPEG"))
    (cat / "notes.txt").write_text("photographed in 2021")
    blue.save(dog / "plain.bmp")
    blue.convert("P").save(dog / "palette.png")
    blue.convert("CMYK").save(dog / "cmyk.jpg")
    blue.save(dog / "animated.gif", save_all=True, append_images=[red], duration=100, loop=0)
    blue.save(dog / "photo.webp")
    (dog / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "README.md").write_text("cats and dogs")
    return {
        "cat/truncated.jpg": (SKIPPED, "damaged JPEG"),
        "cat/empty.jpg": (SKIPPED, "zero-byte file"),
        "cat/notes.txt": (SKIPPED, "not an image"),
        "dog/photo.webp": (SKIPPED, "WebP image"),
        "cat/png_named.jpg": (USED, "PNG file named .jpg"),
        "cat/gray.png": (USED, "grayscale"),
        "cat/rgba.png": (USED, "transparency"),
        "dog/palette.png": (USED, "palette PNG"),
        "dog/cmyk.jpg": (USED, "CMYK JPEG"),
        "dog/animated.gif": (USED, "animated GIF"),
        "cat/.DS_Store": (IGNORED, "hidden file"),
        "cat/.thumbnails": (IGNORED, "hidden folder"),
        "dog/._photo.jpg": (IGNORED, "hidden file"),
        "README.md": (IGNORED, "not in a class folder"),
    }


@pytest.fixture
def faulty_folder(tmp_path):
    """(root, expected findings): 7 usable images per class and 14 problem files."""
    root = tmp_path / "pets"
    return root, write_faulty_folder(root)


def test_check_data_reports_every_problem_file_and_what_happens_to_it(faulty_folder):
    root, expected = faulty_folder
    report = check_data(root)
    found = {f.name: f for f in report.findings}
    assert sorted(found) == sorted(expected)  # every problem file, and nothing about ordinary images
    for name, (action, finding) in expected.items():
        assert found[name].action == action and finding in found[name].finding, found[name]
    assert report.class_names == ["cat", "dog"] and report.counts == [7, 7]
    assert report.can_train and report.exit_code == 1
    assert "convert it to PNG or JPEG" in found["dog/photo.webp"].detail
    assert found["cat/gray.png"].what_happens == "used: copied to 3 channels"
    assert found["dog/animated.gif"].what_happens == "used: first frame only"
    text = report.format()
    assert text.splitlines()[2].split() == ["file", "finding", "what", "happens"]
    assert all(name in text for name in expected)
    assert text.splitlines()[-1] == report.summary()
    assert report.summary().startswith("14 usable images in 2 classes; 4 skipped, 4 ignored, 6 used with a note")


def test_check_data_predicts_exactly_the_files_training_skips(faulty_folder):
    root, _ = faulty_folder
    pillow, tensorflow = check_data(root), check_data(root, decode=_decode_in_tensorflow)
    assert [f.name for f in pillow.skipped] == [f.name for f in tensorflow.skipped]
    assert pillow.counts == tensorflow.counts


def test_training_skips_undecodable_files_with_one_warning(faulty_folder, caplog):
    root, expected = faulty_folder
    with caplog.at_level(logging.WARNING, logger="kerastl.data"):
        data = from_folder(root, 16, validation_split=0.0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    skipped = [name for name, (action, _) in expected.items() if action == SKIPPED]
    assert all(f"pets/{name}" in warnings[0].getMessage() for name in skipped)
    assert "kerastl check-data" in warnings[0].getMessage()
    split = data.train
    assert split.count == 14 and np.bincount(split.labels).tolist() == [7, 7]
    for _ in range(2):  # two epochs: nothing dropped mid-epoch, labels still match the images
        images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in split.batches(4, training=True, seed=0)])
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert len(images) == split.count and sorted(labels.tolist()) == sorted(split.labels.tolist())
        red, blue = images[..., 0].mean(axis=(1, 2)), images[..., 2].mean(axis=(1, 2))
        assert np.all(red[labels == 0] >= blue[labels == 0]) and np.all(blue[labels == 1] > red[labels == 1] + 100)


def test_every_image_reaches_the_model_with_three_channels(faulty_folder):
    root, _ = faulty_folder
    data = from_folder(root, 16, validation_split=0.25, seed=0)
    for split in (data.train, data.validation):
        for x, _ in split.batches(3):
            assert x.shape[1:] == (16, 16, 3)
    x, y = data.train.arrays()
    gray = x[(y == 0) & (np.ptp(x, axis=-1).max(axis=(1, 2)) == 0)]
    assert len(gray) <= 1  # at most the grayscale cat, its channel copied three times


def test_strict_fails_before_training_on_a_bad_file(faulty_folder, tmp_path):
    root, _ = faulty_folder
    # the listing finds three without decoding anything, so strict stops there
    with pytest.raises(KerastlError, match=r"^3 files cannot be used as images: pets/cat/empty.jpg") as caught:
        from_folder(root, 16, strict=True)
    assert "kerastl check-data" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(KerastlError, match="cannot be used as images"):
        load_data(DataConfig(source=str(root), strict=True), 16)
    # a file that only decoding reveals (a truncated JPEG) fails too, naming the file
    clean = tmp_path / "clean"
    for name, rgb in (("cat", RED), ("dog", BLUE)):
        (clean / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_pixels(rgb, seed=i)).save(clean / name / f"{i}.jpg")
    assert from_folder(clean, 16, strict=True, validation_split=0.0).train.count == 4
    (clean / "dog" / "cut.jpg").write_bytes((clean / "dog" / "0.jpg").read_bytes()[:200])
    with pytest.raises(KerastlError, match=r"1 files cannot be used as images: clean/dog/cut.jpg \(damaged JPEG\)"):
        from_folder(clean, 16, strict=True)


def test_listing_decodes_nothing_and_needs_no_tensorflow(faulty_folder, monkeypatch):
    root, _ = faulty_folder
    code = f"import sys; import kerastl.imagefiles as f; f.list_class_folder({str(root)!r}); " \
           "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the listing decoded an image"))
    listing = list_class_folder(root)
    assert listing.counts() == [8, 7]  # the truncated JPEG is only found by decoding
    assert {f.name for f in listing.skipped} == {"cat/empty.jpg", "cat/notes.txt", "dog/photo.webp"}


def test_a_class_left_without_readable_images_is_one_sentence(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_pixels(BLUE)).save(root / "dog" / "0.png")
    (root / "cat" / "0.jpg").write_bytes(_encoded(Image.fromarray(_pixels(RED)), "JPEG")[:200])
    with pytest.raises(KerastlError, match=r"class folder .*cat has no images kerastl can read") as caught:
        from_folder(root, 16)
    assert "\n" not in str(caught.value)
    report = check_data(root)  # the report explains instead of raising
    assert not report.can_train and report.exit_code == 2 and "cannot train" in report.summary()
    assert [f.name for f in report.skipped] == ["cat/0.jpg"]


def test_bmps_tensorflow_would_misread_are_skipped(tmp_path):
    root = tmp_path / "bmp"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(_pixels(BLUE)).save(root / name / "rgb.bmp")
    blue = Image.fromarray(_pixels(BLUE))
    blue.convert("P").save(root / "a" / "palette.bmp")  # TensorFlow reads palette indices as grey levels
    blue.convert("1").save(root / "a" / "onebit.bmp")
    blue.convert("L").save(root / "b" / "gray.bmp")  # a grey palette: read correctly
    (root / "b" / "padded.bmp").write_bytes((root / "b" / "rgb.bmp").read_bytes() + b"\x00\x00")
    found = {f.name: f for f in check_data(root).findings}
    assert {name for name, f in found.items() if f.action == SKIPPED} == {"a/palette.bmp", "a/onebit.bmp",
                                                                         "b/padded.bmp"}
    assert found["b/gray.bmp"].finding == "grayscale"
    assert "convert it to PNG" in found["a/palette.bmp"].detail


def test_cmyk_jpeg_reaches_the_model_in_its_true_colours():
    import tensorflow as tf

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8], rgb[8:] = RED, BLUE
    cmyk = _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)  # Pillow writes Adobe CMYK
    decoded = tf.io.decode_image(cmyk, channels=3, expand_animations=False).numpy().astype(int)
    assert np.abs(decoded - rgb).max() < 20  # converted to RGB, not read inverted or as three of four channels
    assert np.abs(decoded - np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))).max() <= 3


def test_the_skip_warning_names_at_most_twenty_files(image_folder, caplog):
    for i in range(25):
        (image_folder / "red" / f"note{i:02d}.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="kerastl.data"):
        data = from_folder(image_folder, 16, validation_split=0.0)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.startswith("skipped 25 files") and "note19.txt" in message and "note20.txt" not in message
    assert "and 5 more" in message and data.train.count == 24


def test_a_separate_validation_folder_is_checked_the_same_way(faulty_folder, tmp_path, caplog):
    root, _ = faulty_folder
    write_faulty_folder(tmp_path / "val")
    with caplog.at_level(logging.WARNING, logger="kerastl.data"):
        data = from_folder(root, 16, validation_dir=str(tmp_path / "val"))
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.startswith("skipped 8 files") and "pets/cat/truncated.jpg" in message
    assert "val/cat/truncated.jpg" in message
    assert data.train.count == data.validation.count == 14
    assert len(data.validation.arrays()[0]) == 14


# --- a quick, quiet command line --------------------------------------------------------------

NATIVE_LINE = r"^([IWEF]\d{4} \d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |WARNING: All log messages before absl)"


def test_bad_input_answers_in_one_line_before_tensorflow_is_imported(tmp_path, image_folder):
    one_class, empty = tmp_path / "one", tmp_path / "empty"
    (one_class / "cat").mkdir(parents=True)
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    Image.fromarray(_pixels(RED)).save(empty / "cat" / "0.png")
    (tmp_path / "file").write_text("")
    cases = [
        (["train", "--data", str(tmp_path / "nope")], "does not exist"),
        (["train", "--data", str(one_class)], "only one class folder"),
        (["train", "--data", str(empty)], "no images"),
        (["train", "--data", str(image_folder), "--backbone", "nonet"], "unknown backbone"),
        (["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--image-size", "8"], "too small"),
        (["train", "--data", str(image_folder), "--epochs", "two"], "not a whole number"),
        (["train", "--data", str(image_folder), "--learning-rate", "-1"], "not positive"),
        (["train", "--data", str(image_folder), "--weights", str(tmp_path / "w.h5")], "does not exist"),
        (["train", "--data", str(image_folder), "--export", str(tmp_path / "no" / "run")], "does not exist"),
        (["train", "--data", str(image_folder), "--export", str(tmp_path / "file" / "run")], "not a folder"),
        (["predict", "--model", str(tmp_path / "nope"), "x.jpg"], "no saved_model.pb"),
        (["tune", "--data", str(one_class)], "only one class folder"),
        (["extract", "--data", str(tmp_path / "nope"), "--out", "x.npz"], "does not exist"),
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "from kerastl.cli import main\n"
        "out = []\n"
        f"for argv, match in {cases!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    out.append([code, err.getvalue(), match])\n"
        "print(json.dumps({'results': out, 'tensorflow': 'tensorflow' in sys.modules}))\n"
    )

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert not result["tensorflow"], "a bad-input check imported TensorFlow"
    for code, err, match in result["results"]:
        assert code == 2 and err.startswith("kerastl: error: ") and err.count("\n") == 1, err
        assert match in err, (match, err)


def test_tensorflows_start_up_lines_stay_off_the_terminal_unless_asked_for():

    code = "from kerastl.quiet import import_tensorflow; import_tensorflow()"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**_env(), "KERASTL_TF_LOG": ""})
    assert not [line for line in quiet.stderr.splitlines() if re.match(NATIVE_LINE, line)], quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**_env(), "KERASTL_TF_LOG": "1"})
    assert [line for line in loud.stderr.splitlines() if re.match(NATIVE_LINE, line)], "nothing to filter here?"


def _env() -> dict:

    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def test_real_native_errors_still_reach_the_terminal(capfd):
    from kerastl.quiet import filtered_native_stderr

    with filtered_native_stderr():
        os.write(2, b"I0000 00:00:1795614494.482421    4532 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"E0000 00:00:1795614494.482421    4532 kernel.cc:12] Out of memory\n")
    assert capfd.readouterr().err == "E0000 00:00:1795614494.482421    4532 kernel.cc:12] Out of memory\n"


def test_a_normal_train_prints_no_native_log_line(image_folder, tmp_path):

    run = subprocess.run(
        [sys.executable, "-m", "kerastl", "train", "--data", str(image_folder), "--backbone", "simple_cnn",
         "--image-size", "16", "--weights", "none", "--epochs", "1", "--min-steps", "0", "--quiet",
         "--export", str(tmp_path / "run")],
        capture_output=True, text=True, env={**_env(), "KERASTL_CACHE": os.environ["KERASTL_CACHE"]})
    assert run.returncode == 0, run.stderr
    assert not [line for line in run.stderr.splitlines() if re.match(NATIVE_LINE, line)], run.stderr


# --- untrusted and misfit files ---------------------------------------------------------------


def test_a_keras_file_holding_a_lambda_layer_is_refused_in_one_line(tmp_path):
    from kerastl.runfolder import load_model

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
    from kerastl.backbones import build_backbone

    path = tmp_path / "cnn.weights.h5"
    build_backbone("simple_cnn", 16, None).save_weights(path)
    with pytest.raises(KerastlError) as caught:
        build_backbone("mobilenet_v2", 32, str(path))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(path) in message and "mobilenet_v2" in message and "Conv1" in message


# --- atomic, safe files -----------------------------------------------------------------------


def _tiny_run_folder(folder):
    from kerastl.classifier import build_classifier
    from kerastl.config import ModelConfig, RunConfig
    from kerastl.runfolder import write_run_folder
    from kerastl.train import TrainResult

    model = build_classifier(ModelConfig("simple_cnn", None, 16), 2, seed=0)
    history = keras.callbacks.History()
    history.history, history.epoch = {"loss": [1.0]}, [0]
    return write_run_folder(folder, model, ["a", "b"], RunConfig(), TrainResult(history), {"val_accuracy": 0.5})


def test_a_full_disk_during_a_write_gives_one_line_and_leaves_the_previous_export(tmp_path, monkeypatch):
    from kerastl import runfolder

    folder = _tiny_run_folder(tmp_path / "export")
    before = sorted(p.name for p in folder.iterdir())

    def full(path, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder, "write_json", full)
    with pytest.raises(KerastlError, match="no space left on the device") as caught:
        _tiny_run_folder(folder)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no half-written folder beside it


def test_a_kill_during_export_leaves_the_previous_export_intact(tmp_path):
    folder = _tiny_run_folder(tmp_path / "export")
    (folder / "marker").write_text("the previous export")
    script = (
        "import os, signal, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from kerastl import runfolder\n"
        "from test_faults import _tiny_run_folder\n"
        "def killed(path, value):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "runfolder.write_json = killed  # after the SavedModel and model.keras, before the JSON files\n"
        f"_tiny_run_folder({str(folder)!r})\n"
    )

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (folder / "marker").read_text() == "the previous export"
    assert (folder / "saved_model.pb").is_file() and (folder / "metrics.json").is_file()


def test_an_unwritable_export_parent_is_reported_before_training(tmp_path, image_folder, fails_cleanly):
    (tmp_path / "file").write_text("")
    fails_cleanly(["train", "--data", str(image_folder), "--export", str(tmp_path / "file" / "run")],
                  "not a folder")
    fails_cleanly(["train", "--data", str(image_folder), "--export", str(tmp_path / "missing" / "run")],
                  "does not exist")


# --- resuming ---------------------------------------------------------------------------------


def test_a_second_run_into_the_same_export_folder_refuses_with_one_line(tmp_path, image_folder, fails_cleanly):
    export = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kerastl.resume import RunState; "
         "from kerastl.config import RunConfig; "
         f"RunState({str(export)!r}).acquire(RunConfig(), named=True); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails_cleanly(["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--weights", "none",
                       "--export", str(export)],
                      "another kerastl run (pid")
    finally:
        holder.kill()
        holder.wait()


def test_only_an_unfinished_run_of_the_same_config_resumes(tmp_path, image_folder, fails_cleanly, capsys):
    from kerastl.config import DataConfig, ModelConfig, RunConfig
    from kerastl.preflight import check_run, resolve_run_config
    from kerastl.resume import RunState

    export = tmp_path / "run"
    config = RunConfig(DataConfig(str(image_folder)), ModelConfig("simple_cnn", None, 16), export_dir=str(export))
    state = RunState(export).acquire(resolve_run_config(config), named=True)
    state.release()
    other = dataclasses_replace_dropout(config)
    check_run(other)  # a run that failed before its first epoch does not hold its folder
    (state.backup_dir / "phase1" / "epoch-00001").mkdir(parents=True)
    (state.backup_dir / "phase1" / "epoch-00001" / "state.json").write_text("{}")
    check_run(config)  # the same config: resumes
    resumed = RunState(export).acquire(resolve_run_config(config), named=True)
    assert resumed.resuming
    resumed.release()
    capsys.readouterr()  # its log line, when an earlier test left the CLI's log handler in place
    fails_cleanly(["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--image-size", "16",
                   "--weights", "none", "--dropout", "0.5", "--export", str(export)], "another config")
    check_run(other, restart=True)  # --restart discards it
    RunState(export).acquire(resolve_run_config(other), named=True, restart=True).release()
    assert not state.has_progress()


def dataclasses_replace_dropout(config):

    config = copy.deepcopy(config)
    config.model.dropout = 0.5
    return config


def test_the_same_command_without_a_name_finds_its_unfinished_run(tmp_path, image_folder, monkeypatch):
    from kerastl.config import DataConfig, ModelConfig, RunConfig
    from kerastl.preflight import check_run
    from kerastl.resume import RunState

    monkeypatch.chdir(tmp_path)
    config = RunConfig(DataConfig(str(image_folder)), ModelConfig("simple_cnn", None, 16))
    first = check_run(config)
    RunState(first.export_dir).acquire(first, named=False).release()
    (tmp_path / "saved_models" / f"{first.name}.partial" / "backup").mkdir()

    time.sleep(1.1)  # a later default name
    assert check_run(config).export_dir == first.export_dir
    other = dataclasses_replace_dropout(config)
    assert check_run(other).export_dir != first.export_dir


def _snapshotted_model(tmp_path, epochs: int = 3):
    from kerastl.callbacks import EpochSnapshots, KeepBest

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    x, y = np.ones((8, 4)), np.zeros((8, 2))
    stop = KeepBest(patience=10)
    model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0,
              callbacks=[stop, EpochSnapshots(tmp_path / "snapshots", stop)])
    return model, stop


def test_a_damaged_backup_falls_back_to_the_previous_copy_or_fails_with_one_line(tmp_path):
    from kerastl.callbacks import KeepBest, restore_snapshot, snapshot_folders

    model, _ = _snapshotted_model(tmp_path)
    folders = snapshot_folders(tmp_path / "snapshots")
    assert [f.name for f in folders] == ["epoch-00002", "epoch-00003"]  # the newest two are kept
    latest = folders[-1] / "state.npz"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    meta = restore_snapshot(tmp_path / "snapshots", model, KeepBest(patience=10))
    assert meta["epoch"] == 2 and len(meta["history"]["loss"]) == 2
    earlier = folders[0] / "state.json"
    earlier.write_text("{not json")
    with pytest.raises(KerastlError, match="--restart") as caught:
        restore_snapshot(tmp_path / "snapshots", model)
    assert "\n" not in str(caught.value)


def test_a_damaged_finished_phase_one_runs_again_instead_of_failing(tmp_path):
    from kerastl.train import load_phase1, save_phase1

    model, _ = _snapshotted_model(tmp_path)
    history = keras.callbacks.History()
    history.history, history.epoch = {"val_loss": [0.5]}, [0]
    save_phase1(tmp_path, model, history, drawn=1)
    kept = load_phase1(tmp_path, model)
    assert kept is not None and kept[1] == 1 and kept[0].history["val_loss"] == [0.5]
    stored = tmp_path / "phase1-done" / "variables.npz"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit
    stored.write_bytes(bytes(data))
    assert load_phase1(tmp_path, model) is None


def test_nan_loss_stops_with_one_line_and_keeps_the_backup(tmp_path, image_folder):
    from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from kerastl.run import run_training

    class Poison(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])

    config = RunConfig(DataConfig(str(image_folder), augment="none"), ModelConfig("simple_cnn", None, 16),
                       TrainConfig(epochs=6, min_steps=0, fine_tune_epochs=0, validation="holdout", patience=10),
                       export_dir=str(tmp_path / "run"))
    with pytest.raises(KerastlError, match="NaN|nan") as caught:
        run_training(config, callbacks=[Poison()], verbose=0)
    assert "\n" not in str(caught.value) and "--restart" in str(caught.value)
    assert not (tmp_path / "run").exists()
    snapshots = sorted(p.name for p in (tmp_path / "run.partial" / "backup" / "phase1").iterdir())
    assert snapshots == ["epoch-00002", "epoch-00003"]
    assert (tmp_path / "run.partial" / "backup" / "phase1" / "epoch-00003" / "best.npz").is_file()


# --- resuming after SIGKILL (slow: two or three training runs each) ---------------------------------

# a deterministic run: no augmentation, no dropout, the head reads the output (no probing)
RUN = ["train", "--data", "digits", "--backbone", "simple_cnn", "--image-size", "16", "--augment", "none",
       "--dropout", "0", "--features", "last", "--unfreeze-blocks", "1", "--validation", "holdout", "--quiet",
       "--epochs", "6", "--min-steps", "0", "--fine-tune-epochs", "6", "--fine-tune-min-steps", "0",
       "--patience", "20"]


def _kerastl(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "kerastl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def run_env(tmp_path, backbone_weights):
    env = {**os.environ, "KERASTL_CACHE": str(tmp_path / "cache"), "TF_DETERMINISTIC_OPS": "1"}
    return env, ["--weights", str(backbone_weights), "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture
def backbone_weights(tmp_path):
    from kerastl.backbones import build_backbone

    path = tmp_path / "cnn.weights.h5"
    build_backbone("simple_cnn", 16, None).save_weights(path)
    return path


def _weights(folder: Path) -> list[np.ndarray]:
    from kerastl.runfolder import load_model

    return load_model(folder).get_weights()


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    start = time.time()
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


# where to kill: the flags that make the run, and the backup file whose appearance means "mid-way"
KILLS = {
    "phase1": (["--no-cache"], "phase1/epoch-00002"),  # phase 1 on images: epochs long enough to kill in
    "phase2": ([], "phase2/epoch-*"),
    "cv": (["--validation", "cv", "--cv-folds", "3", "--fine-tune-epochs", "2"], "cv-folds/1.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(KILLS))
def test_a_killed_train_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, run_env, where):
    env, extra = run_env
    flags, mark = KILLS[where]
    flags = [*RUN, *extra, *flags]
    whole = _kerastl([*flags, "--export", str(tmp_path / "whole")], env)
    assert whole.wait() == 0, whole.communicate()
    target = tmp_path / "killed"
    backup = tmp_path / "killed.partial" / "backup"
    process = _kerastl([*flags, "--export", str(target)], env)
    _kill_when(process, lambda: any(backup.glob(mark)))
    assert not target.exists()
    again = _kerastl([*flags, "--export", str(target)], env)
    out, err = again.communicate()
    assert again.returncode == 0, err
    assert "resuming" in err
    assert not (tmp_path / "killed.partial").exists()
    for a, b in zip(_weights(tmp_path / "whole"), _weights(target)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_run_cleans_up_only_its_own_killed_writes_not_a_siblings(tmp_path):
    from kerastl.storage import remove_stale_writes, staged_folder

    with staged_folder(tmp_path / "run-2") as sibling:  # another export, being written right now
        (tmp_path / ".run-writing-abc").mkdir()  # left by a killed writer of "run"
        (tmp_path / ".run-old-def").mkdir()
        remove_stale_writes(tmp_path / "run")
        assert sibling.is_dir()
        (sibling / "f").write_text("x")
    assert not (tmp_path / ".run-writing-abc").exists() and not (tmp_path / ".run-old-def").exists()
    assert (tmp_path / "run-2" / "f").read_text() == "x"
