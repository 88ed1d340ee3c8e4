"""A whole search: check, run (in this process or as a chief with workers), report, export.

The project folder holds everything a search needs to resume: `search.json` (the
run and tune configs), KerasTuner's state, one `trial_*` folder per trial and the
saved phase-1 heads. Running the same search on it again reruns no completed
trial and reruns the one a crash interrupted.

The exported model is the best trial's own trained model, restored from its
folder, not a retrain on train + validation: it is exactly the model whose
validation score picked it, and no validation images are left to stop a
retrain early or to check it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from kerastl.config import RunConfig, TuneConfig
from kerastl.data import ImageData
from kerastl.errors import KerastlError
from kerastl.space import DEFAULT_SPACE, check_space

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
CHIEF_GRACE_S = 60


@dataclass
class SearchResult:
    """The search's trials (best first), the best trial's model and where it was exported.

    A worker of a search spread over machines returns no trials and no model: the chief reports.
    """

    trials: list[dict]
    model: keras.Model | None
    export_dir: Path | None
    metrics: dict[str, float]


def prepare(config: RunConfig, tune: TuneConfig) -> tuple[RunConfig, TuneConfig]:
    """Validated copies: the space checked against the config, the export folder named."""
    from kerastl.run import resolve_config

    tune = TuneConfig.from_dict(tune.to_dict())
    tune.validate()
    resolved = resolve_config(config)
    base = RunConfig.from_dict(config.to_dict())
    base.name, base.export_dir = resolved.name, resolved.export_dir
    tune.space = check_space(DEFAULT_SPACE if tune.space is None else tune.space, base)
    return base, tune


def _claim_project(project: Path, base: RunConfig, tune: TuneConfig, restart: bool) -> None:
    """Writes `search.json`; refuses a folder that holds a different search (unless restarting)."""
    path = project / SEARCH_FILE
    if restart and project.exists():
        import shutil

        shutil.rmtree(project)
    record = {"run": base.to_dict(), "tune": tune.to_dict()}
    if path.exists():
        previous = json.loads(path.read_text())
        free = {"workers", "max_trials", "project_dir", "name", "export_dir"}  # may change between runs

        def settled(part: dict) -> dict:
            return {k: v for k, v in part.items() if k not in free}

        if any(settled(previous[k]) != settled(record[k]) for k in ("run", "tune")):
            raise KerastlError(f"project folder {project} holds a different search; resume it with the same "
                               "settings, start over with --restart (restart=True), or choose another folder")
    project.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def make_tuner(base: RunConfig, tune: TuneConfig, context, num_classes: int | None):
    """The search's `TransferTuner` on its project folder (reloading any state there)."""
    from kerastl.tuning import TransferHyperModel, TransferTuner, make_oracle

    project = Path(tune.project_dir).resolve()
    oracle = make_oracle(tune, base.data.seed, base.train.epochs)
    hypermodel = TransferHyperModel(base, tune.space, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner prints "Reloading Tuner from ..."
        tuner = TransferTuner(oracle, hypermodel, context, tune, str(project.parent), project.name)
    trials = getattr(tuner.oracle, "trials", {})  # a worker's oracle is a client of the chief's: no trials here
    done = sum(trial.status == "COMPLETED" for trial in trials.values())
    if done:
        log.info("resuming the search in %s: %d trials completed", project, done)
    return tuner


def search_here(base: RunConfig, tune: TuneConfig, data: ImageData | None, verbose: int | str = 0):
    """Runs trials in this process (the single-process search, or one worker of many)."""
    from kerastl.devices import setup_devices
    from kerastl.tuning import TrialContext

    setup = setup_devices(tune.mixed_precision)
    context = TrialContext(tune.project_dir, data, setup.device, verbose)
    num_classes = len(data.class_names) if data is not None else None
    tuner = make_tuner(base, tune, context, num_classes)
    try:
        tuner.search(verbose=0)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        last = [line for line in str(error).splitlines() if line.strip()][-1]
        raise KerastlError(f"search stopped: {tune.max_failures} trials in a row failed; the last with: "
                           f"{last}. Trial folders under {tune.project_dir} hold each trial's log") from None
    return tuner


def serve_chief(base: RunConfig, tune: TuneConfig):
    """The chief: KerasTuner's oracle over gRPC, until every worker has been told to stop.

    KerasTuner's own `start_server` polls every 20 s once the search is over; this
    is the same servicer polled every 0.2 s, so the chief ends as soon as the last
    worker has.
    """
    import grpc
    from concurrent import futures

    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    tuner = make_tuner(base, tune, None, None)
    tuner.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(tuner.oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(tuner.oracle)):
            time.sleep(0.2)
    finally:
        server.stop(grace=1)
    return tuner


def launch(tune: TuneConfig, workers: int, gpus: int, verbose: bool = True) -> None:
    """Starts a chief and `workers` worker processes on this machine and waits for all of them.

    Each process runs `python -m kerastl.worker search PROJECT` with KerasTuner's
    KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT. The same
    command with a shared project folder runs them on several machines (see README).
    """
    from kerastl.devices import free_port, worker_environments

    project = Path(tune.project_dir)
    logs = project / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    command = [sys.executable, "-m", "kerastl.worker", "search", str(project)]

    def start(tuner_id: str, extra: dict) -> subprocess.Popen:
        out = open(logs / f"{tuner_id}.log", "w")
        return subprocess.Popen(command, env={**common, **extra, "KERASTUNER_TUNER_ID": tuner_id},
                                stdout=out, stderr=subprocess.STDOUT)

    chief = start("chief", {"CUDA_VISIBLE_DEVICES": ""})
    pool = {f"tuner{i}": start(f"tuner{i}", env) for i, env in enumerate(worker_environments(workers, gpus))}
    log.info("started a chief and %d workers (logs in %s)", workers, logs)
    codes = {name: proc.wait() for name, proc in pool.items()}
    try:  # after a clean finish the chief ends by itself; after a worker died it would wait for it forever
        codes["chief"] = chief.wait(timeout=CHIEF_GRACE_S if not any(codes.values()) else 1)
    except subprocess.TimeoutExpired:
        chief.terminate()
        codes["chief"] = chief.wait()
        log.warning("the chief was still waiting for a trial after every worker ended; stopped it")
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        name = sorted(failed, key=lambda n: (n == "chief", n))[0]  # a worker's error explains the chief's
        lines = [line for line in (logs / f"{name}.log").read_text().splitlines() if line.strip()]
        raise KerastlError(f"{name} exited with code {failed[name]}: {lines[-1] if lines else 'no output'} "
                           f"(logs in {logs})")


def trial_table(tuner) -> list[dict]:
    """Every trial: id, status, objective and all metrics, values, seconds; best first, failed last."""
    from kerastl.tuning import shown_values

    objective = tuner.oracle.objective
    rows = []
    for trial in tuner.oracle.trials.values():
        score = None if trial.score is None else float(trial.score)
        row = {"trial": trial.trial_id, "status": trial.status, "score": score}
        for name in ("val_accuracy", "val_loss", "val_macro_f1", "val_auc"):
            row[name] = float(trial.metrics.get_last_value(name)) if trial.metrics.exists(name) else None
        result = Path(tuner.get_trial_dir(trial.trial_id)) / "result.json"
        info = json.loads(result.read_text())["info"] if result.exists() else {}
        row.update(seconds=info.get("seconds"), reused_head=info.get("reused_head"), memory_mb=info.get("memory_mb"),
                   gpu_peak_mb=info.get("gpu_peak_mb"))
        row["values"] = shown_values(trial.hyperparameters.values)
        if trial.message:
            row["error"] = [line for line in trial.message.splitlines() if line.strip()][-1]
        rows.append(row)
    return rank(rows, objective.name, objective.direction)


def rank(rows: list[dict], objective: str, direction: str) -> list[dict]:
    """Best first, failed last. Ties, common for accuracy on a few hundred images, go to the
    lower val_loss (to the higher val_accuracy when val_loss is the objective)."""
    sign = 1 if direction == "min" else -1
    tiebreak = "val_accuracy" if objective == "val_loss" else "val_loss"
    tie_sign = -1 if tiebreak == "val_accuracy" else 1

    def key(row: dict) -> tuple:
        score, other = row["score"], row.get(tiebreak)
        return (score is None, sign * (score or 0), other is None, tie_sign * (other or 0), row["trial"])

    return sorted(rows, key=key)


def format_table(rows: list[dict], objective: str) -> str:
    """The summary table people read: one line per trial, best first."""
    names = sorted({k for row in rows for k in row["values"]})
    header = ["trial", "status", objective, "seconds"] + names
    lines = [header]
    for row in rows:
        value = row.get(objective)
        lines.append([row["trial"], row["status"], "-" if value is None else f"{value:.4f}",
                      "-" if row["seconds"] is None else f"{row['seconds']:.1f}"]
                     + [str(row["values"].get(n, "-")) for n in names])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_tables(rows: list[dict], folder: Path) -> None:
    """`trials.json` and `trials.csv` (same rows, best first) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = sorted({k for row in rows for k in row["values"]})
    fields = ["trial", "status", "score", "val_accuracy", "val_loss", "val_macro_f1", "val_auc", "seconds",
              "reused_head", "memory_mb", "gpu_peak_mb", "error"]
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields + names)
        for row in rows:
            writer.writerow([row.get(f) for f in fields] + [row["values"].get(n) for n in names])


def restore_trial_model(trial_dir: Path, data: ImageData | None = None) -> keras.Model:
    """A trial's trained classifier, rebuilt from its `result.json` and weights."""
    from kerastl.features import weights_digest
    from kerastl.model import build_head, get_backbone
    from kerastl.train import graft_head
    from kerastl.tuning import HEAD_WEIGHTS, MODEL_WEIGHTS, seeded_classifier

    result = json.loads((trial_dir / "result.json").read_text())
    config = RunConfig.from_dict(result["config"])
    classes = result["info"]["classes"]
    model = seeded_classifier(config, classes)
    if (trial_dir / MODEL_WEIGHTS).exists():
        model.load_weights(trial_dir / MODEL_WEIGHTS)
        return model
    head = build_head(config.model, classes, model.get_layer("pool").output.shape[-1])
    head.load_weights(trial_dir / HEAD_WEIGHTS)
    graft_head(head, model)
    if weights_digest(get_backbone(model)) != result["info"]["backbone_digest"]:
        raise KerastlError(f"the backbone rebuilt for {trial_dir.name} differs from the one its head was trained on")
    return model


def run_search(
    config: RunConfig,
    tune: TuneConfig,
    data: ImageData | None = None,
    overwrite: bool = False,
    restart: bool = False,
    verbose: int | str = 0,
) -> SearchResult:
    """Searches, then exports the best trial's model with the trial tables beside it.

    Args:
        config: the run every trial starts from (data, backbone, training settings).
        tune: tuner, objective, space, project folder, workers.
        data: in-memory data for every trial (single process only); default loads
            `config.data.source` (needed for workers and isolated trials).
        overwrite: replace a non-empty export folder.
        restart: delete the project folder first instead of resuming it.
        verbose: Keras `fit` verbosity inside trials.
    """
    from kerastl.data import load_data
    from kerastl.devices import list_gpus
    from kerastl.export import export_saved_model
    from kerastl.run import check_export_dir, resolve_config
    from kerastl.report import predict_split, score

    base, tune = prepare(config, tune)
    export_dir = Path(base.export_dir)
    check_export_dir(export_dir, overwrite)
    project = Path(tune.project_dir)
    _claim_project(project, base, tune, restart)
    workers, gpus = tune.workers, len(list_gpus())
    if workers == 0:
        workers = gpus if gpus > 1 else 1
    role = os.environ.get("KERASTUNER_TUNER_ID", "") if "KERASTUNER_ORACLE_IP" in os.environ else ""
    if role and "chief" not in role:  # one worker of a search spread over machines: run trials, export nothing
        tuner = search_here(base, tune, data, verbose)
        return SearchResult([], None, None, {})
    if role:  # the chief of a search spread over machines: serve the oracle, then report and export
        tuner = serve_chief(base, tune)
    elif workers > 1:
        if data is not None:
            raise KerastlError("several workers load the data themselves: give a data source, not in-memory data")
        launch(tune, workers, gpus)
        tuner = make_tuner(base, tune, None, None)  # reloads the finished search's state
    else:
        tuner = search_here(base, tune, data, verbose)
    rows = trial_table(tuner)
    write_tables(rows, project)
    done = [row for row in rows if row["status"] == "COMPLETED"]
    if not done:
        raise KerastlError(f"no trial completed; see {project / 'trials.csv'} and the trial logs")
    best_dir = Path(tuner.get_trial_dir(done[0]["trial"]))
    best_config = resolve_config(RunConfig.from_dict(json.loads((best_dir / "result.json").read_text())["config"]))
    best_config.name, best_config.export_dir = base.name, str(export_dir)
    model = restore_trial_model(best_dir)
    if data is None and tuner.context is not None:  # an in-process search has loaded it already
        data = tuner.context.data(best_config)
    elif data is None:
        data = load_data(best_config.data, best_config.model.image_size)
    metrics = {k: done[0][k] for k in ("val_accuracy", "val_loss", "val_macro_f1", "val_auc")}
    if data.test is not None:
        test = score(*predict_split(model, data.test.batches(best_config.data.batch_size, cache_limit_mb=0)))
        metrics.update({k.replace("val_", "test_"): v for k, v in test.items()})
    export_saved_model(model, export_dir, data.class_names, {**best_config.to_dict(), "tune": tune.to_dict(),
                                                             "best_trial": done[0]["trial"]})
    model.save(export_dir / "model.keras")
    (export_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_tables(rows, export_dir)
    log.info("best trial %s (%s %.4f) exported to %s", done[0]["trial"], tune.objective, done[0][tune.objective],
             export_dir)
    return SearchResult(rows, model, export_dir, metrics)
