"""Running a backbone over images: pooled features (or named layers' outputs), in batches, into
memory or straight into a `.npy` file on disk (`RowWriter`), without holding a second copy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import ModelConfig
from kerastl.data.augment import build_augmenter
from kerastl.data.images import ImageData
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier, build_classifier

log = logging.getLogger(__name__)

def layer_features_model(model: TransferClassifier, layers: Sequence[str]) -> keras.Model:
    """Raw images -> a dict of named backbone layers' globally average-pooled outputs.

    The images go through the classifier's own resizing and preprocessing. For the
    pooled features the head reads, use `model.features_model()`.
    """
    backbone = model.backbone
    names = {layer.name for layer in backbone.layers}
    missing = [name for name in layers if name not in names]
    if missing:
        raise KerastlError(f"layers {missing} are not in backbone {backbone.name}")
    inputs = keras.Input(shape=(None, None, 3), name="images")
    inner = keras.Model(backbone.inputs, [backbone.get_layer(name).output for name in layers])
    outputs = inner(model.preprocess_images(inputs), training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    pooled = {
        name: keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(out) if len(out.shape) == 4 else out
        for name, out in zip(layers, outputs)
    }
    return keras.Model(inputs, pooled, name="layer_features")


def class_indices(labels: np.ndarray) -> np.ndarray:
    """Integer labels as they are; mixed labels (MixUp, CutMix) as their largest share's class."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    rows = labels.reshape(len(labels), -1)
    return np.argmax(rows, axis=-1) if rows.shape[1] > 1 else (rows[:, 0] > 0.5).astype(np.int32)


def extract(
    extractor: keras.Model,
    batches: tf.data.Dataset,
    augment: str = "none",
    seed: int | None = None,
    progress: bool | int = False,
    steps: int | None = None,
    out: np.ndarray | RowWriter | None = None,
) -> tuple[dict[str, np.ndarray] | np.ndarray | RowWriter, np.ndarray]:
    """Runs `extractor` over batched (images, labels) in order; returns (features, labels).

    Args:
        augment: an augmentation spec applied before extraction (one random view).
        progress: show a Keras progress bar of `steps` batches (2: one line at the end, for a log file).
        out: a preallocated [rows, dim] array or `RowWriter` (one feature output) that
            the features are written into batch by batch, instead of being collected
            and concatenated; it is returned as the features, its first len(labels)
            rows filled.
    """
    augmenter = build_augmenter(augment, seed=seed)
    bar = keras.utils.Progbar(steps, unit_name="batch", verbose=int(progress)) if progress else None  # 2: one line
    outputs, labels, rows = [], [], 0
    for step, (batch, y) in enumerate(_predicted(extractor, batches, augmenter), start=1):
        if out is None:
            outputs.append(batch)
        else:
            if rows + len(batch) > len(out):
                raise KerastlError(f"more images than the {len(out)} rows allocated for their features")
            out[rows : rows + len(batch)] = batch
        rows += len(batch)
        labels.append(class_indices(y))
        if bar is not None:
            bar.update(step)
    if rows == 0:
        raise KerastlError("no images to extract features from")
    if out is not None:
        features = out
    elif isinstance(outputs[0], dict):
        features = {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}
    else:
        features = np.concatenate(outputs)
    return features, np.concatenate(labels)


def _predicted(extractor: keras.Model, batches: tf.data.Dataset, augmenter: keras.Layer | None):
    """(features, labels) of each batch, in order. Under a `tf.distribute` strategy of several replicas
    (see `kerastl.training.distribute`), each replica takes its share of every batch and the shares are
    gathered back in order; the augmentation runs in the input pipeline. A batch is padded to a multiple
    of the replicas (its last image repeated, the copies dropped after), so that no replica gets none."""
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        for images, y, *_ in batches:  # sample weights, if any, are not features
            if augmenter is not None:
                images = augmenter(images, training=True)
            yield extractor.predict_on_batch(images), y.numpy()
        return
    batches = batches.map(lambda images, y, *_: (images, y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        batches = batches.map(lambda images, y: (augmenter(images, training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)

    def padded(images, y):
        rows = tf.shape(images)[0]
        extra = tf.math.floormod(-rows, replicas)
        kept = tf.cast(tf.range(rows + extra) < rows, tf.int32)  # collectives take no bool
        return tf.concat([images, tf.repeat(images[-1:], extra, axis=0)], 0), tf.concat(
            [y, tf.repeat(y[-1:], extra, axis=0)], 0), kept

    distributed = strategy.experimental_distribute_dataset(batches.map(padded, num_parallel_calls=tf.data.AUTOTUNE))

    @tf.function
    def step(images, y, kept):
        features = strategy.run(lambda x: keras.tree.map_structure(  # float32: collectives take no bfloat16
            lambda f: tf.cast(f, tf.float32), extractor(x, training=False)), args=(images,))
        kept = strategy.gather(kept, axis=0) > 0
        gathered = keras.tree.map_structure(lambda f: tf.boolean_mask(strategy.gather(f, axis=0), kept), features)
        return gathered, tf.boolean_mask(strategy.gather(y, axis=0), kept)

    for images, y, kept in distributed:
        features, labels = step(images, y, kept)
        yield keras.tree.map_structure(np.asarray, features), labels.numpy()


class RowWriter:
    """Rows of one view of a float32 .npy file [views, n, dim], written in place by slice
    assignment (`writer[a:b] = rows`) through the file, never mapped or held in memory."""

    def __init__(self, path: Path, offset: int, rows: int, dim: int):
        self.path, self.offset, self.rows, self.dim = path, offset, rows, dim

    def __len__(self) -> int:
        return self.rows

    def __setitem__(self, index: slice, values: np.ndarray) -> None:
        start = index.start or 0
        values = np.ascontiguousarray(values, np.float32)
        if values.shape != (len(range(*index.indices(self.rows))), self.dim):
            raise ValueError(f"rows of shape {values.shape} do not fit rows {index} of width {self.dim}")
        with open(self.path, "r+b") as handle:
            handle.seek(self.offset + start * self.dim * 4)
            values.tofile(handle)


def npy_rows(path: Path, views: int, rows: int, dim: int) -> list[RowWriter]:
    """Creates a float32 .npy file [views, rows, dim] (sparse, zero-filled) and a writer per view."""
    created = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(views, rows, dim))
    offset = created.offset
    del created  # only the header is written: the data stays sparse until the writers fill it
    return [RowWriter(path, offset + view * rows * dim * 4, rows, dim) for view in range(views)]


def extract_features(
    config: ModelConfig,
    data: ImageData,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool | int = False,
) -> dict[str, np.ndarray]:
    """Pooled features of every image in `data.train` through `config`'s backbone and preprocessing.

    Returns arrays ready for `np.savez`: "features" (the blocks `config.features`
    names, concatenated; "block_widths" gives each block's columns) or one array
    per named layer, "labels" and "class_names".
    """
    model = build_classifier(config, len(data.class_names))
    extractor = layer_features_model(model, layers) if layers else model.features_model()
    batches = data.train.batches(batch_size, cache_limit_mb=0)  # one pass: nothing to cache
    steps = math.ceil(data.train.count / batch_size)
    features, labels = extract(extractor, batches, progress=progress, steps=steps)
    arrays = dict(features) if isinstance(features, dict) else {
        "features": features, "blocks": np.array(model.feature_blocks),
        "block_widths": np.array(model.block_widths(model.feature_blocks))}
    arrays.update(labels=labels, class_names=np.array(data.class_names))
    return arrays
