"""A run plans every choice once (`kerastl.runs.plan`), records the plan, and trains only through
`kerastl.training.phase.fit_phase`."""

import dataclasses
import inspect
import json
import math

import keras
import pytest

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.datasets import load_digits
from kerastl.data.images import from_arrays
from kerastl.errors import KerastlError
from kerastl.runs.plan import plan_run
from kerastl.runs.run import run_training

SIZE = 16


def digits(per_class: int):
    x, y, names = load_digits((0, 1, 2))
    keep = [i for c in range(3) for i in [j for j in range(len(y)) if y[j] == c][:per_class]]
    return from_arrays(x[keep], y[keep], SIZE, names, validation_split=0.25, seed=0)


def small(**train) -> RunConfig:
    return RunConfig(DataConfig(augment="none", batch_size=8),
                     ModelConfig("simple_cnn", weights=None, image_size=SIZE, from_scratch=False, features="last"),
                     TrainConfig(**{"epochs": 2, "min_steps": 0, "fine_tune_epochs": 2, "fine_tune_min_steps": 0,
                                    "unfreeze_blocks": 1, **train}))


@pytest.mark.parametrize("per_class, mode", [(40, "holdout"), pytest.param(6, "cv", marks=pytest.mark.slow)])
def test_every_fit_of_a_run_goes_through_fit_phase(per_class, mode, monkeypatch):
    callers = []
    fit = keras.Model.fit

    def recording_fit(self, *args, **kwargs):
        callers.append(inspect.stack()[1].frame.f_globals["__name__"])
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    result = run_training(small(validation=mode), data=digits(per_class), verbose=0, save="none")
    assert result.plan.validation_mode == mode
    assert callers and set(callers) == {"kerastl.training.phase"}
    if mode == "cv":  # every fold and the final fit on every image, when fine-tuning helped
        assert len(callers) >= result.plan.folds


def test_the_plan_resolves_the_step_floor_once_and_is_frozen():
    data = digits(40)
    config = small(min_steps=100, fine_tune_min_steps=30, patience=2, validation="holdout", feature_cache=False)
    plan = plan_run(config, data)
    steps = math.ceil(data.train.count / 8)  # the training images, in batches of 8
    head, fine = plan.phases
    assert (head.name, head.steps_per_epoch, head.epochs) == ("head", steps, math.ceil(100 / steps))
    assert head.patience == math.ceil(2 * head.epochs / 2)  # raised with the epochs
    assert (fine.name, fine.epochs, fine.unfreeze) == ("fine_tune", max(2, math.ceil(30 / steps)), 1)
    assert fine.learning_rate == pytest.approx(config.train.learning_rate * 0.1)
    assert plan.validation_mode == "holdout" and plan.head_start == "probe" and plan.class_weights is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.validation_mode = "cv"


def test_config_json_records_the_plan_and_still_reproduces_the_run(tmp_path):
    config = small(validation="holdout", fine_tune_epochs=0)
    config.export_dir = str(tmp_path / "run")
    result = run_training(config, data=digits(20), verbose=0)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["plan"] == result.plan.to_dict() and written["plan"]["head_start"] == "probe"
    assert "cache_dir" not in written["train"] and "cache_limit_mb" not in written["data"]  # the machine's
    assert [phase["name"] for phase in written["plan"]["phases"]] == ["head"]
    assert RunConfig.from_json(tmp_path / "run" / "config.json") == result.config  # the plan is not a setting


def test_pipelines_train_through_their_own_keyword_and_0_2s_tuple_as_data_alike():
    from kerastl.models.classifier import build_classifier

    data = digits(20)
    pipelines = (data.train.batches(8), data.validation.batches(8))
    config = small(validation="holdout", fine_tune_epochs=0)
    plans = []
    for keywords in ({"pipelines": pipelines}, {"data": pipelines}):
        keras.utils.set_random_seed(0)
        model = build_classifier(config.model, 3, seed=0)
        result = run_training(config, model=model, verbose=0, save="none", **keywords)
        assert result.class_names is None and result.plan.head_start == "probe"
        plans.append(result.plan.to_dict())
    assert plans[0] == plans[1]
    with pytest.raises(KerastlError, match="needs the model built for them"):
        run_training(config, pipelines=pipelines, verbose=0, save="none")


def test_a_linear_head_from_the_probe_on_cached_features_has_no_step_floor(tmp_path):
    data = digits(40)
    config = small(min_steps=100, validation="holdout", fine_tune_epochs=0, cache_dir=str(tmp_path / "cache"))
    plan = plan_run(config, data)
    assert plan.head_start == "probe" and plan.head.epochs == 2  # converged: its epochs only try to beat it
    hidden = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_units=16))
    steps = math.ceil(data.train.count / 8)
    assert plan_run(hidden, data).head.epochs == math.ceil(100 / steps)  # a random hidden layer needs the steps
