"""`TransferTuner`: a KerasTuner Tuner whose trials are kerastl runs, isolated when heavy.

Head-only trials run in this process on the search's shared cached features
(the feature cache keys them, so they are extracted once per backbone setting);
trials that run the backbone go to a process of their own (see `kerastl.tune.trial`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import keras
import keras_tuner
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier
from kerastl.runs.folder import LOGS, load_model
from kerastl.tune import internals
from kerastl.tune.config import AUTO_OBJECTIVE, OBJECTIVES, TuneConfig
from kerastl.tune.hypermodel import TransferHyperModel
from kerastl.tune.tables import shown_values, trial_table, write_tables
from kerastl.tune.trial import TrialContext, needs_process, run_in_process

log = logging.getLogger(__name__)


def make_objective(name: str) -> keras_tuner.Objective:
    """The KerasTuner objective with its direction (max for accuracy, F1 and AUC; min for loss).

    "auto" is resolved from the class counts by `kerastl.tune.search.run_search`; a tuner made
    without the data (the stock KerasTuner path) reads it as val_accuracy.
    """
    if name == AUTO_OBJECTIVE:
        log.info("objective auto without the data's class counts: val_accuracy (run_search chooses val_macro_f1 "
                 "for imbalanced classes)")
        name = "val_accuracy"
    if name not in OBJECTIVES:
        raise KerastlError(f"objective must be one of {list(OBJECTIVES)}, got {name!r}")
    return keras_tuner.Objective(name, OBJECTIVES[name])


def make_oracle(tune: TuneConfig, seed: int, max_epochs: int) -> keras_tuner.Oracle:
    """The KerasTuner oracle for `tune.tuner`, with the objective's direction and the failure limit."""
    common = {"objective": make_objective(tune.objective), "seed": seed, "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": tune.max_failures}
    if tune.tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=tune.max_trials, **common)
    if tune.tuner == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=tune.max_trials, **common)
    return keras_tuner.oracles.HyperbandOracle(max_epochs=max_epochs, factor=tune.hyperband_factor, **common)


