"""One run: config -> data -> classifier -> two-phase training -> scores -> run folder.

`run_training` is the one run path. `kerastl train` calls it; so does every search
trial (a weights-only run folder, with phase-1 heads shared through a `HeadStore`)
and the stock-KerasTuner `TransferHyperModel.fit` (on the pipelines KerasTuner
hands it, writing nothing). The run folder is written by `kerastl.runfolder`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from kerastl.augment import build_augmenter, parse_augment
from kerastl.backbones import check_weights, get_spec, normalize_weights, resolve_size
from kerastl.classifier import TransferClassifier, seeded_classifier
from kerastl.compile import make_loss, make_optimizer
from kerastl.config import RunConfig
from kerastl.data import ImageData, load_data
from kerastl.errors import KerastlError
from kerastl.features import CachedFeatures, FeatureCache, cached_views, model_fingerprint
from kerastl.report import score, split_scores
from kerastl.runfolder import check_export_dir, write_run_folder
from kerastl.storage import HeadStore
from kerastl.train import TrainResult, train_classifier

log = logging.getLogger(__name__)

DEFAULT_EXPORT_ROOT = Path("saved_models")
Pipelines = tuple[tf.data.Dataset, tf.data.Dataset]


@dataclass
class RunResult:
    """What a run produced: the trained model, its histories, metrics and folder.

    `reused_head` says whether phase 1 came from a `HeadStore` instead of training.
    """

    model: TransferClassifier
    history: TrainResult
    class_names: list[str] | None
    metrics: dict[str, float]
    export_dir: Path | None
    config: RunConfig
    reused_head: bool = False


def resolve_config(config: RunConfig) -> RunConfig:
    """A validated copy with registry defaults filled in (size, canonical name, folders)."""
    config = copy.deepcopy(config)
    config.validate()
    config.model.weights = normalize_weights(config.model.weights)
    spec = get_spec(config.model.backbone)
    config.model.backbone = spec.name
    config.model.image_size = resolve_size(spec, config.model.image_size)
    check_weights(spec, config.model.weights)
    parse_augment(config.data.augment)
    make_optimizer(config.train.optimizer, config.train.learning_rate, config.train.weight_decay)
    make_loss(config.train.loss, config.model.binary, config.train.label_smoothing)
    if not config.name:
        config.name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.export_dir is None:
        config.export_dir = str(DEFAULT_EXPORT_ROOT / config.name)
    return config


def phase1_key(fingerprint: dict, data: ImageData, config: RunConfig) -> str:
    """The `HeadStore` key of a run's phase-1 head: the features and every phase-1 setting."""
    m, t, d = config.model, config.train, config.data
    parts = {
        "features": fingerprint, "train": data.train.fingerprint, "validation": data.validation.fingerprint,
        "head": [m.dropout, m.hidden_units, m.binary], "epochs": t.epochs, "batch_size": d.batch_size,
        "optimizer": [t.optimizer, t.learning_rate, t.weight_decay, t.loss, t.label_smoothing, t.patience],
        "views": [cached_views(d.augment, t.cache_views), d.augment, d.seed],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _checked_data(config: RunConfig, data: ImageData | None) -> ImageData:
    size = config.model.image_size
    if data is None:
        data = load_data(config.data, size)
    elif data.train.image_size != size:
        raise KerastlError(f"the in-memory data is {data.train.image_size}x{data.train.image_size} but this run "
                           f"wants {size}x{size}: load it at the backbone's size, or give a data source")
    if data.validation is None:
        raise KerastlError("no validation data: set a validation split above 0 or a validation folder")
    return data


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
) -> RunResult:
    """Trains one classifier as `config` says, scores it and writes its run folder.

    Everything is checked before anything is written, so bad input leaves no files.

    Args:
        config: the run's settings; registry defaults are resolved first.
        data: loaded data (skips `config.data.source`), or (train, validation)
            batched pipelines of (images, labels), used as they are: no feature
            cache, no test split.
        overwrite: replace a non-empty run folder.
        verbose: Keras `fit` verbosity.
        model: a classifier already built for this config (KerasTuner's `build(hp)`).
        callbacks: extra Keras callbacks for both phases.
        heads: a store of phase-1 heads: a head trained before on the same features
            and phase-1 settings skips phase 1, and a newly trained one is stored.
        save: "export" (the SavedModel and everything, see `kerastl.runfolder`),
            "weights" (a weights-only run folder) or "none".

    Example:
    ```python
    result = kerastl.run_training(RunConfig(DataConfig("flowers"), ModelConfig("efficientnet_b0")))
    result.metrics["val_accuracy"], result.export_dir
    ```
    """
    config = resolve_config(config)
    folder = Path(config.export_dir)
    pipelines = isinstance(data, tuple)
    if pipelines and (model is None or save != "none"):
        raise KerastlError("training on (train, validation) pipelines needs the model built for them and "
                           "save='none': pipelines carry no class names to build or export with")
    if save != "none":
        check_export_dir(folder, overwrite)
    if not pipelines:
        data = _checked_data(config, data)
    model = model or seeded_classifier(config.model, len(data.class_names), config.data.seed)
    if pipelines:
        (train, validation), phase1 = data, Phase1()
    else:
        train, validation = _image_pipelines(config, data)
        phase1 = _phase1(config, data, model, heads, verbose)
    dc = config.data
    calibration = data.train.sample() if model.from_scratch and not pipelines else None  # un-augmented
    history = train_classifier(
        model, train, validation, config.train, calibration_images=calibration,
        features=phase1.features, batch_size=dc.batch_size, seed=dc.seed, callbacks=callbacks, verbose=verbose,
        phase1=phase1.start, after_phase1=lambda history: phase1.store(heads, model, history),
    )
    if phase1.features is not None and history.phase2 is None:  # the head's own view: no backbone pass
        metrics = _head_scores(model, phase1.features[1])
    else:
        metrics = split_scores(model, validation, "val_")
    if not pipelines and data.test is not None:
        metrics.update(split_scores(model, data.test.batches(dc.batch_size, cache_limit_mb=0), "test_"))
    log.info("metrics: %s", metrics)
    class_names = None if pipelines else data.class_names
    if save != "none":
        write_run_folder(folder, model, class_names, config, history, metrics, export=save == "export",
                         backbone_digest=phase1.backbone_digest)
    return RunResult(model, history, class_names, metrics, folder if save != "none" else None, config,
                     reused_head=phase1.start is not None)


