"""What a run leaves for people to look at: evaluation, plots, report, model card, TensorBoard logs,
the `evaluate` and `report` commands, config files, and the search's trial lines and HParams."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers import SMALL, frozen_random
from sklearn.metrics import accuracy_score, confusion_matrix

from kerastl.cli.main import main
from kerastl.config import DataConfig, RunConfig, read_config_file
from kerastl.runs.checks import resolve_run_config

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("curves.png", "confusion.png", "reliability.png", "class_counts.png", "wrong.png")


def event_tags(folder) -> set[str]:
    """The scalar tags of the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])
    return tags


def test_a_run_folder_holds_its_evaluation_plots_report_card_and_tensorboard_logs(trained_run):
    export = trained_run.export
    evaluation = json.loads((export / "evaluation.json").read_text())
    metrics = json.loads((export / "metrics.json").read_text())
    assert evaluation["split"] == "test"  # the held-out test split, when there is one
    assert evaluation["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert evaluation["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert sum(map(sum, evaluation["confusion_matrix"])) == evaluation["count"] == 6
    data = json.loads((export / "data.json").read_text())
    assert data["class_names"] == ["blue", "green", "red"]
    assert data["counts"] == {"train": [6, 6, 6], "validation": [2, 2, 2], "test": [2, 2, 2]}
    for name in PLOTS:
        assert (export / "plots" / name).read_bytes().startswith(PNG), name
    html = (export / "report.html").read_text()
    assert 'id="metrics"' in html and "data:image/png;base64," in html and "https://" not in html
    card = (export / "MODEL_CARD.md").read_text()
    assert "simple_cnn" in card and "test" in card.lower()
    for phase in ("phase1", "phase2"):  # the head, then fine-tuning
        assert {"epoch_loss", "epoch_accuracy"} <= event_tags(export / "logs" / phase), phase


def test_train_ends_with_a_summary_naming_the_files_written(tmp_path, image_folder, capsys):
    export = tmp_path / "out"
    assert main(["train", "--data", str(image_folder), "--export", str(export), *SMALL, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {export}" in out
    for name in ("saved_model.pb", "report.html", "MODEL_CARD.md", "logs", "config.json"):
        assert f"  {name}" in out, name
    assert f"tensorboard --logdir {export}" in out


def test_evaluate_reports_what_the_export_predicts(trained_run, tmp_path, capsys):
    trained_on, export = trained_run.images, trained_run.export
    images = tmp_path / "new"  # images the run did not read (copies, in another folder)
    shutil.copytree(trained_on, images)
    out_json, plots = tmp_path / "eval.json", tmp_path / "plots"
    assert main(["evaluate", "--model", str(export), "--data", str(images), "--json", str(out_json),
                 "--plots", str(plots), "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads(out_json.read_text())
    assert evaluation["count"] == 30 and evaluation["top_k"] == 2
    # the same numbers from the export's own predictions on every image of the folder
    from kerastl.models.export import load_export

    model = load_export(export)
    files = sorted(images.rglob("*.*"))
    truth = np.array([model.class_names.index(path.parent.name) for path in files])
    predicted = model.predict_files(files).argmax(axis=1)
    assert evaluation["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-9)
    assert np.array_equal(np.array(evaluation["confusion_matrix"]), confusion_matrix(truth, predicted,
                                                                                   labels=[0, 1, 2]))
    for name in ("blue", "green", "red", "accuracy"):
        assert name in printed
    for name in ("confusion.png", "reliability.png", "wrong.png"):
        assert (plots / name).read_bytes().startswith(PNG)


def test_evaluate_on_the_training_source_scores_only_the_runs_held_out_images(trained_run, tmp_path):
    source, export = trained_run.csv, trained_run.export  # its test split: cut from the table's training rows
    assert main(["evaluate", "--model", str(export), "--data", source, "--json", str(tmp_path / "e.json")]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["count"] == 6 and "held-out test split" in evaluation["split"]
    during_the_run = json.loads((export / "evaluation.json").read_text())  # the same images, scored by the run
    assert evaluation["confusion_matrix"] == during_the_run["confusion_matrix"]
    assert evaluation["loss"] == pytest.approx(during_the_run["loss"], rel=1e-4)


def test_evaluate_takes_a_subset_of_the_classes_and_refuses_unknown_ones(trained_run, tmp_path, capsys):
    images, export = trained_run.images, trained_run.export
    subset = tmp_path / "subset"
    shutil.copytree(images / "red", subset / "red")
    shutil.copytree(images / "blue", subset / "blue")
    assert main(["evaluate", "--model", str(export), "--data", str(subset), "--json", str(tmp_path / "e.json")]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["count"] == 20 and [row["class"] for row in evaluation["per_class"]] == ["blue", "red"]
    assert evaluation["class_names"] == ["blue", "green", "red"]  # labels keep the model's order
    one = tmp_path / "one"
    shutil.copytree(images / "green", one / "green")
    assert main(["evaluate", "--model", str(export), "--data", str(one), "--json", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["count"] == 10
    shutil.copytree(images / "red", subset / "purple")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(export), "--data", str(subset)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "purple" in err


def test_report_rebuilds_the_report_and_plots_of_a_run_folder(trained_run, tmp_path, capsys):
    export = trained_run.export
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    (copy / "report.html").unlink()
    (copy / "plots" / "confusion.png").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").is_file() and (copy / "plots" / "confusion.png").is_file()
    assert (copy / "plots" / "wrong.png").is_file()  # kept: it needs the images
    assert main(["report", str(tmp_path)]) == 2  # neither a run folder nor a search project


TOML = """
name = "flowers"

[data]
source = "digits"
augment = "none"
batch_size = 16

[model]
backbone = "simple_cnn"
weights = "none"
image_size = 16

[train]
epochs = 3
learning_rate = 0.003
unfreeze_blocks = 1

[tune]
max_trials = 4
objective = "val_loss"
"""


JSON_TWIN = {"name": "flowers", "data": {"source": "digits", "augment": "none", "batch_size": 16},
             "model": {"backbone": "simple_cnn", "weights": None, "image_size": 16},
             "train": {"epochs": 3, "learning_rate": 0.003, "unfreeze_blocks": 1},
             "tune": {"max_trials": 4, "objective": "val_loss"}}


def test_a_toml_config_resolves_to_the_same_config_as_its_json_twin(tmp_path):
    toml, twin = tmp_path / "run.toml", tmp_path / "run.json"
    toml.write_text(TOML)
    twin.write_text(json.dumps(JSON_TWIN))  # written by hand: the same settings, with JSON's null
    from_toml = RunConfig.from_file(toml)
    assert from_toml.model.weights is None  # "none": TOML has no null
    assert resolve_run_config(RunConfig.from_file(twin)) == resolve_run_config(from_toml)
    assert resolve_run_config(from_toml).train.learning_rate == 0.003
    assert read_config_file(toml)["tune"] == {"max_trials": 4, "objective": "val_loss"}


@pytest.mark.parametrize("text, message", [("[data\nsource=", "not valid TOML"), ("[data]\nsorce = 'x'", "sorce")])
def test_a_bad_toml_config_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_search_reports_each_trial_and_writes_hparams_and_a_project_report(tmp_path, capsys):
    project = tmp_path / "project"
    config = tmp_path / "search.toml"
    config.write_text(TOML.replace("max_trials = 4", "max_trials = 2").replace('objective = "val_loss"', "")
                      .replace('weights = "none"', 'weights = "none"\nfrom_scratch = false')  # head-only trials
                      + f'project_dir = "{project}"\nspace = {{ dropout = [0.0, 0.3] }}\n')
    code = main(["tune", "--config", str(config), "--export", str(tmp_path / "best"), "--fine-tune-epochs", "0",
                 "--features", "last", "--min-steps", "0", "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert code == 0
    out, err = capsys.readouterr()
    assert re.search(r"^trial 1/2, val_accuracy 0\.\d{4}, best so far 0\.\d{4}$", err, flags=re.M), err
    assert re.search(r"^trial 2/2, ", err, flags=re.M)
    assert "report.html" in out and out.splitlines()[0].split()[:3] == ["trial", "status", "val_accuracy"]
    html = (project / "report.html").read_text()
    assert html.count("<tr") >= 3  # a header and a row per trial
    for trial_dir in project.glob("trial_*"):
        assert "_hparams_/session_start_info" in event_tags(trial_dir / "logs")
    assert (tmp_path / "best" / "evaluation.json").is_file()


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_cross_validated_run_logs_its_curves_for_tensorboard(tmp_path, image_folder):
    from kerastl.config import DataConfig, TrainConfig
    from kerastl.runs.run import run_training

    config = RunConfig(DataConfig(str(image_folder), augment="none", batch_size=8),
                       frozen_random(),
                       TrainConfig(epochs=2, min_steps=0, fine_tune_epochs=1, fine_tune_min_steps=0,
                                   cache_dir=str(tmp_path / "cache")), export_dir=str(tmp_path / "cv"))
    result = run_training(config, verbose=0)
    assert "cv_accuracy" in result.metrics  # 8 images per class: cross-validated
    assert {"epoch_loss", "epoch_accuracy"} <= event_tags(tmp_path / "cv" / "logs" / "phase1")
    assert not (tmp_path / "cv" / "evaluation.json").exists()  # no held-out images to evaluate
    assert "none were held out" in (tmp_path / "cv" / "MODEL_CARD.md").read_text()


def test_data_json_names_in_memory_sources_and_the_folds_used():
    from kerastl.data.images import from_arrays
    from kerastl.runs.scoring import describe_data

    x, y = np.zeros((20, 8, 8, 3), np.uint8), np.repeat([0, 1], 10)
    data = from_arrays(x, y, 8, ["a", "b"], validation_split=0.2, test=(x[:4], np.array([0, 1, 0, 1])))
    sources = describe_data(data, DataConfig(), "holdout")["sources"]
    assert sources == {"train": "in-memory images (the Python API)",
                       "validation": "0.2 of each class of the in-memory data, held out",
                       "test": "test images of the in-memory data"}
    described = describe_data(data, DataConfig(), "cv", folds=3)
    assert described["sources"]["validation"] == "3-fold cross-validation on the training images"
    assert described["counts"]["test"] == [2, 2] and described["skipped_files"] == 0
    unfolded = describe_data(data, DataConfig(), "cv", folds=0)  # no cached features: nothing to fold
    assert unfolded["sources"]["validation"] == "none: every labelled image trains, with no validation estimate"


def test_the_report_gives_each_phase_as_the_run_planned_it(tmp_path):
    from kerastl.reports.facts import RunFiles, phases

    config = RunConfig().to_dict()  # patience 5, learning rate 0.001, fine-tuning at 0.1 of it
    config["plan"] = {"validation_mode": "holdout", "folds": 0, "phases": [
        {"name": "head", "epochs": 100, "patience": 50, "learning_rate": 0.001, "schedule": "constant",
         "steps_per_epoch": 3},
        {"name": "fine_tune", "epochs": 10, "patience": 5, "learning_rate": 2e-05, "schedule": "cosine"}]}
    history = {"phase1": {"loss": [1.0] * 4, "val_loss": [1.0] * 4},
               "phase2": {"loss": [1.0] * 3, "val_loss": [1.0] * 3}}
    facts = dict(phases(RunFiles(tmp_path, config, {"val_accuracy": 0.5}, history=history)))
    assert facts["phase 1"].endswith("4 epochs, learning rate 0.001")
    assert facts["phase 2"].endswith("3 epochs, learning rate 2e-05")  # the plan's, not 0.001 x 0.1
    assert facts["validation"] == ("holdout: early stopping on the validation split's loss (patience 50; the step "
                                   "floor of 300 optimizer steps (3 per epoch) raised phase 1 from 10 to 100 epochs, "
                                   "and the patience with them from 5)")  # why a 10-epoch run ran 100
    config["plan"].update(validation_mode="cv", folds=0)  # cross-validation without cached features: no folds
    config["plan"]["phases"][0].update(name="scratch", learning_rate=0.005)  # phase 1 from scratch: its own name
    facts = dict(phases(RunFiles(tmp_path, config, {"val_accuracy": 0.5}, history=history)))
    assert facts["validation"] == "none: every labelled image trained, with no validation estimate"
    assert facts["phase 1"].endswith("4 epochs, learning rate 0.005")


def test_a_model_no_better_than_a_trivial_one_is_named():
    from kerastl.reports.baselines import trivial_model_warning

    names = ["cat", "dog", "fox"]
    balanced = {"train": [8, 8, 8], "validation": [2, 2, 2]}
    assert "no better than chance (0.333 on 3 balanced classes)" in trivial_model_warning(
        {"val_accuracy": 1 / 3}, balanced, names)
    assert trivial_model_warning({"val_accuracy": 0.5}, balanced, names) is None
    skewed = {"train": [30, 5, 5], "test": [6, 1, 1]}
    message = trivial_model_warning({"val_accuracy": 0.9, "test_accuracy": 0.75}, skewed, names)
    assert "always answering 'cat' (0.750)" in message and "test accuracy is 0.750 on 8 images" in message
    assert "cross-validated" in trivial_model_warning({"cv_accuracy": 0.7}, {"train": [30, 5, 5]}, names)
    assert trivial_model_warning({"cv_accuracy": 0.7}, {}, names) is None  # nothing to compare with


def test_each_metric_appears_once_and_epochs_are_whole_numbers(tmp_path, monkeypatch):
    from kerastl.reports import plots
    from kerastl.reports.facts import RunFiles, metric_rows

    evaluation = {"split": "validation", "count": 6, "accuracy": 0.5, "top_k": 3, "top_k_accuracy": 1.0, "ece": 0.1}
    run = RunFiles(tmp_path, RunConfig().to_dict(), {"val_accuracy": 0.5, "val_loss": 0.9}, evaluation=evaluation)
    labels = [label for label, _, _ in metric_rows(run)]
    assert labels.count("accuracy") == 1 and "top-3 accuracy" in labels and "expected calibration error" in labels

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path, **kwargs: drawn.append(figure) or path)
    plots.plot_curves({"phase1": {"loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.8]},
                       "phase2": {"loss": [0.6, 0.5], "val_loss": [0.7, 0.7]}}, tmp_path / "curves.png")
    ticks = [tick for axes in drawn[0].axes for tick in axes.get_xticks()]
    assert ticks and all(float(tick).is_integer() for tick in ticks)  # no epoch 1.5
