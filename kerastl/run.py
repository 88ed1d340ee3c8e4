"""One run: config -> data -> classifier -> two-phase training -> scores -> run folder.

`run_training` is the one run path. `kerastl train` calls it; so does every search
trial (a weights-only run folder, with phase-1 heads shared through a `HeadStore`)
and the stock-KerasTuner `TransferHyperModel.fit` (on the pipelines KerasTuner
hands it, writing nothing). The run folder is written by `kerastl.runfolder`.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from kerastl.augment import mixes_labels, parse_augment
from kerastl.callbacks import NaNLoss
from kerastl.classifier import TransferClassifier, seeded_classifier
from kerastl.compile import make_optimizer
from kerastl.losses import make_loss
from kerastl.pipelines import class_weights, training_batches, weighted
from kerastl.config import RunConfig, TrainConfig, parse_features
from kerastl.crossval import cross_validate_run
from kerastl.data import ImageData, load_data, merge_splits
from kerastl.errors import KerastlError
from kerastl.features import CachedFeatures, FeatureCache, cached_views, extract, model_fingerprint
from kerastl.probe import (DEFAULT_DEPTH, MAX_ROWS, ProbeCurve, ProbeFit, block_columns, choose_c_cv,
                           choose_c_holdout, folds_of, probe_blocks)
from kerastl.preflight import DEFAULT_EXPORT_ROOT, is_named, resolve_run_config
from kerastl.scoring import describe_data, evaluate_split, predict_split, score
from kerastl.resume import RunState, adopt_unfinished
from kerastl.runfolder import LOGS, write_run_folder
from kerastl.storage import HeadStore, check_export_dir, disk_full_error
from kerastl.train import TrainResult, train_classifier

log = logging.getLogger(__name__)

Pipelines = tuple[tf.data.Dataset, tf.data.Dataset]


@dataclass
class RunResult:
    """What a run produced: the trained model, its histories, metrics and folder.

    `reused_head` says whether phase 1 came from a `HeadStore` instead of training;
    `probe` is the probe curve that `features="auto"` chose from. `config` is the
    resolved config, with what "auto" chose.
    """

    model: TransferClassifier
    history: TrainResult
    class_names: list[str] | None
    metrics: dict[str, float]
    export_dir: Path | None
    config: RunConfig
    reused_head: bool = False
    probe: ProbeCurve | None = None


def resolve_config(config: RunConfig) -> RunConfig:
    """A validated copy with registry defaults filled in (size, canonical name, folders); the
    augmentation, optimizer and loss are checked too."""
    config = resolve_run_config(config)
    parse_augment(config.data.augment)
    make_optimizer(config.train.optimizer, config.train.learning_rate, config.train.weight_decay)
    make_loss(config.train.loss, config.model.binary, config.train.label_smoothing, mixes_labels(config.data.augment))
    return config


def phase1_key(fingerprint: dict, data: ImageData, config: RunConfig, blocks: list[int]) -> str:
    """The `HeadStore` key of a run's phase-1 head: the features and every phase-1 setting."""
    m, t, d = config.model, config.train, config.data
    parts = {
        "features": fingerprint, "blocks": blocks, "train": data.train.fingerprint,
        "validation": data.validation.fingerprint if data.validation is not None else None,
        "head": [m.dropout, m.hidden_units, m.binary, m.l2, m.max_norm], "epochs": [t.epochs, t.min_steps],
        "batch_size": d.batch_size,
        "optimizer": [t.optimizer, t.learning_rate, t.weight_decay, t.loss, t.label_smoothing, t.patience,
                      t.schedule, t.warmup],
        "balance": [t.class_weight, t.sampling],
        "views": [cached_views(d.augment, t.cache_views), d.augment, d.seed],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _checked_data(config: RunConfig, data: ImageData | None) -> tuple[ImageData, str, np.ndarray | None]:
    """The data, its validation mode and its class weights (of the images that train); in "cv" mode
    training and validation images are merged."""
    size = config.model.image_size
    if data is None:
        data = load_data(config.data, size)
    elif data.train.image_size != size:
        raise KerastlError(f"the in-memory data is {data.train.image_size}x{data.train.image_size} but this run "
                           f"wants {size}x{size}: load it at the backbone's size, or give a data source")
    mode = validation_mode(config.train, data)
    if mode == "cv":
        merged = data.train if data.validation is None else merge_splits(data.train, data.validation)
        data = dataclasses.replace(data, train=merged, validation=None)
    elif data.validation is None:
        raise KerastlError("no validation data: set a validation split above 0 or a validation folder")
    weights = class_weights(config.train.class_weight, data.train.class_counts(len(data.class_names)),
                            data.class_names)
    if mode == "cv":
        log.info("cross-validating on all %d labelled images (fewer than %d in some class)", data.train.count,
                 config.train.cv_below)
    return data, mode, weights


def validation_mode(config: TrainConfig, data: ImageData) -> str:
    """ "cv" or "holdout": `config.validation`, or for "auto", cv when the smallest class has
    fewer than `config.cv_below` labelled images (training plus validation)."""
    if config.validation != "auto":
        return config.validation
    return "cv" if data.labelled_counts().min() < config.cv_below else "holdout"


def run_training(
    config: RunConfig,
    data: ImageData | Pipelines | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
    *,
    model: TransferClassifier | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    heads: HeadStore | None = None,
    save: Literal["export", "weights", "none"] = "export",
    restart: bool = False,
) -> RunResult:
    """Trains one classifier as `config` says, scores it and writes its run folder.

    Everything is checked before anything is written, so bad input leaves no files.
    With cached features (the default for a pretrained base), the head starts from
    a converged linear probe, `features="auto"` chooses the blocks it reads and
    `unfreeze_blocks="auto"` the fine-tuning depth (see `kerastl.probe`); with few
    images per class, every choice is cross-validated (see `kerastl.crossval`).
    The resolved config written beside the model records those choices.

    Args:
        config: the run's settings; registry defaults are resolved first.
        data: loaded data (skips `config.data.source`), or (train, validation)
            batched pipelines of (images, labels), used as they are: no feature
            cache, no test split, the backbone's output as features.
        overwrite: replace a non-empty run folder.
        verbose: Keras `fit` verbosity.
        model: a classifier already built for this config (KerasTuner's `build(hp)`).
        callbacks: extra Keras callbacks for both phases.
        heads: a store of phase-1 heads: a head trained before on the same features
            and phase-1 settings skips phase 1, and a newly trained one is stored.
        save: "export" (the SavedModel and everything, see `kerastl.runfolder`),
            "weights" (a weights-only run folder) or "none".
        restart: discard an unfinished run into the same folder instead of resuming it.

    An exported run keeps its state in `<export>.partial` while it trains (see
    `kerastl.resume`): killed, the same call resumes from its last completed epoch.
    A NaN loss stops training with a `KerastlError`, keeping that state.

    Example:
    ```python
    result = kerastl.run_training(RunConfig(DataConfig("flowers"), ModelConfig("efficientnet_b0")))
    result.metrics["val_accuracy"], result.export_dir
    ```
    """
    named, config_export_dir = is_named(config), config.export_dir
    config = resolve_config(config)
    if save == "export" and not named:  # the same command finds its unfinished run
        config = adopt_unfinished(config, DEFAULT_EXPORT_ROOT)
    folder = Path(config.export_dir)
    pipelines = isinstance(data, tuple)
    if pipelines and (model is None or save != "none"):
        raise KerastlError("training on (train, validation) pipelines needs the model built for them and "
                           "save='none': pipelines carry no class names to build or export with")
    if save != "none":
        check_export_dir(folder, overwrite, create_parent=config_export_dir is None)
    mode, weights = "holdout" if pipelines else None, None
    if not pipelines:  # read (and checked) before the folder is locked or anything is written
        data, mode, weights = _checked_data(config, data)
    state = RunState(folder).acquire(config, named, restart) if save == "export" else None
    try:
        result = _run(config, data, mode, weights, pipelines, verbose, model, callbacks, heads, save, state)
        if state is not None:
            state.finish()  # under the lock: no other run can have started in the folder meanwhile
    except NaNLoss as error:
        best = sorted(state.backup_dir.rglob("best.npz")) if state is not None else []
        kept = f"; the best weights before it are kept in {best[-1].parent}" if best else ""
        raise KerastlError(f"training stopped: {error}{kept}. To start over with a lower --learning-rate, "
                           "pass --restart") from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise disk_full_error(error, f"the run's files beside {folder}") from None
    finally:
        if state is not None:
            state.release()
    return result


def _run(config: RunConfig, data, mode: str, weights: np.ndarray | None, pipelines: bool, verbose, model, callbacks,
         heads, save: str, state: RunState | None) -> RunResult:
    """`run_training` once its data is read (with its class `weights`) and its folder checked (and,
    exporting, locked)."""
    folder = Path(config.export_dir)
    if pipelines:
        train, validation = data
        weights = _pipeline_weights(config, model, train)
        train, validation = weighted(train, weights), weighted(validation, weights)
    else:
        if state is not None:
            state.check_data(data.train.fingerprint)
        train, validation = _image_pipelines(config, data, weights) if mode == "holdout" else (None, None)
    if weights is not None:
        log.info("class weights: %s", ", ".join(f"{w:.3g}" for w in weights))
    model = model or seeded_classifier(config.model, len(data.class_names), config.data.seed)
    phase1 = Phase1() if pipelines else _phase1(config, data, model, heads, verbose, mode, weights)
    model = phase1.model or model
    if phase1.features is None and not model.from_scratch and mode == "holdout":
        phase1.probe = _probe_pipelines(config, model, train, validation, weights)
    dc, tc, held = config.data, config.train, None
    logs = None if save == "none" else state.logs_dir if state is not None else folder / LOGS
    if mode == "cv":
        history, metrics = cross_validate_run(
            config, data, model, phase1.features[1] if phase1.features else None, phase1.views, phase1.probe,
            phase1.folds, phase1.depth, callbacks, verbose, state.backup_dir if state is not None else None, logs,
            weights)
    else:
        calibration = data.train.sample() if model.from_scratch and not pipelines else None  # un-augmented
        history = train_classifier(
            model, train, validation, tc, calibration_images=calibration, features=phase1.features,
            batch_size=dc.batch_size, seed=dc.seed, callbacks=callbacks, verbose=verbose, phase1=phase1.start,
            after_phase1=lambda history: phase1.store(heads, model, history), head_start=phase1.probe,
            unfreeze_blocks=phase1.depth, backup_dir=state.backup_dir if state is not None else None, log_dir=logs,
            class_weights=weights,
        )
        if phase1.features is not None and history.phase2 is None:  # the head's own view: no backbone pass
            predicted = _head_predictions(model, phase1.features[1])
        else:
            predicted = predict_split(model, validation, None if pipelines else data.validation.labels)
        metrics = score(*predicted, "val_")
        held = ("validation", data.validation, predicted) if not pipelines else None
    if not pipelines and data.test is not None:
        predicted = predict_split(model, data.test.batches(dc.batch_size, cache_limit_mb=0), data.test.labels)
        metrics.update(score(*predicted, "test_"))
        held = ("test", data.test, predicted)
    log.debug("metrics: %s", metrics)
    evaluation = wrong = None
    if save == "export" and held is not None:  # the held-out split's full evaluation, for the report
        name, split, (probabilities, labels) = held
        evaluation, wrong = evaluate_split(probabilities, labels, split, data.class_names, name)
    config = _with_choices(config, model, phase1)
    class_names = None if pipelines else data.class_names
    if save != "none":
        write_run_folder(folder, model, class_names, config, history, metrics, export=save == "export",
                         backbone_digest=phase1.backbone_digest, probe=phase1.curve, logs=logs,
                         evaluation=evaluation, wrong_images=wrong,
                         data=describe_data(data, config, mode, int(metrics.get("cv_folds", 0)) or None)
                         if save == "export" else None)
    return RunResult(model, history, class_names, metrics, folder if save != "none" else None, config,
                     reused_head=phase1.start is not None, probe=phase1.curve)


def _with_choices(config: RunConfig, model: TransferClassifier, phase1: Phase1) -> RunConfig:
    """The config with "auto" resolved to what this run chose, so that it reproduces the run."""
    config = copy.deepcopy(config)
    if not model.from_scratch and config.model.features == "auto":
        last = model.block_count()
        config.model.features = "last" if model.feature_blocks == [last] else ",".join(map(str, model.feature_blocks))
    if config.train.unfreeze_blocks == "auto":
        config.train.unfreeze_blocks = phase1.depth or DEFAULT_DEPTH
    return config


def _image_pipelines(config: RunConfig, data: ImageData, weights: np.ndarray | None) -> Pipelines:
    """The training pipeline (see `kerastl.pipelines.training_batches`) and the plain validation
    pipeline, both weighted by the class `weights` (if any).

    Both share one budget of decoded images in memory, `cache_limit_mb`: the training
    images are cached when they fit it, the validation images when they fit what is left.
    """
    dc = config.data
    log.info("training %s on %d images of %d classes (%d validation)", config.model.backbone,
             data.train.count, len(data.class_names), data.validation.count)
    train_mb = data.train.count * data.train.image_size**2 * 3 / 2**20  # or its shuffle buffer: the limit
    left = max(dc.cache_limit_mb - train_mb, 0)
    return (training_batches(data.train, dc, config.train, len(data.class_names), config.model.binary, weights),
            weighted(data.validation.batches(dc.batch_size, cache_limit_mb=int(left)), weights))


def _pipeline_weights(config: RunConfig, model: TransferClassifier, train: tf.data.Dataset) -> np.ndarray | None:
    """Class weights for a user's (train, validation) pipelines: "auto" counts the labels of one
    pass over the training pipeline; weights by class name need class names, which pipelines lack."""
    spec = config.train.class_weight
    if spec == "none":
        return None
    counts = np.zeros(model.num_classes, np.int64)
    if spec == "auto":
        for batch in train:
            labels = np.asarray(batch[1])
            one_hot = labels.ndim == 2 and labels.shape[-1] == model.num_classes > 1
            labels = labels.argmax(axis=-1) if one_hot else labels.reshape(-1)
            counts += np.bincount(labels.astype(np.int64), minlength=model.num_classes)
    return class_weights(spec, counts)


@dataclass
class Phase1:
    """What phase 1 starts from: cached features (of the blocks the head reads), a stored head
    (its history) under `key`, or a convex start (`probe`); and what `auto` chose."""

    features: tuple[CachedFeatures, CachedFeatures] | None = None
    start: keras.callbacks.History | None = None
    key: str | None = None
    backbone_digest: str | None = None  # of the backbone the features came from
    probe: ProbeFit | None = None
    curve: ProbeCurve | None = None
    depth: int | None = None  # the fine-tuning depth the probe curve chose
    model: TransferClassifier | None = None  # rebuilt to read the blocks `auto` chose
    views: np.ndarray | None = None  # cross-validation: every view of every image [views, n, dim]
    folds: list = field(default_factory=list)

    def store(self, heads: HeadStore | None, model: TransferClassifier, history: keras.callbacks.History) -> None:
        """Stores a newly trained phase-1 head (called between the phases)."""
        if heads is not None and self.key is not None and self.start is None:
            heads.save(self.key, model.head_model(), {"phase1": TrainResult(history).to_dict()["phase1"]})


def _phase1(config: RunConfig, data: ImageData, model: TransferClassifier, heads: HeadStore | None,
            verbose: int | str, mode: str, weights: np.ndarray | None = None) -> Phase1:
    """Cached features (when the base is frozen and the cache is on), the blocks they come from,
    and the head's start: a stored head, or a linear probe fitted on them."""
    dc, tc = config.data, config.train
    if not tc.feature_cache or model.from_scratch:
        return Phase1()
    fingerprint = model_fingerprint(model)
    auto = parse_features(config.model.features) == "auto"
    # the fine-tuning depth is read off the probe curve too
    probing = auto or (tc.unfreeze_blocks == "auto" and tc.fine_tune_epochs > 0)
    blocks = list(range(1, model.block_count() + 1)) if probing else model.feature_blocks
    views = cached_views(dc.augment, tc.cache_views)
    plain_split = data.validation if mode == "holdout" else data.train  # cv: a plain view of every image
    train, plain = FeatureCache(tc.cache_dir, dc.cache_limit_mb).phase1(
        model, data.train, plain_split, views, dc.augment, dc.seed, dc.batch_size, progress=verbose != 0,
        fingerprint=fingerprint, blocks=blocks)
    phase1 = Phase1(backbone_digest=fingerprint["weights"])
    if probing:
        model, train, plain = _probe_blocks(config, data, model, phase1, train, plain, mode, auto)
    phase1.features = (train, plain)
    if heads is not None:
        phase1.key = phase1_key(fingerprint, data, config, model.feature_blocks)
        phase1.start = _stored_phase1(heads, phase1.key, model)
    binary, classes = config.model.binary, len(data.class_names)
    if mode == "cv":
        phase1.views = train.features if views == 1 else np.concatenate([train.features, plain.features])
        phase1.folds = folds_of(plain.labels, tc.cv_folds, dc.seed)
        phase1.probe = choose_c_cv(phase1.views, plain.features[0], plain.labels, phase1.folds, classes, binary,
                                   dc.seed, weights)
    elif phase1.start is None:
        phase1.probe = choose_c_holdout(train.features, train.labels, plain.features[0], plain.labels, classes,
                                        binary, dc.seed, weights)
    return phase1


def _probe_blocks(config: RunConfig, data: ImageData, model: TransferClassifier, phase1: Phase1,
                  train: CachedFeatures, plain: CachedFeatures, mode: str, choose: bool):
    """Probes every block on the labelled images (features of every block, in order) for the
    probe curve and the fine-tuning depth; with `choose` (`features="auto"`), rebuilds the
    classifier to read the chosen blocks. Returns it with its blocks' columns of the features."""
    # the labelled images that train: in holdout mode, the validation images stay held out
    x, y = (np.asarray(plain.features[0]), plain.labels) if mode == "cv" else (np.asarray(train.features[0]),
                                                                              train.labels)
    widths = model.block_widths(list(range(1, model.block_count() + 1)))
    curve = probe_blocks(x, y, widths, model.block_names(), config.train.cv_folds, config.data.seed)
    if not choose:
        curve.chosen = model.feature_blocks
    log.debug("%s", curve.summary())
    phase1.curve, phase1.depth = curve, curve.unfreeze_blocks
    if curve.chosen != model.feature_blocks:
        model = seeded_classifier(config.model, len(data.class_names), config.data.seed, backbone=model.backbone,
                                  feature_blocks=curve.chosen)
        phase1.model = model
    columns = block_columns(widths, curve.chosen)
    return model, train.columns(columns), plain.columns(columns)


def _probe_pipelines(config: RunConfig, model: TransferClassifier, train: tf.data.Dataset,
                     validation: tf.data.Dataset, weights: np.ndarray | None = None) -> ProbeFit:
    """The convex start without cached features: one pass of the backbone over (a sample of)
    the training pipeline as it comes, augmented, and over the validation pipeline."""
    extractor = model.features_model()
    steps = math.ceil(MAX_ROWS / config.data.batch_size)
    x, y = extract(extractor, train.take(steps))
    xv, yv = extract(extractor, validation)
    return choose_c_holdout(x[None], y, xv, yv, model.num_classes, model.binary, config.data.seed, weights)


def _stored_phase1(heads: HeadStore, key: str, model: TransferClassifier) -> keras.callbacks.History | None:
    """Loads a stored phase-1 head into `model`; returns that phase's history, or None when there is none."""
    stored = heads.load(key)
    if stored is None:
        return None
    model.head_model().load_weights(stored["weights"])
    log.info("phase 1 reuses the stored head %s", key)
    return TrainResult.from_dict({"phase1": stored["phase1"]}).phase1


def _head_predictions(model: TransferClassifier, validation: CachedFeatures) -> tuple[np.ndarray, np.ndarray]:
    # one eager call on a few thousand feature rows: no predict function to trace
    probabilities = keras.ops.convert_to_numpy(
        model.head_model()(np.asarray(validation.features[0]), training=False))
    return probabilities, validation.labels
