"""The KerasTuner internals behind `kerastl.tune.internals`: these fail loudly when KerasTuner changes them."""

import inspect

import keras
import keras_tuner
import pytest

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.tune import internals
from kerastl.tune.config import TuneConfig
from kerastl.tune.distribute import free_port
from kerastl.tune.hypermodel import TransferHyperModel
from kerastl.tune.tuner import TransferTuner, make_oracle


def test_kerastuner_still_calls_the_space_hook_from_its_constructor():
    base_tuner = keras_tuner.Tuner.__mro__[1]
    assert hasattr(base_tuner, internals.POPULATE_SPACE_HOOK), "KerasTuner renamed its space hook"
    assert f"self.{internals.POPULATE_SPACE_HOOK}()" in inspect.getsource(base_tuner.__init__)


def test_a_fresh_tuner_declares_its_space_without_building_a_model(tmp_path, monkeypatch):
    config = RunConfig(DataConfig(source="digits"), ModelConfig("simple_cnn", None, 16), TrainConfig(fine_tune_epochs=2))
    space = {"dropout": [0.0, 0.2], "unfreeze_blocks": [0, 1], "fine_tune_lr_ratio": [0.05, 0.1]}
    hypermodel = TransferHyperModel(config, space, num_classes=10)
    builds = []
    monkeypatch.setattr(hypermodel, "build", lambda hp: builds.append(hp) or pytest.fail("a model was built"))
    tune = TuneConfig(max_trials=2, space=space)
    tuner = TransferTuner(make_oracle(tune, 0, 4), hypermodel, None, tune, str(tmp_path), "p")
    assert builds == []
    names = {hp.name for hp in tuner.oracle.get_space().space}
    assert names == {"dropout", "unfreeze_blocks", "fine_tune_lr_ratio"}


def test_the_oracle_servicer_serves_and_knows_when_the_search_is_over():
    oracle = keras_tuner.oracles.RandomSearchOracle(objective="val_accuracy", max_trials=1)
    server, servicer = internals.serve_oracle(oracle, f"127.0.0.1:{free_port()}")
    try:
        assert not internals.search_finished(servicer, oracle)  # no worker has said it is done
        servicer.stop_triggered = True
        assert internals.search_finished(servicer, oracle)  # and no trial is running
    finally:
        server.stop(grace=0)



def test_kerastuner_still_runs_a_trial_through_the_step_kerastl_calls():
    base_tuner = keras_tuner.Tuner.__mro__[1]
    assert hasattr(base_tuner, internals.RUN_TRIAL_STEP), "KerasTuner renamed the step that runs one trial"
    assert f"self.{internals.RUN_TRIAL_STEP}(" in inspect.getsource(base_tuner.search)


def test_the_oracle_forgets_a_tuner_id_when_it_tells_it_to_stop(tmp_path):
    """A chief ends only when every id has been forgotten: populations ask each slot once more at the end."""
    from keras_tuner.src.distribute import oracle_chief

    def build(hp):
        hp.Choice("x", [1, 2])
        return keras.Sequential()

    oracle = keras_tuner.RandomSearch(build, objective="val_accuracy", max_trials=1, directory=str(tmp_path)).oracle
    first = oracle.create_trial("w-0")
    oracle.update_trial(first.trial_id, {"val_accuracy": 0.5})
    first.status = "COMPLETED"
    oracle.end_trial(first)
    assert oracle.create_trial("w-1").status == "STOPPED"
    assert not oracle_chief.exit_chief(oracle)  # "w-0" claimed a trial and was never told to stop
    assert oracle.create_trial("w-0").status == "STOPPED" and oracle_chief.exit_chief(oracle)
