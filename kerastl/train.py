"""Two-phase training on a held-out validation split: head on a frozen base, then fine-tuning.

Phase 1 trains the head with the base frozen (given cached backbone features, on
the classifier's head model, which shares its layers; see `kerastl.features`).
Given a convex start (`kerastl.probe`), the head starts from the converged linear
probe and EarlyStopping counts it as the best so far. Its budget is optimizer
steps: at least `min_steps`, whatever the dataset's size (epochs and patience are
raised to reach it); EarlyStopping on validation loss keeps the best epoch.
Phase 2 unfreezes the top blocks, recompiles with a lower learning rate and
continues from that converged head (LP-FT, Kumar et al. 2022); its EarlyStopping
starts from phase 1's best, so fine-tuning never leaves the model worse on
validation than phase 1 ended. Small data is cross-validated instead
(`kerastl.crossval`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from kerastl.classifier import TransferClassifier
from kerastl.compile import compile_classifier
from kerastl.config import TrainConfig
from kerastl.features import CachedFeatures
from kerastl.probe import DEFAULT_DEPTH, ProbeFit

log = logging.getLogger(__name__)

HEAD_STEPS_PER_EXECUTION = 32
START_LOSS = "start_val_loss"  # phase 1's starting (probe) loss, in its history: the best to beat


@dataclass
class TrainResult:
    """The Keras histories of both phases (phase2 is None when there was none)."""

    phase1: keras.callbacks.History
    phase2: keras.callbacks.History | None = None

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        """Both histories as plain lists, with the epochs each phase ran."""
        out = {}
        for name, history in (("phase1", self.phase1), ("phase2", self.phase2)):
            if history is not None:
                out[name] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
                out[name]["epoch"] = [int(e) for e in history.epoch]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, list[float]]]) -> TrainResult:
        """The inverse of `to_dict` (a stored phase 1 that a later run starts from)."""
        histories = {}
        for name in ("phase1", "phase2"):
            if values.get(name) is not None:
                history = keras.callbacks.History()
                metrics = dict(values[name])
                history.epoch = metrics.pop("epoch")
                history.history = metrics
                histories[name] = history
        return cls(histories["phase1"], histories.get("phase2"))


class KeepBest(keras.callbacks.EarlyStopping):
    """EarlyStopping on `val_loss` that restores the best weights, seeded with a known best.

    With `initial_best` (phase 1's best validation loss) the weights at the start
    of training count as the best so far, so training can only end better or equal.
    """

    def __init__(self, patience: int, initial_best: float | None = None):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self.initial_best = initial_best

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.initial_best is not None:
            self.best = self.initial_best
            self.best_weights = self.model.get_weights()


def epochs_for(epochs: int, min_steps: int, count: int, batch_size: int) -> int:
    """`epochs`, raised so that `count` examples in batches of `batch_size` make `min_steps` steps."""
    return max(epochs, math.ceil(min_steps / max(1, math.ceil(count / batch_size))))


def scaled_patience(patience: int, epochs: int, raised: int) -> int:
    """Patience raised in step with the epochs, so it stays the same share of the budget."""
    return max(patience, math.ceil(patience * raised / max(epochs, 1)))


def start_head(model: TransferClassifier, fit: ProbeFit) -> None:
    """Sets the classifier's standardisation, and a linear head's weights, to a fitted probe."""
    if model.feature_norm is not None:
        model.feature_norm.set_statistics(fit.standardizer.mean, fit.standardizer.scale)
    if model.hidden is None:
        model.output_dense.set_weights([fit.kernel, fit.bias])


def first_images(batches: tf.data.Dataset, count: int = 512) -> tf.Tensor:
    """Up to `count` images from a dataset of image or (image, label) batches."""
    gathered, total = [], 0
    for batch in batches:
        gathered.append(batch[0] if isinstance(batch, tuple) else batch)
        total += int(gathered[-1].shape[0])
        if total >= count:
            break
    return tf.concat(gathered, axis=0)[:count]


def recalibrate_batchnorm(model: TransferClassifier, images) -> int:
    """Sets every backbone BatchNorm's moving statistics to those of `images`.

    Keras BatchNorm momentum (0.99-0.999) leaves moving statistics far from the data
    after short training from scratch, so a model that trained well evaluates badly.
    This runs `images` (one un-augmented batch of training images, a few hundred is
    plenty) through the backbone once in training mode with momentum 0, so the moving
    statistics become exactly those of the sample; frozen or not, every BatchNorm
    layer is updated and left as it was found. Returns the number of layers updated.
    """
    norms = model.batchnorm_layers()
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    try:
        for layer in norms:  # a frozen BatchNorm ignores training=True: unfreeze it meanwhile
            layer.momentum, layer.trainable = 0.0, True
        if norms:
            x = tf.convert_to_tensor(images, tf.float32)
            model.backbone(model.preprocess_images(x), training=True)
    finally:
        for layer, (momentum, trainable) in zip(norms, saved):
            layer.momentum, layer.trainable = momentum, trainable
    return len(norms)


class BatchNormCalibration(keras.callbacks.Callback):
    """Recalibrates BatchNorm statistics on a fixed sample before every validation."""

    def __init__(self, images):
        super().__init__()
        self.images = tf.convert_to_tensor(images, tf.float32)

    def on_test_begin(self, logs=None):
        recalibrate_batchnorm(self.model, self.images)


def feature_batches(
    cached: CachedFeatures, batch_size: int, training: bool = False, seed: int | None = None
) -> tf.data.Dataset:
    """A pipeline over cached features; each iteration of it is one epoch.

    One view in memory: the same cache -> shuffle -> batch structure and seed as
    the image pipeline, so batches come in the same order. Several views
    (augmentation on): the e-th iteration trains on view e % K, reshuffled each time.
    Memory-mapped features are streamed batch by batch, never read in whole.
    """
    in_memory = not isinstance(cached.features, np.memmap)
    if in_memory and (not training or cached.views == 1):
        ds = tf.data.Dataset.from_tensor_slices((np.asarray(cached.features[0]), cached.labels)).cache()
        if training:
            ds = ds.shuffle(max(len(cached.labels), 1), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    count, rng, epochs_done = len(cached.labels), np.random.default_rng(seed), [0]

    def one_epoch():
        view = cached.features[epochs_done[0] % cached.views] if training else cached.features[0]
        order = rng.permutation(count) if training else np.arange(count)
        epochs_done[0] += 1
        for start in range(0, count, batch_size):
            index = np.sort(order[start : start + batch_size])
            yield np.asarray(view[index]), cached.labels[index]

    dim = cached.features.shape[-1]
    signature = (tf.TensorSpec((None, dim), tf.float32), tf.TensorSpec((None,), tf.int32))
    ds = tf.data.Dataset.from_generator(one_epoch, output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))  # Keras then knows the steps


def train_head(
    head: keras.Model,
    features: tuple[CachedFeatures, CachedFeatures],
    config: TrainConfig,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    start_is_best: bool = False,
) -> tuple[keras.callbacks.History, KeepBest]:
    """Phase 1 on cached (train, validation) features: trains `head` with KeepBest.

    At least `config.min_steps` steps (see `epochs_for`). With `start_is_best` (a
    convex start), the starting weights count as the best so far, at their validation
    loss as compiled (label smoothing included), recorded in the history as
    `START_LOSS`. Returns the history and the KeepBest callback (its `best` is the best val_loss).
    """
    epochs = epochs_for(config.epochs, config.min_steps, len(features[0].labels), batch_size)
    # head steps take microseconds: run many per call so Python overhead does not dominate
    compile_classifier(head, config, steps_per_execution=HEAD_STEPS_PER_EXECUTION)
    validation = feature_batches(features[1], batch_size)
    initial = head.evaluate(validation, verbose=0, return_dict=True)["loss"] if start_is_best else None
    stop = KeepBest(scaled_patience(config.patience, config.epochs, epochs), initial)
    history = head.fit(
        feature_batches(features[0], batch_size, True, seed), epochs=epochs,
        validation_data=validation,
        callbacks=[stop, *(callbacks or [])], shuffle=False, verbose=verbose,
    )
    if initial is not None:
        history.history[START_LOSS] = [initial]
    return history, stop


def fine_tune(
    model: TransferClassifier,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    phase1_best: float,
    initial_epoch: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    unfreeze_blocks: int | None = None,
) -> keras.callbacks.History | None:
    """Phase 2: unfreezes the top blocks and trains at the lower rate, never ending worse than `phase1_best`.

    At least `config.fine_tune_min_steps` steps; `unfreeze_blocks` is the depth
    when `config.unfreeze_blocks` is "auto". Returns None when there is nothing to fine-tune.
    """
    if not unfreeze_top(model, config, unfreeze_blocks):
        return None
    compile_classifier(model, config, config.learning_rate * config.fine_tune_lr_ratio)
    epochs = pipeline_epochs(config.fine_tune_epochs, config.fine_tune_min_steps, train_data)
    return model.fit(
        train_data, validation_data=validation_data, initial_epoch=initial_epoch, epochs=initial_epoch + epochs,
        callbacks=[KeepBest(scaled_patience(config.patience, config.fine_tune_epochs, epochs), phase1_best),
                   *(callbacks or [])],
        shuffle=False, verbose=verbose,
    )


def unfreeze_top(model: TransferClassifier, config: TrainConfig, depth: int | None) -> bool:
    """Unfreezes what phase 2 trains; False (and a log line) when that is nothing."""
    blocks = (depth or DEFAULT_DEPTH) if config.unfreeze_blocks == "auto" else config.unfreeze_blocks
    if config.fine_tune_epochs == 0 or model.unfreeze(blocks or 0, config.unfreeze_from) == 0:
        log.info("nothing to fine-tune (no epochs or no blocks); skipping phase 2")
        return False
    return True


def pipeline_epochs(epochs: int, min_steps: int, batches: tf.data.Dataset) -> int:
    """`epochs_for` a batched pipeline: its batches are its steps; unknown (a user's pipeline): `epochs`."""
    steps = int(batches.cardinality())
    return epochs_for(epochs, min_steps, steps, 1) if steps > 0 else epochs


def train_classifier(
    model: TransferClassifier,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    calibration_images=None,
    features: tuple[CachedFeatures, CachedFeatures] | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    phase1: keras.callbacks.History | None = None,
    after_phase1: Callable[[keras.callbacks.History], None] | None = None,
    head_start: ProbeFit | None = None,
    unfreeze_blocks: int | None = None,
) -> TrainResult:
    """Trains `model` in two phases (one when it trains from scratch).

    Args:
        model: a `TransferClassifier`.
        train_data: batched (images, labels), augmented if wanted.
        validation_data: batched (images, labels); drives EarlyStopping.
        config: epochs, learning rates, unfreezing.
        calibration_images: one batch of un-augmented training images (float32 0-255)
            for BatchNorm recalibration when training from scratch; defaults to the
            first 512 images of `train_data`.
        features: cached (train, validation) features of the frozen base: phase 1 then
            trains the classifier's head model on them.
        batch_size: phase-1 batch size on cached features.
        seed: phase-1 shuffle seed on cached features (use the image pipeline's).
        callbacks: extra Keras callbacks for both phases.
        verbose: passed to `fit`.
        phase1: the history of a phase 1 that already ran: the head holds its best
            weights, so training goes straight to phase 2.
        after_phase1: called with phase 1's history before phase 2 starts (to store the head).
        head_start: a linear probe fitted on the cached features (`kerastl.probe`):
            the head starts from it, and it counts as phase 1's best so far.
        unfreeze_blocks: the fine-tuning depth when `config.unfreeze_blocks` is "auto"
            (a probe curve's choice; `DEFAULT_DEPTH` when None).
    """
    config.validate()
    extra = list(callbacks or [])
    scratch = model.from_scratch
    if scratch:
        model.backbone.trainable = True
        sample = first_images(train_data) if calibration_images is None else calibration_images
        extra.append(BatchNormCalibration(sample))
    else:
        model.freeze_backbone()
    initial = None
    probe_start = head_start is not None and phase1 is None and not scratch
    if probe_start:
        start_head(model, head_start)
    if phase1 is not None:
        compile_classifier(model, config)
    elif features is not None and not scratch:
        phase1, _ = train_head(model.head_model(), features, config, batch_size, seed, callbacks=extra,
                               verbose=verbose, start_is_best=probe_start and model.hidden is None)
        compile_classifier(model, config)  # as the plain path leaves it
    else:
        compile_classifier(model, config)
        if probe_start and model.hidden is None:  # the head is the probe: its loss, as compiled, is the best so far
            initial = model.evaluate(validation_data, verbose=0, return_dict=True)["loss"]
        epochs = pipeline_epochs(config.epochs, config.min_steps, train_data)
        phase1 = model.fit(
            train_data, validation_data=validation_data, epochs=epochs,
            callbacks=[KeepBest(scaled_patience(config.patience, config.epochs, epochs), initial), *extra],
            shuffle=False, verbose=verbose,
        )
    if initial is not None:
        phase1.history[START_LOSS] = [initial]
    if after_phase1 is not None:
        after_phase1(phase1)  # a stored head keeps its start's loss: a later phase 2 must beat it too
    result = TrainResult(phase1)
    if not scratch:
        best = min(phase1.history["val_loss"] + phase1.history.get(START_LOSS, []))
        result.phase2 = fine_tune(model, train_data, validation_data, config, best, len(phase1.epoch),
                                  callbacks=extra, verbose=verbose, unfreeze_blocks=unfreeze_blocks)
    return result
