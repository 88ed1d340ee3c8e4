"""One training run: config -> data -> classifier -> two-phase training -> files.

A run folder (default `saved_models/<name>/`) holds the SavedModel with its
`labels.txt` and `config.json`, plus `model.keras`, `backbone.weights.h5` (the
pretrained start for a later run), `history.json` and `metrics.json`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from kerastl.augment import build_augmenter, parse_augment
from kerastl.backbones import check_weights, get_spec, normalize_weights, resolve_size
from kerastl.config import RunConfig
from kerastl.data import ImageData, load_data
from kerastl.errors import KerastlError
from kerastl.export import export_saved_model
from kerastl.features import FeatureCache
from kerastl.model import build_classifier, get_backbone
from kerastl.train import TrainResult, make_loss, make_optimizer, train_classifier

log = logging.getLogger(__name__)

DEFAULT_EXPORT_ROOT = Path("saved_models")
BACKBONE_WEIGHTS = "backbone.weights.h5"


@dataclass
class RunResult:
    """What a run produced: the trained model, its histories, metrics and folder."""

    model: keras.Model
    history: TrainResult
    class_names: list[str]
    metrics: dict[str, float]
    export_dir: Path
    config: RunConfig


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


def check_export_dir(path: Path, overwrite: bool) -> None:
    """Refuses a file, or a non-empty folder unless `overwrite`, before anything is trained."""
    if path.exists() and not path.is_dir():
        raise KerastlError(f"export path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise KerastlError(f"export folder {path} is not empty; choose another or pass overwrite")


def run_training(
    config: RunConfig, data: ImageData | None = None, overwrite: bool = False, verbose: int | str = "auto"
) -> RunResult:
    """Trains and exports one classifier as `config` says.

    Args:
        config: the run's settings; registry defaults are resolved first.
        data: already-loaded data (skips `config.data.source`).
        overwrite: replace a non-empty export folder.
        verbose: Keras `fit` verbosity.

    Everything is checked before anything is written, so bad input leaves no files.
    """
    config = resolve_config(config)
    export_dir = Path(config.export_dir)
    check_export_dir(export_dir, overwrite)
    keras.utils.set_random_seed(config.data.seed)
    size = config.model.image_size
    if data is None:
        data = load_data(config.data, size)
    if data.validation is None:
        raise KerastlError("no validation data: set a validation split above 0 or a validation folder")
    model = build_classifier(config.model, len(data.class_names))

    dc = config.data
    augmenter = build_augmenter(dc.augment, seed=dc.seed)
    train = data.train.batches(dc.batch_size, True, augmenter, dc.seed, dc.cache_limit_mb)
    validation = data.validation.batches(dc.batch_size, cache_limit_mb=dc.cache_limit_mb)
    log.info(
        "training %s on %d images of %d classes (%d validation)",
        config.model.backbone, data.train.count, len(data.class_names), data.validation.count,
    )
    scratch, tc = config.model.trains_from_scratch, config.train
    features = None
    if tc.feature_cache and not scratch:
        cache = FeatureCache(tc.cache_dir, dc.cache_limit_mb)
        views = tc.cache_views if augmenter is not None else 1
        features = cache.phase1(
            model, data.train, data.validation, views, dc.augment, dc.seed, dc.batch_size, progress=verbose != 0
        )
    history = train_classifier(
        model, train, validation, tc, from_scratch=scratch,
        calibration_images=data.train.sample() if scratch else None, features=features,
        batch_size=dc.batch_size, seed=dc.seed, verbose=verbose,
    )
    metrics = {}
    test = data.test.batches(dc.batch_size, cache_limit_mb=0) if data.test is not None else None
    for name, batches in (("validation", validation), ("test", test)):
        if batches is not None:
            values = model.evaluate(batches, return_dict=True, verbose=0)
            metrics.update({f"{name}_{key}": float(value) for key, value in values.items()})
    log.info("metrics: %s", metrics)

    export_saved_model(model, export_dir, data.class_names, config.to_dict())
    model.save(export_dir / "model.keras")
    get_backbone(model).save_weights(export_dir / BACKBONE_WEIGHTS)
    (export_dir / "history.json").write_text(json.dumps(history.to_dict(), indent=2) + "\n")
    (export_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return RunResult(model, history, data.class_names, metrics, export_dir, config)

