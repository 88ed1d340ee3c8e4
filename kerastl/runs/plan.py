"""Planning a run: every automatic choice resolved once, before anything trains.

`plan_run(config, data)` returns a frozen `RunPlan`:
- the validation mode ("auto": cross-validation when some class has fewer than `cv_below`
  labelled images) and the folds;
- the class weights;
- the blocks the head reads and the fine-tuning depth (`features="auto"` and
  `unfreeze_blocks="auto"` are read off a probe curve on cached features, `kerastl.features.blocks`);
- the head's start: a head stored by an earlier search trial, a converged linear probe, or
  random (a hidden layer, or every layer from scratch);
- a `PhasePlan` per phase: epochs raised to the step floor (not for a linear head that starts
  from the converged probe on cached features), patience, learning rate, schedule, what is unfrozen.

Planning runs the frozen backbone once over the images (the feature cache), since the probe
that chooses the blocks and starts the head reads its features. `kerastl.runs.run` then
executes the plan and writes `plan` into `config.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig, ValidationConfig, parse_features
from kerastl.data.images import ImageData, merge_splits
from kerastl.data.pipelines import class_weights as weigh_classes
from kerastl.data.pipelines import training_batches, weighted
from kerastl.errors import KerastlError
from kerastl.features.blocks import BlockCurve, block_columns, probe_blocks
from kerastl.features.cache import CachedFeatures, FeatureCache, cached_views, model_fingerprint
from kerastl.features.extract import extract
from kerastl.features.probe import MAX_ROWS, ProbeFit, choose_c_cv, choose_c_holdout, folds_of, views_or_plain
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.storage import HeadStore
from kerastl.training.distribute import DevicePlan
from kerastl.training.phase import PhasePlan, batches_per_epoch, fine_tune_depth, plan_phases
from kerastl.training.phases import TrainResult

log = logging.getLogger(__name__)

Pipelines = tuple[tf.data.Dataset, tf.data.Dataset]
HEAD_STARTS = ("probe", "stored", "random", "scratch")


@dataclass(frozen=True)
class PlanInputs:
    """What the plan was made from and what training starts from (not written to `config.json`)."""

    model: TransferClassifier
    data: ImageData | None = None  # None: a user's pipelines
    train_batches: tf.data.Dataset | None = None  # holdout: the training and validation pipelines
    validation_batches: tf.data.Dataset | None = None
    class_weights: np.ndarray | None = None  # as the loss takes them
    cached: tuple[CachedFeatures, CachedFeatures] | None = None  # features (training views, plain) of the blocks read
    probe: ProbeFit | None = None
    curve: BlockCurve | None = None
    stored: keras.callbacks.History | None = None  # a stored head's phase-1 history
    head_key: str | None = None  # the `HeadStore` key a newly trained head is stored under
    backbone_digest: str | None = None
    views: np.ndarray | None = None  # cv: every view of every image [views, n, dim]
    folds: list = field(default_factory=list)  # cv: (train, held-out) image indices


@dataclass(frozen=True)
class RunPlan:
    """Every choice of one run, resolved (see the module docstring); `inputs` holds what it starts from."""

    validation_mode: str  # "holdout" or "cv"
    folds: int  # cross-validation folds (0: holdout, or too few images in some class to fold)
    class_weights: tuple[float, ...] | None
    feature_blocks: tuple[int, ...] | None  # None: the whole network trains from scratch
    unfreeze_blocks: int  # what `unfreeze_blocks="auto"` resolves to (phase 2 unfreezes it, when there is one)
    head_start: str  # one of HEAD_STARTS
    phases: tuple[PhasePlan, ...]  # phase 1, then fine-tuning when there is any
    inputs: PlanInputs = field(compare=False, repr=False)
    devices: dict[str, Any] | None = None  # `DevicePlan.to_dict()`: strategy, replicas, precision, XLA

    def on_devices(self, devices: DevicePlan) -> RunPlan:
        """This plan on `devices`: the phases' rates times its learning-rate scale, its XLA setting."""
        phases = tuple(dataclasses.replace(phase, learning_rate=phase.learning_rate * devices.lr_scale,
                                           jit_compile=devices.jit_compile) for phase in self.phases)
        return dataclasses.replace(self, phases=phases, devices=devices.to_dict())

    @property
    def head(self) -> PhasePlan:
        return self.phases[0]

    @property
    def fine_tune(self) -> PhasePlan | None:
        return self.phases[1] if len(self.phases) > 1 else None

    @property
    def model(self) -> TransferClassifier:
        return self.inputs.model

    def steps_summary(self) -> str:
        """The optimizer steps the plan allows at most, phase by phase (early stopping may end them sooner)."""
        names = {"head": "phase 1", "fine_tune": "phase 2", "scratch": "training from scratch"}
        parts = [f"{names[phase.name]} {phase.epochs} epochs" + (f" x {phase.steps_per_epoch} = {phase.steps:,}"
                                                                  if phase.steps else "")
                 for phase in self.phases if phase.epochs > 0]
        if not parts:
            return "no optimizer steps: the head is the converged probe"
        folds = f", in each of {self.folds} folds and then on every image" if self.validation_mode == "cv" and \
            self.folds else ""
        return f"optimizer steps at most: {'; '.join(parts)}{folds} (early stopping may end sooner)"

    def to_dict(self) -> dict[str, Any]:
        """The choices, as `config.json` records them under "plan"."""
        return {"validation_mode": self.validation_mode, "folds": self.folds,
                "class_weights": None if self.class_weights is None else list(self.class_weights),
                "feature_blocks": None if self.feature_blocks is None else list(self.feature_blocks),
                "unfreeze_blocks": self.unfreeze_blocks,
                "head_start": self.head_start, "phases": [phase.to_dict() for phase in self.phases],
                "devices": self.devices,
                # the cached views phase 1 reads (the plain one first); None: no cached features
                "cached_views": None if self.inputs.cached is None else self.inputs.cached[0].views}


