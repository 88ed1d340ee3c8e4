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

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from kerastl.batchnorm import BatchNormCalibration
from kerastl.callbacks import DAMAGED, EpochSnapshots, KeepBest, StopOnNaN, load_values, restore_snapshot, save_values
from kerastl.classifier import TransferClassifier
from kerastl.compile import compile_classifier, compile_fine_tuning
from kerastl.config import TrainConfig
from kerastl.features import CachedFeatures
from kerastl.pipelines import budget_steps, feature_batches, is_mixed, skip_epochs
from kerastl.probe import DEFAULT_DEPTH, ProbeFit
from kerastl.schedules import plateau_callbacks
from kerastl.storage import staged_folder

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
        constraint = model.output_dense.kernel_constraint  # a max-norm head starts within its norm
        kernel = fit.kernel if constraint is None else keras.ops.convert_to_numpy(constraint(fit.kernel))
        model.output_dense.set_weights([kernel, fit.bias])


def tensorboard_logs(log_dir: str | Path | None, phase: str) -> list[keras.callbacks.Callback]:
    """Keras's TensorBoard callback logging one phase into `log_dir/phase` (none without a `log_dir`)."""
    if log_dir is None:
        return []
    return [keras.callbacks.TensorBoard(str(Path(log_dir) / phase), write_graph=False)]


def first_images(batches: tf.data.Dataset, count: int = 512) -> tf.Tensor:
    """Up to `count` images from a dataset of image or (image, label) batches."""
    gathered, total = [], 0
    for batch in batches:
        gathered.append(batch[0] if isinstance(batch, tuple) else batch)
        total += int(gathered[-1].shape[0])
        if total >= count:
            break
    return tf.concat(gathered, axis=0)[:count]


def resumable_fit(
    model: keras.Model,
    make_train: Callable[[int], tf.data.Dataset],
    validation_data: tf.data.Dataset | None,
    epochs: int,
    stop: KeepBest | None,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str,
    snapshots: Path | None = None,
    initial_epoch: int = 0,
) -> keras.callbacks.History:
    """`model.fit` with `stop` (KeepBest, if any), NaN checks and, given `snapshots`, a snapshot per epoch.

    With `snapshots`, training resumes from the newest good snapshot there: weights,
    optimizer, KeepBest's state and the history so far; `make_train(k)` gives the
    training pipeline as it is after the first k epochs of this fit.
    """
    done = None if snapshots is None else restore_snapshot(snapshots, model, stop)
    start = initial_epoch if done is None else done["epoch"]
    before = {} if done is None else done["history"]
    if done is not None and (done["stopped"] or start >= epochs):  # it had ended: as KeepBest would end it
        if stop is not None and done["best_weights"] is not None:
            model.set_weights(done["best_weights"])
        make_train(start - initial_epoch)  # the pipeline as those epochs left it, for what comes next
        return _history(before, {})
    extra = [StopOnNaN(), *callbacks]
    if snapshots is not None:
        extra.append(EpochSnapshots(snapshots, stop, before))  # last: it saves what KeepBest decided
    history = model.fit(make_train(start - initial_epoch), validation_data=validation_data, initial_epoch=start,
                        epochs=epochs, callbacks=[*([stop] if stop else []), *extra], shuffle=False, verbose=verbose)
    return _history(before, {**history.history, "epoch": list(history.epoch)})


def _history(before: dict, after: dict) -> keras.callbacks.History:
    """One History of the epochs before a resume and those after it."""
    merged = {k: list(before.get(k, [])) + list(after.get(k, [])) for k in {*before, *after}}
    return TrainResult.from_dict({"phase1": {"epoch": [], **merged}}).phase1


