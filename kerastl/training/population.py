"""A population of phase-1 heads trained at once on the same cached batches, in one traced step.

The head-only trials of a search read the same cached features in the same batches; they
differ only in their heads (hidden units, dropout) and in how those train (learning rate,
weight decay, label smoothing, schedule). Run one by one, every trial pays for tracing its
own train and test functions and for its own pass over the batches. `train_population`
trains K heads together instead:

- each head is a classifier's own head model, compiled by `compile_classifier` exactly as a
  lone run compiles it: its loss (label smoothing, class weights as sample weights) is that
  head's own Keras object, and so is its optimizer (rate, schedule, weight decay), or, in a
  stack, one optimizer of the same kind with that head's rate and decay for its slice;
- `HeadPopulation` holds the heads side by side, so one `fit` over the cached batches traces
  one train step that computes every head's loss and applies every head's own optimizer to
  its own variables (the heads share no variable, so each gets the gradient of its own loss);
  heads of one shape and optimizer kind train as a `kerastl.training.stacked.HeadStack`
  (their weights stacked, one optimizer with per-head rates and decay), the others one by one;
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
from kerastl.models.classifier import TransferClassifier
from kerastl.training.losses import label_accuracy
from kerastl.training.phase import PhasePlan, fit_phase, history_of
from kerastl.training.phases import HEAD_STEPS_PER_EXECUTION, START_LOSS
from kerastl.training.stacked import HeadStack, stack_key

log = logging.getLogger(__name__)


@dataclass
class PopulationHead:
    """One head of a population: the compiled head model, its classifier (whose head layers the model
    shares) and its phase plan. `start_is_best`: the head starts from a converged probe, whose
    validation loss is the best to beat."""

    model: keras.Model
    phase: PhasePlan
    start_is_best: bool = False
    classifier: TransferClassifier | None = None


class HeadPopulation(keras.Model):
    """K compiled heads on one input of cached features, trained by one traced step.

    Heads of one shape and optimizer train as a `HeadStack` (stacked weights, one optimizer);
    the others each with their own head model and optimizer. `call` returns every head's
    probabilities; `train_step` lowers each head's compiled loss, and reports `loss_k` and
    `accuracy_k` per head.
    """

    def __init__(self, heads: list[PopulationHead], stack: bool = True, **kwargs):
        super().__init__(name="head_population", **kwargs)
        self.heads = [head.model for head in heads]
        groups: dict[str, list[int]] = {}
        for k, head in enumerate(heads):
            key = stack_key(head.classifier, head.model.optimizer) if stack and head.classifier else None
            if key is not None:
                groups.setdefault(key, []).append(k)
        self.stacks = [(members, HeadStack([heads[k].classifier for k in members],
                                           [heads[k].model.optimizer for k in members]))
                       for members in groups.values() if len(members) > 1]
        stacked = {k for members, _ in self.stacks for k in members}
        self.alone = [k for k in range(len(heads)) if k not in stacked]
        self.head_losses = HeadMeans(len(heads), name="head_losses")
        self.head_accuracies = HeadMeans(len(heads), name="head_accuracies")

    def build_optimizers(self) -> None:
        """Builds every optimizer before tracing, so the traced step creates no variables."""
        for _, stack in self.stacks:
            stack.optimizer.build(stack.trainable_variables)
        for k in self.alone:
            self.heads[k].optimizer.build(self.heads[k].trainable_variables)

    def call(self, features, training=False):
        outputs = [None] * len(self.heads)
        for members, stack in self.stacks:
            for k, output in zip(members, stack(features, training=training)):
                outputs[k] = output
        for k in self.alone:
            outputs[k] = self.heads[k](features, training=training)
        return outputs

    def write_back(self, heads: list[int]) -> None:
        """These stacked heads' current weights into their own head models (the others train in place)."""
        for members, stack in self.stacks:
            stack.write_back([i for i, k in enumerate(members) if k in heads])

    @property
    def metrics(self):
        return [self.head_losses, self.head_accuracies]

    def train_step(self, data):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        owners = [(stack.optimizer, stack.trainable_variables, members) for members, stack in self.stacks]
        owners += [(self.heads[k].optimizer, self.heads[k].trainable_variables, [k]) for k in self.alone]
        with tf.GradientTape() as tape:
            outputs = self(x, training=True)
            losses = [head.compute_loss(x, y, out, weight) for head, out in zip(self.heads, outputs)]
            # each optimizer's share of the loss, scaled as Keras's own step scales it (mixed precision)
            scaled = [optimizer.scale_loss(keras.ops.sum(keras.ops.stack([losses[k] for k in members])))
                      for optimizer, _, members in owners]
        gradients = tape.gradient(scaled, [own for _, own, _ in owners])  # no head reads another's weights
        for (optimizer, own, _), grads in zip(owners, gradients):
            optimizer.apply(grads, own)
        return self._scores(x, y, outputs, losses, weight)

    def test_step(self, data):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self(x, training=False)
        losses = [head.compute_loss(x, y, out, weight, training=False) for head, out in zip(self.heads, outputs)]
        return self._scores(x, y, outputs, losses, weight)

    def _scores(self, x, y, outputs, losses, weight) -> dict:
        """Each head's loss and accuracy so far (`loss_k`, `accuracy_k`), averaged as Keras's own
        trackers average them: the loss by batch size, the accuracy by sample weight."""
        self.head_losses.update_state(keras.ops.stack(losses), keras.ops.cast(keras.ops.shape(x)[0], "float32"))
        self.head_accuracies.update_state(label_accuracy(y, keras.ops.stack(outputs)), weight)
        values = {name: keras.ops.unstack(metric.result(), len(self.heads))
                  for name, metric in (("loss", self.head_losses), ("accuracy", self.head_accuracies))}
        return {f"{name}_{k}": value for name, per_head in values.items() for k, value in enumerate(per_head)}


