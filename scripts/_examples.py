"""What the worked examples in scripts/ share: their common flags, loading a source with at most
N training images per class, the training settings, a plain-text table, and the one-line error.

Built only on kerastl's public API (`import kerastl`), as the examples themselves are.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np

import kerastl

# digits are not mirror-symmetric: small rotations and zooms, no flips (as `kerastl demo` does)
DIGITS_AUGMENT = "rotate:0.05,zoom:0.1"


def add_common_flags(parser: argparse.ArgumentParser, data: str, weights: str, output: str,
                     augment: str = DIGITS_AUGMENT) -> None:
    """--data, --weights, --limit, --output, --augment and --seed."""
    parser.add_argument("--data", default=data,
                        help=f"digits, cifar10 (downloaded), an extracted cifar-10-batches-py folder or a "
                             f"folder of class folders (default {data})")
    parser.add_argument("--weights", default=weights,
                        help=f"imagenet (downloaded once), none, or a weights file (default {weights})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="at most N training images per class (a quick run)")
    parser.add_argument("--output", default=output, help=f"where the script writes (default {output})")
    parser.add_argument("--augment", default=augment, help=f"augmentation preset or list (default {augment})")
    parser.add_argument("--seed", type=int, default=0)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """--epochs, --fine-tune-epochs and --min-steps, defaulting to kerastl's `TrainConfig`."""
    defaults = kerastl.TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="phase-1 (head) epochs at the least")
    parser.add_argument("--fine-tune-epochs", type=int, default=defaults.fine_tune_epochs,
                        help="phase-2 (fine-tuning) epochs at the least; 0 skips fine-tuning")
    parser.add_argument("--min-steps", type=int, default=None,
                        help=f"the optimizer steps each phase runs at the least (kerastl's defaults: "
                             f"{defaults.min_steps} for the head, {defaults.fine_tune_min_steps} for "
                             f"fine-tuning); 0 trains exactly the epochs asked for")


def train_config(args: argparse.Namespace, **values) -> kerastl.TrainConfig:
    """The `TrainConfig` of the training flags, with `values` on top."""
    fields = {"epochs": args.epochs, "fine_tune_epochs": args.fine_tune_epochs}
    if args.min_steps is not None:
        fields.update(min_steps=args.min_steps, fine_tune_min_steps=args.min_steps)
    return kerastl.TrainConfig(**{**fields, **values})


@dataclass
class Arrays:
    """A source's labelled training images and its test images (uint8, at one size), and class names."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    def limited(self, limit: int | None, seed: int = 0) -> Arrays:
        """At most `limit` training images per class, drawn at random; the test images are all kept."""
        if limit is None:
            return self
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(self.y == c))[:limit]
                                       for c in np.unique(self.y)]))
        return Arrays(self.x[keep], self.y[keep], self.x_test, self.y_test, self.class_names)

    def classes(self, names: Sequence[str]) -> Arrays:
        """Only the images of the classes `names`, relabelled 0, 1, ... in that order."""
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise kerastl.KerastlError(f"classes {unknown} are not in the data; its classes: {self.class_names}")
        numbers = [self.class_names.index(name) for name in names]

        def pick(x, y):
            keep = np.isin(y, numbers)
            return x[keep], np.array([numbers.index(label) for label in y[keep]], np.int32)

        return Arrays(*pick(self.x, self.y), *pick(self.x_test, self.y_test), list(names))

    def image_data(self, image_size: int, seed: int = 0, validation_split: float = 0.2) -> kerastl.ImageData:
        """kerastl's `ImageData`: `validation_split` of each class's training images held out, and the test images."""
        return kerastl.from_arrays(self.x, self.y, image_size, self.class_names, validation_split=validation_split,
                                   test=(self.x_test, self.y_test), seed=seed)


def load_arrays(source: str, image_size: int, seed: int = 0, test_split: float = 0.2) -> Arrays:
    """A kerastl data source at `image_size`: CIFAR-10 keeps its own test images; digits and class
    folders hold out `test_split` of each class for testing."""
    data = kerastl.load_data(kerastl.DataConfig(source=source, validation_split=0.0, test_split=test_split,
                                                seed=seed), image_size)
    (x, y), (x_test, y_test) = data.train.arrays(), data.test.arrays()
    return Arrays(x, y, x_test, y_test, data.class_names)


def timed(function: Callable, *args, **kwargs):
    """`function(*args, **kwargs)` and the seconds it took."""
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of softmax rows, or of one sigmoid column (threshold 0.5)."""
    probabilities = np.asarray(probabilities)
    predicted = (probabilities[:, 0] > 0.5).astype(int) if probabilities.shape[1] == 1 else probabilities.argmax(1)
    return float(np.mean(predicted == np.asarray(labels)))


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "-+-".join("-" * w for w in widths), *map(line, cells[1:])])


def save_table(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Writes a table as CSV (its folder created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def run(body: Callable[[argparse.Namespace], None], args: argparse.Namespace, prog: str) -> int:
    """Runs a script's body: 0, or 2 with kerastl's one-line message (no network, a bad flag...) on stderr."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # no retracing notices between the tables
    try:
        keras.utils.set_random_seed(args.seed)  # the same random starts (and a random backbone) on every run
        body(args)
    except kerastl.KerastlError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0
