"""KerasTuner searches over both training phases, fast on cached features.

`TransferHyperModel` is a plain KerasTuner HyperModel: `build(hp)` returns the
classifier and `fit(hp, model, ...)` trains the head and then fine-tunes, so any
KerasTuner tuner can search both phases in one space. `TransferTuner` runs the
same trials faster and more safely:

- a head-only trial never runs the backbone: it trains a head on the search's
  shared cached features (computed once per backbone setting);
- a trial with a fine-tuning phase starts from the saved phase-1 head of an
  earlier trial whose head settings were the same (`HeadStore`);
- trials that run the backbone go to a process of their own, so every byte of
  host and GPU memory they used is returned when they end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from kerastl.config import OBJECTIVES, RunConfig, TuneConfig
from kerastl.data import ImageData, load_data
from kerastl.errors import KerastlError
from kerastl.features import CachedFeatures, FeatureCache, model_fingerprint, staged_folder
from kerastl.model import build_classifier, build_head
from kerastl.report import predict_split, score
from kerastl.space import apply_values, declare
from kerastl.train import compile_classifier, fine_tune, graft_head, train_classifier, train_head

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
REQUEST_FILE = "request.json"
HEAD_WEIGHTS = "head.weights.h5"
MODEL_WEIGHTS = "model.weights.h5"


def make_objective(name: str) -> keras_tuner.Objective:
    """The KerasTuner objective with its direction (max for accuracy, F1 and AUC; min for loss)."""
    if name not in OBJECTIVES:
        raise KerastlError(f"objective must be one of {list(OBJECTIVES)}, got {name!r}")
    return keras_tuner.Objective(name, OBJECTIVES[name])


def memory_mb() -> float:
    """This process's resident memory now, in MB (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class HeadStore:
    """Trained phase-1 heads under `directory/<key>/`, shared by every trial and worker.

    The key covers the features the head was trained on and every setting of
    phase 1, so a trial whose head settings match an earlier one's skips phase 1.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @staticmethod
    def key(fingerprint: dict, data: ImageData, config: RunConfig, epochs: int) -> str:
        m, t, d = config.model, config.train, config.data
        parts = {
            "features": fingerprint, "train": data.train.fingerprint, "validation": data.validation.fingerprint,
            "head": [m.dropout, m.hidden_units, m.binary], "epochs": epochs, "batch_size": d.batch_size,
            "optimizer": [t.optimizer, t.learning_rate, t.weight_decay, t.loss, t.label_smoothing, t.patience],
            "views": [t.cache_views, d.augment, d.seed],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def load(self, key: str) -> dict | None:
        """The head's meta (with "weights", its file) or None."""
        folder = self.directory / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return {**meta, "weights": str(folder / HEAD_WEIGHTS)}

    def save(self, key: str, head: keras.Model, meta: dict) -> None:
        """Stores a head atomically; if another worker stored the same key first, keeps theirs."""
        with staged_folder(self.directory / key) as staging:
            head.save_weights(staging / HEAD_WEIGHTS)
            (staging / "meta.json").write_text(json.dumps(meta))