class TransferTuner(keras_tuner.Tuner):
    """Runs `TransferHyperModel` trials as kerastl runs: cached features, stored heads, own processes.

    Args:
        oracle: any KerasTuner oracle (see `make_oracle`).
        hypermodel: the search's `TransferHyperModel`.
        context: shared data and heads for in-process trials (None in a chief, which runs none).
        tune: isolation and precision settings.
        directory, project_name: where KerasTuner keeps its state (never overwritten: reruns resume).
    """

    def __init__(self, oracle, hypermodel: TransferHyperModel, context: TrialContext | None, tune: TuneConfig,
                 directory: str, project_name: str):
        self.context, self.tune = context, tune
        self._slots: set[int] = set()  # the claim slots that hold a tuner id the oracle knows (see `_claim`)
        super().__init__(oracle=oracle, hypermodel=hypermodel, directory=directory, project_name=project_name,
                         overwrite=False)

    def declare_space(self) -> None:
        """Declares the hypermodel's space on the oracle without building a model."""
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def search(self, *fit_args, **fit_kwargs) -> None:
        """KerasTuner's search, with head-only trials claimed `tune.population` at a time (as parallel
        workers claim them) and trained together; every trial is begun, reported and ended as its own."""
        if self.context is None or self.tune.population < 2 or self.tune.tuner == "bayesian":
            return super().search(*fit_args, **fit_kwargs)  # Bayesian optimisation learns from each trial in turn
        if "verbose" in fit_kwargs:  # as KerasTuner's search sets it: its own per-trial display
            self.oracle.verbose = fit_kwargs["verbose"]
        self.on_search_begin()
        while (batch := self._claim(self.tune.population)) is not None:
            joins = [self._trains_together(config.trains_head_only) for _, config in batch]
            together = [pair for pair, join in zip(batch, joins) if join]
            if len(together) >= 2:  # first: a fine-tuning trial after them may reuse one of their heads
                self._run_together(together)
            for (trial, _), join in zip(batch, joins):
                if len(together) < 2 or not join:
                    self.on_trial_begin(trial)
                    internals.run_one_trial(self, trial, *fit_args, **fit_kwargs)
                    self.on_trial_end(trial)
        self.on_search_end()

    def _trains_together(self, head_only: bool) -> bool:
        """Whether a trial can join a population: it trains a head only (`head_only`), in this process."""
        return head_only and not (self.tune.isolate == "always" and self.context.can_isolate)

    def _claim(self, count: int) -> list | None:
        """Up to `count` (trial, its config) pairs from the oracle, each trial under its own tuner id
        (`<tuner id>-<slot>`), ending at the first that cannot join a population (so a search without
        head-only trials runs as KerasTuner's does); None when the search is over.

        Once the oracle says stop, every slot id that ever claimed a trial is asked once more (and no
        other): KerasTuner forgets a tuner id when it tells it to stop, and a chief ends as soon as it
        has forgotten them all, so an id asked after that would find no chief."""
        batch, stopped = [], False
        for slot in range(count):
            if stopped and slot not in self._slots:
                continue
            trial = self.oracle.create_trial(f"{self.tuner_id}-{slot}")
            if trial.status == keras_tuner.engine.trial.TrialStatus.STOPPED:
                stopped = True
                self._slots.discard(slot)
                continue
            if trial.status == keras_tuner.engine.trial.TrialStatus.IDLE:  # the oracle waits for results
                break
            self._slots.add(slot)
            batch.append((trial, self.hypermodel.trial_config(trial.hyperparameters)))
            if not self._trains_together(batch[-1][1].trains_head_only):
                break
        return None if stopped and not batch else batch

    def _run_together(self, together: list) -> None:
        """Head-only (trial, config) pairs as one population (`TrialContext.run`); each trial is then
        reported to the oracle and ended as a lone trial would be."""
        trials = [trial for trial, _ in together]
        for trial in trials:
            self.on_trial_begin(trial)
            log.info("trial %s: %s (population of %d)", trial.trial_id,
                     json.dumps(shown_values(trial.hyperparameters.values)), len(trials))
        fresh_session()
        outcomes = self.context.run([config for _, config in together],
                                    [Path(self.get_trial_dir(trial.trial_id)) for trial in trials],
                                    [trial.hyperparameters.values.get("tuner/epochs") for trial in trials])
        ended = sorted(zip(trials, outcomes), key=lambda pair: isinstance(pair[1], Exception))
        for trial, outcome in ended:  # completed ones first: enough failures in a row stop the search
            if isinstance(outcome, Exception):
                _log_failure(trial.trial_id, outcome)
                trial.status, trial.message = keras_tuner.engine.trial.TrialStatus.FAILED, str(outcome)
            else:
                write_hparams(Path(self.get_trial_dir(trial.trial_id)) / LOGS, trial.hyperparameters.values,
                              outcome, trial.trial_id)
                self.oracle.update_trial(trial.trial_id, outcome)
                trial.status = keras_tuner.engine.trial.TrialStatus.COMPLETED
            self.on_trial_end(trial)

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        config = self.hypermodel.trial_config(trial.hyperparameters)
        budget = trial.hyperparameters.values.get("tuner/epochs")
        trial_dir = Path(self.get_trial_dir(trial.trial_id))
        isolated = needs_process(config.trains_head_only, self.tune.isolate) and self.context.can_isolate
        log.info("trial %s: %s%s", trial.trial_id, json.dumps(shown_values(trial.hyperparameters.values)),
                 " (own process)" if isolated else "")
        try:
            if isolated:
                metrics = run_in_process(config.to_dict(), trial_dir, Path(self.project_dir), budget)
            else:
                fresh_session()
                metrics = self.context.run([config], [trial_dir], [budget])[0]
                if isinstance(metrics, Exception):
                    raise metrics
        except Exception as error:
            _log_failure(trial.trial_id, error)
            raise
        write_hparams(trial_dir / LOGS, trial.hyperparameters.values, metrics, trial.trial_id)
        return metrics

    def on_trial_end(self, trial: keras_tuner.engine.trial.Trial) -> None:
        """KerasTuner's end of a trial, then one line: "trial 3/10, val_accuracy 0.9100, best so far 0.9300";
        and the trial tables so far, so that `kerastl report` shows a search while it runs."""
        super().on_trial_end(trial)
        trial = self.oracle.get_trial(trial.trial_id)  # as the oracle holds it: a worker's copy has no scores
        objective = self.oracle.objective.name
        trials = getattr(self.oracle, "trials", None)  # a worker's oracle client has none: it names the trial
        if trials:
            write_tables(trial_table(self), Path(self.project_dir))
        # an INVALID trial is retried by KerasTuner: it has not finished
        finished = sum(t.status in ("COMPLETED", "FAILED") for t in trials.values()) if trials else None
        total = getattr(self.oracle, "max_trials", None)
        best = self.oracle.get_best_trials(1)
        best_score = f"best so far {best[0].score:.4f}" if best and best[0].score is not None else "none completed"
        if trial.metrics.exists(objective):
            outcome = f"{objective} {trial.metrics.get_last_value(objective):.4f}"
        else:
            outcome = "failed"
        number = f"trial {trial.trial_id}" if finished is None else f"trial {finished}/{total or '?'}"
        log.info("%s, %s, %s", number, outcome, best_score)

    def load_model(self, trial) -> TransferClassifier:
        """The trial's trained classifier, as `get_best_models` expects."""
        return load_model(self.get_trial_dir(trial.trial_id))


