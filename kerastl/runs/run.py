"""One run: config -> data -> classifier -> two-phase training -> scores -> run folder.

`run_training` is the one run path: checks, `plan_run`, `execute`. `kerastl train` calls it;
so does a search trial that runs alone (a weights-only run folder, with phase-1 heads shared
through a `HeadStore`) and the stock-KerasTuner `TransferHyperModel.fit` (on the pipelines
KerasTuner hands it, writing nothing). Trials trained as a population go through the same
`plan_run` and `execute` (`kerastl.runs.population`). The run folder is written by
`kerastl.runs.folder`.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import keras
import numpy as np

from kerastl.config import DataConfig, RunConfig
from kerastl.data.augment import mixes_labels, parse_augment
from kerastl.data.images import ImageData, load_data
from kerastl.errors import KerastlError
from kerastl.features.blocks import BlockCurve
from kerastl.features.cache import CachedFeatures
from kerastl.models.classifier import TransferClassifier
from kerastl.reports.baselines import trivial_model_warning
from kerastl.runs.checks import resolve_run_config, setting_notes
from kerastl.runs.folder import LOGS, write_run_folder
from kerastl.runs.plan import Pipelines, RunPlan, plan_run, split_for
from kerastl.runs.resume import RunState
from kerastl.runs.scoring import describe_data, evaluate_split, predict_split, score, split_counts
from kerastl.storage import HeadStore, check_export_dir, disk_full_error
from kerastl.training.callbacks import NaNLoss
from kerastl.training.compile import make_optimizer
from kerastl.training.crossval import cross_validate
from kerastl.training.distribute import plan_devices
from kerastl.training.losses import make_loss
from kerastl.training.phases import TrainResult, train_phase1, train_phase2

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What a run produced: the trained model, its histories, metrics and folder.

    `reused_head` says whether phase 1 came from a `HeadStore` instead of training;
    `curve` is the probe curve that `features="auto"` chose from (0.2 called it `probe`); `plan` every choice the
    run made (`kerastl.runs.plan`). `config` is the resolved config, with what "auto" chose.
    """

    model: TransferClassifier
    history: TrainResult
    class_names: list[str] | None
    metrics: dict[str, float]
    export_dir: Path | None
    config: RunConfig
    reused_head: bool = False
    curve: BlockCurve | None = None
    plan: RunPlan | None = None
    population: int = 1  # runs whose phase 1 trained together with this one's (`kerastl.runs.population`)
    warnings: list[str] = field(default_factory=list)  # logged at the end: a model no better than a trivial one

    @property
    def probe(self) -> BlockCurve | None:
        """The 0.2 name of `curve`."""
        return self.curve


def checked_config(config: RunConfig, find_unfinished: bool = False) -> RunConfig:
    """A validated copy with registry defaults filled in (size, canonical name, folders); the
    augmentation, optimizer and loss are checked too. `find_unfinished`: see `resolve_run_config`."""
    config = resolve_run_config(config, find_unfinished)
    parse_augment(config.data.augment)
    make_optimizer(config.train.optimizer, config.train.learning_rate, config.train.weight_decay)
    make_loss(config.train.loss, config.model.binary, config.train.label_smoothing, mixes_labels(config.data.augment))
    return config