class TrialContext:
    """What the trials of one search share in a process: data, cached features, saved heads.

    Args:
        project_dir: the search's folder (saved heads go to `heads/`).
        data: loaded data for every trial; None loads `config.data` (once per image size).
        device: where trials run (`tf.device` name).
        verbose: Keras `fit` verbosity inside trials.
    """

    def __init__(self, project_dir: str | os.PathLike, data: ImageData | None = None, device: str = "/CPU:0",
                 verbose: int | str = 0):
        self.heads = HeadStore(Path(project_dir) / "heads")
        self.device, self.verbose = device, verbose
        self._data, self._given = {}, data
        self._features: dict[str, tuple[dict, tuple[CachedFeatures, CachedFeatures]]] = {}

    @property
    def can_isolate(self) -> bool:
        """Whether a trial process can load the data itself (it was not handed in as arrays)."""
        return self._given is None

    def data(self, config: RunConfig) -> ImageData:
        """The data at the (resolved) config's image size: loaded once per size, or the data handed in."""
        size = config.model.image_size
        if self._given is not None:
            if self._given.train.image_size != size:
                raise KerastlError(f"the in-memory data is {self._given.train.image_size}x"
                                   f"{self._given.train.image_size} but this trial wants {size}x{size}: search "
                                   "image sizes (or backbones of other sizes) from a data source, not arrays")
            return self._given
        if size not in self._data:
            self._data[size] = load_data(config.data, size)
            if self._data[size].validation is None:
                raise KerastlError("a search needs validation data: set a validation split or folder")
        return self._data[size]

    def features(self, config: RunConfig, num_classes: int, model: keras.Model | None = None):
        """(fingerprint, (train, validation) features), computed once per backbone setting in this process."""
        m, d, t = config.model, config.data, config.train
        views = t.cache_views if d.augment != "none" else 1
        memo = json.dumps([m.backbone, m.weights, m.image_size, m.pooling, views, d.augment, d.seed,
                           keras.config.dtype_policy().name])
        if memo not in self._features:
            model = model or seeded_classifier(config, num_classes)
            data = self.data(config)
            cache = FeatureCache(t.cache_dir, d.cache_limit_mb)
            self._features[memo] = (model_fingerprint(model), cache.phase1(
                model, data.train, data.validation, views, d.augment, d.seed, d.batch_size))
        return self._features[memo]

    def run(self, config: RunConfig, trial_dir: str | os.PathLike, budget: int | None = None) -> dict[str, float]:
        """Trains one trial's config on `self.device`; saves its weights and `result.json` in `trial_dir`."""
        with tf.device(self.device):
            return run_trial_config(config, self, Path(trial_dir), budget)


def seeded_classifier(config: RunConfig, num_classes: int) -> keras.Model:
    """The classifier built right after seeding, so a random start is the same in every trial and process."""
    keras.utils.set_random_seed(config.data.seed)
    return build_classifier(config.model, num_classes, seed=config.data.seed)


def seeded_head(config: RunConfig, num_classes: int, dim: int) -> keras.Model:
    """The head alone, starting exactly as `seeded_classifier`'s head does."""
    keras.utils.set_random_seed(config.data.seed)
    return build_head(config.model, num_classes, dim, seed=config.data.seed)


def budgeted(config: RunConfig, budget: int | None, max_epochs: int) -> RunConfig:
    """Hyperband's epoch budget: phase 1 gets `budget` epochs, phase 2 the same share of its own."""
    if budget:
        tc = config.train
        tc.fine_tune_epochs = math.ceil(tc.fine_tune_epochs * budget / max(max_epochs, 1))
        tc.epochs = int(budget)
    return config


