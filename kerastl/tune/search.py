"""A whole search: check, run (in this process or as a chief with workers), report, export.

The project folder holds everything a search needs to resume: `search.json` (the
run and tune configs), KerasTuner's state, one `trial_*` folder per trial and the
stored phase-1 heads. Running the same search on it again reruns no completed
trial and reruns the one a crash interrupted.

The exported model is the best trial's own trained model, restored from its
folder, not a retrain on train + validation: it is exactly the model whose
validation score picked it, and no validation images are left to stop a
retrain early or to check it. It is written by the one run-folder writer, with
`tune.json` (the tune config and the best trial) and the trial tables beside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kerastl.choices import IMBALANCE_RATIO, OBJECTIVES
from kerastl.config import DataConfig, RunConfig
from kerastl.data.images import ImageData, load_data
from kerastl.data.sources import labelled_counts
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier
from kerastl.models.export import CONFIG_FILE
from kerastl.reports.html import write_search_report
from kerastl.runs.folder import (
    HISTORY_FILE,
    LOGS,
    METRICS_FILE,
    PROBE_FILE,
    load_model,
    read_config,
    read_json_file,
    write_run_folder,
)
from kerastl.runs.run import checked_config
from kerastl.runs.scoring import describe_data, evaluate_split, predict_split, score
from kerastl.storage import check_export_dir
from kerastl.training.distribute import list_gpus
from kerastl.training.phases import TrainResult
from kerastl.tune.config import AUTO_OBJECTIVE, TuneConfig
from kerastl.tune.distribute import launch, serve_chief, setup_devices
from kerastl.tune.hypermodel import TransferHyperModel
from kerastl.tune.space import DEFAULT_SPACE, check_space
from kerastl.tune.tables import trial_table, write_tables
from kerastl.tune.trial import TrialContext
from kerastl.tune.tuner import TransferTuner, make_tuner

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"  # in the project folder: the run and tune configs the search was started with
TUNE_FILE = "tune.json"  # beside the export: the tune config and the best trial
PROJECT_FORMAT = 2  # 0.1's project folders have none: their trial folders differ, so they are not resumed


@dataclass
class SearchResult:
    """The search's trials (best first), the best trial's model and where it was exported.

    A worker of a search spread over machines returns no trials and no model: the chief reports.
    """

    trials: list[dict]
    model: TransferClassifier | None
    export_dir: Path | None
    metrics: dict[str, float]
    objective: str = "val_accuracy"  # what the search optimised ("auto" resolved)


def prepare(config: RunConfig, tune: TuneConfig) -> tuple[RunConfig, TuneConfig]:
    """Validated copies: the space checked against the config, the export folder named."""
    tune = TuneConfig.from_dict(tune.to_dict())
    tune.validate()
    resolved = checked_config(config)
    base = RunConfig.from_dict(config.to_dict())
    base.name, base.export_dir = resolved.name, resolved.export_dir
    tune.space = check_space(DEFAULT_SPACE if tune.space is None else tune.space, base)
    if tune.mixed_precision is not None and base.devices.precision == "auto":  # 0.2's switch folds into precision
        base.devices.precision = "mixed_float16" if tune.mixed_precision else "float32"
    tune.mixed_precision = None
    if base.devices.strategy not in ("auto", tune.trial_strategy):
        raise KerastlError(f"a search places its trials with trial_strategy (one or mirrored), not strategy="
                           f"{base.devices.strategy}")
    base.devices.strategy = tune.trial_strategy  # a trial's devices are the search's choice
    return base, tune


def choose_objective(source: DataConfig, tune: TuneConfig, data: ImageData | None,
                     restart: bool = False) -> TuneConfig:
    """`tune` with objective "auto" resolved: val_macro_f1 when the labelled classes (of `data`, else
    of `source`) are imbalanced beyond `IMBALANCE_RATIO` (largest / smallest count), val_accuracy
    otherwise. Says which, and why. A search being resumed keeps the objective its project recorded."""
    if tune.objective != AUTO_OBJECTIVE:
        return tune
    recorded = Path(tune.project_dir) / SEARCH_FILE
    objective = json.loads(recorded.read_text()).get("tune", {}).get("objective") if recorded.is_file() else None
    if objective in OBJECTIVES and not restart:  # resuming: the objective it started with, whatever the data is now
        log.info("resuming a search that optimises %s", objective)
        return TuneConfig.from_dict({**tune.to_dict(), "objective": objective})
    counts = np.asarray(labelled_counts(source, data))
    ratio = counts.max() / max(counts.min(), 1)
    tune = TuneConfig.from_dict({**tune.to_dict(), "objective": "val_accuracy"})
    if ratio > IMBALANCE_RATIO:
        tune.objective = "val_macro_f1"
        log.warning("classes are imbalanced %.1f:1 (more than %g:1): the search maximises val_macro_f1, not "
                    "val_accuracy (--objective chooses)", ratio, IMBALANCE_RATIO)
    return tune


def claim_project(project: Path, run: dict[str, Any], tune: TuneConfig, restart: bool) -> None:
    """Writes `search.json` of a search of the `run` config (`RunConfig.to_dict`) and `tune`; refuses
    a folder that holds a different search (unless restarting)."""
    path = project / SEARCH_FILE
    if restart and project.exists():
        shutil.rmtree(project)
    record = {"run": run, "tune": tune.to_dict(), "format": PROJECT_FORMAT}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("format") == PROJECT_FORMAT:  # settings added since are at their defaults
            previous.update(run=RunConfig.from_dict(previous["run"]).experiment_dict(),
                            tune=TuneConfig.from_dict(previous["tune"]).to_dict())
        if previous.get("format") != PROJECT_FORMAT:
            raise KerastlError(f"project folder {project} holds a search started by kerastl 0.1, which this version "
                               "cannot resume: finish it with kerastl 0.1, or start over with "
                               "restart=True, or choose another folder")
        # may change between runs: they change how trials run, not what they find
        free = {"workers", "max_trials", "project_dir", "name", "export_dir", "isolate", "mixed_precision",
                "max_failures", "population", "trial_strategy"}

        def settled(part: dict) -> dict:  # where trials compute may change too (strategy, XLA), not their precision
            devices = {k: v for k, v in part.get("devices", {}).items() if k not in ("strategy", "jit_compile")}
            return {**{k: v for k, v in part.items() if k not in free}, "devices": devices}

        record_now = {**record, "run": RunConfig.from_dict(run).experiment_dict()}  # the machine's may change
        if any(settled(previous[k]) != settled(record_now[k]) for k in ("run", "tune")):
            raise KerastlError(f"project folder {project} holds a different search; resume it with the same "
                               "settings, start over with restart=True, or choose another folder")
    project.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def read_search(project: Path) -> tuple[RunConfig, TuneConfig]:
    """The run and tune configs a project folder's `search.json` holds."""
    record = json.loads((project / SEARCH_FILE).read_text())
    tune = TuneConfig.from_dict(record["tune"])
    tune.project_dir = str(project)
    return RunConfig.from_dict(record["run"]), tune