def validation_mode(validation: ValidationConfig, data: ImageData) -> str:
    """ "cv" or "holdout": the configured mode, or for "auto", cv when the smallest class has fewer
    than `cv_below` labelled images (training plus validation)."""
    if validation.mode != "auto":
        return validation.mode
    return "cv" if data.labelled_counts().min() < validation.cv_below else "holdout"


def split_for(validation: ValidationConfig, data: ImageData) -> tuple[ImageData, str]:
    """The data as the run trains on it, and its validation mode: in "cv" mode the training and
    validation images are merged. Holdout without validation images is a `KerastlError`."""
    mode = validation_mode(validation, data)
    if mode == "cv":
        merged = data.train if data.validation is None else merge_splits(data.train, data.validation)
        data = dataclasses.replace(data, train=merged, validation=None)
    elif data.validation is None:
        raise KerastlError("no validation data: set a validation split above 0 or a validation folder")
    return data, mode


def plan_run(config: RunConfig, data: ImageData | None = None, model: TransferClassifier | None = None,
             heads: HeadStore | None = None, verbose: int | str = "auto", mode: str | None = None,
             pipelines: Pipelines | None = None) -> RunPlan:
    """The plan of a run of `config` (resolved and validated) on `data`, loaded images, or on a
    user's (train, validation) `pipelines` with the `model` built for them.

    `model`: a classifier already built for this config (a search's shared backbone);
    `heads`: a store of phase-1 heads, a stored one replacing phase 1's training. `mode`: the
    validation mode when `data` is already split for it (`split_for`).
    """
    tc = config.train
    if pipelines is not None:
        return _plan_pipelines(tc, config.data, pipelines, model)
    if data is None:
        raise KerastlError("plan_run needs the run's data: loaded images, or (train, validation) pipelines")
    if mode is None:
        data, mode = split_for(tc.validation, data)
    class_weights = weigh_classes(tc.class_weight, data.train.class_counts(len(data.class_names)), data.class_names)
    if mode == "cv":
        log.info("cross-validating on all %d labelled images (fewer than %d in some class)", data.train.count,
                 tc.validation.cv_below)
    model = model or build_classifier(config.model, len(data.class_names), config.data.seed)
    train = validation = None
    if mode == "holdout":
        log.info("training %s on %d images of %d classes (%d validation)", config.model.backbone,
                 data.train.count, len(data.class_names), data.validation.count)
        train, validation = _image_pipelines(config.data, tc, config.model.binary, data, class_weights)
    inputs = _head_inputs(config.model, config.data, tc, data, model, heads, verbose, mode, class_weights)
    if inputs.cached is None and not inputs.model.from_scratch and mode == "holdout":
        probe = _probe_pipelines(config.data, inputs.model, train, validation, class_weights)
        inputs = dataclasses.replace(inputs, probe=probe)
    inputs = dataclasses.replace(inputs, data=data, train_batches=train, validation_batches=validation,
                                 class_weights=class_weights)
    return _plan(tc, config.data.batch_size, inputs, mode)


