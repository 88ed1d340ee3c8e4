"""Two-phase training: head on a frozen base, then fine-tuning the top blocks.

Phase 1 trains the head with the base frozen (given cached backbone features, on
a copy of the head whose weights then go back into the model; see
`kerastl.features`); EarlyStopping on validation loss keeps the best epoch.
Phase 2 unfreezes the top blocks, recompiles with a lower learning rate and
continues; its EarlyStopping starts from phase 1's best, so fine-tuning never
leaves the model worse on validation than phase 1 ended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import TrainConfig
from kerastl.errors import KerastlError
from kerastl.features import CachedFeatures
from kerastl.model import HEAD_LAYERS, freeze_base, get_backbone, head_on_features, unfreeze

log = logging.getLogger(__name__)

HEAD_STEPS_PER_EXECUTION = 32


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


def first_images(batches: tf.data.Dataset, count: int = 512) -> tf.Tensor:
    """Up to `count` images from a dataset of image or (image, label) batches."""
    gathered, total = [], 0
    for batch in batches:
        gathered.append(batch[0] if isinstance(batch, tuple) else batch)
        total += int(gathered[-1].shape[0])
        if total >= count:
            break
    return tf.concat(gathered, axis=0)[:count]


def recalibrate_batchnorm(model: keras.Model, images) -> int:
    """Sets every backbone BatchNorm's moving statistics to those of `images`.

    Keras BatchNorm momentum (0.99-0.999) leaves moving statistics far from the data
    after short training from scratch, so a model that trained well evaluates badly.
    This runs `images` (one un-augmented batch of training images, a few hundred is
    plenty) through the backbone once in training mode with momentum 0, so the moving
    statistics become exactly those of the sample; frozen or not, every BatchNorm
    layer is updated and left as it was found. Returns the number of layers updated.
    """
    backbone = get_backbone(model)
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    try:
        for layer in norms:  # a frozen BatchNorm ignores training=True: unfreeze it meanwhile
            layer.momentum, layer.trainable = 0.0, True
        if norms:
            x = tf.convert_to_tensor(images, tf.float32)
            backbone(model.get_layer("preprocess")(model.get_layer("resize")(x)), training=True)
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


def head_model(model: keras.Model) -> keras.Model:
    """A copy of the classifier's head (dropout, hidden, softmax) taking pooled features.

    It starts from the classifier's current head weights and dropout random state, so
    training it on cached features follows the same path as training the full model.
    """
    names = {layer.name for layer in model.layers}
    copies = [type(layer).from_config(layer.get_config())
              for layer in (model.get_layer(name) for name in HEAD_LAYERS if name in names)]
    head = head_on_features(copies, model.get_layer("pool").output.shape[-1])
    graft_head(model, head)
    return head


def graft_head(source: keras.Model, target: keras.Model) -> None:
    """Copies the head layers' weights (and dropout random state) from `source` to `target`."""
    names = {layer.name for layer in target.layers}
    for name in HEAD_LAYERS:
        if name in names:
            src, dst = source.get_layer(name), target.get_layer(name)
            dst.set_weights(src.get_weights())
            if hasattr(src, "seed_generator"):
                dst.seed_generator.state.assign(src.seed_generator.state)


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


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name ("adam", "sgd", "adamw", ...), with decoupled weight decay."""
    values = {"learning_rate": learning_rate}
    if weight_decay:
        values["weight_decay"] = weight_decay
    try:
        return keras.optimizers.get({"class_name": name, "config": values})
    except (ValueError, TypeError):
        raise KerastlError(f"unknown optimizer {name!r}; use a Keras optimizer name such as adam or sgd") from None


@keras.saving.register_keras_serializable(package="kerastl")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy on integer labels with label smoothing (Keras's sparse loss has none)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        depth = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), depth)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(name: str, binary: bool, label_smoothing: float = 0.0) -> keras.losses.Loss:
    """The loss by Keras name; "auto" is (sparse categorical or binary) cross-entropy, smoothed if asked."""
    if name == "auto" and label_smoothing:
        if binary:
            return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        return SparseSmoothedCrossentropy(label_smoothing)
    if label_smoothing:
        raise KerastlError("label_smoothing needs loss auto (cross-entropy)")
    if name == "auto":
        name = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
    try:
        return keras.losses.get(name)
    except (ValueError, TypeError):
        raise KerastlError(f"unknown loss {name!r}; use auto or a Keras loss name") from None


def compile_classifier(
    model: keras.Model, config: TrainConfig, learning_rate: float | None = None, steps_per_execution: int = 1
) -> None:
    """Compiles with a fresh optimizer, the loss (see `TrainConfig`) and accuracy.

    `learning_rate` defaults to `config.learning_rate` (phase 2 passes its lower rate).
    """
    binary = model.output_shape[-1] == 1
    rate = config.learning_rate if learning_rate is None else learning_rate
    model.compile(optimizer=make_optimizer(config.optimizer, rate, config.weight_decay),
                  loss=make_loss(config.loss, binary, config.label_smoothing),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)


def train_head(
    head: keras.Model,
    features: tuple[CachedFeatures, CachedFeatures],
    config: TrainConfig,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
) -> tuple[keras.callbacks.History, KeepBest]:
    """Phase 1 on cached (train, validation) features: trains `head` with KeepBest.

    Returns the history and the KeepBest callback (its `best` is the best val_loss).
    """
    stop = KeepBest(config.patience)
    # head steps take microseconds: run many per call so Python overhead does not dominate
    compile_classifier(head, config, steps_per_execution=HEAD_STEPS_PER_EXECUTION)
    history = head.fit(
        feature_batches(features[0], batch_size, True, seed), epochs=config.epochs,
        validation_data=feature_batches(features[1], batch_size),
        callbacks=[stop, *(callbacks or [])], shuffle=False, verbose=verbose,
    )
    return history, stop


def fine_tune(
    model: keras.Model,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    phase1_best: float,
    initial_epoch: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
) -> keras.callbacks.History | None:
    """Phase 2: unfreezes the top blocks and trains at the lower rate, never ending worse than `phase1_best`.

    Returns None when there is nothing to fine-tune.
    """
    if config.fine_tune_epochs == 0 or unfreeze(model, config.unfreeze_blocks, config.unfreeze_from) == 0:
        log.info("nothing to fine-tune (no epochs or no blocks); skipping phase 2")
        return None
    compile_classifier(model, config, config.learning_rate * config.fine_tune_lr_ratio)
    return model.fit(
        train_data, validation_data=validation_data, initial_epoch=initial_epoch,
        epochs=initial_epoch + config.fine_tune_epochs,
        callbacks=[KeepBest(config.patience, initial_best=phase1_best), *(callbacks or [])], shuffle=False,
        verbose=verbose,
    )


def train_classifier(
    model: keras.Model,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    from_scratch: bool = False,
    calibration_images=None,
    features: tuple[CachedFeatures, CachedFeatures] | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
) -> TrainResult:
    """Trains `model` in two phases (one when `from_scratch`).

    Args:
        model: a kerastl classifier.
        train_data: batched (images, labels), augmented if wanted.
        validation_data: batched (images, labels); drives EarlyStopping.
        config: epochs, learning rates, unfreezing.
        from_scratch: train every layer at once and skip fine-tuning.
        calibration_images: one batch of un-augmented training images (float32 0-255)
            for BatchNorm recalibration when training from scratch; defaults to the
            first 512 images of `train_data`.
        features: cached (train, validation) features of the frozen base: phase 1 then
            trains a copy of the head on them and grafts its weights into `model`.
        batch_size: phase-1 batch size on cached features.
        seed: phase-1 shuffle seed on cached features (use the image pipeline's).
        callbacks: extra Keras callbacks for both phases.
        verbose: passed to `fit`.
    """
    config.validate()
    extra = list(callbacks or [])
    if from_scratch:
        get_backbone(model).trainable = True
        sample = first_images(train_data) if calibration_images is None else calibration_images
        extra.append(BatchNormCalibration(sample))
    else:
        freeze_base(model)
    if features is not None and not from_scratch:
        head = head_model(model)
        phase1, phase1_stop = train_head(head, features, config, batch_size, seed, callbacks=extra, verbose=verbose)
        graft_head(head, model)
        compile_classifier(model, config)  # as the plain path leaves it
    else:
        phase1_stop = KeepBest(config.patience)
        compile_classifier(model, config)
        phase1 = model.fit(
            train_data, validation_data=validation_data, epochs=config.epochs,
            callbacks=[phase1_stop, *extra], shuffle=False, verbose=verbose,
        )
    result = TrainResult(phase1)
    if not from_scratch:
        result.phase2 = fine_tune(model, train_data, validation_data, config, phase1_stop.best,
                                  len(phase1.epoch), callbacks=extra, verbose=verbose)
    return result