def train_head(
    head: keras.Model,
    features: tuple[CachedFeatures, CachedFeatures],
    config: TrainConfig,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    start_is_best: bool = False,
    snapshots: Path | None = None,
    weights: np.ndarray | None = None,
) -> tuple[keras.callbacks.History, KeepBest]:
    """Phase 1 on cached (train, validation) features: trains `head` with KeepBest.

    At least `config.min_steps` steps (see `epochs_for`). With `start_is_best` (a
    convex start), the starting weights count as the best so far, at their validation
    loss as compiled (label smoothing included), recorded in the history as
    `START_LOSS`. `snapshots`: resume from and save epoch snapshots there. `weights`: class
    weights, on training and validation rows alike (the loss that training lowers is the one
    that chooses the epoch). Returns the history and the KeepBest callback (its `best` is the best val_loss).
    """
    epochs = epochs_for(config.epochs, config.min_steps, len(features[0].labels), batch_size)
    # head steps take microseconds: run many per call so Python overhead does not dominate
    compile_classifier(head, config, steps_per_execution=HEAD_STEPS_PER_EXECUTION, schedule=config.schedule,
                       steps=epochs * math.ceil(len(features[0].labels) / batch_size))
    validation = feature_batches(features[1], batch_size, weights=weights)
    initial = head.evaluate(validation, verbose=0, return_dict=True)["loss"] if start_is_best else None
    patience = scaled_patience(config.patience, config.epochs, epochs)
    stop = KeepBest(patience, initial)
    balanced = config.sampling == "balanced"
    history = resumable_fit(
        head, lambda first: feature_batches(features[0], batch_size, True, seed, first, weights, balanced),
        validation, epochs, stop, [*(callbacks or []), *plateau_callbacks(config.schedule, patience)], verbose,
        snapshots)
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
    snapshots: Path | None = None,
    skipped: int = 0,
) -> keras.callbacks.History | None:
    """Phase 2: unfreezes the top blocks and trains at the lower rate, never ending worse than `phase1_best`.

    At least `config.fine_tune_min_steps` steps; `unfreeze_blocks` is the depth
    when `config.unfreeze_blocks` is "auto". `snapshots`: resume from and save
    epoch snapshots there; `skipped`: epochs of `train_data` an uninterrupted run
    would have drawn before phase 2 that this process did not (a phase 1 read
    back from its backup). Returns None when there is nothing to fine-tune.
    """
    if not unfreeze_top(model, config, unfreeze_blocks):
        return None
    epochs = pipeline_epochs(config.fine_tune_epochs, config.fine_tune_min_steps, train_data)
    patience = scaled_patience(config.patience, config.fine_tune_epochs, epochs)
    extra = compile_fine_tuning(model, config, train_data, epochs, patience, initial_epoch)
    stop = KeepBest(patience, phase1_best)
    return resumable_fit(model, lambda first: skip_epochs(train_data, skipped + first), validation_data,
                         initial_epoch + epochs, stop, [*(callbacks or []), *extra], verbose, snapshots,
                         initial_epoch)


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


PHASE1_DONE = "phase1-done"


def save_phase1(backup_dir: Path, model: TransferClassifier, history: keras.callbacks.History, drawn: int) -> None:
    """Keeps a finished phase 1: every variable of the model (dropout seeds too), its history and
    the epochs of the training pipeline it drew."""
    with staged_folder(backup_dir / PHASE1_DONE) as staging:
        digest = save_values(staging / "variables.npz", model.variables)
        (staging / "phase1.json").write_text(json.dumps({**TrainResult(history).to_dict(), "drawn": drawn,
                                                         "digest": digest}))


