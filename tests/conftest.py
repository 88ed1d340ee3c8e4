"""Shared fixtures: seeds, a synthetic image folder, one trained run, offline Keras, one-line CLI errors.
The plain helpers they use are in helpers.py."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERASTL_CACHE"] = tempfile.mkdtemp(prefix="kerastl-test-cache-")  # never ~/.cache in tests

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402
from helpers import folder_rows, write_class_folder, write_csv  # noqa: E402

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from kerastl.runs.run import RunResult, run_training  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture
def image_folder(tmp_path):
    """A class folder with blue/green/red subfolders of 8 images each."""
    root = tmp_path / "images"
    write_class_folder(root)
    return root


@dataclass(frozen=True)
class TrainedRun:
    """The session's trained run: its result, the class folder, the label table it read, its run folder."""

    result: RunResult
    images: Path
    csv: str
    export: Path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One exported run shared by the export, report and label-table tests; read it, never change it
    (copy the folder to change it).

    A frozen random-weight simple_cnn at 32x32 reads three colours, 10 noisy images of each (every
    format), through a CSV label table whose split column names 2 validation images per class; the
    test split (2 per class) is cut from the training rows by `test_split`. 12 head epochs, then 2
    fine-tuning the last block (a SavedModel, model.keras, evaluation, plots, report, card, logs).
    """
    root = tmp_path_factory.mktemp("trained")
    write_class_folder(root / "images", per_class=10)
    rows = [(path, label, "validation" if Path(path).stem in ("8", "9") else "train")
            for path, label in folder_rows(root / "images", root)]
    csv = write_csv(root / "labels.csv", rows, ("path", "label", "split"))
    keras.utils.set_random_seed(0)  # whichever test asks first, the same run
    config = RunConfig(
        DataConfig(source=csv, test_split=0.25, batch_size=8, augment="flip"),
        ModelConfig("simple_cnn", weights=None, image_size=32, from_scratch=False),
        TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                    epochs=12, fine_tune_epochs=2, unfreeze_blocks=1, learning_rate=0.01, patience=12),
        export_dir=str(root / "export"),
    )
    result = run_training(config, verbose=0)
    return TrainedRun(result, root / "images", csv, result.export_dir)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Makes every Keras download fail as it does without a network, with an empty cache."""
    import urllib.error

    from keras.src.backend import config
    from keras.src.utils import file_utils

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", refuse)
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras_home"))  # where Keras would download
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # what kerastl tells the user
    return tmp_path / "keras_home"


@pytest.fixture
def fails_cleanly(capsys):
    """`check(argv, match)`: the CLI exits 2 with one `kerastl: error:` line containing `match`, no traceback."""
    from kerastl.cli.main import main

    def check(argv, match):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("kerastl: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and match in err, err

    return check
