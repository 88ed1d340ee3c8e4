"""Runs whose phase 1 trains together: a search's head-only trials as one population.

`run_population(configs, ...)` takes head-only run configs (a search's trials), and for each:
- plans it as a lone run plans it (`kerastl.runs.plan.plan_run`: the cached features, the blocks,
  the probe start, the phases; the trials of one search share the probe curve and start);
- trains the phase-1 heads of every run that reads the same cached batches at once
  (`kerastl.training.population`), each with its own compiled optimizer and loss;
- then finishes each as the lone run path does (`kerastl.runs.run.execute`, with the trained head
  standing as its phase 1): scored, and written as its own weights-only run folder.

A run the population cannot train (a head stored by an earlier trial, fine-tuning, a plateau
schedule, no cached features) runs alone through `execute`; a run that fails is reported as
its exception, and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import keras

from kerastl.config import DataConfig, RunConfig, TrainConfig
from kerastl.data.images import ImageData
from kerastl.models.classifier import TransferClassifier
from kerastl.runs.plan import RunPlan, plan_run, split_for
from kerastl.runs.run import RunResult, checked_data, execute
from kerastl.storage import HeadStore, check_export_dir
from kerastl.training.compile import compile_classifier
from kerastl.training.callbacks import NaNLoss
from kerastl.training.distribute import plan_devices
from kerastl.training.phases import HEAD_STEPS_PER_EXECUTION, TrainResult, start_head
from kerastl.training.population import PopulationHead, train_population

log = logging.getLogger(__name__)


def run_population(configs: list[RunConfig], data: ImageData, models: list[TransferClassifier | None],
                   heads: HeadStore | None = None, verbose: int | str = 0) -> list[RunResult | Exception]:
    """Each of `configs` (checked, head-only, with its own `export_dir`) as a weights-only run on
    `data`, their phase-1 heads trained together where they read the same batches; `models`: a
    classifier already built for each (or None). Returns each run's result, or the exception it
    failed with."""
    results: list[RunResult | Exception | None] = [None] * len(configs)
    plans: dict[int, RunPlan] = {}
    for i, (config, model) in enumerate(zip(configs, models)):
        try:
            check_export_dir(Path(config.export_dir), True)
            split, mode = split_for(config.train.validation, checked_data(config.data, config.model.image_size, data))
            devices = plan_devices(config.devices, config.data.batch_size)  # one device: the caller's placement
            plans[i] = plan_run(config, split, model, heads, verbose, mode).on_devices(devices)
        except Exception as error:  # noqa: BLE001 - one trial's failure is that trial's
            results[i] = error
    groups: dict[str, list[int]] = {}
    for i, plan in plans.items():
        if trainable_together(plan):
            groups.setdefault(batches_key(plan, configs[i].data, configs[i].train.sampling), []).append(i)
    histories: dict[int, keras.callbacks.History] = {}
    sizes: dict[int, int] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        try:
            trained = _train_together([plans[i] for i in members], [configs[i].train for i in members],
                                      configs[members[0]].data)
        except Exception as error:  # noqa: BLE001 - then each of them trains alone, as without a population
            log.warning("training %d heads together failed (%s); training each alone", len(members), error)
            continue
        histories.update(zip(members, trained))
        sizes.update((i, len(members)) for i in members)
    for i, plan in plans.items():  # the rest of the run path, for each run
        try:
            history = histories.get(i)
            if history is not None:  # the head stands as phase 1, as a stored head does
                _check_finite(history)
                if heads is not None and plan.inputs.head_key is not None:  # stored, as a lone run stores it
                    heads.save(plan.inputs.head_key, plan.model.head_model(),
                               {"phase1": TrainResult(history).to_dict()["phase1"]})
                plan = dataclasses.replace(plan, inputs=dataclasses.replace(plan.inputs, stored=history))
            result = execute(plan, configs[i], verbose, heads=heads if history is None else None, save="weights")
            results[i] = dataclasses.replace(result, population=sizes.get(i, 1))
        except Exception as error:  # noqa: BLE001 - one trial's failure is that trial's
            results[i] = error
    return results


def _check_finite(history: keras.callbacks.History) -> None:
    """Fails a run whose head's loss became NaN or infinite in the population, as `StopOnNaN` fails a lone run."""
    for epoch, loss in enumerate(history.history.get("loss", [])):
        if not math.isfinite(loss):
            raise NaNLoss(epoch, loss)


def trainable_together(plan: RunPlan) -> bool:
    """Whether a planned run's phase 1 can train in a population: a head on cached features, held-out
    validation, trained here (not a stored head), no fine-tuning, and no schedule that needs a callback."""
    return (plan.inputs.cached is not None and plan.validation_mode == "holdout" and plan.fine_tune is None
            and plan.head_start in ("probe", "random") and plan.head.schedule != "plateau")


def batches_key(plan: RunPlan, source: DataConfig, sampling: str) -> str:
    """What decides a run's phase-1 batches: runs with the same key train on the same batches."""
    data = plan.inputs.data
    return json.dumps([plan.inputs.backbone_digest, plan.feature_blocks, data.train.fingerprint,
                       data.validation.fingerprint, plan.inputs.cached[0].views, source.augment, source.seed,
                       source.batch_size, plan.class_weights, sampling])


def _train_together(plans: list[RunPlan], trains: list[TrainConfig], source: DataConfig) -> list:
    """Phase 1 of every plan at once (each with its training settings of `trains`), on the first plan's
    cached features; each history as a lone run's."""
    members = []
    for plan, train in zip(plans, trains):
        model = plan.model
        model.freeze_backbone()
        if plan.head_start == "probe":
            start_head(model, plan.inputs.probe)
        head = model.head_model()
        compile_classifier(head, train, plan.head.learning_rate, steps_per_execution=HEAD_STEPS_PER_EXECUTION,
                           schedule=plan.head.schedule, steps=plan.head.steps, jit_compile=plan.head.jit_compile)
        members.append(PopulationHead(head, plan.head, plan.head_start == "probe" and model.hidden is None,
                                      model))
    first = plans[0]
    return train_population(members, first.inputs.cached, source.batch_size, source.seed,
                            first.inputs.class_weights, trains[0].sampling == "balanced")
