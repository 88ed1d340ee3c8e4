"""Training pipelines: what each training example counts for.

- Class weights (`TrainConfig.class_weight`): "auto" weighs class c by
  n / (k * count_c) (scikit-learn's "balanced"), so every class carries the same
  total weight; or weights by hand. They reach the loss as Keras sample weights,
  the third element of each batch, on images and on cached features alike.
- Rebalanced sampling (`TrainConfig.sampling="balanced"`): an epoch keeps its length
  and gives every class the same number of draws (to within one), in a random order;
  each class's draws go through its images in a reshuffled order, rare ones repeating.
- MixUp and CutMix (`kerastl.augment.build_mixer`): integer labels are one-hot
  encoded and mixed with the images. A mixed example's weight is its label's mix of
  its classes' weights.

`training_batches` builds a split's training pipeline with all of them; validation
batches stay plain (integer labels, no weights), so validation loss is comparable
between runs whatever the recipe.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from kerastl.augment import build_augmenter, build_mixer
from kerastl.config import DataConfig, TrainConfig, parse_class_weight
from kerastl.data import Split
from kerastl.errors import KerastlError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


def class_weights(spec: str, counts: np.ndarray, class_names: list[str] | None = None) -> np.ndarray | None:
    """Each class's weight, in class order, for `spec` ("none", "auto", "cat=2,dog=1", "2,1").

    "auto" is n / (k * count_c) over the k classes that have training images (a class
    with none gets 0). Weights by name need `class_names`; every class left out weighs 1.
    """
    parsed = parse_class_weight(spec)
    counts = np.asarray(counts, np.float64)
    if parsed == "none":
        return None
    if parsed == "auto":
        present = counts > 0
        weights = np.zeros_like(counts)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights.astype(np.float32)
    if isinstance(parsed, list):
        if len(parsed) != len(counts):
            raise KerastlError(f"class_weight gives {len(parsed)} weights but there are {len(counts)} classes")
        return np.asarray(parsed, np.float32)
    names = list(class_names or [])
    unknown = sorted(set(parsed) - set(names))
    if unknown:
        raise KerastlError(f"class_weight names unknown classes {unknown}; classes: {', '.join(names)}")
    return np.asarray([parsed.get(name, 1.0) for name in names], np.float32)


def sample_weights(labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Per-example weights for a batch of integer labels [b] / [b, 1], or mixed one-hot rows [b, k],
    or mixed binary labels [b, 1] (floats): the label's mix of its classes' weights."""
    if labels.dtype.is_integer:
        return tf.gather(weights, tf.reshape(labels, [-1]))
    if labels.shape[-1] == 1 and weights.shape[0] == 2:  # a binary model's mixed label: its share of class 1
        share = tf.reshape(labels, [-1])
        return share * weights[1] + (1.0 - share) * weights[0]
    return tf.linalg.matvec(tf.cast(labels, tf.float32), weights)


def weighted(batches: tf.data.Dataset, weights: np.ndarray | None) -> tf.data.Dataset:
    """(x, y) batches -> (x, y, sample weight) for `weights` (unchanged when None)."""
    if weights is None:
        return batches
    constant = tf.constant(weights, tf.float32)
    return batches.map(lambda x, y: (x, y, sample_weights(y, constant)), num_parallel_calls=AUTOTUNE)


def mixed(batches: tf.data.Dataset, mixer, num_classes: int, binary: bool) -> tf.data.Dataset:
    """(x, integer y) batches -> MixUp/CutMix-mixed (x, y rows); a binary model's y is its class-1 share [b, 1]."""

    def mix(x, y):
        rows = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), num_classes)
        out = mixer({"images": x, "labels": rows}, training=True)
        labels = out["labels"][:, 1:2] if binary else out["labels"]
        return out["images"], tf.cast(labels, tf.float32)

    return batches.map(mix, num_parallel_calls=AUTOTUNE)


def balanced_sampler(labels: np.ndarray, seed: int | None):
    """A `Split.batches` resampler: an epoch of len(labels) draws, the classes (among those with
    images) drawn equally often in a random order, each class's images in a reshuffled order."""
    labels = np.asarray(labels)
    classes = [int(c) for c in np.unique(labels)]
    count = len(labels)

    def resample(dataset: tf.data.Dataset) -> tf.data.Dataset:
        streams = [dataset.filter(lambda x, y, c=c: tf.equal(tf.cast(y, tf.int64), c))
                   .shuffle(int((labels == c).sum()), seed=seed, reshuffle_each_iteration=True).repeat()
                   for c in classes]
        order = (tf.data.Dataset.range(count).map(lambda i: i % len(classes))
                 .shuffle(count, seed=seed, reshuffle_each_iteration=True))
        return tf.data.Dataset.choose_from_datasets(streams, order)

    return resample


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch's indices under rebalanced sampling (cached features, see `kerastl.train.feature_batches`):
    len(labels) draws, the classes equally often in a random order, each class's images in turn
    in a reshuffled order (repeating when the class has fewer images than draws)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    drawn = rng.permutation(np.resize(classes, len(labels)))
    order = np.empty(len(labels), np.int64)
    for c in classes:
        slots = np.flatnonzero(drawn == c)
        members = np.flatnonzero(labels == c)
        turns = -(-len(slots) // len(members))
        order[slots] = np.concatenate([rng.permutation(members) for _ in range(turns)])[:len(slots)]
    return order


def training_batches(split: Split, data: DataConfig, train: TrainConfig, num_classes: int, binary: bool,
                     weights: np.ndarray | None = None, cache_limit_mb: int | None = None) -> tf.data.Dataset:
    """A split's training pipeline: cached, (re)sampled, shuffled, batched, augmented, mixed and weighted.

    `weights` are the class weights (see `class_weights`); `cache_limit_mb` defaults to `data.cache_limit_mb`.
    """
    labels = split.labels
    resample = None
    if train.sampling == "balanced":
        labels = labels if labels is not None else np.array([int(y) for _, y in split.dataset])
        resample = balanced_sampler(labels, data.seed)
    batches = split.batches(data.batch_size, True, build_augmenter(data.augment, seed=data.seed), data.seed,
                            data.cache_limit_mb if cache_limit_mb is None else cache_limit_mb, resample=resample)
    mixer = build_mixer(data.augment, seed=data.seed)
    if mixer is not None:
        batches = mixed(batches, mixer, num_classes, binary)
    return weighted(batches, weights)


def is_mixed(batches: tf.data.Dataset) -> bool:
    """Whether a pipeline's labels are mixed (floats) rather than integer classes."""
    spec = batches.element_spec
    return isinstance(spec, tuple) and len(spec) > 1 and spec[1].dtype.is_floating
