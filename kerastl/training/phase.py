"""One training phase: its resolved settings (`PhasePlan`) and `fit_phase`, the one caller of Keras
`fit` for training.

A phase's budget is optimizer steps as well as epochs: at least `min_steps`, whatever the
data's size, so epochs are raised to reach the step floor and patience is raised with them
(it stays the same share of the budget). `plan_phase` works that out once, when a run is
planned; everything that trains (the head on cached features, the whole network from scratch,
fine-tuning, every cross-validation fold and the final fit on every image) then runs the
`PhasePlan` it is handed through `fit_phase`, which adds NaN checks, keeping the best epoch and,
given a folder, a snapshot per epoch to resume from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

from kerastl.config import PhaseConfig, TrainConfig
from kerastl.features.blocks import DEFAULT_DEPTH
from kerastl.training.callbacks import EpochSnapshots, KeepBest, StopOnNaN, restore_snapshot

PHASES = ("head", "fine_tune", "scratch")  # the head on a frozen base, fine-tuning, or every layer from scratch


@dataclass(frozen=True)
class PhasePlan:
    """One phase as it will run.

    Attributes:
        name: one of `PHASES`.
        epochs: the epochs it runs at most: the configured epochs, raised to reach its step floor.
        patience: early-stopping patience, raised in step with the epochs.
        learning_rate: the rate it starts from (fine-tuning: the head's rate times its ratio).
        schedule: one of `kerastl.config.SCHEDULES`.
        steps_per_epoch: batches in one epoch; None when a pipeline's length is unknown.
        unfreeze: fine-tuning only: the backbone blocks it trains, or the layer name it trains from.
        jit_compile: XLA, as `compile` takes it (True, False or Keras's "auto"; see
            `kerastl.training.distribute.DevicePlan`).
    """

    name: str
    epochs: int
    patience: int
    learning_rate: float
    schedule: str
    steps_per_epoch: int | None = None
    unfreeze: int | str | None = None
    jit_compile: bool | str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def steps(self) -> int | None:
        """The phase's optimizer steps, when its epochs' length is known."""
        return self.epochs * self.steps_per_epoch if self.steps_per_epoch else None


def epochs_for(epochs: int, min_steps: int, count: int, batch_size: int) -> int:
    """`epochs`, raised so that `count` examples in batches of `batch_size` make `min_steps` steps."""
    return max(epochs, math.ceil(min_steps / max(1, math.ceil(count / batch_size))))


def scaled_patience(patience: int, epochs: int, raised: int) -> int:
    """Patience raised in step with the epochs, so it stays the same share of the budget."""
    return max(patience, math.ceil(patience * raised / max(epochs, 1)))


def batches_per_epoch(batches: tf.data.Dataset) -> int | None:
    """A batched pipeline's batches (its steps per epoch); None when its length is unknown."""
    steps = int(batches.cardinality())
    return steps if steps > 0 else None


def plan_phase(name: str, epochs: int, min_steps: int, patience: int, learning_rate: float, schedule: str,
               steps_per_epoch: int | None, unfreeze: int | str | None = None) -> PhasePlan:
    """A phase of at least `epochs` and `min_steps` steps (unknown epoch length: `epochs` as given)."""
    raised = epochs_for(epochs, min_steps, steps_per_epoch, 1) if steps_per_epoch else epochs
    return PhasePlan(name, raised, scaled_patience(patience, epochs, raised), learning_rate, schedule,
                     steps_per_epoch, unfreeze)


def phase_from(name: str, phase: PhaseConfig, config: TrainConfig, steps_per_epoch: int | None,
               unfreeze: int | str | None = None) -> PhasePlan:
    """The plan of one of `config`'s two phases (`config.head` or `config.fine_tune`): its rate is
    `phase.lr_ratio` times `config.learning_rate`, its patience `config.patience`, raised with it."""
    return plan_phase(name, phase.epochs, phase.min_steps, config.patience, config.learning_rate * phase.lr_ratio,
                      phase.schedule, steps_per_epoch, unfreeze)


def head_phase(config: TrainConfig, steps_per_epoch: int | None, name: str = "head") -> PhasePlan:
    """Phase 1 (the head on a frozen base; or, named "scratch", every layer) from `config`."""
    return phase_from(name, config.head, config, steps_per_epoch)


def fine_tune_phase(config: TrainConfig, steps_per_epoch: int | None, unfreeze: int | str) -> PhasePlan:
    """Phase 2 (the top of the backbone at the lower rate) from `config`, unfreezing `unfreeze`."""
    return phase_from("fine_tune", config.fine_tune, config, steps_per_epoch, unfreeze)


def fine_tune_depth(config: TrainConfig, depth: int | None = None) -> int:
    """The backbone blocks phase 2 unfreezes: `config.unfreeze_blocks`, or for "auto" the probe
    curve's `depth` (`DEFAULT_DEPTH` when no curve chose one)."""
    return (depth or DEFAULT_DEPTH) if config.unfreeze_blocks == "auto" else config.unfreeze_blocks


def plan_phases(config: TrainConfig, from_scratch: bool, head_steps: int | None, fine_tune_steps: int | None,
                depth: int | None = None) -> tuple[PhasePlan, ...]:
    """Phase 1, and phase 2 when there is anything to fine-tune: epochs and a depth to unfreeze (blocks,
    or a layer name). `*_steps`: each phase's batches per epoch; `depth`: the fine-tuning depth when
    `config.unfreeze_blocks` is "auto" (a probe curve's choice; `DEFAULT_DEPTH` when None)."""
    head = head_phase(config, head_steps, "scratch" if from_scratch else "head")
    blocks = fine_tune_depth(config, depth)
    if from_scratch or config.fine_tune.epochs == 0 or not (blocks > 0 or config.unfreeze_from):
        return (head,)
    return head, fine_tune_phase(config, fine_tune_steps, blocks)


def fit_phase(
    model: keras.Model,
    phase: PhasePlan,
    make_train: Callable[[int], tf.data.Dataset],
    validation_data: tf.data.Dataset | None,
    stop: KeepBest | None,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str,
    snapshots: Path | None = None,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> keras.callbacks.History:
    """Runs one phase: `model.fit` for `phase.epochs` (or `epochs`) from `initial_epoch`, with `stop`
    (KeepBest, if any), NaN checks and, given `snapshots`, a snapshot per epoch.

    With `snapshots`, training resumes from the newest good snapshot there: weights,
    optimizer, KeepBest's state and the history so far; `make_train(k)` gives the
    training pipeline as it is after the first k epochs of this phase.
    """
    end = initial_epoch + (phase.epochs if epochs is None else epochs)
    done = None if snapshots is None else restore_snapshot(snapshots, model, stop)
    start = initial_epoch if done is None else done["epoch"]
    before = {} if done is None else done["history"]
    if done is not None and (done["stopped"] or start >= end):  # it had ended: as KeepBest would end it
        if stop is not None and done["best_weights"] is not None:
            model.set_weights(done["best_weights"])
        make_train(start - initial_epoch)  # the pipeline as those epochs left it, for what comes next
        return merged_history(before, {})
    extra = [StopOnNaN(), *callbacks]
    if snapshots is not None:
        extra.append(EpochSnapshots(snapshots, stop, before))  # last: it saves what KeepBest decided
    history = model.fit(make_train(start - initial_epoch), validation_data=validation_data, initial_epoch=start,
                        epochs=end, callbacks=[*([stop] if stop else []), *extra], shuffle=False, verbose=verbose)
    return merged_history(before, {**history.history, "epoch": list(history.epoch)})


def history_of(values: dict[str, list[float]], epochs: list[int] | None = None) -> keras.callbacks.History:
    """A Keras History holding `values` per epoch (numbered from 0 unless `epochs` are given)."""
    history = keras.callbacks.History()
    history.history = {key: [float(v) for v in vals] for key, vals in values.items()}
    history.epoch = list(epochs) if epochs is not None else list(range(len(next(iter(values.values()), []))))
    return history


def merged_history(before: dict, after: dict) -> keras.callbacks.History:
    """One History of the epochs before a resume and those after it."""
    merged = {k: list(before.get(k, [])) + list(after.get(k, [])) for k in {*before, *after}}
    epochs = [int(e) for e in merged.pop("epoch", [])]
    return history_of(merged, epochs)
