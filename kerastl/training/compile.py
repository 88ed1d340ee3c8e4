"""Optimizers and compiling: the one place a classifier is compiled.

Both phases, every cross-validation fold and every search trial compile through
`compile_classifier` (phase 2 through `compile_fine_tuning`, which adds layer-wise rates
and gradual unfreezing), so the optimizer, its schedule, the loss and the metrics are
the same wherever a model trains. The losses live in `kerastl.training.losses`, the
schedules and layer-wise rates in `kerastl.training.schedules`.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from kerastl.config import TrainConfig
from kerastl.data.pipelines import budget_steps, is_mixed
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier
from kerastl.training.losses import LabelAccuracy, make_loss
from kerastl.training.phase import PhasePlan
from kerastl.training.schedules import GradualUnfreezing, LayerRates, opening_epochs, plateau_callbacks, scheduled_rate

log = logging.getLogger(__name__)


def make_optimizer(name: str, learning_rate, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name ("adam", "sgd", "adamw", ...), with decoupled weight decay
    (none when 0, AdamW included).

    `learning_rate` is a number or a Keras learning-rate schedule.
    """
    try:
        optimizer = keras.optimizers.get({"class_name": name, "config": {"learning_rate": learning_rate,
                                                                         "weight_decay": float(weight_decay)}})
    except (ValueError, TypeError):
        raise KerastlError(f"unknown optimizer {name!r}; use a Keras optimizer name such as adam or sgd") from None
    if not weight_decay:  # none, as the config says (AdamW's own default is 0.004)
        optimizer.weight_decay = None
    return optimizer


def compile_classifier(
    model: keras.Model,
    config: TrainConfig,
    learning_rate: float | None = None,
    steps_per_execution: int = 1,
    *,
    schedule: str = "constant",
    steps: int | None = None,
    layer_rates: LayerRates | None = None,
    mixed: bool = False,
    jit_compile: bool | str = "auto",
) -> None:
    """Compiles `model` (a classifier or its head model) with a fresh optimizer, the loss and accuracy.

    Args:
        model: the model to compile.
        config: the optimizer, loss, label smoothing and weight decay.
        learning_rate: the phase's rate; `config.learning_rate` by default (phase 2 passes its lower rate).
        steps_per_execution: optimizer steps per call (many for a head on cached features).
        schedule: one of `kerastl.config.SCHEDULES` ("plateau" is a callback, see
            `kerastl.training.schedules.plateau_callbacks`).
        steps: the phase's step budget (a cosine schedule spans it).
        layer_rates: per-block rate multipliers for the backbone's variables (phase 2).
        mixed: training labels are mixed (MixUp, CutMix): a loss and an accuracy that take them.
        jit_compile: XLA: True, False or Keras's "auto" (the phase's plan says which).
    """
    binary = model.output_shape[-1] == 1
    rate = config.learning_rate if learning_rate is None else learning_rate
    rate = scheduled_rate(schedule, rate, steps, config.warmup)
    if layer_rates is None:
        optimizer = make_optimizer(config.optimizer, rate, config.weight_decay)
    else:  # weight decay per variable, scaled with its rate (see LayerRates.attach)
        optimizer = make_optimizer(config.optimizer, rate)
        layer_rates.attach(optimizer, config.weight_decay)
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:  # Keras's multi-step loop fails under several
        steps_per_execution = 1  # replicas ("You must feed a value for placeholder"): one step per call there
    model.compile(optimizer=optimizer, loss=make_loss(config.loss, binary, config.label_smoothing, mixed),
                  metrics=[LabelAccuracy() if mixed else "accuracy"], steps_per_execution=steps_per_execution,
                  jit_compile=jit_compile)


def compile_fine_tuning(model: TransferClassifier, config: TrainConfig, train_data: tf.data.Dataset,
                        phase: PhasePlan, first_epoch: int = 0,
                        validated: bool = True) -> list[keras.callbacks.Callback]:
    """Compiles phase 2 (its rate, schedule, layer-wise rates, mixed labels) once the top is unfrozen.

    Returns the callbacks the phase needs: gradual unfreezing from `first_epoch` on, and
    `ReduceLROnPlateau` for a plateau schedule (when the phase is `validated`).
    """
    rates, extra = None, []
    if config.layer_decay != 1.0 or config.gradual_unfreeze:
        blocks = model.trainable_blocks()
        opening = opening_epochs(len(blocks), phase.epochs) if config.gradual_unfreeze else None
        rates = LayerRates(blocks, config.layer_decay, opening)
        if opening is not None:
            extra.append(GradualUnfreezing(rates, first_epoch))
        log.info("phase 2: %d blocks, rates %s of the head's%s", len(blocks),
                 ", ".join(f"{rate:.3g}" for rate in rates.rates),
                 f", opening at epochs {[first_epoch + e + 1 for e in opening]}" if opening else "")
    compile_classifier(model, config, phase.learning_rate, schedule=phase.schedule,
                       steps=budget_steps(phase.epochs, train_data), layer_rates=rates, mixed=is_mixed(train_data),
                       jit_compile=phase.jit_compile)
    return [*extra, *plateau_callbacks(phase.schedule, phase.patience, validated)]
