"""Pipelines over cached features: each iteration is one epoch, in the order the image pipeline
would have drawn it, with the same class weights and rebalanced sampling (`kerastl.data.pipelines`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kerastl.data.pipelines import skip_epochs, weighted
from kerastl.features.cache import CachedFeatures


def feature_batches(
    cached: CachedFeatures, batch_size: int, training: bool = False, seed: int | None = None, first_epoch: int = 0,
    class_weights: np.ndarray | None = None, balanced: bool = False,
) -> tf.data.Dataset:
    """A pipeline over cached features; each iteration of it is one epoch.

    `class_weights`: each class's weight, given to the loss as sample weights (see `kerastl.data.pipelines`);
    `balanced`: when training, each epoch draws its rows by rebalanced sampling.

    One view in memory: the same cache -> shuffle -> batch structure and seed as
    the image pipeline, so batches come in the same order. Several views
    (augmentation on): the e-th iteration trains on view e % K, shuffled by a
    generator seeded with (seed, e). Memory-mapped features are streamed batch by
    batch, never read in whole. `first_epoch` starts at a later epoch (resuming)
    with the order that epoch has in an uninterrupted run.
    """
    in_memory = not isinstance(cached.features, np.memmap)
    balanced = balanced and training
    if in_memory and (not training or cached.views == 1) and not balanced:
        ds = tf.data.Dataset.from_tensor_slices((np.asarray(cached.features[0]), cached.labels)).cache()
        if training:
            ds = ds.shuffle(max(len(cached.labels), 1), seed=seed, reshuffle_each_iteration=True)
        return skip_epochs(weighted(ds.batch(batch_size), class_weights).prefetch(tf.data.AUTOTUNE), first_epoch)
    count, epochs_done = len(cached.labels), [first_epoch]

    def one_epoch():
        epoch = epochs_done[0]
        view = cached.features[epoch % cached.views] if training else cached.features[0]
        rng = np.random.default_rng([seed or 0, epoch])
        if balanced:
            order = balanced_order(cached.labels, rng)
        else:
            order = rng.permutation(count) if training else np.arange(count)
        epochs_done[0] += 1
        for start in range(0, count, batch_size):
            index = np.sort(order[start : start + batch_size])
            yield np.asarray(view[index]), cached.labels[index]

    dim = cached.features.shape[-1]
    signature = (tf.TensorSpec((None, dim), tf.float32), tf.TensorSpec((None,), tf.int32))
    ds = tf.data.Dataset.from_generator(one_epoch, output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))  # Keras then knows the steps
    return weighted(ds, class_weights)


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch's indices under rebalanced sampling (cached features, see `feature_batches`):
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