def run_training(
    config: RunConfig,
    data: ImageData | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
    *,
    model: TransferClassifier | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    heads: HeadStore | None = None,
    save: Literal["export", "weights", "none"] = "export",
    restart: bool = False,
    pipelines: Pipelines | None = None,
) -> RunResult:
    """Trains one classifier as `config` says, scores it and writes its run folder.

    Everything is checked before anything is written, so bad input leaves no files.
    With cached features (the default for a pretrained base), the head starts from
    a converged linear probe, `features="auto"` chooses the blocks it reads and
    `unfreeze_blocks="auto"` the fine-tuning depth (see `kerastl.features.probe`); with few
    images per class, every choice is cross-validated (see `kerastl.training.crossval`).
    The resolved config written beside the model records those choices.

    Args:
        config: the run's settings; registry defaults are resolved first.
        data: loaded data (skips `config.data.source`).
        overwrite: replace a non-empty run folder.
        verbose: Keras `fit` verbosity; "auto": progress bars on a terminal, one line per epoch when
            the output goes to a file or a pipe (no escape codes).
        model: a classifier already built for this config (KerasTuner's `build(hp)`).
        callbacks: extra Keras callbacks for both phases.
        heads: a store of phase-1 heads: a head trained before on the same features
            and phase-1 settings skips phase 1, and a newly trained one is stored.
        save: "export" (the SavedModel and everything, see `kerastl.runs.folder`),
            "weights" (a weights-only run folder) or "none".
        restart: discard an unfinished run into the same folder instead of resuming it.
        pipelines: (train, validation) batched pipelines of (images, labels) instead of `data`,
            used as they are: no feature cache, no test split, the backbone's output as
            features (0.2 took them as `data`, which still works).

    An exported run keeps its state in `<export>.partial` while it trains (see
    `kerastl.runs.resume`): killed, the same call resumes from its last completed epoch.
    A NaN loss stops training with a `KerastlError`, keeping that state.

    Example:
    ```python
    result = kerastl.run_training(RunConfig(DataConfig("flowers"), ModelConfig("efficientnet_b0")))
    result.metrics["val_accuracy"], result.export_dir
    ```
    """
    named, config_export_dir = bool(config.name or config.export_dir), config.export_dir
    if verbose == "auto":  # bars on a terminal or in a notebook, one line per epoch in a file or a pipe
        verbose = 1 if sys.stdout.isatty() or "ipykernel" in sys.modules else 2
    notes = setting_notes(config.model, config.train) if save == "export" else []  # not each of a search's trials
    config = checked_config(config, find_unfinished=save == "export")  # the device settings too
    for note in notes:
        log.warning(note)
    devices = plan_devices(config.devices, config.data.batch_size)
    if model is not None and devices.replicas > 1 and model.distribute_strategy is not devices.tf_strategy:
        raise KerastlError(f"the model passed in was built outside the strategy of {devices.replicas} replicas this "
                           "run trains under: build it inside `plan_devices(...).scope()`, or pass strategy='one'")
    with devices.scope():
        folder = Path(config.export_dir)
        if isinstance(data, tuple):  # 0.2 took the pipelines as `data`
            data, pipelines = None, data
        if pipelines is not None and (model is None or save != "none"):
            raise KerastlError("training on (train, validation) pipelines needs the model built for them and "
                               "save='none': pipelines carry no class names to build or export with")
        if save != "none":
            check_export_dir(folder, overwrite, create_parent=config_export_dir is None)
        mode = None
        if pipelines is None:  # read (and checked) before the folder is locked or anything is written
            data, mode = split_for(config.train.validation, checked_data(config.data, config.model.image_size, data))
        state = (RunState(folder).acquire(config.to_dict(), config.digest(), named, restart)
                 if save == "export" else None)
        finished = False
        try:
            if state is not None and pipelines is None:
                state.check_data(data.train.fingerprint)
            plan = plan_run(config, data, model, heads, verbose, mode, pipelines).on_devices(devices)
            if save == "export":
                log.info(devices.summary())
                log.info(plan.steps_summary())
            result = execute(plan, config, verbose, callbacks, heads, save, state)
            if state is not None:
                state.finish()  # under the lock: no other run can have started in the folder meanwhile
            finished = True
            for warning in result.warnings if save == "export" else []:  # a search reports its own best
                log.warning(warning)
        except NaNLoss as error:
            best = sorted(state.backup_dir.rglob("best.npz")) if state is not None else []
            kept = f"; the best weights before it are kept in {best[-1].parent}" if best else ""
            raise KerastlError(f"training stopped: {error}{kept}. To start over, pass restart=True and a lower "
                               "learning_rate=RATE") from None
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise disk_full_error(error, f"the run's files beside {folder}") from None
        finally:
            if state is not None and not finished:
                state.abandon()  # failed before its first snapshot (weights missing, say): no .partial left
        return result


def checked_data(source: DataConfig, size: int, data: ImageData | None) -> ImageData:
    """The run's images: `data` as given (at the backbone's `size`), or loaded from `source`."""
    if data is None:
        return load_data(source, size)
    if data.train.image_size != size:
        raise KerastlError(f"the in-memory data is {data.train.image_size}x{data.train.image_size} but this run "
                           f"wants {size}x{size}: load it at the backbone's size, or give a data source")
    return data