def _plan_pipelines(tc: TrainConfig, dc: DataConfig, pipelines: Pipelines, model: TransferClassifier | None) -> RunPlan:
    if model is None:
        raise KerastlError("training on (train, validation) pipelines needs the model built for them and "
                           "save='none': pipelines carry no class names to build or export with")
    class_weights = _pipeline_weights(tc.class_weight, model, pipelines[0])
    train, validation = weighted(pipelines[0], class_weights), weighted(pipelines[1], class_weights)
    probe = None if model.from_scratch else _probe_pipelines(dc, model, train, validation, class_weights)
    return _plan(tc, dc.batch_size, PlanInputs(model, None, train, validation, class_weights, probe=probe), "holdout")


def _plan(tc: TrainConfig, batch_size: int, inputs: PlanInputs, mode: str) -> RunPlan:
    """The phases and the choices, from what the inputs hold."""
    model = inputs.model
    depth = inputs.curve.unfreeze_blocks if inputs.curve is not None else None
    if inputs.class_weights is not None:
        log.info("class weights: %s", ", ".join(f"{w:.3g}" for w in inputs.class_weights))
    scratch = model.from_scratch
    if mode == "cv":
        head_steps = math.ceil(inputs.data.train.count / batch_size)
        fine_tune_steps = math.ceil(min((len(train) for train, _ in inputs.folds), default=0) / batch_size)
    elif inputs.cached is not None:
        head_steps = math.ceil(len(inputs.cached[0].labels) / batch_size)
        fine_tune_steps = batches_per_epoch(inputs.train_batches)
    else:
        head_steps = fine_tune_steps = batches_per_epoch(inputs.train_batches)
    start = "scratch" if scratch else "stored" if inputs.stored is not None else \
        "probe" if inputs.probe is not None else "random"
    if start == "probe" and model.hidden is None and inputs.cached is not None:
        # converged: no step floor. The epochs still run (KeepBest seeded with the probe's loss keeps it unless
        # they beat it): the C grid is coarse, and they lowered MobileNetV3Small's validation loss 0.258 -> 0.221
        # at 100 images per class (test accuracy +1.0 point; docs/architecture.md)
        tc = dataclasses.replace(tc, head=dataclasses.replace(tc.head, min_steps=0))
    phases = list(plan_phases(tc, scratch, head_steps, fine_tune_steps, depth))  # each fold: one epoch count
    if mode == "cv" and inputs.cached is not None and model.hidden is None:  # the probe is the head
        phases[0] = dataclasses.replace(phases[0], epochs=0, patience=0)
    if mode == "cv" and not (inputs.folds and model.hidden is None):  # nothing to cross-validate phase 2 on
        phases = phases[:1]
    per_class = None if inputs.class_weights is None else tuple(float(w) for w in inputs.class_weights)
    return RunPlan(mode, len(inputs.folds), per_class, None if scratch else tuple(model.feature_blocks),
                   fine_tune_depth(tc, depth), start, tuple(phases), inputs)