def _image_pipelines(config: RunConfig, data: ImageData) -> Pipelines:
    """The augmented, shuffled training pipeline and the plain validation pipeline."""
    dc = config.data
    log.info("training %s on %d images of %d classes (%d validation)", config.model.backbone,
             data.train.count, len(data.class_names), data.validation.count)
    augmenter = build_augmenter(dc.augment, seed=dc.seed)
    return (data.train.batches(dc.batch_size, True, augmenter, dc.seed, dc.cache_limit_mb),
            data.validation.batches(dc.batch_size, cache_limit_mb=dc.cache_limit_mb))


@dataclass
class Phase1:
    """What phase 1 starts from: cached features, and a stored head (its history) under `key`."""

    features: tuple[CachedFeatures, CachedFeatures] | None = None
    start: keras.callbacks.History | None = None
    key: str | None = None
    backbone_digest: str | None = None  # of the backbone the features came from

    def store(self, heads: HeadStore | None, model: TransferClassifier, history: keras.callbacks.History) -> None:
        """Stores a newly trained phase-1 head (called between the phases)."""
        if heads is not None and self.key is not None and self.start is None:
            heads.save(self.key, model.head_model(), {"phase1": TrainResult(history).to_dict()["phase1"]})


def _phase1(config: RunConfig, data: ImageData, model: TransferClassifier, heads: HeadStore | None,
            verbose: int | str) -> Phase1:
    """The cached features (when the base is frozen and the cache is on) and any stored head."""
    dc, tc = config.data, config.train
    if not tc.feature_cache or model.from_scratch:
        return Phase1()
    fingerprint = model_fingerprint(model)
    features = FeatureCache(tc.cache_dir, dc.cache_limit_mb).phase1(
        model, data.train, data.validation, cached_views(dc.augment, tc.cache_views), dc.augment, dc.seed,
        dc.batch_size, progress=verbose != 0, fingerprint=fingerprint)
    digest = fingerprint["weights"]
    if heads is None:
        return Phase1(features, backbone_digest=digest)
    key = phase1_key(fingerprint, data, config)
    return Phase1(features, _stored_phase1(heads, key, model), key, digest)


def _stored_phase1(heads: HeadStore, key: str, model: TransferClassifier) -> keras.callbacks.History | None:
    """Loads a stored phase-1 head into `model`; returns that phase's history, or None when there is none."""
    stored = heads.load(key)
    if stored is None:
        return None
    model.head_model().load_weights(stored["weights"])
    log.info("phase 1 reuses the stored head %s", key)
    return TrainResult.from_dict({"phase1": stored["phase1"]}).phase1


def _head_scores(model: TransferClassifier, validation: CachedFeatures) -> dict[str, float]:
    # one eager call on a few thousand feature rows: no predict function to trace
    probabilities = keras.ops.convert_to_numpy(
        model.head_model()(np.asarray(validation.features[0]), training=False))
    return score(probabilities, validation.labels, "val_")
