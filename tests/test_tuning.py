"""KerasTuner searches: space, objectives, shared features, saved heads, failures, memory, tables, export."""

import json

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf
from helpers import base_config

from kerastl.config import ModelConfig, RunConfig
from kerastl.errors import KerastlError
from kerastl.models.export import load_export
from kerastl.runs.folder import load_model
from kerastl.runs.scoring import score
from kerastl.tune.config import TuneConfig
from kerastl.tune.hypermodel import TransferHyperModel
from kerastl.tune.search import run_search
from kerastl.tune.space import check_space, declare, parse_setting
from kerastl.tune.trial import TrialContext
from kerastl.tune.tuner import make_objective

HEAD_SPACE = {"dropout": [0.0, 0.2], "hidden_units": [0, 32], "learning_rate": [3e-3, 1e-2]}


def test_search_settings_parse_as_choices_ranges_and_fixed_values():
    assert parse_setting("hidden_units=0,64") == ("hidden_units", [0, 64])
    assert parse_setting("learning_rate=1e-4:1e-2:log") == ("learning_rate", {"min": 1e-4, "max": 1e-2, "log": True})
    assert parse_setting("dropout=0:0.5:0.1") == ("dropout", {"min": 0, "max": 0.5, "step": 0.1})
    assert parse_setting("backbone=mobilenet_v2,resnet50") == ("backbone", ["mobilenet_v2", "resnet50"])
    assert parse_setting("fine-tune-epochs=3") == ("fine_tune_epochs", 3)
    with pytest.raises(KerastlError, match="NAME=VALUES"):
        parse_setting("dropout")


@pytest.mark.parametrize("space, message", [
    ({"drop": [0.1]}, "unknown search settings"),
    ({"dropout": [0.1, 1.5]}, "dropout must be in"),
    ({"learning_rate": {"min": 0, "max": 0.1, "log": True}}, "log range needs min > 0"),
    ({"learning_rate": {"min": 0.1, "max": 0.01}}, "min <= max"),
    ({"backbone": ["simple_cnn", "no_such_net"]}, "unknown backbone"),
    ({"optimizer": ["adam", "nonsense"]}, "unknown optimizer"),
    ({"features": ["last", "deep"]}, "features must be last, auto, all or block numbers"),
])
def test_bad_spaces_fail_before_any_trial(tmp_path, space, message):
    with pytest.raises(KerastlError, match=message):
        check_space(space, base_config(tmp_path))


def test_fine_tuning_settings_depend_on_unfreezing_and_vanish_when_no_trial_fine_tunes(tmp_path):
    space = check_space({"dropout": [0.0, 0.2], "unfreeze_blocks": [0, 2], "fine_tune_lr_ratio": [0.05, 0.1]},
                        base_config(tmp_path, fine_tune_epochs=2))
    hp = keras_tuner.HyperParameters()
    assert declare(hp, space)["fine_tune_lr_ratio"] is None  # default unfreeze_blocks is 0: inactive
    hp.values["unfreeze_blocks"] = 2
    hp.ensure_active_values()  # what the oracle does when it picks values
    assert declare(hp, space)["fine_tune_lr_ratio"] in (0.05, 0.1)
    head_only = check_space({"dropout": [0.0, 0.2], "unfreeze_blocks": [0, 2], "fine_tune_lr_ratio": [0.05, 0.1]},
                            base_config(tmp_path, fine_tune_epochs=0))
    assert set(head_only) == {"dropout"}


