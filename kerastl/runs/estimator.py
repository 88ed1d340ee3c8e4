"""`ImageClassifier`: a Keras-native estimator over the one run path.

```python
clf = kerastl.ImageClassifier("efficientnet_b0", weights="imagenet")  # image_size=, settings as keywords
clf.fit("flowers/")                  # a class folder, a CSV, (x, y) arrays or a tf.data.Dataset
clf.evaluate("flowers_test/")        # the same scores as `kerastl evaluate`
clf.predict(["a.jpg", "garden/"])    # paths, class names and probabilities
clf.export("saved_models/flowers")   # the run folder: SavedModel, report, card (format="tflite" too)
clf = kerastl.ImageClassifier.load("saved_models/flowers")
```

`fit` is `kerastl.runs.run.run_training` (plan, then execute), so it makes every choice a
`kerastl train` run makes and writes the same run folder: into `export_dir` when given (a
killed `fit` then resumes), else into a temporary folder that `export` copies and that is
removed with the estimator. Keyword settings are the config's fields under their flag names
(`epochs`, `learning_rate`, `augment`, ...: `kerastl train --help`). `clf.model` is the
`TransferClassifier` (a `keras.Model`), `clf.history` both phases' Keras histories.
`evaluate` and `predict` run the exported SavedModel, as `kerastl evaluate` and
`kerastl predict` do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from kerastl.choices import closest_name
from kerastl.config import SETTINGS, DataConfig, ModelConfig, RunConfig
from kerastl.data.images import ImageData, from_arrays
from kerastl.data.sources import from_dataset
from kerastl.errors import KerastlError
from kerastl.models.export import ExportedModel, load_export, read_labels
from kerastl.models.predict import Predictions, predict_images
from kerastl.quiet import filtered_native_stderr, native_log_wanted
from kerastl.reports.evaluation import Evaluation
from kerastl.runs.folder import (HISTORY_FILE, METRICS_FILE, copy_run_folder, export_folder_litert, load_model,
                                 read_config)
from kerastl.runs.run import checked_config, run_training
from kerastl.runs.scoring import evaluate_data, evaluate_folder
from kerastl.settings import set_setting
from kerastl.storage import check_export_dir, check_parent
from kerastl.training.phases import TrainResult

# settings a keyword may not set: the data comes to `fit`, the folder to `fit`/`export`
_NOT_KEYWORDS = ("data", "export")
FORMATS = ("saved_model", "tflite")


class ImageClassifier:
    """Train, evaluate, predict and export an image classifier (see the module docstring).

    Args:
        backbone: a registry name (`kerastl backbones`).
        weights: "imagenet", None (train from scratch) or a weights file.
        image_size: the input size; the backbone's default when None.
        **settings: any other run setting by its flag name (`epochs=5`, `augment="standard"`).

    Raises:
        KerastlError: a keyword that is not a setting, naming the closest one.
    """

    def __init__(self, backbone: str = "mobilenet_v2", weights: str | None = "imagenet",
                 image_size: int | None = None, **settings: Any) -> None:
        self.config = RunConfig(model=ModelConfig(backbone, weights, image_size))
        for name, value in settings.items():
            if name not in SETTINGS or name in _NOT_KEYWORDS or SETTINGS[name].hidden:
                known = [key for key in SETTINGS if key not in _NOT_KEYWORDS and not SETTINGS[key].hidden]
                close = closest_name(name, known, separator="_")
                hint = f" (did you mean {close}?)" if close else "; the settings are kerastl train's flags"
                raise KerastlError(f"ImageClassifier got an unknown setting {name}={value!r}{hint}")
            set_setting(self.config, SETTINGS[name], value)
        self.model = None  # the TransferClassifier, once fitted or loaded
        self.history: TrainResult | None = None
        self.metrics: dict[str, float] = {}
        self.class_names: list[str] | None = None
        self.folder: Path | None = None  # the run folder
        self._exported: ExportedModel | None = None
        self._cleanup: weakref.finalize | None = None  # removes a temporary run folder

    def fit(self, data: Any, validation_data: Any = None, *, class_names: Sequence[str] | None = None,
            export_dir: str | os.PathLike | None = None, overwrite: bool = False,
            verbose: int | str = "auto") -> TrainResult:
        """Trains both phases on `data` and writes the run folder; returns `history`.

        Args:
            data: a class folder, a CSV label table, "digits", "cifar10", (x, y) arrays of 0-255
                images and integer labels, a `tf.data.Dataset` of (image, label), or `ImageData`.
            validation_data: the same kind as `data` (a folder for a folder); else a share of
                each class is held out (`validation_split`) or, with few images, cross-validated.
            class_names: names of arrays' or a dataset's classes (a dataset's own `class_names`
                are used when it has them).
            export_dir: where the run folder is written as it trains (resumable); by default a
                temporary folder that `export` copies.
            overwrite: replace a non-empty `export_dir`.
            verbose: Keras `fit` verbosity.
        """
        config = RunConfig.from_dict(self.config.to_dict())
        loaded = None
        if isinstance(data, (str, os.PathLike)):  # a source run_training reads
            if validation_data is not None and not isinstance(validation_data, (str, os.PathLike)):
                raise KerastlError("validation_data for a data folder must be a folder too")
            config.data.source = str(data)
            if validation_data is not None:  # else the validation_dir setting, if any
                config.data.validation_dir = str(validation_data)
        else:  # images in memory: no folder of an earlier fit is this run's source
            config.data.source, config.data.validation_dir, config.data.test_dir = "", None, None
            if isinstance(data, ImageData):
                loaded = data
            else:
                size = checked_config(config).model.image_size
                loaded = _in_memory(data, validation_data, class_names, config.data, size)
        scratch = None
        if export_dir is None:
            scratch = tempfile.mkdtemp(prefix="kerastl-")
            config.export_dir = str(Path(scratch) / "run")
        else:
            check_parent(export_dir, create=True)
            config.export_dir = str(export_dir)
        try:
            result = run_training(config, data=loaded, overwrite=overwrite, verbose=verbose)
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        if self._cleanup is not None:  # the folder of an earlier fit, unless exported
            self._cleanup()
        self._cleanup = weakref.finalize(self, shutil.rmtree, scratch, True) if scratch is not None else None
        self.model, self.history, self.metrics = result.model, result.history, result.metrics
        self.class_names, self.folder, self._exported = list(result.class_names), Path(result.export_dir), None
        self.config = result.config
        return self.history

    def _folder(self) -> Path:
        if self.folder is None:
            raise KerastlError("this ImageClassifier has not been fitted: call fit(data) or ImageClassifier.load")
        return self.folder

    def _export(self) -> ExportedModel:
        if self._exported is None:
            self._exported = load_export(self._folder())
        return self._exported

    def evaluate(self, data: Any, batch_size: int = 64, top_k: int = 3) -> Evaluation:
        """Scores the exported model on labelled images, as `kerastl evaluate` does: a class folder,
        CSV, "digits" or CIFAR-10 (its held-out images when it is the source trained on), (x, y)
        arrays with labels in `class_names` order, or a `tf.data.Dataset` of (image, label)."""
        folder = self._folder()
        if isinstance(data, (str, os.PathLike)):
            return evaluate_folder(folder, str(data), batch_size, top_k)[0]
        if isinstance(data, tuple) and len(data) == 2:
            size = self.config.model.image_size
            data = from_arrays(data[0], data[1], size, self.class_names, validation_split=0.0)
        return evaluate_data(folder, data, batch_size, top_k)

    def predict(self, images: Any, batch_size: int = 32, strict: bool = False) -> Predictions:
        """Class names and probabilities of image files and folders (recursively, skipping files that do
        not decode unless `strict`; see `kerastl.models.predict`), or of 0-255 pixel arrays [n, h, w, 3]."""
        exported = self._export()
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, np.ndarray):
            rows = [exported.predict(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
            probabilities = np.concatenate(rows) if rows else np.zeros((0, len(exported.class_names)), np.float32)
            return Predictions([], probabilities, exported.class_names)
        return predict_images(exported, list(images), batch_size, strict)

    def export(self, path: str | os.PathLike, format: str = "saved_model", quantize: str = "none",
               overwrite: bool = False) -> Path:
        """Writes the run folder at `path` (the SavedModel, model.keras, report.html, MODEL_CARD.md, ...);
        `format="tflite"` adds `model.tflite` (`quantize`: none, float16 or int8). Returns `path`."""
        if format not in FORMATS:
            raise KerastlError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        source, path = self._folder(), Path(path)
        if path.resolve() != source.resolve():
            check_export_dir(path, overwrite, create_parent=True)
            copy_run_folder(source, path)
        if format == "tflite":  # the converter's native summary kept off stderr, as on the command line
            with contextlib.nullcontext() if native_log_wanted() else filtered_native_stderr():
                export_folder_litert(path, quantize=quantize)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageClassifier:
        """The estimator of a run folder (`kerastl train`'s or `export`'s), ready to evaluate and predict."""
        path = Path(path)
        config = read_config(path)
        clf = cls(config.model.backbone, config.model.weights, config.model.image_size)
        clf.config, clf.folder, clf.class_names = config, path, read_labels(path)
        clf.model = load_model(path)
        history = json.loads((path / HISTORY_FILE).read_text()) if (path / HISTORY_FILE).is_file() else {}
        if "phase1" in history:
            clf.history = TrainResult.from_dict(history)
        if (path / METRICS_FILE).is_file():
            clf.metrics = json.loads((path / METRICS_FILE).read_text())
        return clf

    def __repr__(self) -> str:
        state = f"fitted, {len(self.class_names)} classes, {self.folder}" if self.folder else "not fitted"
        return f"ImageClassifier({self.config.model.backbone!r}, {state})"


def _in_memory(data: Any, validation: Any, class_names: Sequence[str] | None, dc: DataConfig, size: int) -> ImageData:
    """(x, y) arrays or a `tf.data.Dataset` (with `validation` of the same kind) as `ImageData` at `size`."""
    if isinstance(data, tf.data.Dataset):
        names = class_names or getattr(data, "class_names", None)
        if not names:
            raise KerastlError("a tf.data.Dataset carries no class names: pass class_names=[...]")
        return from_dataset(data, names, size, validation, validation_split=dc.validation_split,
                            test_split=dc.test_split, seed=dc.seed)
    if isinstance(data, tuple) and len(data) == 2:
        given = None if validation is None else tuple(validation)
        return from_arrays(data[0], data[1], size, list(class_names) if class_names else None,
                           dc.validation_split, dc.test_split, dc.seed, given)
    raise KerastlError(f"data must be a folder, a CSV file, (x, y) arrays or a tf.data.Dataset, not "
                       f"{type(data).__name__}")
