"""The KerasTuner internals behind `kerastl.tune.internals`: these fail loudly when KerasTuner changes them."""

import inspect

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