class HeadMeans(keras.metrics.Metric):
    """K running means at once, one per head, each weighted as `keras.metrics.Mean` weighs its values."""

    def __init__(self, heads: int, name: str):
        super().__init__(name=name)
        self.heads = heads
        self.total = self.add_variable(shape=(heads,), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(heads,), initializer="zeros", name="count")

    def update_state(self, values, weight=None):
        """`values`: [heads] or [heads, batch]; `weight`: one number, or one per example ([batch])."""
        values = keras.ops.reshape(keras.ops.cast(values, "float32"), (self.heads, -1))
        weight = keras.ops.ones_like(values[0]) if weight is None else keras.ops.cast(weight, "float32")
        weight = keras.ops.broadcast_to(keras.ops.reshape(weight, (1, -1)), keras.ops.shape(values))
        self.total.assign_add(keras.ops.sum(values * weight, axis=1))
        self.count.assign_add(keras.ops.sum(weight, axis=1))

    def result(self):
        return keras.ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(keras.ops.zeros((self.heads,)))
        self.count.assign(keras.ops.zeros((self.heads,)))


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
        # a head with no epochs to run rides along, and ends as it started
        self.starts = [None if running else head.model.get_weights() for head, running in zip(self.heads,
                                                                                               self.running)]
        self.model.stop_training = not any(self.running)

    def on_epoch_end(self, epoch, logs=None):
        # the running stacked heads' weights into their own models, for their KeepBest
        self.model.write_back([k for k, running in enumerate(self.running) if running])
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

    def on_train_end(self, logs=None):  # every head ends on weights its KeepBest or its start kept
        for head, keeper, start in zip(self.heads, self.keepers, self.starts):
            keeper.on_train_end()  # each head's best weights (its start, on a probe start that was not beaten)
            if start is not None:
                head.model.set_weights(start)


def train_population(
    heads: list[PopulationHead],
    cached: tuple[CachedFeatures, CachedFeatures],
    batch_size: int,
    seed: int | None,
    class_weights: np.ndarray | None = None,
    balanced: bool = False,
    verbose: int | str = 0,
    stack: bool = True,
) -> list[keras.callbacks.History]:
    """Trains every head of `heads` on the same `cached` (train, validation) batches at once (see the
    module docstring); each head ends with its best weights. Returns each head's phase-1 history (with
    the probe's loss as `START_LOSS` on a probe start)."""
    population = HeadPopulation(heads, stack)
    population.compile(optimizer="sgd", steps_per_execution=HEAD_STEPS_PER_EXECUTION,  # each head applies its own
                       jit_compile=False)
    population.build_optimizers()
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