def head_key(fingerprint: dict, data: ImageData, blocks: list[int], m: ModelConfig, t: TrainConfig,
             d: DataConfig) -> str:
    """The `HeadStore` key of a run's phase-1 head: the features (`fingerprint`, the `blocks` read,
    the images of `data`) and every phase-1 setting of the model, training and data configs."""
    parts = {
        "features": fingerprint, "blocks": blocks, "train": data.train.fingerprint,
        "validation": data.validation.fingerprint if data.validation is not None else None,
        "head": [m.dropout, m.hidden_units, m.binary, m.l2, m.max_norm], "epochs": [t.head.epochs, t.head.min_steps],
        "batch_size": d.batch_size,
        "optimizer": [t.optimizer, t.learning_rate, t.weight_decay, t.loss, t.label_smoothing, t.patience,
                      t.head.schedule, t.warmup, *([t.head.lr_ratio] if t.head.lr_ratio != 1.0 else [])],
        "balance": [t.class_weight, t.sampling],
        "views": [cached_views(d.augment, t.cache_views), d.augment, d.seed],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _image_pipelines(dc: DataConfig, tc: TrainConfig, binary: bool, data: ImageData,
                     class_weights: np.ndarray | None) -> Pipelines:
    """The training pipeline (see `kerastl.data.pipelines.training_batches`) and the plain validation
    pipeline, both weighted by the `class_weights` (if any).

    Both share one budget of decoded images in memory, `cache_limit_mb`: the training
    images are cached when they fit it, the validation images when they fit what is left.
    """
    train_mb = data.train.count * data.train.image_size**2 * 3 / 2**20  # or its shuffle buffer: the limit
    left = max(dc.cache_limit_mb - train_mb, 0)
    return (training_batches(data.train, dc, tc, len(data.class_names), binary, class_weights),
            weighted(data.validation.batches(dc.batch_size, cache_limit_mb=int(left)), class_weights))


def _pipeline_weights(spec: str, model: TransferClassifier, train: tf.data.Dataset) -> np.ndarray | None:
    """Class weights for a user's (train, validation) pipelines: "auto" counts the labels of one
    pass over the training pipeline; weights by class name need class names, which pipelines lack."""
    if spec == "none":
        return None
    counts = np.zeros(model.num_classes, np.int64)
    if spec == "auto":
        for batch in train:
            labels = np.asarray(batch[1])
            one_hot = labels.ndim == 2 and labels.shape[-1] == model.num_classes > 1
            labels = labels.argmax(axis=-1) if one_hot else labels.reshape(-1)
            counts += np.bincount(labels.astype(np.int64), minlength=model.num_classes)
    return weigh_classes(spec, counts)


def _head_inputs(mc: ModelConfig, dc: DataConfig, tc: TrainConfig, data: ImageData, model: TransferClassifier,
                 heads: HeadStore | None, verbose: int | str, mode: str,
                 class_weights: np.ndarray | None) -> PlanInputs:
    """Cached features (when the base is frozen and the cache is on), the blocks they come from,
    and the head's start: a stored head, or a linear probe fitted on them."""
    if not tc.feature_cache or model.from_scratch:
        return PlanInputs(model)
    fingerprint = model_fingerprint(model)
    auto = parse_features(mc.features) == "auto"
    # the fine-tuning depth is read off the probe curve too
    probing = auto or (tc.unfreeze_blocks == "auto" and tc.fine_tune.epochs > 0)
    blocks = list(range(1, model.block_count() + 1)) if probing else model.feature_blocks
    views = cached_views(dc.augment, tc.cache_views)
    plain_split = data.validation if mode == "holdout" else data.train  # cv: a plain view of every image
    # what the features, the probe curve and the columns read come from: the trials of one search load
    # and compute each once, holding one copy (`HeadStore.shared`); the probe start depends on more
    source = {"features": fingerprint, "train": data.train.fingerprint, "mode": mode, "seed": dc.seed,
              "validation": None if data.validation is None else data.validation.fingerprint,
              "views": [views, dc.augment], "folds": tc.validation.cv_folds}
    train, plain = _shared(heads, {**source, "loaded": blocks}, lambda: FeatureCache(
        tc.cache_dir, dc.cache_limit_mb).head_features(model, data.train, plain_split, views, dc.augment, dc.seed,
                                                      dc.batch_size, progress=verbose if isinstance(verbose, int) else 1,
                                                      fingerprint=fingerprint, blocks=blocks))
    curve = None
    if probing:
        model, curve, train, plain = _probe_blocks(mc, tc.validation.cv_folds, dc.seed, len(data.class_names),
                                                   model, train, plain, mode, auto,
                                                   lambda what, compute: _shared(heads, {**source, what: 1}, compute))
    key = stored = probe = all_views = None
    folds: list = []
    if heads is not None:
        key = head_key(fingerprint, data, model.feature_blocks, mc, tc, dc)
        stored = _stored_head(heads, key, model)
    binary, classes = mc.binary, len(data.class_names)
    same = {**source, "binary": binary, "blocks": list(model.feature_blocks),
            "class_weights": None if class_weights is None else [float(w) for w in class_weights]}
    read = train.views  # the views phase 1 reads: every one, or the plain one when only it helps the probe
    widths = model.read_widths()
    if mode == "cv":
        folds = folds_of(plain.labels, tc.validation.cv_folds, dc.seed)
        probe, read = _shared(heads, same, lambda: views_or_plain(
            lambda rows: choose_c_cv(rows, plain.features[0], plain.labels, folds, classes, binary, dc.seed,
                                     class_weights, widths), train.features))
        all_views = train.features[:read]
    elif stored is None:
        probe, read = _shared(heads, same, lambda: views_or_plain(
            lambda rows: choose_c_holdout(rows, train.labels, plain.features[0], plain.labels, classes, binary,
                                          dc.seed, class_weights, widths), train.features))
    if read < train.views:
        train = CachedFeatures(train.features[:read], train.labels)
    return PlanInputs(model, cached=(train, plain), probe=probe, curve=curve, stored=stored, head_key=key,
                      backbone_digest=fingerprint["weights"], views=all_views, folds=folds)


def _shared(heads: HeadStore | None, parts: dict, compute):
    """`compute()`, or with a store, its value computed once per process for these `parts`."""
    if heads is None:
        return compute()
    return heads.shared(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], compute)


