"""Shared fixtures: seeds, a synthetic image folder, small configs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERASTL_CACHE"] = tempfile.mkdtemp(prefix="kerastl-test-cache-")  # never ~/.cache in tests

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 20)}
FORMATS = ("png", "jpg", "bmp", "gif")


@pytest.fixture(autouse=True)
def seed():
    keras.utils.set_random_seed(1234)


def write_class_folder(root, per_class: int = 8, colours=COLOURS) -> list[str]:
    """Writes noisy solid-colour images, in every supported format and several sizes."""
    rng = np.random.default_rng(0)
    for name, rgb in colours.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 3 * (i % 3), 24 + 2 * (i % 4)
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{FORMATS[i % len(FORMATS)]}")
    return sorted(colours)


@pytest.fixture
def image_folder(tmp_path):
    """A class folder with blue/green/red subfolders of 8 images each."""
    root = tmp_path / "images"
    write_class_folder(root)
    return root


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
    from kerastl.cli import main

    def check(argv, match):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("kerastl: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and match in err, err

    return check
