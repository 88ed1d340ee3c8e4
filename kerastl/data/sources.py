"""Label tables and `tf.data` datasets -> `ImageData`.

A label table is a CSV file or a pandas DataFrame, one image file per row with its
label and, optionally, its split (train, validation or val, test). It is read and
checked by `kerastl.data.tables.read_label_table` (no TensorFlow, so `kerastl train
--data labels.csv` answers a bad row before TensorFlow loads), then its files go
through the checks and splits a class folder's do (`kerastl.data.images.from_table`): the
feature cache, reports and exports work alike, and a table and the folder it lists
give the same classes in the same order (sorted names).

A dataset of (image, label) pairs is read once, in order, into memory at the
backbone's size: a user's dataset may be one-shot, or shuffle or augment differently
every time it is read, and the feature cache keys on its content. For images that do
not fit in memory, list the files in a CSV file instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from kerastl.config import DataConfig
from kerastl.data import imagefiles
from kerastl.data.images import (
    AUTOTUNE,
    HasImageSize,
    ImageData,
    from_arrays,
    from_table,
    image_size_of,
    load_data,
    to_model_input,
)
from kerastl.data.tables import is_cifar10_folder, is_csv, label_table_of, read_label_table
from kerastl.errors import KerastlError

log = logging.getLogger(__name__)

READ_BATCH = 256  # images converted per step while a dataset is read


def from_csv(
    path: str | os.PathLike,
    image_size: int | HasImageSize,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 42,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
    min_classes: int = 2,
) -> ImageData:
    """Reads the images a CSV file lists, one per row, with their labels.

    Args:
        path: the CSV file. Relative image paths are relative to its folder.
        image_size: the size to load images at, or the classifier they are for.
        validation_split, test_split, seed: the fractions held out from each class,
            for the splits the split column names no rows for (all without one).
        path_column, label_column, split_column: the columns; by default the first
            of path, filename, file, image; of label, class; and split, if present.
        class_names: the classes in output order (default: the sorted labels); a
            label not in it is an error.
        strict: fail when a file cannot be used as an image, instead of skipping it.
        min_classes: 1 reads a table of one class (images to evaluate a model on).

    Raises:
        KerastlError: one line for a missing file or column, an unknown label or
            split, or a class without training rows.

    Example:
    ```python
    data = from_csv("labels.csv", 224)  # columns path,label[,split]
    data.class_names, data.train.count
    ```
    """
    table = read_label_table(path, None, path_column, label_column, split_column, class_names)
    return from_table(table, image_size, validation_split, test_split, seed, strict, min_classes)


def from_dataframe(
    frame: Any,
    image_size: int | HasImageSize,
    root: str | os.PathLike = ".",
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 42,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
    min_classes: int = 2,
) -> ImageData:
    """Reads the images a pandas DataFrame lists, as `from_csv` does a CSV file's; relative image
    paths are relative to `root` (default: the current folder), and rows are named by the
    DataFrame's index in messages.

    Example:
    ```python
    frame = pandas.DataFrame({"path": ["a/1.jpg", "b/2.jpg", ...], "label": ["cat", "dog", ...]})
    data = from_dataframe(frame, 224, root="photos")
    ```
    """
    table = read_label_table(frame, root, path_column, label_column, split_column, class_names)
    return from_table(table, image_size, validation_split, test_split, seed, strict, min_classes)


def from_dataset(
    dataset: tf.data.Dataset,
    class_names: Sequence[str],
    image_size: int | HasImageSize,
    validation: tf.data.Dataset | None = None,
    test: tf.data.Dataset | None = None,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 42,
) -> ImageData:
    """Reads a `tf.data.Dataset` of (image, label) pairs, or of batches of them.

    Images may have any size and dtype (pixel values 0-255) and 1 or 3 channels; they are
    converted as every source's are (`kerastl.data.images.to_model_input`). Labels are class
    indices into `class_names`, or one-hot vectors. Batched or not, kerastl batches the
    images itself by the run's `batch_size` and logs which it found. Without `validation`
    or `test` datasets, those splits are cut from each class by the fractions.

    Raises:
        KerastlError: one line for an infinite dataset, elements that are not (image,
            label), images that are not pixels of 1 or 3 channels, or a label that is not
            a class index.

    Example:
    ```python
    ds = tf.keras.utils.image_dataset_from_directory("flowers", image_size=(224, 224))
    data = from_dataset(ds, ds.class_names, 224)
    run_training(RunConfig(model=ModelConfig("efficientnet_b0")), data=data)
    ```
    """
    size, names = image_size_of(image_size), [str(name) for name in class_names]
    x, y = dataset_arrays(dataset, len(names), size)
    given = {name: dataset_arrays(ds, len(names), size, f"{name} dataset")
             for name, ds in (("validation", validation), ("test", test)) if ds is not None}
    data = from_arrays(x, y, size, names, validation_split, test_split, seed, given.get("validation"),
                       given.get("test"))
    data.origins = {name: f"the {name} dataset given" for name in given}
    batched = dataset.element_spec[0].shape.rank == 4  # data.json says which kerastl found, as the log does
    data.origins["train"] = "a tf.data.Dataset of " + (
        "batches (kerastl unbatched them and batches by batch_size)" if batched else
        "single images (kerastl batches them by batch_size)")
    return data


def dataset_arrays(dataset: tf.data.Dataset, num_classes: int, image_size: int,
                   name: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [n, size, size, 3]) and class indices (int32) of a dataset of (image,
    label) pairs or batches of them, read once, in order."""
    if not isinstance(dataset, tf.data.Dataset):
        raise KerastlError(f"the {name} must be a tf.data.Dataset of (image, label), got {type(dataset).__name__}")
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, tf.TensorSpec) for s in spec)):
        raise KerastlError(f"the {name} must give (image, label) pairs; it gives {spec}")
    image, label = spec
    rank = image.shape.rank
    if rank not in (3, 4) or image.shape[-1] not in (1, 3):
        raise KerastlError(f"the {name}'s images have shape {image.shape}: expected [height, width, 1 or 3] "
                           "images or batches of them (give the channels: decode_image(..., channels=3))")
    if not (image.dtype.is_integer or image.dtype.is_floating or image.dtype == tf.bool):
        raise KerastlError(f"the {name}'s images are {image.dtype.name}, not pixels: decode them first")
    if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise KerastlError(f"the {name} is infinite (it repeats): pass a finite dataset, without .repeat()")
    batched = rank == 4
    label_dims = label.shape[1:] if batched else label.shape
    dims = label_dims.as_list() if label_dims.rank is not None else None
    if dims not in ([], [1], [num_classes]) or not (label.dtype.is_integer or label.dtype.is_floating):
        raise KerastlError(f"the {name}'s labels are {label.dtype.name} of shape {label_dims}: expected class "
                           f"indices or one-hot vectors of the {num_classes} classes")
    one_hot = dims == [num_classes] and num_classes > 1
    if batched:
        log.info("the %s gives batches: kerastl unbatches them and batches by batch_size", name)
        dataset = dataset.unbatch()
    else:
        log.info("the %s gives single images: kerastl batches them", name)

    def convert(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        y = tf.argmax(y, axis=-1) if one_hot else tf.reshape(y, [])
        return to_model_input(x, image_size), tf.cast(y, tf.float64), tf.reduce_max(tf.cast(x, tf.float32))

    images, labels, peak = [], [], 0.0
    for x, y, top in dataset.map(convert, num_parallel_calls=AUTOTUNE).batch(READ_BATCH).prefetch(AUTOTUNE):
        images.append(x.numpy())
        labels.append(y.numpy())
        peak = max(peak, float(top.numpy().max()))
    if not images:
        raise KerastlError(f"the {name} has no images")
    raw = np.concatenate(labels)
    bad = np.flatnonzero((raw != np.round(raw)) | (raw < 0) | (raw >= num_classes))
    if len(bad):
        raise KerastlError(f"label {raw[bad[0]]:g} of image {bad[0]} of the {name} is not a class index "
                           f"(0 to {num_classes - 1} for {num_classes} class names)")
    if image.dtype.is_floating and peak <= 1.0:
        log.warning("the %s's images are at most %g: kerastl reads pixel values 0-255, so multiply images "
                    "scaled to 0-1 by 255", name, peak)
    return np.concatenate(images), raw.astype(np.int32)


def labelled_counts(config: DataConfig, data: ImageData | None = None) -> np.ndarray:
    """Labelled images per class (training plus validation): of `data` when given, else of
    `config.source`, counted from its listing or label table without decoding an image."""
    if data is None and config.source not in ("digits", "cifar10") and not is_cifar10_folder(config.source):
        if is_csv(config.source):
            table = label_table_of(config)
            rows = [i for i, split in enumerate(table.splits or ["train"] * len(table.labels)) if split != "test"]
            return np.bincount(np.asarray(table.labels, np.int64)[rows], minlength=len(table.class_names))
        counts = np.asarray(imagefiles.list_class_folder(config.source).counts())
        if config.validation_dir:
            counts = counts + np.asarray(imagefiles.list_class_folder(config.validation_dir).counts())
        return counts
    return (data if data is not None else load_data(config, 32)).labelled_counts()