def _probe_blocks(model_config: ModelConfig, folds: int, seed: int, num_classes: int, model: TransferClassifier,
                  train: CachedFeatures, plain: CachedFeatures, mode: str, choose: bool,
                  once=lambda what, compute: compute()):
    """Probes every block on the labelled images (features of every block, in order) for the
    probe curve and the fine-tuning depth; with `choose` (`features="auto"`), rebuilds the
    classifier to read the chosen blocks. Returns it, the curve and its blocks' columns of the features.
    `once(what, compute)` runs the probes and selects the columns (a search's trials share them)."""
    # the labelled images that train: in holdout mode, the validation images stay held out
    x, y = (np.asarray(plain.features[0]), plain.labels) if mode == "cv" else (np.asarray(train.features[0]),
                                                                              train.labels)
    widths = model.block_widths(list(range(1, model.block_count() + 1)))
    fixed = None if choose else list(model.feature_blocks)
    curve = once(f"curve {fixed}", lambda: probe_blocks(x, y, widths, model.block_names(), folds, seed, fixed))
    log.debug("%s", curve.summary())
    if curve.chosen != model.feature_blocks:
        model = build_classifier(model_config, num_classes, seed, backbone=model.backbone, feature_blocks=curve.chosen)
    columns = block_columns(widths, curve.chosen)
    chosen = once(f"columns {curve.chosen}", lambda: (train.columns(columns), plain.columns(columns)))
    return model, curve, *chosen


def _probe_pipelines(dc: DataConfig, model: TransferClassifier, train: tf.data.Dataset,
                     validation: tf.data.Dataset, class_weights: np.ndarray | None = None) -> ProbeFit:
    """The convex start without cached features: one pass of the backbone over (a sample of)
    the training pipeline as it comes, augmented, and over the validation pipeline."""
    extractor = model.features_model()
    steps = math.ceil(MAX_ROWS / dc.batch_size)
    x, y = extract(extractor, train.take(steps))
    xv, yv = extract(extractor, validation)
    return choose_c_holdout(x[None], y, xv, yv, model.num_classes, model.binary, dc.seed, class_weights,
                            model.read_widths())


def _stored_head(heads: HeadStore, key: str, model: TransferClassifier) -> keras.callbacks.History | None:
    """Loads a stored phase-1 head into `model`; returns that phase's history, or None when there is none."""
    stored = heads.load(key)
    if stored is None:
        return None
    model.head_model().load_weights(stored["weights"])
    log.info("phase 1 reuses the stored head %s", key)
    return TrainResult.from_dict({"phase1": stored["phase1"]}).phase1
