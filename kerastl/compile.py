"""Optimizers and compiling: the one place a classifier is compiled.

Both phases, every cross-validation fold and every search trial compile through
`compile_classifier`, so the optimizer, its schedule, the loss and the metrics are
the same wherever a model trains. The losses live in `kerastl.losses`, the
schedules and layer-wise rates in `kerastl.schedules`.
"""

from __future__ import annotations

import keras

from kerastl.config import TrainConfig
from kerastl.errors import KerastlError
from kerastl.losses import LabelAccuracy, make_loss
from kerastl.schedules import LayerRates, scheduled_rate


def make_optimizer(name: str, learning_rate, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name ("adam", "sgd", "adamw", ...), with decoupled weight decay.

    `learning_rate` is a number or a Keras learning-rate schedule.
    """
    values = {"learning_rate": learning_rate}
    if weight_decay:
        values["weight_decay"] = weight_decay
    try:
        return keras.optimizers.get({"class_name": name, "config": values})
    except (ValueError, TypeError):
        raise KerastlError(f"unknown optimizer {name!r}; use a Keras optimizer name such as adam or sgd") from None


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
) -> None:
    """Compiles `model` (a classifier or its head model) with a fresh optimizer, the loss and accuracy.

    Args:
        model: the model to compile.
        config: the optimizer, loss, label smoothing and weight decay.
        learning_rate: the phase's rate; `config.learning_rate` by default (phase 2 passes its lower rate).
        steps_per_execution: optimizer steps per call (many for a head on cached features).
        schedule: one of `kerastl.config.SCHEDULES` ("plateau" is a callback, see
            `kerastl.schedules.plateau_callbacks`).
        steps: the phase's step budget (a cosine schedule spans it).
        layer_rates: per-block rate multipliers for the backbone's variables (phase 2).
        mixed: training labels are mixed (MixUp, CutMix): a loss and an accuracy that take them.
    """
    binary = model.output_shape[-1] == 1
    rate = config.learning_rate if learning_rate is None else learning_rate
    rate = scheduled_rate(schedule, rate, steps, config.warmup)
    if layer_rates is None:
        optimizer = make_optimizer(config.optimizer, rate, config.weight_decay)
    else:  # weight decay per variable, scaled with its rate (see LayerRates.attach)
        optimizer = make_optimizer(config.optimizer, rate)
        layer_rates.attach(optimizer, config.weight_decay)
    model.compile(optimizer=optimizer, loss=make_loss(config.loss, binary, config.label_smoothing, mixed),
                  metrics=[LabelAccuracy() if mixed else "accuracy"], steps_per_execution=steps_per_execution)
