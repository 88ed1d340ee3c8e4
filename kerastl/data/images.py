"""Image sources -> `tf.data` pipelines.

Sources: a folder with one subfolder per class, a CSV label table (read by
`kerastl.data.tables.read_label_table`; `kerastl.data.sources` adds DataFrames and `tf.data`
datasets), numpy arrays, CIFAR-10 and scikit-learn's bundled digits. Every source becomes an
`ImageData`: class names plus unbatched splits of (uint8 image resized to the backbone's size, int label).
`Split.batches` turns a split into a pipeline: parallel decode and resize, cache (before
augmentation, so augmented images differ every epoch), shuffle, batch, augment, prefetch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import DataConfig
from kerastl.data import imagefiles
from kerastl.data.datasets import load_cifar10, load_digits
from kerastl.data.tables import LabelTable, is_cifar10_folder, is_csv, label_table_of
from kerastl.errors import KerastlError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


class HasImageSize(Protocol):
    """Anything that knows the square image size it takes, such as a `TransferClassifier`."""

    image_size: int


def image_size_of(image_size: int | HasImageSize) -> int:
    """The size to load images at: an int, or the size a classifier asks for (timm's `resolve_data_config`)."""
    return int(image_size if isinstance(image_size, (int, np.integer)) else image_size.image_size)


@dataclass
class Split:
    """One split: an unbatched dataset of (uint8 [size, size, 3], int32 label)."""

    dataset: tf.data.Dataset
    count: int
    image_size: int
    fingerprint: str = ""  # changes whenever the split's images or labels change
    labels: np.ndarray | None = None  # every image's label, in order, when known without reading images
    paths: list[str] | None = None  # every image's file, in order, when the images came from files

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Images per class (read from the labels, or from the dataset when they are not known)."""
        labels = self.labels if self.labels is not None else np.array([int(y) for _, y in self.dataset])
        return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)

    def batches(
        self,
        batch_size: int,
        training: bool = False,
        augmenter: keras.Model | None = None,
        seed: int | None = None,
        cache_limit_mb: int = 2048,
        resample: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
    ) -> tf.data.Dataset:
        """A batched float32 0-255 pipeline; shuffled and augmented when `training`.

        `resample` (training only) maps the endless reshuffled stream of single images to
        the draws an epoch takes the first `count` of (rebalanced sampling, see
        `kerastl.data.pipelines`): one cache and one shuffle buffer, as without it."""
        ds = self.dataset
        megabytes = self.count * self.image_size**2 * 3 / 2**20
        if megabytes <= cache_limit_mb:
            ds = ds.cache()
        else:
            log.debug("not caching %d images (%.0f MB > cache limit %d MB)", self.count, megabytes, cache_limit_mb)
        if training:
            # a shuffle buffer holds its images decoded: no more than the memory budget (or 1024 images)
            limit = max(int(cache_limit_mb * 2**20 // (self.image_size**2 * 3)), 1024)
            ds = ds.shuffle(max(min(self.count, limit), 1), seed=seed, reshuffle_each_iteration=True)
            if resample is not None:  # an epoch keeps its length, and Keras knows it
                ds = resample(ds.repeat()).take(self.count).apply(tf.data.experimental.assert_cardinality(self.count))
        ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
        if training and augmenter is not None:
            ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)

    def sample(self, count: int = 512) -> tf.Tensor:
        """Up to `count` images (uint8 0-255) as one batch, read once without touching any cache."""
        images, _ = next(iter(self.dataset.take(count).batch(count)))
        return images

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images and labels as numpy arrays (for evaluation and small data)."""
        images, labels = [], []
        for x, y in self.dataset.batch(256):
            images.append(x.numpy())
            labels.append(y.numpy())
        if not images:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), np.zeros((0,), np.int32)
        return np.concatenate(images), np.concatenate(labels)


def merge_splits(first: Split, second: Split) -> Split:
    """One split holding both splits' images (the first's, then the second's)."""
    digest = hashlib.sha256((first.fingerprint + second.fingerprint).encode()).hexdigest()
    both = first.labels is not None and second.labels is not None
    labels = np.concatenate([first.labels, second.labels]) if both else None
    paths = first.paths + second.paths if first.paths is not None and second.paths is not None else None
    return Split(first.dataset.concatenate(second.dataset), first.count + second.count, first.image_size, digest,
                 labels, paths)