def execute(plan: RunPlan, config: RunConfig, verbose: int | str = "auto",
            callbacks: list[keras.callbacks.Callback] | None = None, heads: HeadStore | None = None,
            save: str = "export", state: RunState | None = None) -> RunResult:
    """Trains as `plan` says, scores the model and writes the run folder (`save`: "export",
    "weights" or "none"). Nothing here chooses: every choice is in the plan."""
    folder, inputs, model = Path(config.export_dir), plan.inputs, plan.model
    data, dc, tc = inputs.data, config.data, config.train
    backup = state.backup_dir if state is not None else None
    logs = None if save == "none" else state.logs_dir if state is not None else folder / LOGS
    held = None
    if plan.validation_mode == "cv":
        history, metrics = cross_validate(
            model, data, plan.phases, inputs.cached[1] if inputs.cached else None, inputs.views, inputs.probe,
            inputs.folds, tc, dc, callbacks, verbose, backup, logs, inputs.class_weights)
    else:
        calibration = data.train.sample() if model.from_scratch and data is not None else None  # un-augmented
        train, validation = inputs.train_batches, inputs.validation_batches
        first = train_phase1(model, plan.head, train, validation, tc, cached=inputs.cached, start=inputs.probe,
                             stored=inputs.stored, calibration_images=calibration,
                             batch_size=dc.batch_size, seed=dc.seed, callbacks=callbacks, verbose=verbose,
                             backup=backup, log_dir=logs, class_weights=inputs.class_weights)
        if heads is not None and inputs.head_key is not None and inputs.stored is None and not first.kept:
            heads.save(inputs.head_key, model.head_model(), {"phase1": TrainResult(first.history).to_dict()["phase1"]})
        second = train_phase2(model, plan.fine_tune, train, validation, tc, first, callbacks, verbose, backup, logs)
        history = TrainResult(first.history, second)
        if inputs.cached is not None and second is None:  # the head's own view: no backbone pass
            predicted = _head_predictions(model, inputs.cached[1])
        else:
            predicted = predict_split(model, validation, None if data is None else data.validation.labels)
        metrics = score(*predicted, "val_")
        held = ("validation", data.validation, predicted) if data is not None else None
    if data is not None and data.test is not None:
        predicted = predict_split(model, data.test.batches(dc.batch_size, cache_limit_mb=0), data.test.labels)
        metrics.update(score(*predicted, "test_"))
        held = ("test", data.test, predicted)
    log.debug("metrics: %s", metrics)
    curve = inputs.curve
    if curve is not None and history.fine_tune_rule is not None:
        curve = dataclasses.replace(curve, fine_tune_rule=history.fine_tune_rule)
    evaluation = wrong = None
    if save == "export" and held is not None:  # the held-out split's full evaluation, for the report
        name, split, (probabilities, labels) = held
        evaluation, wrong = evaluate_split(probabilities, labels, split, data.class_names, name)
    config = copy.deepcopy(config)  # with "auto" resolved to what the plan chose, so that it reproduces the run
    if not model.from_scratch and config.model.features == "auto":
        last = model.block_count()
        config.model.features = "last" if model.feature_blocks == [last] else ",".join(map(str, model.feature_blocks))
    if config.train.unfreeze_blocks == "auto":
        config.train.unfreeze_blocks = plan.unfreeze_blocks
    class_names = None if data is None else data.class_names
    if save != "none":
        write_run_folder(folder, model, class_names, config, history, metrics, export=save == "export",
                         backbone_digest=inputs.backbone_digest, curve=curve, logs=logs,
                         evaluation=evaluation, wrong_images=wrong, plan=plan.to_dict(),
                         data=describe_data(data, config.data, plan.validation_mode, plan.folds)
                         if save == "export" else None)
    trivial = trivial_model_warning(metrics, {} if data is None else split_counts(data), class_names or [])
    return RunResult(model, history, class_names, metrics, folder if save != "none" else None, config,
                     reused_head=plan.head_start == "stored", curve=curve, plan=plan,
                     warnings=[trivial] if trivial else [])


def _head_predictions(model: TransferClassifier, validation: CachedFeatures) -> tuple[np.ndarray, np.ndarray]:
    # one eager call on a few thousand feature rows: no predict function to trace
    probabilities = keras.ops.convert_to_numpy(
        model.head_model()(np.asarray(validation.features[0]), training=False))
    return probabilities, validation.labels
