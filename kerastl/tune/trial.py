"""One search trial, and the trial folder's format (this module is its only owner).

A trial is a run of the base config with the trial's values (`kerastl.runs.run.run_training`,
or, for head-only trials trained together, `kerastl.runs.population.run_population`), written
as a weights-only run folder into KerasTuner's trial folder, plus `result.json`: the scores and
what the trial cost. Phase-1 heads are shared
through the project's `HeadStore`, so a fine-tuning trial whose head settings an
earlier trial had skips phase 1. A trial that runs the backbone may run in a
process of its own (`python -m kerastl.tune.worker trial DIR`, reading
`request.json`), so every byte of host and GPU memory it used is returned.
"""

from __future__ import annotations

import contextlib
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

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import ImageData, load_data
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.runs.population import run_population
from kerastl.runs.run import RunResult, checked_config, run_training
from kerastl.storage import HeadStore
from kerastl.tune.distribute import setup_devices

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


def apply_budget(tc: TrainConfig, budget: int | None, max_epochs: int) -> None:
    """Hyperband's epoch budget, set in `tc`: phase 1 gets `budget` epochs, phase 2 the same share of its own."""
    if budget:
        tc.fine_tune.epochs = math.ceil(tc.fine_tune.epochs * budget / max(max_epochs, 1))
        tc.head.epochs = int(budget)
        tc.head.min_steps = tc.fine_tune.min_steps = 0  # the bracket's epochs are the budget, not a floor of steps


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

    def data(self, source: DataConfig, size: int) -> ImageData:
        """The data handed in (the run refuses it at another image size), or `source` loaded once per image size."""
        if self._given is not None:
            return self._given
        if size not in self._data:
            self._data[size] = load_data(source, size)
        return self._data[size]

    def classifier(self, mc: ModelConfig, num_classes: int, seed: int) -> TransferClassifier:
        """A head-only trial's classifier on the frozen backbone its earlier trials built.

        A head-only trial never changes its backbone, so one built backbone (per
        backbone setting and seed) serves them all instead of one per trial.
        """
        key = json.dumps([mc.backbone, mc.weights, mc.image_size, seed, keras.config.dtype_policy().name])
        model = build_classifier(mc, num_classes, seed=seed, backbone=self._backbones.get(key))
        self._backbones[key] = model.backbone
        return model

    def run(self, configs: list[RunConfig], trial_dirs: list[str | os.PathLike],
            budgets: list[int | None] | None = None) -> list[dict[str, float] | Exception]:
        """Trials in this process on `self.device`, each a weights-only run folder in its trial folder
        with `result.json` (scores, time, memory). One trial runs alone (`run_training`); several run
        as one population per image size (`kerastl.runs.population`: they must train heads only), and
        `seconds` is then the population's time shared among them. Returns each trial's metrics, or
        the exception it failed with; `budgets`: Hyperband's epochs per trial (None: none)."""
        start, trial_dirs = time.perf_counter(), [Path(path) for path in trial_dirs]
        gpu = self.device.startswith("/GPU")
        if gpu:
            tf.config.experimental.reset_memory_stats(self.device.strip("/"))
        prepared: list[RunConfig | Exception] = []
        for config, trial_dir, budget in zip(configs, trial_dirs, budgets or [None] * len(configs)):
            try:
                config = checked_config(config)
                apply_budget(config.train, budget, config.train.head.epochs)
                config.export_dir = str(trial_dir)
                config.train.validation.mode = "holdout"  # trials are compared on one validation split
                prepared.append(config)
            except Exception as error:  # noqa: BLE001 - one trial's failure is that trial's
                prepared.append(error)
        sizes: dict[int, list[int]] = {}  # one population per image size (the data it reads)
        for i, config in enumerate(prepared):
            if isinstance(config, RunConfig):
                sizes.setdefault(config.model.image_size, []).append(i)
        outcomes: dict[int, RunResult | Exception] = {}
        with tf.device(self.device) if self.device else contextlib.nullcontext():  # "": each trial mirrored
            for members in sizes.values():
                group = [prepared[i] for i in members]
                data = dataclasses.replace(self.data(group[0].data, group[0].model.image_size), test=None)
                mirrored = group[0].devices.strategy == "mirrored"  # models built in each run's own scope, alone
                models = [self.classifier(c.model, len(data.class_names), c.data.seed)
                          if c.trains_head_only and not mirrored else None for c in group]
                if len(group) > 1 and not mirrored:
                    outcomes.update(zip(members, run_population(group, data, models, self.heads, self.verbose)))
                    continue
                for i, config, model in zip(members, group, models):  # one alone (or each mirrored trial)
                    try:
                        outcomes[i] = run_training(config, data, overwrite=True, verbose=self.verbose, model=model,
                                                   heads=self.heads, save="weights")
                    except Exception as error:  # noqa: BLE001 - reported as the trial's outcome
                        outcomes[i] = error
        shared = {"seconds": round((time.perf_counter() - start) / max(len(configs), 1), 3),
                  "memory_mb": round(memory_mb(), 1), "device": self.device}
        if gpu:  # flat across trials when every trial gives its memory back
            peak = tf.config.experimental.get_memory_info(self.device.strip("/"))["peak"]
            shared["gpu_peak_mb"] = round(peak / 2**20, 1)
        out: list[dict[str, float] | Exception] = []
        for i, trial_dir in enumerate(trial_dirs):
            result = outcomes.get(i, prepared[i])
            if not isinstance(result, Exception):
                info = {**_what_ran(result), **shared, **({"population": result.population}
                                                           if result.population > 1 else {})}
                (trial_dir / RESULT_FILE).write_text(json.dumps({"metrics": result.metrics, "info": info}, indent=2))
                result = result.metrics
            out.append(result)
        return out


def _what_ran(result: RunResult) -> dict[str, Any]:
    """What `result.json` says a trial ran: both phases or one, a stored head, its epochs."""
    train = result.config.train
    return {"fine_tuned": result.history.phase2 is not None, "reused_head": result.reused_head,
            "classes": len(result.class_names or []), "epochs": train.head.epochs,
            "fine_tune_epochs": train.fine_tune.epochs if result.history.phase2 is not None else 0}


def read_result(trial_dir: Path) -> dict | None:
    """A finished trial's `result.json` ({"metrics", "info"}), or None."""
    path = trial_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def needs_process(head_only: bool, isolate: str) -> bool:
    """Whether a trial runs in its own process: always, never, or (auto) when it runs the backbone
    (it is not `head_only`, `RunConfig.trains_head_only`)."""
    return isolate == "always" if isolate != "auto" else not head_only


def run_in_process(config: dict[str, Any], trial_dir: Path, project_dir: Path, budget: int | None) -> dict[str, float]:
    """Runs one trial of `config` (`RunConfig.to_dict`) in a fresh Python process
    (`python -m kerastl.tune.worker trial DIR`); returns its metrics."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    request = {"config": config, "project_dir": str(project_dir), "budget": budget}
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
    config = RunConfig.from_dict(request["config"])
    setup = setup_devices(config.devices)  # where the search placed its trials, in their precision
    context = TrialContext(request["project_dir"], device=setup.device, verbose=2)
    outcome = context.run([config], [trial_dir], [request["budget"]])[0]
    if isinstance(outcome, Exception):
        raise outcome