@dataclass
class ImageData:
    """Class names (in output order) and the train/validation/test splits."""

    class_names: list[str]
    train: Split
    validation: Split | None = None
    test: Split | None = None
    skipped: int = 0  # files of the class folders left out: they cannot be used as images
    # where a split came from when the split fractions did not cut it (a CSV's split column, a given dataset)
    origins: dict[str, str] = field(default_factory=dict)

    def labelled_counts(self) -> np.ndarray:
        """Labelled images per class: training plus validation (the test split left out)."""
        counts = self.train.class_counts(len(self.class_names))
        return counts if self.validation is None else counts + self.validation.class_counts(len(self.class_names))


def to_model_input(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Grayscale -> RGB, bilinear resize to `image_size`, back to uint8 for caching."""
    images = tf.convert_to_tensor(images)
    if images.shape[-1] == 1:
        images = tf.image.grayscale_to_rgb(images)
    if tuple(images.shape[-3:-1]) != (image_size, image_size) or images.dtype != tf.uint8:
        images = tf.image.resize(tf.cast(images, tf.float32), (image_size, image_size))
        images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
    return images


def _decode_file(path: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return to_model_input(image, image_size)


def stratified_split(
    labels: np.ndarray, validation: float, test: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train/validation/test, split per class so every class is in every split.

    Training indices come in random order, so the first images of a training split
    are a fair sample of every class.
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(index) * validation)) if validation else 0
        n_test = int(round(len(index) * test)) if test else 0
        if validation and n_val == 0 and len(index) > 1:
            n_val = 1
        if len(index) - n_val - n_test < 1:
            raise KerastlError(f"class {label} has too few images ({len(index)}) to split")
        parts[1].append(index[:n_val])
        parts[2].append(index[n_val : n_val + n_test])
        parts[0].append(index[n_val + n_test :])
    train = rng.permutation(np.concatenate(parts[0])).astype(np.int64)  # random order: see Split.sample
    return train, np.sort(np.concatenate(parts[1])), np.sort(np.concatenate(parts[2]))


def _decode_in_tensorflow(path: str) -> None:
    """Decodes one file exactly as the pipeline will; raises ValueError with TensorFlow's reason."""
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        # "{{function_node ...}} Invalid PNG data, size 60 [Op:DecodeImage] name: " -> "Invalid PNG data, size 60"
        message = error.message.split("}}")[-1].split("[Op:")[0].strip()
        raise ValueError(message or type(error).__name__) from None


def _usable_files(listings: list[imagefiles.FolderListing], strict: bool,
                  min_classes: int = 2) -> list[imagefiles.FolderListing]:
    """Decodes every listed file once; undecodable ones are dropped up front with one warning.

    With `strict`, any file that would be skipped fails here (before any decoding
    when the cheap listing already found one).
    """

    def skipped_in(listings: list[imagefiles.FolderListing]) -> tuple[list[imagefiles.Finding], str]:
        found = [replace(f, name=f"{listing.root.name}/{f.name}") for listing in listings for f in listing.skipped]
        roots = sorted({str(listing.root) for listing in listings if listing.skipped})
        hint = f"run `kerastl check-data` on {' and '.join(roots)}"
        if strict and found:
            raise KerastlError(f"{len(found)} files cannot be used as images: {imagefiles.describe(found, 3)}; "
                               f"fix or remove them, or pass strict=False to skip them; {hint} to list every problem")
        return found, hint

    skipped_in(listings)
    listings = [imagefiles.check_files(listing, decode=_decode_in_tensorflow) for listing in listings]
    skipped, hint = skipped_in(listings)
    if skipped:
        log.warning("skipped %d files that cannot be used as images: %s; %s for details",
                    len(skipped), imagefiles.describe(skipped, 20), hint)
    noted = len({f.path for listing in listings for f in listing.findings if f.action == imagefiles.USED})
    if noted:
        log.info("%d images are read with a conversion (grayscale, alpha, palette, CMYK, first frame...); "
                 "`kerastl check-data` lists them", noted)
    for listing in listings:
        errors = listing.errors(min_classes)
        if errors:
            raise KerastlError(errors[0])
    return listings


def _file_split(paths: list[str], labels: list[int], image_size: int) -> Split:
    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
    # No `ignore_errors`: every file was decoded once by `_usable_files`, so a decode here fails only
    # when a file changed during training. Dropping it would make `count` and `labels` wrong and
    # shift every later label, so such a change stops the run with TensorFlow's error instead.
    ds = ds.map(lambda p, y: (_decode_file(p, image_size), y), num_parallel_calls=AUTOTUNE)
    digest = hashlib.sha256(str(image_size).encode())
    for path, label in zip(paths, labels):
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    return Split(ds, len(paths), image_size, digest.hexdigest(), np.asarray(labels, np.int32), list(paths))


def from_folder(
    root: str | os.PathLike,
    image_size: int | HasImageSize,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 42,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    strict: bool = False,
    min_classes: int = 2,
) -> ImageData:
    """Reads a folder of class subfolders (JPEG, PNG, GIF, BMP, judged by content).

    Every file is decoded once before the pipeline is built: files that cannot be
    used (damaged, empty, not an image, WebP...) are left out up front with one
    warning listing them, so counts and labels always match the images; with
    `strict` they raise `KerastlError` instead. Hidden files are ignored. See
    `kerastl.data.imagefiles` for what happens to each kind of file. Without
    `validation_dir` or `test_dir`, those splits are cut from each class of `root`.
    `image_size` may be the classifier the images are for; `min_classes=1` reads a
    folder of one class (images to evaluate a model on).
    """
    image_size = image_size_of(image_size)
    listings = [imagefiles.list_class_folder(root, min_classes)]
    classes = listings[0].class_names
    for name, folder in (("validation", validation_dir), ("test", test_dir)):
        if folder:
            listings.append(imagefiles.list_class_folder(folder))
            if listings[-1].class_names != classes:
                raise KerastlError(
                    f"{name} folder {folder} has classes {listings[-1].class_names}, expected {classes}")
    listings = _usable_files(listings, strict, min_classes)
    skipped = sum(len(listing.skipped) for listing in listings)
    others = iter((listing.paths, listing.labels) for listing in listings[1:])
    validation, test = (next(others) if folder else None for folder in (validation_dir, test_dir))
    return _from_files(classes, listings[0].paths, listings[0].labels, image_size, validation_split, test_split,
                       seed, validation, test, skipped)


Files = tuple[list[str], list[int]]  # image files and their labels


def _from_files(class_names: list[str], paths: list[str], labels: list[int], image_size: int,
                validation_split: float, test_split: float, seed: int, validation: Files | None = None,
                test: Files | None = None, skipped: int = 0) -> ImageData:
    """`ImageData` of checked image files: given `validation`/`test` (paths, labels), or those splits
    cut from each class by the fractions (as `from_arrays` does for arrays)."""
    train, val, tst = stratified_split(
        np.asarray(labels), 0.0 if validation else validation_split, 0.0 if test else test_split, seed
    )
    pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    data = ImageData(class_names, _file_split(*pick(train), image_size), skipped=skipped)
    for name, files, index in (("validation", validation, val), ("test", test, tst)):
        if files is not None:
            setattr(data, name, _file_split(*files, image_size))
        elif len(index):
            setattr(data, name, _file_split(*pick(index), image_size))
    return data


def from_table(table: LabelTable, image_size: int | HasImageSize, validation_split: float = 0.2,
               test_split: float = 0.0, seed: int = 42, strict: bool = False, min_classes: int = 2) -> ImageData:
    """Reads the files of a label table (`kerastl.data.tables.read_label_table`; `kerastl.data.sources.from_csv`
    is the friendlier call). Every file is decoded once up front, as `from_folder` does: rows whose
    file cannot be used are left out with one warning (with `strict` they raise). A split column
    puts each row in the split it names; a split with no rows is cut from the training rows of
    each class by its fraction, as without a split column."""
    image_size = image_size_of(image_size)
    table, findings = table.usable(_decode_in_tensorflow)
    skipped = [finding for finding in findings if finding.action == imagefiles.SKIPPED]
    if skipped:
        problem = f"{len(skipped)} files of {table.name} cannot be used as images: {imagefiles.describe(skipped, 20)}"
        if strict:
            raise KerastlError(f"{problem}; fix or remove their rows, or pass strict=False to skip them")
        log.warning("skipped %s", problem)
    errors = table.errors(min_classes)
    if errors:
        raise KerastlError(errors[0])
    if min_classes == 1 and table.files("train") is None:  # images to evaluate on, in other splits: all of them
        table = replace(table, splits=None)
    data = _from_files(table.class_names, *table.files("train"), image_size, validation_split, test_split, seed,
                       table.files("validation"), table.files("test"), len(skipped))
    if table.splits is not None:
        data.origins = {name: f"the rows of {table.name} whose split is {name}" for name in
                        ("train", "validation", "test") if table.files(name) is not None}
    return data


def split_of_arrays(x: np.ndarray, y: np.ndarray, image_size: int) -> Split:
    """A split of images [n, h, w, 1 or 3] (any size, 0-255) and integer labels.

    The arrays are kept as they are and each image is resized to `image_size` as the split is read (then
    cached by `Split.batches` within its memory limit): resizing all at once would hold every image at
    the backbone's size, in float32 (CIFAR-10 at 224x224: 30 GB)."""
    images, labels = np.asarray(x), np.asarray(y, np.int32)
    shape = f"{images.shape} {images.dtype.str} {image_size}".encode()
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + shape).hexdigest()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if images.shape[1:] != (image_size, image_size, 3) or images.dtype != np.uint8:
        dataset = dataset.map(lambda image, label: (to_model_input(image, image_size), label),
                              num_parallel_calls=AUTOTUNE)
    return Split(dataset, len(images), image_size, digest, labels)


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    image_size: int | HasImageSize,
    class_names: list[str] | None = None,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 42,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> ImageData:
    """Builds `ImageData` from images [n, h, w, 1 or 3] (0-255) and integer labels.

    Explicit `validation`/`test` arrays take precedence over the split fractions.
    `image_size` may be the classifier the images are for.
    """
    image_size = image_size_of(image_size)
    x, y = np.asarray(x), np.asarray(y).reshape(-1).astype(np.int32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) != len(y):
        raise KerastlError(f"expected images [n, h, w, 1|3] and n labels, got {x.shape} and {y.shape}")
    count = int(y.max()) + 1 if len(y) else 0
    class_names = list(class_names) if class_names else [str(i) for i in range(count)]
    if len(class_names) < 2 or count > len(class_names):
        raise KerastlError(f"need two or more classes and a name for each; got {len(class_names)} names")
    train, val, tst = stratified_split(
        y, 0.0 if validation else validation_split, 0.0 if test else test_split, seed
    )
    data = ImageData(class_names, split_of_arrays(x[train], y[train], image_size))
    for name, given, index in (("validation", validation, val), ("test", test, tst)):
        if given is not None:
            setattr(data, name, split_of_arrays(*given, image_size))
        elif len(index):
            setattr(data, name, split_of_arrays(x[index], y[index], image_size))
    return data