# KerasTuner would build the model repeatedly to discover the space; declaring it builds nothing
internals.declare_space_on_init(TransferTuner, TransferTuner.declare_space)


def _log_failure(trial_id: str, error: Exception) -> None:
    """One line: the trial and the last line of its error."""
    lines = str(error).strip().splitlines()
    log.warning("trial %s failed: %s", trial_id, lines[-1] if lines else type(error).__name__)


def write_hparams(log_dir: Path, values: dict, metrics: dict[str, float], trial_id: str) -> None:
    """A trial's settings and final scores for TensorBoard's HParams dashboard, beside its phases'
    logs, so that `tensorboard --logdir PROJECT` compares the trials."""
    shown = {k: v for k, v in shown_values(values).items() if isinstance(v, (bool, int, float, str))}
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        hparams_api.hparams(shown, trial_id=trial_id)
        for name, value in metrics.items():
            tf.summary.scalar(name, value, step=0)
    writer.close()


def fresh_session() -> None:
    """Frees the last in-process trial's models, keeping the dtype policy (mixed precision on a GPU).

    `keras.backend.clear_session` resets every global setting, the policy included;
    it runs `gc.collect` itself.
    """
    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    keras.config.set_dtype_policy(policy)


def make_tuner(hypermodel: TransferHyperModel, tune: TuneConfig, context: TrialContext | None) -> TransferTuner:
    """The search's `TransferTuner` of `hypermodel` on its project folder (reloading any state there)."""
    project = Path(tune.project_dir).resolve()
    oracle = make_oracle(tune, hypermodel.base.data.seed, hypermodel.base.train.head.epochs)
    with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner prints "Reloading Tuner from ..."
        tuner = TransferTuner(oracle, hypermodel, context, tune, str(project.parent), project.name)
    trials = getattr(tuner.oracle, "trials", None)  # a worker's oracle is a client of the chief's: no trials here
    if trials == {} and (project / "oracle.json").exists():
        # KerasTuner reloads a project only through this tuner id's own file; after a search by
        # workers, that id may have run no trial (another took them all as a population)
        tuner.oracle.reload()
        trials = tuner.oracle.trials
    trials = trials or {}
    done = sum(trial.status == "COMPLETED" for trial in trials.values())
    if done:
        log.info("resuming the search in %s: %d trials completed", project, done)
    return tuner
