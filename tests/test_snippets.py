"""Every ```python snippet of the README and docs/ runs, so an example that breaks fails CI.

Each snippet runs as written in a fresh folder that holds what the snippets name: `flowers/`
and `flowers_test/` (class folders of daisy, roses and tulips), `labels.csv`, `a.jpg`,
`b.png`, `photo.jpg`, and `saved_models/flowers`, an exported run with its `model.tflite`
(unless the snippet writes that folder itself). Three things are scaled down, and only these:

- the backbone is `simple_cnn` (`SUBSTITUTIONS`): ImageNet weights cannot be downloaded here,
  so `weights="imagenet"` is a simple_cnn weights file, and a search has 2 trials, not 20;
- every run trains at most 2 head epochs and 1 fine-tuning epoch on a holdout split, with no
  step floor (`_fast`, wrapped around `run_training` and `train_classifier`);
- the names a snippet leaves to the reader are given (`PLACEHOLDERS`: `train_ds`, `config`, ...).
"""

import copy
import re
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import write_class_folder

import kerastl
from kerastl.config import SETTINGS, DataConfig, ModelConfig, RunConfig
from kerastl.models.classifier import build_classifier
from kerastl.settings import set_setting

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBSTITUTIONS = {'"efficientnet_b0"': '"simple_cnn"', 'weights="imagenet"': "weights=WEIGHTS",
                 "max_trials=20": "max_trials=2"}
COLOURS = {"daisy": (240, 240, 240), "roses": (220, 20, 60), "tulips": (250, 200, 0)}
SIZE = 16  # the prebuilt export's image size
TRAINS = re.compile(r"\.fit\(|run_training\(|train_classifier\(|run_search\(")


def snippets() -> list:
    found = []
    for page in PAGES:
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
        found += [pytest.param(code, id=f"{page.name}:{number}",  # one that trains takes over 10 s: CI's slow pass
                               marks=[pytest.mark.slow] * bool(TRAINS.search(code)))
                  for number, code in enumerate(blocks, 1)]
    return found


def _fast(real, train_only: bool = False):
    """`run_training` (or `train_classifier`, whose config is a `TrainConfig`) on a scaled-down copy of its config."""
    def scaled(*args, **kwargs):
        args = list(args)
        at = 3 if train_only else 0
        config = copy.deepcopy(args[at])
        run = RunConfig(train=config) if train_only else config
        for name, value in (("epochs", min(run.train.epochs, 2)), ("min_steps", 0), ("fine_tune_min_steps", 0),
                            ("fine_tune_epochs", min(run.train.fine_tune_epochs, 1)), ("validation", "holdout")):
            set_setting(run, SETTINGS[name], value)
        args[at] = run.train if train_only else run
        return real(*args, **kwargs)

    return scaled


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The folder every snippet starts from (see the module docstring)."""
    root = tmp_path_factory.mktemp("snippets")
    write_class_folder(root / "flowers", per_class=8, colours=COLOURS)
    write_class_folder(root / "flowers_test", per_class=3, colours=COLOURS)
    files = sorted((root / "flowers").rglob("*.*"))
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{p.relative_to(root)},{p.parent.name}\n"
                                                            for p in files))
    for name, source in (("a.jpg", "daisy/1.jpg"), ("photo.jpg", "roses/1.jpg"), ("b.png", "tulips/0.png")):
        shutil.copy(root / "flowers" / source, root / name)
    keras.utils.set_random_seed(0)
    weights = root / "simple_cnn.weights.h5"
    build_classifier(ModelConfig("simple_cnn", weights=None, from_scratch=False), 3).backbone.save_weights(weights)
    clf = kerastl.ImageClassifier("simple_cnn", weights=str(weights), image_size=SIZE, epochs=2, fine_tune_epochs=0,
                                  validation="holdout", min_steps=0)
    clf.fit(root / "flowers", export_dir=root / "saved_models" / "flowers", verbose=0)
    clf.export(clf.folder, format="tflite")
    return root


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code, workspace, tmp_path, monkeypatch):
    for text, replacement in SUBSTITUTIONS.items():
        code = code.replace(text, replacement)
    folder = tmp_path / "work"
    shutil.copytree(workspace, folder)
    if re.search(r'export(_saved_model)?\((model, )?"saved_models/flowers"', code):
        shutil.rmtree(folder / "saved_models" / "flowers")  # the snippet writes it
    monkeypatch.chdir(folder)
    for name, train_only in (("run_training", False), ("train_classifier", True)):
        real = getattr(kerastl, name)
        for module in [m for key, m in sys.modules.items() if key == "kerastl" or key.startswith("kerastl.")]:
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, _fast(real, train_only))
    names = list(COLOURS)
    x = np.stack([np.full((SIZE, SIZE, 3), colour, np.uint8) for colour in COLOURS.values()] * 4)
    y = np.tile(np.arange(3), 4)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    placeholders = {  # PLACEHOLDERS: what a snippet leaves to the reader
        "WEIGHTS": str(folder / "simple_cnn.weights.h5"),
        "train_ds": dataset, "val_ds": dataset.take(6), "test_ds": dataset.take(6), "class_names": names,
        "config": RunConfig(DataConfig(), ModelConfig("simple_cnn", weights=str(folder / "simple_cnn.weights.h5"),
                                                      image_size=224), export_dir="saved_models/from_data"),
        "pixels_0_255_float32": x[0].astype(np.float32), "batch_0_255_float32": x[:2].astype(np.float32),
        "images_0_255": x[:2],
    }
    exec(compile(code, "<snippet>", "exec"), dict(placeholders))