def load_data(config: DataConfig, image_size: int | HasImageSize, min_classes: int = 2) -> ImageData:
    """Dispatches on `config.source`: "digits", "cifar10", a CIFAR-10 folder, a CSV label table
    (a name ending in .csv, see `from_table`) or a class folder (of at least `min_classes` classes)."""
    config.validate()
    image_size = image_size_of(image_size)
    if not config.source:
        raise KerastlError("no data source given: pass a class folder, a CSV file, cifar10 or digits")
    split = dict(validation_split=config.validation_split, seed=config.seed)
    if config.source == "digits":
        x, y, names = load_digits()
        return from_arrays(x, y, image_size, names, test_split=config.test_split, **split)
    if config.source == "cifar10" or is_cifar10_folder(config.source):
        path = None if config.source == "cifar10" else config.source
        (x, y), test, names = load_cifar10(path)
        return from_arrays(x, y, image_size, names, test=test, **split)
    if is_csv(config.source):
        return from_table(label_table_of(config), image_size, test_split=config.test_split,
                          strict=config.strict, min_classes=min_classes, **split)
    return from_folder(
        config.source, image_size, test_split=config.test_split,
        validation_dir=config.validation_dir, test_dir=config.test_dir, strict=config.strict,
        min_classes=min_classes, **split,
    )

