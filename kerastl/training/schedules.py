"""Learning rates over a phase: schedules, discriminative (layer-wise) rates and gradual unfreezing.

- Schedules (`TrainConfig.schedule`, `fine_tune_schedule`): "constant"; "cosine",
  Keras's `CosineDecay` with a linear warmup from 0 over `warmup` of the phase's
  step budget, then down to 0 at its end; "plateau", Keras's `ReduceLROnPlateau`
  on validation loss.
- Discriminative rates (`layer_decay`, Howard & Ruder 2018; BEiT's layer-wise
  decay): in phase 2, the head learns at the phase's rate, the top unfrozen block
  at `layer_decay` times it, the next at `layer_decay**2`, and so on.
- Gradual unfreezing (`gradual_unfreeze`): the top block opens first, then the
  next, an equal share of the phase's epochs apart (ULMFiT).

Both scale each variable's step in the optimizer's public `update_step`, so one
optimizer (its moments, its schedule) serves the whole phase. A block not yet
open has a rate of 0: its weights stay exactly as they are until it opens. The
optimizer stays the Keras class the config names, so a saved model loads anywhere.
"""

from __future__ import annotations

import logging
import math
import types

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

PLATEAU_FACTOR = 0.2  # ReduceLROnPlateau: the rate is multiplied by this on a plateau


def scheduled_rate(name: str, rate: float, steps: int | None, warmup: float) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The optimizer's learning rate for a phase of `steps` optimizer steps under schedule `name`.

    "cosine" warms up linearly from 0 to `rate` over `warmup * steps` steps, then decays
    to 0 at `steps`. Without a known step count (a user's pipeline of unknown length)
    it falls back to the constant `rate`, with a warning.
    """
    if name != "cosine":
        return rate
    if not steps:
        log.warning("a cosine schedule needs the phase's step count, which this pipeline does not give: "
                    "constant learning rate %g instead", rate)
        return rate
    warm = int(round(warmup * steps))
    if warm == 0:
        return keras.optimizers.schedules.CosineDecay(rate, steps)
    return keras.optimizers.schedules.CosineDecay(0.0, max(steps - warm, 1), warmup_target=rate, warmup_steps=warm)


def plateau_callbacks(name: str, patience: int, validated: bool = True) -> list[keras.callbacks.Callback]:
    """Keras's `ReduceLROnPlateau` on validation loss for "plateau" (patience: half the early stop's)."""
    if name != "plateau":
        return []
    if not validated:
        log.info("a plateau schedule needs validation data, and this phase has none: constant learning rate")
        return []
    return [keras.callbacks.ReduceLROnPlateau("val_loss", factor=PLATEAU_FACTOR, patience=max(1, patience // 2),
                                              min_lr=1e-7)]


class LayerRates:
    """Per-variable multipliers of the learning rate, by the block a variable is in.

    Args:
        blocks: the trainable backbone variables, block by block, top block first.
        decay: the top block's multiplier; each block below gets `decay` times the one above.
        opening_epochs: with gradual unfreezing, the epoch (of the phase, from 0) at which
            each block opens, top block first; None opens them all at once.
    """

    def __init__(self, blocks: list[list[keras.Variable]], decay: float = 1.0,
                 opening_epochs: list[int] | None = None):
        self.decay = decay
        self.opening_epochs = opening_epochs
        self.rates = [decay ** (depth + 1) for depth in range(len(blocks))]
        self.scales = [tf.Variable(0.0 if opening_epochs else rate, trainable=False, dtype=tf.float32)
                       for rate in self.rates]
        self.block_of = {_key(variable): depth for depth, variables in enumerate(blocks) for variable in variables}

    def open_blocks(self, epoch: int) -> int:
        """Sets the multipliers for `epoch` of the phase; returns how many blocks are open."""
        opened = 0
        for depth, (scale, rate) in enumerate(zip(self.scales, self.rates)):
            is_open = self.opening_epochs is None or epoch >= self.opening_epochs[depth]
            scale.assign(rate if is_open else 0.0)
            opened += int(is_open)
        return opened

    def scale_of(self, variable: keras.Variable | tf.Variable) -> tf.Variable | None:
        """The multiplier of `variable`'s block (None: a head variable, at the full rate)."""
        depth = self.block_of.get(_key(variable))
        return None if depth is None else self.scales[depth]

    def attach(self, optimizer: keras.optimizers.Optimizer, weight_decay: float = 0.0) -> None:
        """Makes `optimizer` scale each variable's step, and its decoupled weight decay, by its multiplier.

        The optimizer must be made without weight decay: it is applied here, per variable,
        as Keras applies it (`variable -= variable * weight_decay * learning_rate`), so a
        block that is not open yet is not decayed either.
        """
        plain_step = optimizer.update_step
        rates = self

        def update_step(self, gradient, variable, learning_rate):
            scale = rates.scale_of(variable)
            if scale is not None:
                learning_rate = learning_rate * tf.cast(scale, learning_rate.dtype)
            if weight_decay:
                rate = tf.cast(learning_rate, variable.dtype)
                variable.assign(variable - variable * tf.cast(weight_decay, variable.dtype) * rate)
            return plain_step(gradient, variable, learning_rate)

        optimizer.update_step = types.MethodType(update_step, optimizer)


def _key(variable: keras.Variable | tf.Variable) -> int:
    """One variable's identity as the optimizer's step sees it: on TensorFlow, a Keras variable's
    backend `tf.Variable` (its `value`) is what `update_step` is given (one device: kerastl uses no
    `tf.distribute` strategy, whose mirrored variables are other objects)."""
    return id(variable.value) if isinstance(variable, keras.Variable) else id(variable)


def opening_epochs(blocks: int, epochs: int) -> list[int]:
    """Gradual unfreezing: the epoch each of `blocks` blocks opens at, top first, evenly over `epochs`
    (the last by the phase's last epoch, several at once when there are more blocks than epochs)."""
    return [math.floor(depth * epochs / blocks) for depth in range(blocks)]


class GradualUnfreezing(keras.callbacks.Callback):
    """Opens the blocks of a `LayerRates` as their epochs come (also when a phase resumes mid-way)."""

    def __init__(self, rates: LayerRates, first_epoch: int = 0):
        super().__init__()
        self.rates, self.first_epoch, self.open = rates, first_epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        opened = self.rates.open_blocks(epoch - self.first_epoch)
        if opened != self.open:
            log.info("gradual unfreezing: %d of %d blocks open from epoch %d", opened, len(self.rates.scales),
                     epoch + 1)
        self.open = opened
