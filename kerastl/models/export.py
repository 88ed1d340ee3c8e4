"""SavedModel export, loading and prediction.

An export is a SavedModel folder with two signatures, both returning
`probabilities` [batch, classes] in the order of `labels.txt` beside it:

- `serving_default`: `images`, float32 [batch, height, width, 3], 0-255, any size;
- `serve_bytes`: `image_bytes`, tf.string [batch] of encoded JPEG/PNG/GIF/BMP.

Resizing and the backbone's preprocessing live inside, so serving sends raw pixels.
Loading needs TensorFlow only, not kerastl. A run folder (`kerastl.runs.folder`)
holds an export plus the Keras model, config, history and metrics.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.json"


def export_saved_model(model: TransferClassifier, directory: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Writes `model` as a SavedModel with both signatures, plus labels.txt.

    Args:
        model: a `TransferClassifier` (softmax over classes, or one sigmoid unit).
        directory: the export folder (created).
        class_names: names in output order.
    """
    binary = model.output_shape[-1] == 1
    classes = 2 if binary else model.output_shape[-1]
    if len(class_names) != classes:
        raise KerastlError(f"{len(class_names)} class names for a model with {classes} outputs")
    size = model.image_size

    def probabilities(images):
        probs = model(images, training=False)
        if binary:
            probs = both_classes(probs)
        return {"probabilities": probs}

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return tf.image.resize(tf.cast(image, tf.float32), (size, size))

    def from_bytes(image_bytes):
        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return probabilities(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", probabilities, [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
    )
    archive.add_endpoint("serve_bytes", from_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    archive.write_out(str(directory), verbose=False)
    write_labels(directory, class_names)
    log.debug("exported SavedModel to %s", directory)
    return directory


def both_classes(positive):
    """A binary model's one sigmoid column as the two probability columns [1 - p, p] that every export
    returns (on tensors, or on Keras tensors while a functional model is built)."""
    return keras.ops.concatenate([1.0 - positive, positive], axis=-1)


def write_labels(directory: Path, class_names: Sequence[str]) -> None:
    """`labels.txt`: one class name per line, in output order."""
    (directory / LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))


def read_labels(directory: Path) -> list[str]:
    """The class names of an export or run folder's `labels.txt`."""
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        raise KerastlError(f"{directory} has no {LABELS_FILE}")
    return path.read_text().splitlines()


@dataclass
class ExportedModel:
    """A loaded export: its signatures, class names and config."""

    path: Path
    class_names: list[str]
    config: dict[str, Any]
    _saved: Any

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for float 0-255 images [batch, height, width, 3]."""
        fn = self._saved.signatures["serving_default"]
        return fn(images=tf.constant(images, tf.float32))["probabilities"].numpy()

    def predict_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded image files (JPEG, PNG, GIF, BMP)."""
        fn = self._saved.signatures["serve_bytes"]
        try:
            return fn(image_bytes=tf.constant(list(encoded), tf.string))["probabilities"].numpy()
        except tf.errors.InvalidArgumentError as error:
            raise KerastlError(f"cannot decode an image: {error.message.splitlines()[0]}") from None

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Probabilities for image files on disk."""
        return self.predict_bytes(read_image_files(paths))

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs for each row."""
        return top_k(probabilities, self.class_names, k)


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) pairs for each row of `probabilities`."""
    order = np.argsort(-probabilities, axis=-1)[:, :k]
    return [[(class_names[i], float(row[i])) for i in idx] for row, idx in zip(probabilities, order)]


def read_image_files(paths: Sequence[str | os.PathLike]) -> list[bytes]:
    """The bytes of image files on disk; a missing one is a `KerastlError` naming it."""
    data = []
    for path in paths:
        if not Path(path).is_file():
            raise KerastlError(f"image file {path} does not exist")
        data.append(Path(path).read_bytes())
    return data


def load_export(directory: str | os.PathLike) -> ExportedModel:
    """Loads an export written by `export_saved_model` (TensorFlow only, no Keras objects)."""
    directory = Path(directory)
    if not (directory / "saved_model.pb").is_file():
        raise KerastlError(f"{directory} is not a kerastl export (no saved_model.pb)")
    labels = read_labels(directory)
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    saved = tf.saved_model.load(str(directory))
    return ExportedModel(directory, labels, config, saved)
