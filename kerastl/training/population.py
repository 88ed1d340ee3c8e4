"""A population of phase-1 heads trained at once on the same cached batches, in one traced step.

The head-only trials of a search read the same cached features in the same batches; they
differ only in their heads (hidden units, dropout) and in how those train (learning rate,
weight decay, label smoothing, schedule). Run one by one, every trial pays for tracing its
own train and test functions and for its own pass over the batches. `train_population`
trains K heads together instead:

- each head is a classifier's own head model, compiled by `compile_classifier` exactly as a
  lone run compiles it: its optimizer (rate, schedule, weight decay) and its loss (label
  smoothing, class weights as sample weights) are that head's own Keras objects;
- `HeadPopulation` holds the heads side by side, so one `fit` over the cached batches traces
  one train step that computes every head's loss and applies every head's own optimizer to
  its own variables (the heads share no variable, so each gets the gradient of its own loss);
- each head keeps its own best epoch (`KeepBest` on its own validation loss, from the probe's
  loss on a probe start) and its own budget of epochs; a head whose budget or patience is
  spent rides along until the last one stops, and its best weights are put back at the end.

A head therefore ends where a lone run of it would (its dropout layers draw from the same seeds),
up to float round-off: see `tests/test_population.py` for the tolerance. A head whose loss
becomes NaN or infinite stops there, and its history says so (the run then fails, alone).
Mixed precision scales each head's loss as Keras's own step does (`optimizer.scale_loss`).
XLA is off: compiling a population of heads cost more than it saved on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from kerastl.features.batches import feature_batches
from kerastl.features.cache import CachedFeatures
from kerastl.training.callbacks import KeepBest
from kerastl.training.losses import LabelAccuracy
from kerastl.training.phase import PhasePlan, fit_phase, history_of
from kerastl.training.phases import HEAD_STEPS_PER_EXECUTION, START_LOSS

log = logging.getLogger(__name__)


@dataclass
class PopulationHead:
    """One head of a population: the compiled head model and its phase plan. `start_is_best`: the
    head starts from a converged probe, whose validation loss is the best to beat."""

    model: keras.Model
    phase: PhasePlan
    start_is_best: bool = False


class HeadPopulation(keras.Model):
    """K compiled head models on one input of cached features, trained by one traced step.

    `call` returns every head's probabilities; `train_step` lowers each head's compiled loss
    with that head's own optimizer, and reports `loss_k` and `accuracy_k` per head.
    """

    def __init__(self, heads: list[keras.Model], **kwargs):
        super().__init__(name="head_population", **kwargs)
        self.heads = list(heads)
        self.head_losses = [keras.metrics.Mean(name=f"loss_{k}") for k in range(len(heads))]
        self.head_accuracies = [LabelAccuracy(name=f"accuracy_{k}") for k in range(len(heads))]

    def call(self, features, training=False):
        return [head(features, training=training) for head in self.heads]

    @property
    def metrics(self):
        return [*self.head_losses, *self.head_accuracies]

    def train_step(self, data):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = [head.trainable_variables for head in self.heads]
        with tf.GradientTape() as tape:
            outputs = self(x, training=True)
            losses = [head.compute_loss(x, y, out, weight) for head, out in zip(self.heads, outputs)]
            scaled = [head.optimizer.scale_loss(loss) for head, loss in zip(self.heads, losses)]  # mixed precision
        gradients = tape.gradient(scaled, variables)  # a sum of independent losses: each head gets its own
        for head, grads, own in zip(self.heads, gradients, variables):
            head.optimizer.apply(grads, own)
        return self._scores(x, y, outputs, losses, weight)

    def test_step(self, data):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self(x, training=False)
        losses = [head.compute_loss(x, y, out, weight, training=False) for head, out in zip(self.heads, outputs)]
        return self._scores(x, y, outputs, losses, weight)

    def _scores(self, x, y, outputs, losses, weight) -> dict:
        """Each head's loss and accuracy so far, as Keras's own trackers average them (by batch size)."""
        count = keras.ops.shape(x)[0]
        for loss, out, mean, accuracy in zip(losses, outputs, self.head_losses, self.head_accuracies):
            mean.update_state(loss, sample_weight=count)
            accuracy.update_state(y, out, weight)
        return {metric.name: metric.result() for metric in self.metrics}


class EachHeadsBest(keras.callbacks.Callback):
    """After every epoch, each running head's validation loss (from the population's validation
    pass) goes to that head's `KeepBest`; the fit stops once every head has stopped (its patience
    or its own budget of epochs spent)."""

    def __init__(self, heads: list[PopulationHead], start_losses: list[float | None]):
        super().__init__()
        self.heads = heads
        self.keepers = [KeepBest(head.phase.patience, loss) for head, loss in zip(heads, start_losses)]
        self.histories: list[dict[str, list[float]]] = [{} for _ in heads]
        self.running = [head.phase.epochs > 0 for head in heads]

    def on_train_begin(self, logs=None):
        for head, keeper in zip(self.heads, self.keepers):
            keeper.set_model(head.model)
            keeper.on_train_begin()
        self.model.stop_training = not any(self.running)

    def on_epoch_end(self, epoch, logs=None):
        for k, (head, keeper) in enumerate(zip(self.heads, self.keepers)):
            if not self.running[k]:
                continue
            for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
                self.histories[k].setdefault(name, []).append(float(logs[f"{name}_{k}"]))
            diverged = not np.isfinite(self.histories[k]["loss"][-1])
            if not diverged:
                keeper.on_epoch_end(epoch, {"val_loss": float(logs[f"val_loss_{k}"])})
            if diverged or getattr(head.model, "stop_training", False) or epoch + 1 >= head.phase.epochs:
                self.running[k] = False
        self.model.stop_training = not any(self.running)

    def on_train_end(self, logs=None):
        for keeper in self.keepers:
            keeper.on_train_end()  # each head's best weights (its start, on a probe start that was not beaten)


def train_population(
    heads: list[PopulationHead],
    cached: tuple[CachedFeatures, CachedFeatures],
    batch_size: int,
    seed: int | None,
    class_weights: np.ndarray | None = None,
    balanced: bool = False,
    verbose: int | str = 0,
) -> list[keras.callbacks.History]:
    """Trains every head of `heads` on the same `cached` (train, validation) batches at once (see the
    module docstring); each head ends with its best weights. Returns each head's phase-1 history (with
    the probe's loss as `START_LOSS` on a probe start)."""
    population = HeadPopulation([head.model for head in heads])
    population.compile(optimizer="sgd", steps_per_execution=HEAD_STEPS_PER_EXECUTION,  # each head applies its own
                       jit_compile=False)
    for head in heads:  # built before tracing, so the traced step creates no variables
        head.model.optimizer.build(head.model.trainable_variables)
    validation = feature_batches(cached[1], batch_size, class_weights=class_weights)
    start = [None] * len(heads)
    if any(head.start_is_best for head in heads):  # the probes' losses as compiled: the best to beat
        scores = population.evaluate(validation, verbose=0, return_dict=True)
        start = [float(scores[f"loss_{k}"]) if head.start_is_best else None for k, head in enumerate(heads)]
    best = EachHeadsBest(heads, start)
    longest = max((head.phase for head in heads), key=lambda phase: phase.epochs)
    log.info("training %d heads at once on cached features, at most %d epochs", len(heads), longest.epochs)
    fit_phase(population, longest,
              lambda first: feature_batches(cached[0], batch_size, True, seed, first, class_weights, balanced),
              validation, None, [best], verbose)
    histories = [history_of(values) for values in best.histories]
    for history, loss in zip(histories, start):
        if loss is not None:  # as a lone head on a probe start records it (`train_head`)
            history.history[START_LOSS] = [loss]
    return histories
