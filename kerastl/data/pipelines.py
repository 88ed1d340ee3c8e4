"""Training pipelines: what each training example counts for.

- Class weights (`TrainConfig.class_weight`): "auto" weighs class c by
  n / (k * count_c) (scikit-learn's "balanced"), so every class carries the same
  total weight; or weights by hand. They reach the loss as Keras sample weights,
  the third element of each batch, on images and on cached features alike.
- Rebalanced sampling (`TrainConfig.sampling="balanced"`): an epoch keeps its length
  and draws the classes equally often, rare classes' images repeating. On images it is
  rejection sampling of the reshuffled stream (each draw's class equally likely; one
  cache, one shuffle buffer); on cached features every class gets the same number of
  draws to within one (`kerastl.features.batches`).
- MixUp and CutMix (`kerastl.data.augment.build_mixer`): integer labels are one-hot
  encoded and mixed with the images. A mixed example's weight is its label's mix of
  its classes' weights.

`training_batches` builds a split's training pipeline with all of them. Validation
batches keep integer labels and get the same class weights (`weighted`), so the
validation loss that chooses epochs is the loss being trained; scores stay unweighted.
"""

from __future__ import annotations

import logging
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import DataConfig, TrainConfig, parse_class_weight
from kerastl.data.augment import build_augmenter, build_mixer
from kerastl.data.images import Split
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
    if labels.shape.rank == 1 or labels.shape[-1] == 1:
        if weights.shape[0] == 2:  # a binary model's label, mixed or not: its share of class 1
            share = tf.cast(tf.reshape(labels, [-1]), tf.float32)
            return share * weights[1] + (1.0 - share) * weights[0]
        return tf.gather(weights, tf.cast(tf.reshape(labels, [-1]), tf.int32))  # class indices as floats
    return tf.linalg.matvec(tf.cast(labels, tf.float32), weights)


def weighted(batches: tf.data.Dataset, weights: np.ndarray | None) -> tf.data.Dataset:
    """(x, y) batches -> (x, y, sample weight) for `weights` (unchanged when None)."""
    if weights is None:
        return batches
    constant = tf.constant(weights, tf.float32)
    return batches.map(lambda x, y: (x, y, sample_weights(y, constant)), num_parallel_calls=AUTOTUNE)


def mixed(batches: tf.data.Dataset, mixer: keras.layers.Layer, num_classes: int, binary: bool) -> tf.data.Dataset:
    """(x, integer y) batches -> MixUp/CutMix-mixed (x, y rows); a binary model's y is its class-1 share [b, 1]."""

    @tf.autograph.experimental.do_not_convert  # straight-line code: nothing for AutoGraph to convert
    def mix(x, y):
        rows = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), num_classes)
        out = mixer({"images": x, "labels": rows}, training=True)
        labels = out["labels"][:, 1:2] if binary else out["labels"]
        return out["images"], tf.cast(labels, tf.float32)

    return batches.map(mix, num_parallel_calls=AUTOTUNE)


def balanced_sampler(counts: np.ndarray, seed: int | None) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A `Split.batches` resampler: rejection sampling of the reshuffled stream of images, keeping an
    image of class c with probability (smallest count) / count_c, so each kept image's class is
    equally likely. It reads about n / (k * smallest count) images per draw (from the cache)."""
    counts = np.asarray(counts, np.float64)
    keep = tf.constant(np.where(counts > 0, counts[counts > 0].min() / np.maximum(counts, 1), 0.0), tf.float32)

    def resample(stream: tf.data.Dataset) -> tf.data.Dataset:
        coins = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).map(
            lambda r: tf.cast(r % 2**24, tf.float32) / 2**24)
        kept = tf.data.Dataset.zip((stream, coins)).filter(
            lambda element, coin: coin < tf.gather(keep, tf.cast(element[1], tf.int32)))
        return kept.map(lambda element, coin: element)

    return resample


def training_batches(split: Split, data: DataConfig, train: TrainConfig, num_classes: int, binary: bool,
                     weights: np.ndarray | None = None, cache_limit_mb: int | None = None) -> tf.data.Dataset:
    """A split's training pipeline: cached, (re)sampled, shuffled, batched, augmented, mixed and weighted.

    `weights` are the class weights (see `class_weights`); `cache_limit_mb` defaults to `data.cache_limit_mb`.
    """
    resample = balanced_sampler(split.class_counts(num_classes), data.seed) if train.sampling == "balanced" else None
    batches = split.batches(data.batch_size, True, build_augmenter(data.augment, seed=data.seed), data.seed,
                            data.cache_limit_mb if cache_limit_mb is None else cache_limit_mb, resample=resample)
    mixer = build_mixer(data.augment, seed=data.seed)
    if mixer is not None:
        batches = mixed(batches, mixer, num_classes, binary)
    return weighted(batches, weights)


def budget_steps(epochs: int, batches: tf.data.Dataset) -> int | None:
    """A phase's optimizer steps, `epochs` of `batches`; None when the pipeline's length is unknown."""
    steps = int(batches.cardinality())
    return epochs * steps if steps > 0 else None


# Keras's fit makes two iterators per epoch of a dataset of known length: one when the epoch
# starts and one, left unused, when it ends (tests/test_killed_runs.py pins the resumed order).
ITERATORS_PER_EPOCH = 2


def skip_epochs(batches: tf.data.Dataset, epochs: int) -> tf.data.Dataset:
    """`batches` as `fit` leaves it after `epochs` epochs: a reshuffling pipeline draws its next
    order whenever an iterator is made, so making (and dropping) those iterators reads no data."""
    for _ in range(ITERATORS_PER_EPOCH * epochs):
        iter(batches)
    return batches


def is_mixed(batches: tf.data.Dataset) -> bool:
    """Whether a pipeline's labels are mixed (floats) rather than integer classes."""
    spec = batches.element_spec
    return isinstance(spec, tuple) and len(spec) > 1 and spec[1].dtype.is_floating