def run_trial_config(config: RunConfig, context: TrialContext, trial_dir: Path, budget: int | None = None) -> dict:
    """One trial: phase 1 (cached features or a saved head), phase 2 if asked, then the score.

    Writes `head.weights.h5` (head-only trials on cached features) or
    `model.weights.h5`, and `result.json` with metrics, time, host memory and (on a
    GPU) the trial's peak GPU memory.
    """
    from kerastl.run import resolve_config

    start = time.perf_counter()
    gpu = context.device.startswith("/GPU")
    if gpu:
        tf.config.experimental.reset_memory_stats(context.device.strip("/"))
    config = budgeted(resolve_config(config), budget, config.train.epochs)
    m, tc, dc = config.model, config.train, config.data
    data = context.data(config)
    classes = len(data.class_names)
    scratch = m.trains_from_scratch
    fine_tunes = not scratch and tc.wants_fine_tuning
    cached = tc.feature_cache and not scratch
    trial_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"fine_tuned": fine_tunes, "cached_features": cached, "reused_head": False}
    model = stored = key = features = None
    if cached:
        if fine_tunes:
            model = seeded_classifier(config, classes)
        fingerprint, features = context.features(config, classes, model)
        key = HeadStore.key(fingerprint, data, config, tc.epochs)
        stored = context.heads.load(key)
        dim = features[0].features.shape[-1]
        head = seeded_head(config, classes, dim)
        if stored is not None:
            head.load_weights(stored["weights"])
            info["reused_head"] = True
        else:
            history, stop = train_head(head, features, tc, dc.batch_size, dc.seed, verbose=context.verbose)
            stored = {"best_val_loss": float(stop.best), "epochs": len(history.epoch)}
            context.heads.save(key, head, stored)
    if cached and not fine_tunes:
        # one eager call: a few thousand feature rows, and no predict function to trace
        probabilities = keras.ops.convert_to_numpy(head(np.asarray(features[1].features[0]), training=False))
        labels = features[1].labels
        head.save_weights(trial_dir / HEAD_WEIGHTS)
    else:
        model = model or seeded_classifier(config, classes)
        train = data.train.batches(dc.batch_size, True, _augmenter(dc), dc.seed, dc.cache_limit_mb)
        validation = data.validation.batches(dc.batch_size, cache_limit_mb=dc.cache_limit_mb)
        if cached:
            graft_head(head, model)
            fine_tune(model, train, validation, tc, stored["best_val_loss"], stored["epochs"], verbose=context.verbose)
        else:
            train_classifier(model, train, validation, tc, from_scratch=scratch,
                             calibration_images=data.train.sample() if scratch else None,
                             batch_size=dc.batch_size, seed=dc.seed, verbose=context.verbose)
        probabilities, labels = predict_split(model, validation)
        model.save_weights(trial_dir / MODEL_WEIGHTS)
    metrics = score(probabilities, labels)
    if cached:
        info["backbone_digest"] = fingerprint["weights"]
    if gpu:  # flat across trials when every trial gives its memory back
        peak = tf.config.experimental.get_memory_info(context.device.strip("/"))["peak"]
        info["gpu_peak_mb"] = round(peak / 2**20, 1)
    info.update(classes=classes, seconds=round(time.perf_counter() - start, 3), memory_mb=round(memory_mb(), 1),
                device=context.device, epochs=tc.epochs, fine_tune_epochs=tc.fine_tune_epochs if fine_tunes else 0)
    (trial_dir / RESULT_FILE).write_text(json.dumps({"metrics": metrics, "info": info, "config": config.to_dict()},
                                                    indent=2))
    return metrics


def _augmenter(dc):
    from kerastl.augment import build_augmenter

    return build_augmenter(dc.augment, seed=dc.seed)


def needs_process(config: RunConfig, isolate: str) -> bool:
    """Whether a trial runs in its own process: always, never, or (auto) when it runs the backbone."""
    if isolate != "auto":
        return isolate == "always"
    tc = config.train
    return not (tc.feature_cache and not config.model.trains_from_scratch and not tc.wants_fine_tuning)


def run_in_process(config: RunConfig, trial_dir: Path, project_dir: Path, budget: int | None,
                   mixed_precision: bool | None) -> dict[str, float]:
    """Runs one trial in a fresh Python process (`python -m kerastl.worker trial DIR`); returns its metrics."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    request = {"config": config.to_dict(), "project_dir": str(project_dir), "budget": budget,
               "mixed_precision": mixed_precision}
    (trial_dir / REQUEST_FILE).write_text(json.dumps(request, indent=2))
    (trial_dir / RESULT_FILE).unlink(missing_ok=True)
    with open(trial_dir / "trial.log", "w") as out:
        code = subprocess.call([sys.executable, "-m", "kerastl.worker", "trial", str(trial_dir)],
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0 or not (trial_dir / RESULT_FILE).exists():
        lines = [line for line in (trial_dir / "trial.log").read_text().splitlines() if line.strip()]
        raise keras_tuner.errors.FailedTrialError(
            f"trial process exited with code {code}: {lines[-1] if lines else 'no output'}")
    return json.loads((trial_dir / RESULT_FILE).read_text())["metrics"]


class TransferHyperModel(keras_tuner.HyperModel):
    """Both phases in one KerasTuner space.

    Args:
        base: the run config that every trial starts from.
        space: setting -> list, range or value (see `kerastl.space`).
        num_classes: needed by `build` (not to declare the space).
    """

    def __init__(self, base: RunConfig, space: dict[str, Any], num_classes: int | None = None):
        super().__init__(name="kerastl")
        self.base, self.space, self.num_classes = base, space, num_classes

    def declare_hyperparameters(self, hp) -> None:
        declare(hp, self.space)

    def trial_config(self, hp) -> RunConfig:
        """The base config with this trial's values."""
        return apply_values(declare(hp, self.space), self.base)

    def build(self, hp) -> keras.Model:
        from kerastl.run import resolve_config

        config = resolve_config(self.trial_config(hp))
        model = seeded_classifier(config, self.num_classes)
        compile_classifier(model, config.train)
        return model

    def fit(self, hp, model, x, validation_data=None, callbacks=None, epochs=None, **kwargs) -> dict[str, float]:
        """Head, then fine-tuning (when the trial's values ask for it); returns the validation score."""
        from kerastl.run import resolve_config

        config = budgeted(resolve_config(self.trial_config(hp)), epochs, self.base.train.epochs)
        train_classifier(model, x, validation_data, config.train, from_scratch=config.model.trains_from_scratch,
                         batch_size=config.data.batch_size, seed=config.data.seed, callbacks=callbacks,
                         verbose=kwargs.get("verbose", 0))
        return score(*predict_split(model, validation_data))