def load_phase1(backup_dir: Path, model: TransferClassifier) -> tuple[keras.callbacks.History, int] | None:
    """A finished phase 1 kept by `save_phase1`, loaded into `model`; None when there is none or it is damaged."""
    folder = backup_dir / PHASE1_DONE
    if not folder.is_dir():
        return None
    try:
        values = json.loads((folder / "phase1.json").read_text())
        saved = load_values(folder / "variables.npz", values["digest"], model.variables)
    except DAMAGED as error:
        log.warning("the kept phase 1 in %s is damaged (%s); phase 1 runs again", folder, error)
        return None
    for variable, value in zip(model.variables, saved):
        variable.assign(value)
    log.info("phase 1 finished before the interruption: going on with phase 2")
    return TrainResult.from_dict(values).phase1, int(values.get("drawn", 0))


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
    backup_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    class_weights: np.ndarray | None = None,
) -> TrainResult:
    """Trains `model` in two phases (one when it trains from scratch).

    Args:
        model: a `TransferClassifier`.
        train_data: batched (images, labels), augmented if wanted.
        validation_data: batched (images, labels); drives EarlyStopping.
        config: epochs, learning rates, unfreezing.
        calibration_images: un-augmented training images (0-255, any dtype; uint8 keeps
            them small) for BatchNorm recalibration when training from scratch; defaults
            to the first 512 images of `train_data`.
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
        backup_dir: where both phases keep a snapshot per epoch and phase 1 its end
            result: a run killed and started again with the same folder resumes from
            the last completed epoch, in the phase it was in.
        log_dir: TensorBoard logs, `phase1/` and `phase2/` (phase 2's epochs number on from phase 1's).
        class_weights: each class's weight on cached features (image pipelines carry their own
            sample weights, see `kerastl.pipelines.training_batches`).

    Raises:
        kerastl.callbacks.NaNLoss: the loss became NaN or infinite (the snapshots are kept).
    """
    config.validate()
    extra = [*(callbacks or []), *tensorboard_logs(log_dir, "phase1")]
    backup = Path(backup_dir) if backup_dir is not None else None
    scratch = model.from_scratch
    if scratch:
        model.backbone.trainable = True
        sample = first_images(train_data) if calibration_images is None else calibration_images
        extra.append(BatchNormCalibration(sample, chunk_size=batch_size))
    else:
        model.freeze_backbone()
    initial, drawn, skipped = None, 0, 0
    kept = load_phase1(backup, model) if backup is not None and phase1 is None else None
    if kept is not None:
        phase1, skipped = kept
    probe_start = head_start is not None and phase1 is None and not scratch
    if probe_start:
        start_head(model, head_start)
    snapshots = backup / "phase1" if backup is not None else None
    if phase1 is not None:
        compile_classifier(model, config)
    elif features is not None and not scratch:
        phase1, _ = train_head(model.head_model(), features, config, batch_size, seed, callbacks=extra,
                               verbose=verbose, start_is_best=probe_start and model.hidden is None,
                               snapshots=snapshots, weights=class_weights)
        compile_classifier(model, config)  # as the plain path leaves it
    else:
        epochs = pipeline_epochs(config.epochs, config.min_steps, train_data)
        compile_classifier(model, config, schedule=config.schedule, steps=budget_steps(epochs, train_data),
                           mixed=is_mixed(train_data))
        if probe_start and model.hidden is None:  # the head is the probe: its loss, as compiled, is the best so far
            initial = model.evaluate(validation_data, verbose=0, return_dict=True)["loss"]
        patience = scaled_patience(config.patience, config.epochs, epochs)
        stop = KeepBest(patience, initial)
        phase1 = resumable_fit(model, lambda first: skip_epochs(train_data, first), validation_data, epochs, stop,
                               [*extra, *plateau_callbacks(config.schedule, patience)], verbose, snapshots)
        drawn = len(phase1.epoch)
    if initial is not None:
        phase1.history[START_LOSS] = [initial]
    if backup is not None and kept is None:
        save_phase1(backup, model, phase1, drawn)
    if after_phase1 is not None and kept is None:
        after_phase1(phase1)  # a stored head keeps its start's loss: a later phase 2 must beat it too
    result = TrainResult(phase1)
    if not scratch:
        best = min(phase1.history["val_loss"] + phase1.history.get(START_LOSS, []))
        result.phase2 = fine_tune(model, train_data, validation_data, config, best, len(phase1.epoch),
                                  callbacks=[*(callbacks or []), *tensorboard_logs(log_dir, "phase2")],
                                  verbose=verbose, unfreeze_blocks=unfreeze_blocks,
                                  snapshots=backup / "phase2" if backup is not None else None, skipped=skipped)
    return result