def test_objectives_have_their_direction_and_scores_match_sklearn():
    from sklearn.metrics import f1_score, log_loss, roc_auc_score

    assert make_objective("val_loss").direction == "min"
    assert {make_objective(n).direction for n in ("val_accuracy", "val_macro_f1", "val_auc")} == {"max"}
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    p[np.arange(60), labels] += 0.5
    p /= p.sum(1, keepdims=True)
    got = score(p.astype(np.float32), labels)
    assert got["val_loss"] == pytest.approx(log_loss(labels, p), rel=1e-5)
    assert got["val_accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels))
    assert got["val_macro_f1"] == pytest.approx(f1_score(labels, p.argmax(1), average="macro"))
    assert got["val_auc"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr"), rel=1e-6)
    binary = score(np.array([[0.9], [0.2], [0.6]]), np.array([1, 0, 0]))
    assert binary["val_accuracy"] == pytest.approx(2 / 3) and binary["val_auc"] == 1.0


@pytest.mark.slow  # 20-36 s on 2 cores: the default suite stays under 10 minutes
def test_head_search_extracts_features_once_and_exports_the_best_trial(tmp_path):
    config = base_config(tmp_path)
    tune = TuneConfig(max_trials=4, project_dir=str(tmp_path / "project"), space=HEAD_SPACE)
    result = run_search(config, tune)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and validation features, shared by 4 trials
    assert [row["status"] for row in result.trials] == ["COMPLETED"] * 4
    accuracies = [row["val_accuracy"] for row in result.trials]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > 0.6
    for folder in (tmp_path / "project", tmp_path / "export"):
        assert len(json.loads((folder / "trials.json").read_text())) == 4
        assert len((folder / "trials.csv").read_text().splitlines()) == 5
    report = (tmp_path / "project" / "report.html").read_text()  # run_search writes the project's report
    assert 'id="trials"' in report and report.count("<tr") >= 1 + 4  # a header and the four trials
    # the export is the best trial's own model: it scores what the table says on the validation images
    from kerastl.data.images import load_data

    data = load_data(config.data, 16)
    images, labels = data.validation.arrays()
    exported = load_export(tmp_path / "export")
    accuracy = np.mean(exported.predict(images.astype(np.float32)).argmax(1) == labels)
    assert accuracy == pytest.approx(result.trials[0]["val_accuracy"], abs=1e-9)


@pytest.mark.slow  # 20-36 s on 2 cores: the default suite stays under 10 minutes
def test_a_search_export_is_a_run_folder_that_train_reproduces(tmp_path, capsys):
    from kerastl.cli.main import main
    from kerastl.runs.folder import load_model

    config = base_config(tmp_path)
    config.data.test_split = 0.2
    result = run_search(config, TuneConfig(max_trials=2, project_dir=str(tmp_path / "project"), space=HEAD_SPACE))
    export = tmp_path / "export"
    for name in ("saved_model.pb", "labels.txt", "config.json", "model.keras", "backbone.weights.h5", "history.json",
                 "metrics.json", "metadata.json", "tune.json", "trials.csv", "trials.json"):
        assert (export / name).is_file(), name  # what every train export holds, plus the search's own files
    assert json.loads((export / "tune.json").read_text())["best_trial"] == result.trials[0]["trial"]
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["val_accuracy"] == result.trials[0]["val_accuracy"] and "test_accuracy" in metrics
    best_trial = tmp_path / "project" / f"trial_{result.trials[0]['trial']}"
    trial_plan = json.loads((best_trial / "config.json").read_text())["plan"]
    assert json.loads((export / "config.json").read_text())["plan"] == trial_plan  # what the report reads
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(load_model(export).predict(images, verbose=0),
                               load_model(best_trial).predict(images, verbose=0), atol=1e-6)

    assert main(["train", "--config", str(export / "config.json"), "--export", str(tmp_path / "again"), "-q"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert RunConfig.from_json(tmp_path / "again" / "config.json").model == RunConfig.from_json(
        export / "config.json").model
    from kerastl.data.images import load_data

    count = load_data(config.data, 16).validation.count
    assert again["val_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1.5 / count)
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-3)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_fine_tuning_trial_starts_from_the_saved_head_of_an_equal_head_trial(tmp_path):
    config = base_config(tmp_path)
    context = TrialContext(tmp_path / "project")
    [head] = context.run([config], [tmp_path / "t0"])
    tuned = RunConfig.from_dict(config.to_dict())
    tuned.train.fine_tune_epochs, tuned.train.unfreeze_blocks = 2, 1
    [fine] = context.run([tuned], [tmp_path / "t1"])
    info = json.loads((tmp_path / "t1" / "result.json").read_text())["info"]
    assert info["reused_head"] and info["fine_tuned"] and not json.loads(
        (tmp_path / "t0" / "result.json").read_text())["info"]["reused_head"]
    assert (tmp_path / "t1" / "model.weights.h5").exists() and (tmp_path / "t0" / "head.weights.h5").exists()
    # phase 2 starts from the stored head and its best validation loss: it cannot end worse than phase 1
    assert fine["val_loss"] <= head["val_loss"] + 1e-4


def _second_fails(monkeypatch, population: int) -> None:
    """Makes the second trial run out of memory, whether trials run one at a time or as a population."""
    error = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    real, calls = TrialContext.run, []
    if population == 1:

        def second_runs_out_of_memory(self, *args, **kwargs):
            calls.append(1)
            return [error] if len(calls) == 2 else real(self, *args, **kwargs)

        monkeypatch.setattr(TrialContext, "run", second_runs_out_of_memory)
    else:
        def second_of_population_fails(self, *args, **kwargs):
            outcomes = real(self, *args, **kwargs)
            return [error if i == 1 else outcome for i, outcome in enumerate(outcomes)]

        monkeypatch.setattr(TrialContext, "run", second_of_population_fails)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
@pytest.mark.parametrize("population", [1, 32])
def test_a_failing_trial_is_recorded_failed_and_the_search_goes_on(tmp_path, monkeypatch, population):
    _second_fails(monkeypatch, population)
    result = run_search(base_config(tmp_path), TuneConfig(max_trials=3, project_dir=str(tmp_path / "p"),
                                                          space=HEAD_SPACE, population=population))
    statuses = sorted(row["status"] for row in result.trials)
    assert statuses == ["COMPLETED", "COMPLETED", "FAILED"]
    failed = [row for row in result.trials if row["status"] == "FAILED"]
    assert "OOM" in failed[0]["error"]


@pytest.mark.parametrize("population", [1, 32])
def test_repeated_failures_stop_the_search_with_a_clear_message(tmp_path, monkeypatch, population):
    def always_fails(self, configs, *args):
        return [tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor") for _ in configs]

    monkeypatch.setattr(TrialContext, "run", always_fails)
    with pytest.raises(KerastlError, match=r"search stopped: 2 trials in a row failed.*OOM"):
        run_search(base_config(tmp_path), TuneConfig(max_trials=5, max_failures=2, project_dir=str(tmp_path / "p"),
                                                     space=HEAD_SPACE, population=population))


@pytest.mark.slow  # 20 trials, over a minute: CI runs it with the other slow tests
@pytest.mark.parametrize("population", [1, 4])  # one at a time, and five populations of four
def test_memory_stays_flat_over_many_in_process_trials(tmp_path, population):
    space = {"dropout": {"min": 0.0, "max": 0.5}, "hidden_units": [0, 16, 64], "learning_rate": {
        "min": 1e-3, "max": 1e-2, "log": True}}
    tune = TuneConfig(max_trials=20, project_dir=str(tmp_path / "p"), space=space, population=population)
    run_search(base_config(tmp_path, epochs=1), tune)
    trials = sorted((tmp_path / "p").glob("trial_*/result.json"))
    memory = [json.loads(path.read_text())["info"]["memory_mb"] for path in trials]
    assert len(memory) == 20
    settled = memory[4]
    assert max(memory[4:]) < settled * 1.10, memory


@pytest.mark.slow  # about 24 s: two searches; CI runs it
def test_bayesian_and_hyperband_tuners_run(tmp_path):
    for name, trials in (("bayesian", 3), ("hyperband", None)):
        tune = TuneConfig(tuner=name, max_trials=trials or 10, project_dir=str(tmp_path / name), space=HEAD_SPACE)
        config = base_config(tmp_path, epochs=2)
        config.export_dir = str(tmp_path / f"export-{name}")
        result = run_search(config, tune)
        assert result.trials and all(row["status"] == "COMPLETED" for row in result.trials)
        if name == "hyperband":  # every trial trained for its bracket's budget, never more
            for path in (tmp_path / name).glob("trial_*/result.json"):
                trial = json.loads((path.parent / "trial.json").read_text())
                assert json.loads(path.read_text())["info"]["epochs"] == trial["hyperparameters"]["values"][
                    "tuner/epochs"] <= 2


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_the_hypermodel_works_in_a_plain_kerastuner_search(tmp_path):
    from kerastl.data.images import load_data

    config = base_config(tmp_path, epochs=3, learning_rate=1e-2)
    data = load_data(config.data, 16)
    space = check_space({"dropout": [0.0, 0.2]}, config)
    tuner = keras_tuner.RandomSearch(TransferHyperModel(config, space, len(data.class_names)),
                                     objective=make_objective("val_macro_f1"), max_trials=2,
                                     directory=str(tmp_path), project_name="plain")
    tuner.search(data.train.batches(64, True, seed=1), validation_data=data.validation.batches(64), verbose=0)
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.status == "COMPLETED" and best.metrics.get_last_value("val_macro_f1") > 0.3
    assert isinstance(tuner.hypermodel.build(best.hyperparameters), keras.Model)


def test_head_keeps_a_float32_softmax_under_mixed_precision():
    from kerastl.models.classifier import build_classifier

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_classifier(ModelConfig("simple_cnn", None, 16, hidden_units=8), 3)
        head = model.head_model()
        assert model.hidden.compute_dtype == "float16"
        assert head.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_devices_fall_back_to_the_cpu_and_pin_one_gpu_per_worker():
    from kerastl.tune.distribute import setup_devices
    from kerastl.tune.distribute import worker_environments

    from kerastl.devices import DeviceConfig

    one, mirrored = setup_devices(DeviceConfig("one")), setup_devices(DeviceConfig("mirrored", "mixed_float16"))
    assert one.device == "/CPU:0" and mirrored.device == "/CPU:0"  # no GPU here
    assert (one.precision, mirrored.precision) == ("float32", "float32")  # mixed_float16 needs a GPU
    assert keras.config.dtype_policy().name == "float32"
    assert [env["CUDA_VISIBLE_DEVICES"] for env in worker_environments(3, gpus=2)] == ["0", "1", "0"]
    assert worker_environments(2, gpus=0, cpu_count=4) == [{"CUDA_VISIBLE_DEVICES": "", "KERASTL_THREADS": "2"}] * 2


@pytest.mark.slow  # about 22 s: three searches; CI runs it
def test_a_project_folder_resumes_only_its_own_search(tmp_path):
    config = base_config(tmp_path)
    project = str(tmp_path / "p")
    first = run_search(config, TuneConfig(max_trials=2, project_dir=project, space=HEAD_SPACE))
    scores = {row["trial"]: row["score"] for row in first.trials}
    config.export_dir = str(tmp_path / "export-more")
    more = run_search(config, TuneConfig(max_trials=3, project_dir=project, space=HEAD_SPACE))  # one more trial
    assert len(more.trials) == 3 and all(row["score"] == scores[row["trial"]] for row in more.trials
                                         if row["trial"] in scores)
    config.export_dir = str(tmp_path / "export-other")
    with pytest.raises(KerastlError, match="holds a different search"):
        run_search(config, TuneConfig(max_trials=3, project_dir=project, space={"dropout": [0.5, 0.6]}))
    fresh = run_search(config, TuneConfig(max_trials=1, project_dir=project, space={"dropout": [0.5, 0.6]}),
                       restart=True)
    assert len(fresh.trials) == 1


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_cached_trial_scores_what_the_plain_kerastuner_trial_scores(tmp_path):
    from kerastl.data.images import load_data

    config = base_config(tmp_path, epochs=3, learning_rate=3e-3)
    config.model.dropout, config.model.hidden_units = 0.2, 32
    [cached] = TrialContext(tmp_path / "p").run([config], [tmp_path / "t"])
    data = load_data(config.data, 16)
    hypermodel = TransferHyperModel(config, {}, len(data.class_names))
    hp = keras_tuner.HyperParameters()
    plain = hypermodel.fit(hp, hypermodel.build(hp), data.train.batches(64, True, seed=config.data.seed),
                           validation_data=data.validation.batches(64))
    assert cached["val_accuracy"] > 0.3  # well above chance (0.1): a real trial
    # the same start (standardised by the same statistics) and dropout masks; the plain path's one extraction
    # pass over the pipeline (for those statistics) takes one of its shuffles, so its batches come in another order
    assert cached["val_accuracy"] == pytest.approx(plain["val_accuracy"], abs=4.5 / data.validation.count)
    assert cached["val_loss"] == pytest.approx(plain["val_loss"], rel=0.05)


def test_tied_trials_rank_by_validation_loss_and_failed_trials_last():
    from kerastl.tune.tables import rank

    def row(trial, score, accuracy, loss):
        return {"trial": trial, "score": score, "val_accuracy": accuracy, "val_loss": loss}

    rows = [row("0", None, None, None), row("1", 0.7, 0.7, 0.9), row("2", 0.7, 0.7, 0.8), row("3", 0.6, 0.6, 0.5)]
    assert [r["trial"] for r in rank(rows, "val_accuracy", "max")] == ["2", "1", "3", "0"]
    rows = [row("0", 0.5, 0.6, 0.5), row("1", 0.5, 0.7, 0.5), row("2", 0.4, 0.5, 0.4), row("3", None, None, None)]
    assert [r["trial"] for r in rank(rows, "val_loss", "min")] == ["2", "1", "0", "3"]


def test_in_memory_data_of_another_size_is_refused_not_fed_to_the_model(tmp_path):
    from kerastl.data.images import load_data

    config = base_config(tmp_path)
    context = TrialContext(tmp_path / "p", data=load_data(config.data, 16))
    assert context.data(config.data, 16).train.image_size == 16
    config.model.image_size = 24
    [outcome] = context.run([config], [tmp_path / "t"])
    assert isinstance(outcome, KerastlError) and "in-memory data is 16x16 but this run wants 24x24" in str(outcome)


def test_a_project_folder_of_version_0_1_is_refused_with_what_to_do(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    config = base_config(tmp_path)
    (project / "search.json").write_text(json.dumps({"run": config.to_dict(), "tune": {}}))  # 0.1: no format
    with pytest.raises(KerastlError, match="started by kerastl 0.1.*restart=True"):
        run_search(config, TuneConfig(max_trials=1, project_dir=str(project), space=HEAD_SPACE))


def test_a_fresh_session_between_trials_keeps_mixed_precision():
    from kerastl.tune.tuner import fresh_session

    keras.config.set_dtype_policy("mixed_float16")
    try:
        fresh_session()
        assert keras.config.dtype_policy().name == "mixed_float16"
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.slow  # 20-36 s on 2 cores: the default suite stays under 10 minutes
def test_the_blocks_the_head_reads_are_a_searchable_setting(tmp_path):
    config = base_config(tmp_path)
    space = {"features": ["last", "all", "1,2"]}
    tune = TuneConfig(max_trials=3, tuner="random", project_dir=str(tmp_path / "project"), space=space)
    result = run_search(config, tune)
    assert sorted(row["values"]["features"] for row in result.trials) == ["1,2", "all", "last"]
    assert len(list((tmp_path / "cache").iterdir())) == 6  # train and validation features of each reading
    exported = RunConfig.from_json(tmp_path / "export" / "config.json")
    assert exported.model.features == result.trials[0]["values"]["features"]
    reloaded = load_model(tmp_path / "export")
    assert reloaded.feature_blocks == {"last": [3], "all": [1, 2, 3], "1,2": [1, 2]}[exported.model.features]
