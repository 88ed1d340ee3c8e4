"""What the test files share: synthetic image folders, label tables and CIFAR batches, small data,
small models and configs, and the flags of a seconds-long `kerastl train`.

Plain functions and constants (fixtures live in conftest.py); a test file imports them as
`from helpers import ...` (pytest puts this folder on `sys.path`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from PIL import Image

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import ImageData, from_arrays, load_digits
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.runs.folder import write_run_folder
from kerastl.training.phases import TrainResult

COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 20)}
FORMATS = ("png", "jpg", "bmp", "gif")
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# a seconds-long `kerastl train`: a random-weight simple_cnn at 16x16, one epoch, quiet; flags given after
# these override them (argparse keeps the last value)
SMALL = ["--backbone", "simple_cnn", "--weights", "none", "--image-size", "16", "--epochs", "1", "--min-steps", "0",
         "--augment", "none", "--batch-size", "8", "-q"]


# ---- images on disk ----

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


def noisy_pixels(rgb, size: int = 16, seed: int = 0) -> np.ndarray:
    """A `size` x `size` image of colour `rgb` with a little noise."""
    noise = np.random.default_rng(seed).normal(0, 8, (size, size, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def folder_rows(root, base) -> list[tuple[str, str]]:
    """(path relative to `base`, class) of every file of a class folder, in a scrambled order."""
    files = sorted(root.rglob("*.*"))
    rows = [(path.relative_to(base).as_posix(), path.parent.name) for path in files]
    return [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]


def write_csv(path, rows, header=("path", "label")) -> str:
    """A label table of `rows` under `header`; returns its path."""
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return str(path)


def write_fake_cifar(root: Path, per_class: int = 6, test_per_class: int = 2, train_batches: int = 1) -> Path:
    """A `cifar-10-batches-py` folder in CIFAR's pickle format: one image of a brightness per class,
    `per_class` images of each class in each of `train_batches` training batches."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(count: int) -> dict:
        labels = np.repeat(np.arange(10), count)
        images = np.clip(rng.normal(25.0 * labels[:, None], 20.0, (len(labels), 3 * 32 * 32)), 0, 255)
        return {b"data": images.astype(np.uint8), b"labels": labels.tolist()}

    files = [("batches.meta", {b"label_names": [n.encode() for n in CIFAR_NAMES]})]
    files += [(f"data_batch_{i}", batch(per_class)) for i in range(1, train_batches + 1)]
    files += [("test_batch", batch(test_per_class))]
    for name, value in files:
        (root / name).write_bytes(pickle.dumps(value))
    return root


# ---- data, models and configs ----

def digits(count: int = 180, size: int = 32, seed: int = 0, validation_split: float = 0.3,
           classes: tuple[int, ...] = (0, 1, 2)) -> ImageData:
    """The first `count` of scikit-learn's bundled digits of `classes` (no download), at `size`."""
    x, y, names = load_digits(classes)
    return from_arrays(x[:count], y[:count], size, names, validation_split=validation_split, seed=seed)


def frozen_cnn(num_classes: int = 3, size: int = 32, seed: int | None = None, **model) -> TransferClassifier:
    """A simple_cnn classifier on a frozen random-weight base."""
    return build_classifier(ModelConfig("simple_cnn", weights=None, image_size=size, from_scratch=False, **model),
                            num_classes, seed=seed)


def frozen_random(size: int = 16, **model) -> ModelConfig:
    """A frozen random-weight simple_cnn whose head reads its output: real features without any pretraining."""
    return ModelConfig("simple_cnn", weights=None, image_size=size, from_scratch=False, features="last", **model)


def base_config(tmp_path, **train) -> RunConfig:
    """Digits at 16x16 through a frozen random simple_cnn: real data, seconds per trial."""
    values = {"epochs": 4, "fine_tune_epochs": 0, "patience": 3, "cache_dir": str(tmp_path / "cache"),
              "min_steps": 0, "fine_tune_min_steps": 0, **train}
    return RunConfig(DataConfig(source="digits", augment="none", batch_size=64), frozen_random(),
                     TrainConfig(**values), export_dir=str(tmp_path / "export"))


def tiny_run_folder(folder):
    """A run folder of an untrained 16x16 simple_cnn of two classes, written as a run writes one."""
    model = build_classifier(ModelConfig("simple_cnn", None, 16), 2, seed=0)
    history = keras.callbacks.History()
    history.history, history.epoch = {"loss": [1.0]}, [0]
    return write_run_folder(folder, model, ["a", "b"], RunConfig(), TrainResult(history), {"val_accuracy": 0.5})
