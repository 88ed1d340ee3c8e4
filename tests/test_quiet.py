"""A quick, quiet command line: bad input answers in one line before TensorFlow is imported, and
TensorFlow's native start-up log stays off the terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import COLOURS, noisy_pixels
from PIL import Image

NATIVE_LINE = r"^([IWEF]\d{4} \d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |WARNING: All log messages before absl)"


def test_bad_input_answers_in_one_line_before_tensorflow_is_imported(tmp_path, image_folder):
    one_class, empty = tmp_path / "one", tmp_path / "empty"
    (one_class / "cat").mkdir(parents=True)
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    Image.fromarray(noisy_pixels(COLOURS["red"])).save(empty / "cat" / "0.png")
    (tmp_path / "file").write_text("")
    cases = [
        (["train", "--data", str(tmp_path / "nope")], "does not exist"),
        (["train", "--data", str(one_class)], "only one class folder"),
        (["train", "--data", str(empty)], "no images"),
        (["train", "--data", str(image_folder), "--backbone", "nonet"], "unknown backbone"),
        (["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--image-size", "8"], "too small"),
        (["train", "--data", str(image_folder), "--epochs", "two"], "not a whole number"),
        (["train", "--data", str(image_folder), "--learning-rate", "-1"], "not positive"),
        (["train", "--data", str(image_folder), "--augment", "heavy"], "unknown augmentation 'heavy'"),
        (["train", "--data", str(image_folder), "--augment", "standrd"], "'standrd' (did you mean standard?)"),
        (["train", "--data", str(image_folder), "--augment", "mixup,cutmix"], "more than one of mixup, cutmix"),
        (["train", "--data", str(image_folder), "--weights", str(tmp_path / "w.h5")], "does not exist"),
        (["train", "--data", str(image_folder), "--export", str(tmp_path / "no" / "run")], "does not exist"),
        (["train", "--data", str(image_folder), "--export", str(tmp_path / "file" / "run")], "not a folder"),
        (["predict", "--model", str(tmp_path / "nope"), "x.jpg"], "no saved_model.pb"),
        (["tune", "--data", str(one_class)], "only one class folder"),
        (["extract", "--data", str(tmp_path / "nope"), "--out", "x.npz"], "does not exist"),
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "from kerastl.cli.main import main\n"
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


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
@pytest.mark.parametrize("code", ["from kerastl.quiet import import_tensorflow; import_tensorflow()",
                                  "import kerastl; kerastl.ImageClassifier"])  # the CLI's way, and Python's
def test_tensorflows_start_up_lines_stay_off_the_terminal_unless_asked_for(code):
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


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_normal_train_prints_no_native_log_line(image_folder, tmp_path):

    run = subprocess.run(
        [sys.executable, "-m", "kerastl", "train", "--data", str(image_folder), "--backbone", "simple_cnn",
         "--image-size", "16", "--weights", "none", "--epochs", "1", "--min-steps", "0", "--quiet",
         "--export", str(tmp_path / "run")],
        capture_output=True, text=True, env={**_env(), "KERASTL_CACHE": os.environ["KERASTL_CACHE"]})
    assert run.returncode == 0, run.stderr
    assert not [line for line in run.stderr.splitlines() if re.match(NATIVE_LINE, line)], run.stderr


@pytest.mark.slow  # a subprocess that loads TensorFlow: CI runs it with -m slow
def test_piped_progress_is_one_line_per_epoch_without_escape_codes(image_folder, tmp_path):
    weights = tmp_path / "backbone.weights.h5"  # a pretrained start: cached features, phase 1 on them, then phase 2
    script = ("import sys; from kerastl import ImageClassifier\n"
              "clf = ImageClassifier('simple_cnn', weights=sys.argv[1], image_size=16, epochs=2, fine_tune_epochs=2,"
              " unfreeze_blocks=1, validation='holdout', min_steps=0, fine_tune_min_steps=0)\n")
    build = ("import sys; from kerastl import ModelConfig, build_classifier\n"
             "build_classifier(ModelConfig('simple_cnn', weights=None, image_size=16, from_scratch=False), 3)"
             ".backbone.save_weights(sys.argv[1])")
    subprocess.run([sys.executable, "-c", build, str(weights)], check=True, capture_output=True)
    fit = script + f"clf.fit({str(image_folder)!r}, export_dir={str(tmp_path / 'run')!r})\n"
    run = subprocess.run([sys.executable, "-c", fit, str(weights)], capture_output=True, text=True,
                         env={**_env(), "KERASTL_CACHE": os.environ["KERASTL_CACHE"]})  # stdout is a pipe
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout and "\r" not in run.stdout  # no bars redrawn in place, no colours
    lines = run.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.fullmatch(r"Epoch \d+/\d+", line)]
    assert len(epochs) == 4  # both phases, each epoch once
    assert all(re.match(r"(\d+)/\1 - ", lines[i + 1]) for i in epochs)  # "3/3 - 0s - ...": the right totals
    assert not [line for line in run.stderr.splitlines() if re.match(NATIVE_LINE, line)], run.stderr  # Python too
