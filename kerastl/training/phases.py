"""Two-phase training on a held-out validation split: head on a frozen base, then fine-tuning.

Phase 1 trains the head with the base frozen (given cached backbone features, on
the classifier's head model, which shares its layers; see `kerastl.features.cache`).
Given a convex start (`kerastl.features.probe`), the head starts from the converged linear
probe and EarlyStopping counts it as the best so far. Its budget is optimizer
steps: at least `min_steps`, whatever the dataset's size (epochs and patience are
raised to reach it); EarlyStopping on validation loss keeps the best epoch.
Phase 2 unfreezes the top blocks, recompiles with a lower learning rate and
continues from that converged head (LP-FT, Kumar et al. 2022); its EarlyStopping
starts from phase 1's best, so fine-tuning never leaves the model worse on
validation than phase 1 ended. Small data is cross-validated instead
(`kerastl.training.crossval`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import TrainConfig
from kerastl.data.pipelines import budget_steps, is_mixed, skip_epochs
from kerastl.features.batches import feature_batches
from kerastl.features.cache import CachedFeatures
from kerastl.features.probe import ProbeFit
from kerastl.models.classifier import TransferClassifier
from kerastl.storage import staged_folder
from kerastl.training.batchnorm import BatchNormCalibration
from kerastl.training.callbacks import (
    DAMAGED,
    KeepBest,
    load_values,
    save_values,
)
from kerastl.training.compile import compile_classifier, compile_fine_tuning
from kerastl.training.phase import PhasePlan, batches_per_epoch, fit_phase, plan_phases
from kerastl.training.schedules import plateau_callbacks

log = logging.getLogger(__name__)

HEAD_STEPS_PER_EXECUTION = 32
START_LOSS = "start_val_loss"  # phase 1's starting (probe) loss, in its history: the best to beat


@dataclass
class TrainResult:
    """The Keras histories of both phases (phase2 is None when there was none), and on small data
    the rule that decided whether phase 2 ran and for how long (`kerastl.training.crossval`)."""

    phase1: keras.callbacks.History
    phase2: keras.callbacks.History | None = None
    fine_tune_rule: str | None = None

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


def train_head(
    head: keras.Model,
    cached: tuple[CachedFeatures, CachedFeatures],
    config: TrainConfig,
    phase: PhasePlan,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    start_is_best: bool = False,
    snapshots: Path | None = None,
    class_weights: np.ndarray | None = None,
) -> tuple[keras.callbacks.History, KeepBest]:
    """Phase 1 on `cached` (train, validation) features: trains `head` with KeepBest for `phase`.

    With `start_is_best` (a convex start), the starting weights count as the best so far, at
    their validation loss as compiled (label smoothing included), recorded in the history as
    `START_LOSS`. `snapshots`: resume from and save epoch snapshots there. `class_weights`:
    each class's weight, on training and validation rows alike (the loss that training lowers is the one
    that chooses the epoch). Returns the history and the KeepBest callback (its `best` is the best val_loss).
    """
    # head steps take microseconds: run many per call so Python overhead does not dominate
    compile_classifier(head, config, phase.learning_rate, steps_per_execution=HEAD_STEPS_PER_EXECUTION,
                       schedule=phase.schedule, steps=phase.steps, jit_compile=phase.jit_compile)
    validation = feature_batches(cached[1], batch_size, class_weights=class_weights)
    initial = head.evaluate(validation, verbose=0, return_dict=True)["loss"] if start_is_best else None
    stop = KeepBest(phase.patience, initial)
    balanced = config.sampling == "balanced"
    history = fit_phase(
        head, phase, lambda first: feature_batches(cached[0], batch_size, True, seed, first, class_weights, balanced),
        validation, stop, [*(callbacks or []), *plateau_callbacks(phase.schedule, phase.patience)], verbose,
        snapshots)
    if initial is not None:
        history.history[START_LOSS] = [initial]
    return history, stop


def fine_tune(
    model: TransferClassifier,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    phase: PhasePlan | None,
    phase1_best: float,
    initial_epoch: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    snapshots: Path | None = None,
    skipped: int = 0,
) -> keras.callbacks.History | None:
    """Phase 2: unfreezes what `phase` says and trains at its lower rate, never ending worse than `phase1_best`.

    `snapshots`: resume from and save epoch snapshots there; `skipped`: epochs of `train_data`
    an uninterrupted run would have drawn before phase 2 that this process did not (a phase 1
    read back from its backup). Returns None when there is nothing to fine-tune.
    """
    if not unfreeze_top(model, phase, config.unfreeze_from):
        return None
    extra = compile_fine_tuning(model, config, train_data, phase, initial_epoch)
    stop = KeepBest(phase.patience, phase1_best)
    return fit_phase(model, phase, lambda first: skip_epochs(train_data, skipped + first), validation_data, stop,
                     [*(callbacks or []), *extra], verbose, snapshots, initial_epoch)


def unfreeze_top(model: TransferClassifier, phase: PhasePlan | None, unfreeze_from: str | None = None) -> bool:
    """Unfreezes what phase 2 trains; False (and a log line) when that is nothing."""
    if phase is None or model.unfreeze(phase.unfreeze or 0, unfreeze_from) == 0:
        log.info("nothing to fine-tune (no epochs or no blocks); skipping phase 2")
        return False
    return True


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


@dataclass
class Phase1Outcome:
    """How phase 1 ended: its history, whether it was read back from a kept backup (a resumed run),
    and the epochs of the training pipeline it drew that a resumed process did not."""

    history: keras.callbacks.History
    kept: bool = False
    skipped: int = 0


def train_phase1(
    model: TransferClassifier,
    phase: PhasePlan,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    *,
    cached: tuple[CachedFeatures, CachedFeatures] | None = None,
    start: ProbeFit | None = None,
    stored: keras.callbacks.History | None = None,
    calibration_images=None,
    batch_size: int = 32,
    seed: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    backup: Path | None = None,
    log_dir: str | Path | None = None,
    class_weights: np.ndarray | None = None,
) -> Phase1Outcome:
    """Phase 1 as `phase` plans it: the head on the frozen base (on `cached` features when given), or
    every layer from scratch; a `stored` head's history stands for it, and so does one kept in
    `backup` by a run that was killed after it. See `train_classifier` for the arguments (`cached`
    is its `features`, `start` its `head_start`, `stored` its `phase1`)."""
    extra = [*(callbacks or []), *tensorboard_logs(log_dir, "phase1")]
    scratch = model.from_scratch
    if scratch:
        model.backbone.trainable = True
        sample = first_images(train_data) if calibration_images is None else calibration_images
        extra.append(BatchNormCalibration(sample, chunk_size=batch_size))
    else:
        model.freeze_backbone()
    kept = load_phase1(backup, model) if backup is not None and stored is None else None
    if kept is not None:
        stored = kept[0]
    probe_start = start is not None and stored is None and not scratch
    if probe_start:
        start_head(model, start)
    snapshots = backup / "phase1" if backup is not None else None
    initial, drawn = None, 0
    if stored is not None:
        history = stored
        compile_classifier(model, config, jit_compile=phase.jit_compile)
    elif cached is not None and not scratch:
        history, _ = train_head(model.head_model(), cached, config, phase, batch_size, seed, callbacks=extra,
                                verbose=verbose, start_is_best=probe_start and model.hidden is None,
                                snapshots=snapshots, class_weights=class_weights)
        compile_classifier(model, config, jit_compile=phase.jit_compile)  # as the plain path leaves it
    else:
        compile_classifier(model, config, phase.learning_rate, schedule=phase.schedule,
                           steps=budget_steps(phase.epochs, train_data), mixed=is_mixed(train_data),
                           jit_compile=phase.jit_compile)
        if probe_start and model.hidden is None:  # the head is the probe: its loss, as compiled, is the best so far
            initial = model.evaluate(validation_data, verbose=0, return_dict=True)["loss"]
        stop = KeepBest(phase.patience, initial)
        history = fit_phase(model, phase, lambda first: skip_epochs(train_data, first), validation_data, stop,
                            [*extra, *plateau_callbacks(phase.schedule, phase.patience)], verbose, snapshots)
        drawn = len(history.epoch)
    if initial is not None:
        history.history[START_LOSS] = [initial]
    if backup is not None and kept is None:
        save_phase1(backup, model, history, drawn)
    return Phase1Outcome(history, kept is not None, kept[1] if kept is not None else 0)


def train_phase2(
    model: TransferClassifier,
    phase: PhasePlan | None,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    config: TrainConfig,
    first: Phase1Outcome,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    backup: Path | None = None,
    log_dir: str | Path | None = None,
) -> keras.callbacks.History | None:
    """Phase 2 as `phase` plans it (None: none), starting from the `first` phase's best validation loss
    (a stored head keeps its start's loss: phase 2 must beat it too)."""
    if model.from_scratch:
        return None
    history = first.history
    best = min(history.history["val_loss"] + history.history.get(START_LOSS, []))
    return fine_tune(model, train_data, validation_data, config, phase, best, len(history.epoch),
                     callbacks=[*(callbacks or []), *tensorboard_logs(log_dir, "phase2")], verbose=verbose,
                     snapshots=backup / "phase2" if backup is not None else None, skipped=first.skipped)


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
    head_start: ProbeFit | None = None,
    unfreeze_blocks: int | None = None,
    backup_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    class_weights: np.ndarray | None = None,
    phases: tuple[PhasePlan, ...] | None = None,
) -> TrainResult:
    """Trains `model` in two phases (one when it trains from scratch).

    Args:
        model: a `TransferClassifier`.
        train_data: batched (images, labels), augmented if wanted.
        validation_data: batched (images, labels); drives EarlyStopping.
        config: a valid TrainConfig: learning rates, optimizer, loss, unfreezing.
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
        head_start: a linear probe fitted on the cached features (`kerastl.features.probe`):
            the head starts from it, and it counts as phase 1's best so far.
        unfreeze_blocks: the fine-tuning depth when `config.unfreeze_blocks` is "auto"
            (a probe curve's choice; `DEFAULT_DEPTH` when None).
        backup_dir: where both phases keep a snapshot per epoch and phase 1 its end
            result: a run killed and started again with the same folder resumes from
            the last completed epoch, in the phase it was in.
        log_dir: TensorBoard logs, `phase1/` and `phase2/` (phase 2's epochs number on from phase 1's).
        class_weights: each class's weight on cached features (image pipelines carry their own
            sample weights, see `kerastl.data.pipelines.training_batches`).
        phases: the phases as planned (`kerastl.training.phase.plan_phases`); planned from
            `config` and the data when None.

    Raises:
        kerastl.training.callbacks.NaNLoss: the loss became NaN or infinite (the snapshots are kept).
    """
    if phases is None:
        on_features = features is not None and not model.from_scratch
        head_steps = math.ceil(len(features[0].labels) / batch_size) if on_features else batches_per_epoch(train_data)
        phases = plan_phases(config, model.from_scratch, head_steps, batches_per_epoch(train_data), unfreeze_blocks)
    backup = Path(backup_dir) if backup_dir is not None else None
    first = train_phase1(model, phases[0], train_data, validation_data, config, cached=features, start=head_start,
                         stored=phase1, calibration_images=calibration_images, batch_size=batch_size, seed=seed,
                         callbacks=callbacks, verbose=verbose, backup=backup, log_dir=log_dir,
                         class_weights=class_weights)
    second = train_phase2(model, phases[1] if len(phases) > 1 else None, train_data, validation_data, config, first,
                          callbacks, verbose, backup, log_dir)
    return TrainResult(first.history, second)