def search_here(hypermodel: TransferHyperModel, tune: TuneConfig, data: ImageData | None,
                verbose: int | str = 0) -> TransferTuner:
    """Runs trials of `hypermodel` in this process (the single-process search, or one worker of many)."""
    setup = setup_devices(hypermodel.base.devices)
    hypermodel.base.devices.precision = setup.precision  # resolved (and warned about) once, not in every trial
    context = TrialContext(tune.project_dir, data, setup.device, verbose)
    tuner = make_tuner(hypermodel, tune, context)
    try:
        tuner.search(verbose=0)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        last = [line for line in str(error).splitlines() if line.strip()][-1]
        raise KerastlError(f"search stopped: {tune.max_failures} trials in a row failed; the last with: "
                           f"{last}. Trial folders under {tune.project_dir} hold each trial's log") from None
    return tuner


def run_as_chief(hypermodel: TransferHyperModel, tune: TuneConfig) -> TransferTuner:
    """The chief of a distributed search: serves the oracle until the search is done."""
    tuner = make_tuner(hypermodel, tune, None)
    serve_chief(tuner)
    return tuner


def run_search(
    config: RunConfig,
    tune: TuneConfig,
    data: ImageData | None = None,
    overwrite: bool = False,
    restart: bool = False,
    verbose: int | str = 0,
) -> SearchResult:
    """Searches, then exports the best trial's model with the trial tables beside it; the project
    folder gets the tables and `report.html` (`kerastl.reports.html.write_search_report`).

    Args:
        config: the run every trial starts from (data, backbone, training settings).
        tune: tuner, objective, space, project folder, workers.
        data: in-memory data for every trial (single process only); default loads
            `config.data.source` (needed for workers and isolated trials).
        overwrite: replace a non-empty export folder.
        restart: delete the project folder first instead of resuming it.
        verbose: Keras `fit` verbosity inside trials.

    Example:
    ```python
    result = run_search(RunConfig(DataConfig("flowers"), ModelConfig("efficientnet_b0")),
                        TuneConfig(max_trials=20, space={"dropout": [0.0, 0.3], "unfreeze_blocks": [0, 2]}))
    result.trials[0], result.model, result.export_dir
    ```
    """
    base, tune = prepare(config, tune)
    tune = choose_objective(base.data, tune, data, restart)
    export_dir = Path(base.export_dir)
    check_export_dir(export_dir, overwrite)
    project = Path(tune.project_dir)
    claim_project(project, base.to_dict(), tune, restart)
    workers, gpus = tune.workers, len(list_gpus())
    if tune.trial_strategy == "mirrored" and gpus < 2:
        log.warning("trial strategy mirrored: %s, so each trial runs on one device", f"{gpus} GPU visible" if gpus
                    else "no GPU is visible")
        base.devices.strategy = "one"
    hypermodel = TransferHyperModel(base, tune.space)
    if workers == 0:
        workers = gpus if gpus > 1 and tune.trial_strategy == "one" else 1
    role = os.environ.get("KERASTUNER_TUNER_ID", "") if "KERASTUNER_ORACLE_IP" in os.environ else ""
    if role and "chief" not in role:  # one worker of a search spread over machines: run trials, export nothing
        search_here(hypermodel, tune, data, verbose)
        return SearchResult([], None, None, {}, tune.objective)
    if role:  # the chief of a search spread over machines: serve the oracle, then report and export
        tuner = run_as_chief(hypermodel, tune)
    elif workers > 1:
        if data is not None:
            raise KerastlError("several workers load the data themselves: give a data source, not in-memory data")
        launch(tune, workers, gpus if tune.trial_strategy == "one" else 0)
        tuner = make_tuner(hypermodel, tune, None)  # reloads the finished search's state
    else:
        tuner = search_here(hypermodel, tune, data, verbose)
    rows = trial_table(tuner)
    write_tables(rows, project)
    write_search_report(project)  # the trial table and the objective against each setting
    done = [row for row in rows if row["status"] == "COMPLETED"]
    if not done:
        raise KerastlError(f"no trial completed; see {project / 'trials.csv'} and the trial logs")
    model, metrics = export_best(tuner, done[0]["trial"], (base.name, base.export_dir), tune, data)
    write_tables(rows, export_dir)
    log.info("best trial %s (%s %.4f) exported to %s", done[0]["trial"], tune.objective, done[0][tune.objective],
             export_dir)
    return SearchResult(rows, model, export_dir, metrics, tune.objective)


