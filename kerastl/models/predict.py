"""Predicting many image files: folders taken recursively, read in batches, bad files skipped.

`predict_images(model, ["photos/", "a.jpg"])` lists the files (`kerastl.data.imagefiles.
list_image_files`), reads and predicts them `batch_size` at a time, so 10,000 images need
no more memory than one batch plus a row of probabilities each, and returns `Predictions`
with the path of every image predicted and every file skipped, with the reason.

A file that is not an image by its first bytes is skipped before anything runs; one that
does not decode is found when its batch fails, by predicting that batch's files one at a
time. With `strict=True` the first such file stops the call with a `KerastlError` naming it.
`kerastl predict` prints each batch as `iter_predictions` yields it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from kerastl.data.imagefiles import SKIPPED, Finding, FolderListing, list_image_files, skipped_line
from kerastl.errors import KerastlError
from kerastl.models.export import top_k

log = logging.getLogger(__name__)

BATCH_SIZE = 32


class PredictsBytes(Protocol):
    """What `predict_images` runs: an `ExportedModel` or a `LiteModel`."""

    class_names: list[str]

    def predict_bytes(self, encoded: Sequence[bytes]) -> np.ndarray: ...


@dataclass
class Predictions:
    """Probabilities [images, classes] for `paths`, in order (no paths for pixel arrays), and the files
    `skipped` (`Finding`s)."""

    paths: list[str]
    probabilities: np.ndarray
    class_names: list[str]
    skipped: list[Finding] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def classes(self) -> list[str]:
        """The most probable class of each image."""
        return [self.class_names[i] for i in self.probabilities.argmax(axis=-1)] if len(self) else []

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs of each image."""
        return top_k(self.probabilities, self.class_names, k)


def iter_predictions(model: PredictsBytes, listing: FolderListing, batch_size: int = BATCH_SIZE,
                     strict: bool = False, skipped: list[Finding] | None = None
                     ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields (paths, probabilities) one batch at a time over `listing`'s files, in order.

    Files that cannot be read or decoded are appended to `skipped` (with the listing's own
    skipped files first) and left out; with `strict`, the first one is a `KerastlError`.
    """
    skipped = [] if skipped is None else skipped
    for finding in listing.findings:
        if finding.action == SKIPPED:
            _skip(finding, strict, skipped)
    for start in range(0, len(listing.paths), batch_size):
        paths, encoded = [], []
        for path in listing.paths[start:start + batch_size]:
            try:
                encoded.append(Path(path).read_bytes())
                paths.append(path)
            except OSError as error:
                _skip(Finding(path, path, "cannot be read", SKIPPED, error.strerror or type(error).__name__),
                      strict, skipped)
        if not paths:
            continue
        try:
            yield paths, model.predict_bytes(encoded)
        except KerastlError:  # some file in the batch does not decode: find it, predict the others
            kept, rows = [], []
            for path, data in zip(paths, encoded):
                try:
                    rows.append(model.predict_bytes([data]))
                    kept.append(path)
                except KerastlError as error:
                    reason = str(error).removeprefix("cannot decode an image: ")
                    _skip(Finding(path, path, "cannot be decoded", SKIPPED, reason), strict, skipped)
            if kept:
                yield kept, np.concatenate(rows)


def _skip(finding: Finding, strict: bool, skipped: list[Finding]) -> None:
    if strict:
        raise KerastlError(f"cannot predict {skipped_line(finding)}; without strict=True such files are skipped")
    log.debug("skipped %s", skipped_line(finding))
    skipped.append(finding)


def predict_images(model: PredictsBytes, inputs: Sequence[str | os.PathLike] | FolderListing,
                   batch_size: int = BATCH_SIZE, strict: bool = False) -> Predictions:
    """Predicts image files and every image under folders (recursively): see the module docstring.

    Example:
    ```python
    predictions = predict_images(load_export("saved_models/flowers"), ["garden/", "a.jpg"])
    predictions.paths, predictions.classes, predictions.skipped
    ```
    """
    listing = inputs if isinstance(inputs, FolderListing) else list_image_files(inputs)
    skipped: list[Finding] = []
    paths, rows = [], []
    for batch_paths, probabilities in iter_predictions(model, listing, batch_size, strict, skipped):
        paths.extend(batch_paths)
        rows.append(probabilities)
    width = len(model.class_names)
    probabilities = np.concatenate(rows) if rows else np.zeros((0, width), np.float32)
    return Predictions(paths, probabilities, list(model.class_names), skipped)
