"""One search trial, and the trial folder's format (this module is its only owner).

A trial is a run (`kerastl.runs.run.run_training`) of the base config with the trial's
values, written as a weights-only run folder into KerasTuner's trial folder,
plus `result.json`: the scores and what the trial cost. Phase-1 heads are shared
through the project's `HeadStore`, so a fine-tuning trial whose head settings an
earlier trial had skips phase 1. A trial that runs the backbone may run in a
process of its own (`python -m kerastl.tune.worker trial DIR`, reading
`request.json`), so every byte of host and GPU memory it used is returned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import tensorflow as tf

from kerastl.config import RunConfig
from kerastl.data.images import ImageData, load_data
from kerastl.devices import setup_devices
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.runs.run import checked_config, run_training
from kerastl.storage import HeadStore

RESULT_FILE = "result.json"
REQUEST_FILE = "request.json"
LOG_FILE = "trial.log"


def memory_mb() -> float:
    """This process's resident memory now, in MB (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def budgeted(config: RunConfig, budget: int | None, max_epochs: int) -> RunConfig:
    """Hyperband's epoch budget: phase 1 gets `budget` epochs, phase 2 the same share of its own."""
    if budget:
        tc = config.train
        tc.fine_tune_epochs = math.ceil(tc.fine_tune_epochs * budget / max(max_epochs, 1))
        tc.epochs = int(budget)
        tc.min_steps = tc.fine_tune_min_steps = 0  # the bracket's epochs are the budget, not a floor of steps
    return config


class TrialContext:
    """What the trials of one search share in a process: the data and the stored phase-1 heads.

    Args:
        project_dir: the search's folder (stored heads go to `heads/`).
        data: loaded data for every trial; None loads `config.data` (once per image size).
        device: where trials run (`tf.device` name).
        verbose: Keras `fit` verbosity inside trials.
    """

    def __init__(self, project_dir: str | os.PathLike, data: ImageData | None = None, device: str = "/CPU:0",
                 verbose: int | str = 0):
        self.heads = HeadStore(Path(project_dir) / "heads")
        self.device, self.verbose = device, verbose
        self._data: dict[int, ImageData] = {}
        self._given = data
        self._backbones: dict[str, keras.Model] = {}

    @property
    def can_isolate(self) -> bool:
        """Whether a trial process can load the data itself (it was not handed in as arrays)."""
        return self._given is None

    def data(self, config: RunConfig) -> ImageData:
        """The data handed in (the run refuses it at another image size), or loaded once per image size."""
        size = config.model.image_size
        if self._given is not None:
            return self._given
        if size not in self._data:
            self._data[size] = load_data(config.data, size)
        return self._data[size]

    def classifier(self, config: RunConfig, num_classes: int) -> TransferClassifier | None:
        """A head-only trial's classifier on the frozen backbone its earlier trials built; None otherwise.

        A head-only trial never changes its backbone, so one built backbone (per
        backbone setting and seed) serves them all instead of one per trial.
        """
        if not is_head_only(config):
            return None
        m = config.model
        key = json.dumps([m.backbone, m.weights, m.image_size, config.data.seed, keras.config.dtype_policy().name])
        model = build_classifier(m, num_classes, seed=config.data.seed, backbone=self._backbones.get(key))
        self._backbones[key] = model.backbone
        return model

    def run(self, config: RunConfig, trial_dir: str | os.PathLike, budget: int | None = None) -> dict[str, float]:
        """Trains one trial's config on `self.device`; writes its run folder and `result.json`."""
        with tf.device(self.device):
            return run_trial(config, self, Path(trial_dir), budget)


def run_trial(config: RunConfig, context: TrialContext, trial_dir: Path, budget: int | None = None) -> dict:
    """One trial in this process: the run, then `result.json` with the scores, time and memory."""
    start = time.perf_counter()
    gpu = context.device.startswith("/GPU")
    if gpu:
        tf.config.experimental.reset_memory_stats(context.device.strip("/"))
    config = budgeted(checked_config(config), budget, config.train.epochs)
    config.export_dir = str(trial_dir)
    config.train.validation.mode = "holdout"  # trials are compared on one validation split
    data = dataclasses.replace(context.data(config), test=None)  # trials are chosen on validation alone
    result = run_training(config, data, overwrite=True, verbose=context.verbose,
                          model=context.classifier(config, len(data.class_names)), heads=context.heads,
                          save="weights")
    info: dict[str, Any] = {
        "fine_tuned": result.history.phase2 is not None, "reused_head": result.reused_head,
        "classes": len(data.class_names), "epochs": config.train.epochs,
        "fine_tune_epochs": config.train.fine_tune_epochs if result.history.phase2 is not None else 0,
        "seconds": round(time.perf_counter() - start, 3), "memory_mb": round(memory_mb(), 1),
        "device": context.device,
    }
    if gpu:  # flat across trials when every trial gives its memory back
        peak = tf.config.experimental.get_memory_info(context.device.strip("/"))["peak"]
        info["gpu_peak_mb"] = round(peak / 2**20, 1)
    (trial_dir / RESULT_FILE).write_text(json.dumps({"metrics": result.metrics, "info": info}, indent=2))
    return result.metrics


def read_result(trial_dir: Path) -> dict | None:
    """A finished trial's `result.json` ({"metrics", "info"}), or None."""
    path = trial_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def is_head_only(config: RunConfig) -> bool:
    """Whether a run trains the head alone on cached features, never running or changing the backbone."""
    tc = config.train
    return tc.feature_cache and not config.model.trains_from_scratch and not tc.wants_fine_tuning


def needs_process(config: RunConfig, isolate: str) -> bool:
    """Whether a trial runs in its own process: always, never, or (auto) when it runs the backbone."""
    return isolate == "always" if isolate != "auto" else not is_head_only(config)


def run_in_process(config: RunConfig, trial_dir: Path, project_dir: Path, budget: int | None,
                   mixed_precision: bool | None) -> dict[str, float]:
    """Runs one trial in a fresh Python process (`python -m kerastl.tune.worker trial DIR`); returns its metrics."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    request = {"config": config.to_dict(), "project_dir": str(project_dir), "budget": budget,
               "mixed_precision": mixed_precision}
    (trial_dir / REQUEST_FILE).write_text(json.dumps(request, indent=2))
    (trial_dir / RESULT_FILE).unlink(missing_ok=True)
    with open(trial_dir / LOG_FILE, "w") as out:
        code = subprocess.call([sys.executable, "-m", "kerastl.tune.worker", "trial", str(trial_dir)],
                               stdout=out, stderr=subprocess.STDOUT)
    result = read_result(trial_dir)
    if code != 0 or result is None:
        lines = [line for line in (trial_dir / LOG_FILE).read_text().splitlines() if line.strip()]
        raise keras_tuner.errors.FailedTrialError(
            f"trial process exited with code {code}: {lines[-1] if lines else 'no output'}")
    return result["metrics"]


def serve_request(trial_dir: Path) -> None:
    """The trial process: runs the trial that `request.json` in `trial_dir` asks for."""
    request = json.loads((trial_dir / REQUEST_FILE).read_text())
    setup = setup_devices(request["mixed_precision"])
    context = TrialContext(request["project_dir"], device=setup.device, verbose=2)
    context.run(RunConfig.from_dict(request["config"]), trial_dir, request["budget"])