class TransferTuner(keras_tuner.Tuner):
    """A KerasTuner Tuner that runs `TransferHyperModel` trials on cached features, isolated when heavy.

    Args:
        oracle: any KerasTuner oracle (see `make_oracle`).
        hypermodel: the search's `TransferHyperModel`.
        context: shared data/features/heads for in-process trials.
        tune: isolation and precision settings.
        directory, project_name: where KerasTuner keeps its state (never overwritten: reruns resume).
    """

    def __init__(self, oracle, hypermodel: TransferHyperModel, context: TrialContext | None, tune: TuneConfig,
                 directory: str, project_name: str):
        self.context, self.tune = context, tune
        super().__init__(oracle=oracle, hypermodel=hypermodel, directory=directory, project_name=project_name,
                         overwrite=False)

    def _populate_initial_space(self):
        # KerasTuner builds the model repeatedly to discover conditional values;
        # declaring the space is enough here and builds nothing.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        config = self.hypermodel.trial_config(trial.hyperparameters)
        budget = trial.hyperparameters.values.get("tuner/epochs")
        trial_dir = Path(self.get_trial_dir(trial.trial_id))
        isolated = needs_process(config, self.tune.isolate) and self.context.can_isolate
        log.info("trial %s: %s%s", trial.trial_id, json.dumps(shown_values(trial.hyperparameters.values)),
                 " (own process)" if isolated else "")
        try:
            if isolated:
                return run_in_process(config, trial_dir, Path(self.project_dir), budget, self.tune.mixed_precision)
            keras.backend.clear_session()  # frees the last trial's models (it runs gc.collect itself)
            return self.context.run(config, trial_dir, budget)
        except Exception as error:
            lines = str(error).strip().splitlines()
            log.warning("trial %s failed: %s", trial.trial_id, lines[-1] if lines else type(error).__name__)
            raise

    def load_model(self, trial) -> keras.Model:
        """The trial's trained classifier, as `get_best_models` expects."""
        from kerastl.search import restore_trial_model

        return restore_trial_model(Path(self.get_trial_dir(trial.trial_id)))


def shown_values(values: dict) -> dict:
    """A trial's values as tables and logs show them: 4 significant digits, no `tuner/` bookkeeping."""
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in values.items()
            if not k.startswith("tuner/")}


def make_oracle(tune: TuneConfig, seed: int, max_epochs: int) -> keras_tuner.Oracle:
    """The KerasTuner oracle for `tune.tuner`, with the objective's direction and the failure limit."""
    common = {"objective": make_objective(tune.objective), "seed": seed, "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": tune.max_failures}
    if tune.tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=tune.max_trials, **common)
    if tune.tuner == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=tune.max_trials, **common)
    return keras_tuner.oracles.HyperbandOracle(max_epochs=max_epochs, factor=tune.hyperband_factor, **common)
