"""Backbone features: extraction, and the cache that lets phase 1 skip the frozen base.

While the base is frozen, every epoch would recompute the same backbone outputs.
Instead, the pooled features are computed once (K views per image when augmentation
is on: the plain image and K-1 augmented), stored under a key that covers everything they depend on, and
the classifier's head model trains on them: it shares the classifier's head layers,
so the classifier is trained in place.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kerastl.data.augment import image_layers
from kerastl.data.images import Split
from kerastl.features.extract import RowWriter, extract, npy_rows
from kerastl.models.classifier import TransferClassifier
from kerastl.storage import file_digest, staged_folder

log = logging.getLogger(__name__)

def default_cache_dir() -> Path:
    """`$KERASTL_CACHE`, else `$XDG_CACHE_HOME/kerastl`, else `~/.cache/kerastl`."""
    if os.environ.get("KERASTL_CACHE"):
        return Path(os.environ["KERASTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kerastl"


def cached_views(augment: str, cache_views: int) -> int:
    """How many views of each training image the cache holds: the plain image and `cache_views` - 1
    augmented ones; 1 (the plain image) when nothing augments the images themselves (MixUp and
    CutMix mix batches: phase 1 on cached features does not mix)."""
    return cache_views if image_layers(augment) else 1


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of a model's weight values: identifies ImageNet, file or random weights alike."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def model_fingerprint(model: TransferClassifier) -> dict:
    """Everything about a classifier that its pooled backbone features depend on.

    The backbone, its weight values (ImageNet, a file or a random start alike), image
    size, preprocessing, pooling and compute precision. Hashing the weights reads them all, so compute
    this once per model state and pass it to `cache_key`.
    """
    spec = model.spec
    return {
        "backbone": spec.name,
        "weights": weights_digest(model.backbone),
        "precision": model.backbone.dtype_policy.name,
        "image_size": model.image_size,
        "preprocessing": f"{spec.preprocess.__module__}.{spec.preprocess.__name__}",
        "pooling": type(model.pooler).__name__,
    }


def cache_key(
    model: TransferClassifier | dict, split: Split, views: int = 1, augment: str = "none", seed: int = 0,
    blocks: list[int] | None = None,
) -> str:
    """The key of a split's cached features: any change to what they depend on changes it.

    Args:
        model: a classifier, or its `model_fingerprint`.
        split: the data; its fingerprint covers the images and labels.
        views, augment, seed: the augmented views that produced the features.
        blocks: the blocks whose pooled outputs were concatenated (None: the backbone's output).
    """
    parts = {
        **(model if isinstance(model, dict) else model_fingerprint(model)),
        "blocks": blocks,
        "data": split.fingerprint,
        "views": views,
        "augment": augment if views > 1 else "none",
        "seed": seed if views > 1 else None,
        "format": 2,  # 2: view 0 is the plain image
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CachedFeatures:
    """Features of one split: `features` [views, n, dim] and `labels` [n]."""

    features: np.ndarray
    labels: np.ndarray

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def nbytes(self) -> int:
        return int(self.features.nbytes + self.labels.nbytes)

    def columns(self, index: np.ndarray) -> CachedFeatures:
        """These features restricted to some columns (the blocks a head reads), in memory."""
        return CachedFeatures(np.ascontiguousarray(np.asarray(self.features)[..., index]), self.labels)


class FeatureCache:
    """Pooled backbone features on disk under `directory/<key>/`, checked on every load.

    Each entry holds `features.npy`, `labels.npy` and `meta.json` with their SHA-256;
    it is written to a temporary folder and renamed into place, so a crash never
    leaves a half-written entry under its key. An entry that fails to load or
    whose checksum differs is logged, removed and rebuilt, never used.
    Entries larger than `memory_limit_mb` are memory-mapped instead of read in, and
    extracted straight into their staged file instead of into memory, so neither
    building nor loading an entry holds more than that in memory. Smaller ones are
    extracted into one preallocated array (no per-batch copies stacked at the end).
    """

    def __init__(self, directory: str | os.PathLike | None = None, memory_limit_mb: int = 2048):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.memory_limit_mb = memory_limit_mb

    def path(self, key: str) -> Path:
        return self.directory / key

    def load(self, key: str) -> CachedFeatures | None:
        """The entry under `key`, or None when absent or damaged (then it is removed)."""
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            mmap = meta["bytes"] > self.memory_limit_mb * 2**20
            arrays = {}
            for name in ("features", "labels"):
                path = folder / f"{name}.npy"
                if mmap and name == "features":  # checksum by streaming, then map without reading in
                    if file_digest(path) != meta[name]:
                        raise ValueError(f"{name}.npy does not match its checksum")
                    arrays[name] = np.load(path, mmap_mode="r")
                    continue
                data = path.read_bytes()  # read once: checksum and load from the same bytes
                if hashlib.sha256(data).hexdigest() != meta[name]:
                    raise ValueError(f"{name}.npy does not match its checksum")
                arrays[name] = np.load(io.BytesIO(data))
            entry = CachedFeatures(arrays["features"], arrays["labels"])
            if list(entry.features.shape) != meta["shape"] or len(entry.labels) != meta["shape"][1]:
                raise ValueError("shapes differ from meta.json")
        except (OSError, ValueError, KeyError, EOFError) as error:
            log.warning("feature cache entry %s is damaged (%s); rebuilding it", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return entry

    def save(self, key: str, entry: CachedFeatures) -> None:
        """Writes an entry atomically (temporary folder, then rename); an entry already there is kept.

        Damaged entries are removed by `load` before anything is rebuilt, so the
        only entry found here is an equal one another process has just written.
        """
        with staged_folder(self.path(key)) as staging:
            np.save(staging / "features.npy", np.ascontiguousarray(entry.features))
            self._finish(staging, entry.labels, entry.features.shape, entry.features.nbytes)

    @staticmethod
    def _finish(staging: Path, labels: np.ndarray, shape: tuple[int, ...], features_bytes: int) -> None:
        """Completes a staged entry whose features.npy is written: labels.npy and meta.json."""
        np.save(staging / "labels.npy", labels)
        meta = {
            "shape": list(shape),
            "bytes": int(features_bytes) + int(labels.nbytes),
            "features": file_digest(staging / "features.npy"),
            "labels": file_digest(staging / "labels.npy"),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))

    def features(
        self,
        model: TransferClassifier,
        split: Split,
        views: int = 1,
        augment: str = "none",
        seed: int = 0,
        batch_size: int = 64,
        progress: bool | int = False,
    ) -> CachedFeatures:
        """The split's pooled features: from the cache, else extracted and stored."""
        extractor = functools.cache(model.features_model)
        blocks = None if model.feature_blocks == [model.block_count()] else model.feature_blocks
        return self._features(model_fingerprint(model), extractor, split, views, augment, seed, batch_size, progress,
                              blocks)

    def head_features(
        self,
        model: TransferClassifier,
        train: Split,
        validation: Split,
        views: int = 1,
        augment: str = "none",
        seed: int = 0,
        batch_size: int = 64,
        progress: bool | int = False,
        fingerprint: dict | None = None,
        blocks: list[int] | None = None,
    ) -> tuple[CachedFeatures, CachedFeatures]:
        """Training features (K views, view 0 plain) and validation features (one plain view) for phase 1.

        The model's fingerprint (pass it when already known) is computed, and its
        extractor built, once for both. `blocks` are the blocks to read, in one
        backbone pass (default: those the model's head reads).
        """
        fingerprint = fingerprint or model_fingerprint(model)
        blocks = sorted(blocks or model.feature_blocks)
        extractor = functools.cache(lambda: model.features_model(blocks))
        key_blocks = None if blocks == [model.block_count()] else blocks
        training = self._features(fingerprint, extractor, train, views, augment, seed, batch_size, progress, key_blocks)
        if validation is train or (train.fingerprint and validation.fingerprint == train.fingerprint):
            # cross-validation's plain view of the training images: their view 0, not extracted again
            return training, CachedFeatures(training.features[:1], training.labels)
        return training, self._features(fingerprint, extractor, validation, 1, "none", seed, batch_size, False,
                                        key_blocks)

    def _features(self, fingerprint, extractor, split, views, augment, seed, batch_size, progress,
                  blocks=None) -> CachedFeatures:
        key = cache_key(fingerprint, split, views, augment, seed, blocks)
        entry = self.load(key)
        if entry is not None:
            log.info("feature cache hit %s (%d images x %d views)", key, len(entry.labels), entry.views)
            return entry
        log.info("extracting features of %d images x %d views (cache %s)", split.count, views, key)
        # with several views, decode once and reread from memory (when it fits) for the others
        batches = split.batches(batch_size, cache_limit_mb=self.memory_limit_mb if views > 1 else 0)
        steps = math.ceil(split.count / batch_size)
        dim = int(extractor().output.shape[-1])
        shape = (views, split.count, dim)
        on_disk = int(np.prod(shape)) * 4 + split.count * 4 > self.memory_limit_mb * 2**20  # as `load` decides
        with staged_folder(self.path(key)) as staging:
            path = staging / "features.npy"
            # streamed into their place: in memory, or over the limit into the staged file (as `load` maps it)
            features = npy_rows(path, *shape) if on_disk else np.empty(shape, np.float32)
            for view in range(views):  # view 0: the plain images, as validation and serving see them
                _, labels = extract(extractor(), batches, augment if view > 0 else "none", seed + 1009 * view,
                                    progress, steps, out=features[view])
            labels = labels.astype(np.int32)
            if len(labels) < split.count:  # the split held fewer images than it counts
                log.info("features of %d images, of the %d counted", len(labels), split.count)
                features = _trimmed(features, path, len(labels))
            elif not on_disk:
                np.save(path, features)
            self._finish(staging, labels, (views, len(labels), dim), views * len(labels) * dim * 4)
        if not on_disk:
            return CachedFeatures(features, labels)
        return CachedFeatures(np.load(self.path(key) / "features.npy", mmap_mode="r"), labels)


def _trimmed(features: np.ndarray | list[RowWriter], path: Path, rows: int) -> np.ndarray | None:
    """Features keeping only the first `rows` rows of each view, saved to `path` (None: on disk)."""
    if isinstance(features, np.ndarray):
        features = np.ascontiguousarray(features[:, :rows])
        np.save(path, features)
        return features
    full = path.with_name("full.npy")
    os.replace(path, full)
    for old, new in zip(features, npy_rows(path, len(features), rows, features[0].dim)):
        for start in range(0, rows, 4096):  # read through the file too: nothing is mapped
            block = min(4096, rows - start)
            values = np.fromfile(full, np.float32, block * old.dim, offset=old.offset + start * old.dim * 4)
            new[start : start + block] = values.reshape(block, old.dim)
    full.unlink()
    return None