def export_best(tuner: TransferTuner, trial_id: str, export: tuple[str, str], tune: TuneConfig,
                data: ImageData | None) -> tuple[TransferClassifier, dict[str, float]]:
    """Writes the best trial's own model as the exported run folder `export` (name, folder), scored on
    the test split if there is one and evaluated (the report's `evaluation.json`) on it, or else on the
    validation split."""
    trial_dir = Path(tuner.get_trial_dir(trial_id))
    config = read_config(trial_dir)
    config.name, config.export_dir = export
    model = load_model(trial_dir)
    if data is None and tuner.context is not None:  # an in-process search has loaded it already
        data = tuner.context.data(config.data, config.model.image_size)
    elif data is None:
        data = load_data(config.data, config.model.image_size)
    metrics = read_json_file(trial_dir, METRICS_FILE)
    name, held = ("test", data.test) if data.test is not None else ("validation", data.validation)
    probabilities, labels = predict_split(model, held.batches(config.data.batch_size, cache_limit_mb=0), held.labels)
    if data.test is not None:
        metrics.update(score(probabilities, labels, "test_"))
    evaluation, wrong = evaluate_split(probabilities, labels, held, data.class_names, name)
    history = TrainResult.from_dict(read_json_file(trial_dir, HISTORY_FILE))
    extra = {TUNE_FILE: {"tune": tune.to_dict(), "best_trial": trial_id}}
    if (trial_dir / PROBE_FILE).is_file():  # the probe curve the trial chose from: its plot is drawn from it
        extra[PROBE_FILE] = read_json_file(trial_dir, PROBE_FILE)
    plan = read_json_file(trial_dir, CONFIG_FILE).get("plan")  # the choices the trial's run made
    write_run_folder(config.export_dir, model, data.class_names, config, history, metrics, extra=extra,
                     logs=trial_dir / LOGS, plan=plan,
                     evaluation=evaluation, wrong_images=wrong, data=describe_data(data, config.data, "holdout"))
    return model, metrics
