"""Heads of one shape trained as one: their weights stacked, their settings as tensors.

A population's heads (`kerastl.training.population`) that have the same layers (hidden units,
classes) and the same kind of optimizer differ only in numbers: learning rate (or its schedule),
weight decay, dropout rate, label smoothing, starting weights. `HeadStack` trains K of them with
one variable per layer, shaped (K, inputs, units), so a training step runs one batched matmul
and one optimizer update per layer for all K, instead of K of each:

- each head's fixed first steps (standardisation and dropout) are its classifier's own layers,
  called on the batch as a lone head calls them (its dropout draws from its own seed);
- the stacked layers (`StackedDense`) compute every head's hidden layer and classifier at once;
- one Keras optimizer of the heads' own class updates the stacked variables, with each head's
  learning rate (`StackedRate`: each head's own rate or schedule, per step) and weight decay as
  tensors shaped (K, 1, 1) that broadcast over each head's slice; the optimizers that stack
  (`ELEMENTWISE`: Adam, AdamW, SGD, RMSprop, ...) update each element from its own gradient
  and state, so a slice moves exactly as that head's own variable would;
- each head's loss is its own compiled loss on its slice of the output.

`stack_key` says which heads can share a stack; heads with L2 or max-norm penalties, another
optimizer or gradient clipping by norm, or under a mixed-precision policy, are trained one by
one in the population instead.
"""

from __future__ import annotations

import json

import keras
import numpy as np
from keras import layers, ops

from kerastl.models.classifier import TransferClassifier

# optimizer settings that may differ inside a stack: they become per-head tensors
PER_HEAD = ("name", "learning_rate", "weight_decay")
# optimizers whose update of each element reads only that element's gradient and state, so a stacked
# variable's slices move as K separate variables would; others (Lamb's trust ratio, Adafactor's factored
# RMS, Muon's matrix step) read whole variables, and gradient clipping by norm would mix heads too
ELEMENTWISE = ("Adam", "AdamW", "Adamax", "Nadam", "SGD", "RMSprop", "Adagrad", "Adadelta", "Ftrl", "Lion")


def stack_key(classifier: TransferClassifier, optimizer: keras.optimizers.Optimizer) -> str | None:
    """What heads must share to train in one stack (None: this head trains on its own)."""
    if classifier.l2 or classifier.max_norm or keras.config.dtype_policy().name != "float32":
        return None
    if type(optimizer).__name__ not in ELEMENTWISE or optimizer.clipnorm or optimizer.global_clipnorm:
        return None
    settings = {k: v for k, v in optimizer.get_config().items() if k not in PER_HEAD}
    shape = [(dense.units, keras.activations.serialize(dense.activation), dense.use_bias)
             for dense in classifier.head_dense_layers()]
    return json.dumps([type(optimizer).__name__, settings, shape, classifier.feature_dim], sort_keys=True,
                      default=str)


class StackedDense(layers.Layer):
    """K Dense layers of the same shape as one: kernel (K, inputs, units), bias (K, 1, units).

    Takes (K, batch, inputs) and gives (K, batch, units): head k's slice is head k's Dense layer.
    """

    def __init__(self, denses: list[layers.Dense], **kwargs):
        super().__init__(**kwargs)
        self.activation = denses[0].activation
        kernel = np.stack([np.asarray(dense.kernel) for dense in denses])
        bias = np.stack([np.asarray(dense.bias) if dense.use_bias else np.zeros(dense.units, "float32")
                         for dense in denses])[:, None, :]
        self.kernel = self.add_weight(shape=kernel.shape, initializer=keras.initializers.Constant(kernel),
                                      name="kernel")
        self.bias = self.add_weight(shape=bias.shape, initializer=keras.initializers.Constant(bias), name="bias",
                                    trainable=denses[0].use_bias)

    def call(self, inputs, activate=True):
        outputs = ops.matmul(inputs, self.kernel) + self.bias
        return self.activation(outputs) if activate else outputs

    def write_back(self, position: int, dense: layers.Dense) -> None:
        """Puts the slice at `position` (one head's) back into that head's own Dense layer."""
        dense.kernel.assign(self.kernel[position])
        if dense.use_bias:
            dense.bias.assign(self.bias[position, 0])


class StackedRate(keras.optimizers.schedules.LearningRateSchedule):
    """Each head's learning rate at a step (a number or that head's own schedule), shaped (K, 1, 1)."""

    def __init__(self, rates: list):
        self.rates = rates

    def __call__(self, step):
        values = [ops.cast(rate(step) if callable(rate) else rate, "float32") for rate in self.rates]
        return ops.reshape(ops.stack(values), (-1, 1, 1))

    def get_config(self):
        return {"rates": [keras.optimizers.schedules.serialize(rate) if callable(rate) else float(rate)
                          for rate in self.rates]}


def _rate(optimizer: keras.optimizers.Optimizer):
    """An optimizer's learning rate as it was given: a number or a schedule (from its public config)."""
    rate = optimizer.get_config()["learning_rate"]
    return keras.optimizers.schedules.deserialize(rate) if isinstance(rate, dict) else float(rate)


class HeadStack:
    """K heads of one `stack_key`, trained as one: their classifiers' layers stacked, one optimizer.

    Args:
        classifiers: each head's classifier (its head layers are read and, by `write_back`, written).
        optimizers: each head's compiled optimizer (its class and settings; rate and decay per head).
    """

    def __init__(self, classifiers: list[TransferClassifier], optimizers: list[keras.optimizers.Optimizer]):
        self.classifiers = classifiers
        per_layer = list(zip(*(classifier.head_dense_layers() for classifier in classifiers)))
        self.layers = [StackedDense(list(denses), name=f"stacked_{i}") for i, denses in enumerate(per_layer)]
        decay = np.array([optimizer.weight_decay or 0.0 for optimizer in optimizers], "float32")
        config = {**optimizers[0].get_config(), "learning_rate": StackedRate([_rate(o) for o in optimizers]),
                  "weight_decay": 0.0}  # a number: AdamW refuses None
        config.pop("name")
        self.optimizer = type(optimizers[0]).from_config(config)
        self.optimizer.weight_decay = None  # none, unless some head decays (as `make_optimizer` leaves it)
        if decay.any():  # decoupled, per head: each slice decays at its own head's rate
            self.optimizer.weight_decay = ops.convert_to_tensor(decay.reshape(-1, 1, 1))

    @property
    def trainable_variables(self) -> list:
        return [variable for layer in self.layers for variable in layer.trainable_variables]

    def __call__(self, features, training=False) -> list:
        """Every head's output on a batch of features, as a list of K (batch, units) tensors."""
        x = ops.stack([classifier.head_inputs_on(features, training=training) for classifier in self.classifiers])
        for layer in self.layers[:-1]:
            x = layer(x)
        # the output activation per head, as a lone Dense applies it: Keras's crossentropy then reads
        # the logits it keeps (exact with label smoothing, where clipped probabilities are not)
        last = self.layers[-1]
        return [last.activation(logits) for logits in ops.unstack(last(x, activate=False), len(self.classifiers))]

    def write_back(self, positions: list[int]) -> None:
        """The weights of the heads at `positions` (in this stack) as they are now, into their classifiers."""
        for position in positions:
            for layer, dense in zip(self.layers, self.classifiers[position].head_dense_layers()):
                layer.write_back(position, dense)
