"""The bundled and downloadable datasets as arrays: scikit-learn's digits and CIFAR-10.

`kerastl.data.images.load_data` turns them into `ImageData` ("digits", "cifar10" or an extracted
`cifar-10-batches-py` folder).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits as sklearn_digits

from kerastl.data.tables import is_cifar10_folder
from kerastl.errors import KerastlError


def load_digits(classes: tuple[int, ...] = tuple(range(10))) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 digits (no download) as uint8 0-255 images [n, 8, 8, 1].

    Labels are renumbered 0..len(classes)-1 in the order of `classes`.
    """
    digits = sklearn_digits()
    keep = np.isin(digits.target, classes)
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    remap = {c: i for i, c in enumerate(classes)}
    labels = np.array([remap[t] for t in digits.target[keep]], np.int32)
    return images, labels, [str(c) for c in classes]


def load_cifar10(path: str | None = None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """CIFAR-10 as ((x_train, y_train), (x_test, y_test), class_names).

    Reads an extracted `cifar-10-batches-py` folder when `path` is given, otherwise
    downloads through `keras.datasets.cifar10` (needs the network).
    """
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if path is None:
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as error:
            if "URL fetch failure" in str(error):
                raise KerastlError(
                    "cannot download CIFAR-10 (no network?): pass the path of an extracted "
                    "cifar-10-batches-py folder instead"
                ) from error
            raise
        return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1)), names

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(Path(path) / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(batch[b"labels"], np.int32)

    if not is_cifar10_folder(path):
        raise KerastlError(f"{path} is not an extracted cifar-10-batches-py folder")
    with open(Path(path) / "batches.meta", "rb") as handle:
        names = [n.decode() for n in pickle.load(handle, encoding="bytes")[b"label_names"]]
    batches = [read(f"data_batch_{i}") for i in range(1, 6) if (Path(path) / f"data_batch_{i}").is_file()]
    if not batches:
        raise KerastlError(f"{path} has no data_batch_N files")
    x_train = np.concatenate([b[0] for b in batches])
    y_train = np.concatenate([b[1] for b in batches])
    return (x_train, y_train), read("test_batch"), names
