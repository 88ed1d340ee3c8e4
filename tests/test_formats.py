"""Files written by kerastl 0.2 (checked in under tests/fixtures/v0_2, written by the 0.2 code) still load
and resume; the config's new layout round-trips; the machine's settings stay out of the experiment."""

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np

from kerastl.config import SETTINGS, DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from kerastl.models.classifier import TransferClassifier
from kerastl.reports.html import write_run_report
from kerastl.runs.folder import load_model, read_config
from kerastl.runs.run import run_training
from kerastl.tune.config import TuneConfig
from kerastl.tune.search import claim_project, prepare, read_search

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
V0_1 = Path(__file__).parent / "fixtures" / "v0_1"  # a 0.1 search export's config.json, its keys as 0.1 wrote them


def test_a_0_2_config_json_loads_into_the_phase_and_validation_groups():
    config = read_config(FIXTURES / "run")
    train = config.train
    phases = (train.head.epochs, train.head.min_steps, train.fine_tune.epochs, train.fine_tune.min_steps)
    assert phases == (1, 0, 0, 100)
    assert train.fine_tune.lr_ratio == 0.1 and train.validation.mode == "holdout" and train.validation.cv_folds == 5
    assert (train.epochs, train.fine_tune_epochs, train.cv_folds) == (1, 0, 5)  # the 0.2 names still read
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and "head" in config.to_dict()["train"] and "epochs" not in config.to_dict()["train"]


def test_a_0_1_config_json_loads_with_its_search_keys_left_out():
    config = RunConfig.from_file(V0_1 / "config.json")
    assert config.train.head.epochs == 2 and config.train.fine_tune.epochs == 0 and config.model.hidden_units == 8
    assert config.train.validation.mode == "auto" and "tune" not in config.to_dict()


def test_the_0_2_names_still_set_the_phases():
    train = TrainConfig(epochs=3, fine_tune_epochs=0, fine_tune_lr_ratio=0.5, validation="cv", cv_folds=3)
    assert train.head.epochs == 3 and train.fine_tune.epochs == 0 and train.fine_tune.lr_ratio == 0.5
    assert train.validation.mode == "cv" and train.validation.cv_folds == 3
    train.fine_tune_epochs, train.validation = 4, "holdout"
    assert train.fine_tune.epochs == 4 and train.validation.mode == "holdout" and train.validation.cv_folds == 3


def test_a_phase_table_that_sets_one_key_keeps_that_phases_own_defaults():
    config = RunConfig.from_dict({"train": {"fine_tune": {"epochs": 20}, "validation": {"cv_folds": 3}}})
    assert config.train.fine_tune == PhaseConfig(epochs=20, min_steps=100, lr_ratio=0.1)  # not the head's 300, 1.0
    assert config.train.head == TrainConfig().head and config.train.validation.cv_below == 30


def test_a_0_2_run_folder_loads_and_its_report_is_rebuilt_without_touching_global_random_state(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", folder)
    np.random.seed(7)
    random.seed(7)
    expected = np.random.random(3), random.random()
    np.random.seed(7)
    random.seed(7)
    model = load_model(folder)
    after = np.random.random(3), random.random()
    assert np.array_equal(after[0], expected[0]) and after[1] == expected[1]  # NumPy's and Python's generators
    assert isinstance(model, TransferClassifier) and model.backbone_name == "simple_cnn"
    probabilities = model.predict(np.full((2, 16, 16, 3), 128, np.float32), verbose=0)
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    page = write_run_report(folder).read_text()
    assert "holdout" in page and "learning rate 0.001" in page  # the training facts, read from the 0.2 layout


def test_a_0_2_search_project_is_the_same_search_to_0_3(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "search", tmp_path / "fixtures" / "v0_2" / "search")
    monkeypatch.chdir(tmp_path)  # search.json names its project folder relative to where 0.2 ran
    run, tune = read_search(Path("fixtures/v0_2/search"))
    assert run.train.head.epochs == 2 and run.train.fine_tune.epochs == 1 and run.train.validation.cv_folds == 3
    config = RunConfig(DataConfig("imgs", augment="none", batch_size=8), ModelConfig("simple_cnn", weights=None,
                                                                                     image_size=16),
                       TrainConfig(epochs=2, min_steps=0, fine_tune_epochs=1, validation="holdout", cv_folds=3),
                       name="search-0.2")
    base, tune = prepare(config, TuneConfig(max_trials=2, project_dir="fixtures/v0_2/search",
                                            space={"dropout": [0.0, 0.3], "fine_tune_epochs": [0, 1]}))
    claim_project(Path("fixtures/v0_2/search"), base.to_dict(), tune, restart=False)  # another search would be refused


def test_a_run_left_unfinished_by_0_2_resumes(tmp_path, caplog):
    shutil.copytree(FIXTURES / "unfinished.partial", tmp_path / "run.partial")
    config = RunConfig(DataConfig("digits", augment="none", batch_size=64),
                       ModelConfig("simple_cnn", weights=None, image_size=16, from_scratch=False, features="last"),
                       TrainConfig(epochs=4, min_steps=0, fine_tune_epochs=0, validation="holdout", patience=10),
                       export_dir=str(tmp_path / "run"))
    stored = json.loads((tmp_path / "run.partial" / "run.json").read_text())
    assert config.digest() == stored["digest"]  # another --cache-dir than 0.2's: the same experiment
    with caplog.at_level(logging.INFO, logger="kerastl"):
        result = run_training(config, verbose=0)
    assert "resuming the unfinished run" in caplog.text
    assert result.history.phase1.epoch == [0, 1, 2, 3]  # two epochs kept from 0.2, two trained now
    assert not (tmp_path / "run.partial").exists() and (tmp_path / "run" / "config.json").is_file()


def test_the_machines_settings_stay_out_of_the_digest_and_config_json(tmp_path):
    here = RunConfig(DataConfig("digits"), train=TrainConfig())
    there = RunConfig(DataConfig("digits", cache_limit_mb=64), train=TrainConfig(cache_dir=str(tmp_path)))
    assert here.digest() == there.digest()
    machine = {item.path[-1] for item in SETTINGS.values() if item.machine}
    assert machine == {"cache_dir", "cache_limit_mb"}
    there.to_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert "cache_dir" not in written["train"] and "cache_limit_mb" not in written["data"]
    assert RunConfig.from_json(tmp_path / "config.json") == here


def test_every_setting_has_help_and_the_search_space_is_declared_in_the_dataclasses():
    from kerastl.tune.config import SPACE_FIELDS

    assert all(item.help for item in SETTINGS.values())
    assert list(SPACE_FIELDS)[:3] == ["backbone", "image_size", "features"]
    assert SPACE_FIELDS["fine_tune_epochs"].path == ("train", "fine_tune", "epochs")
    assert {item.search for item in SPACE_FIELDS.values()} == set(range(1, len(SPACE_FIELDS) + 1))
