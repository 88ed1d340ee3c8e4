"""Label tables (CSV files, DataFrames) and a user's own tf.data datasets as sources: the same
classes, labels and splits as a class folder or arrays, one-line errors, and training,
evaluating and searching on them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from helpers import COLOURS, SMALL, folder_rows, frozen_random, write_class_folder, write_csv
from PIL import Image

from kerastl.cli.main import main
from kerastl.config import DataConfig, RunConfig, TrainConfig
from kerastl.data.checks import check_table
from kerastl.data.images import from_arrays, from_folder
from kerastl.data.sources import from_csv, from_dataframe, from_dataset
from kerastl.errors import KerastlError
from kerastl.models.export import read_labels
from kerastl.runs.scoring import evaluate_data, evaluate_folder

NAMES = ["red", "blue", "green"]  # not sorted: the order given is the order kept


def contents(split) -> list[tuple[str, int]]:
    """A split's (image digest, label) pairs, sorted: what it holds, whatever its order."""
    images, labels = split.arrays()
    return sorted((hashlib.sha256(image.tobytes()).hexdigest(), int(label)) for image, label in zip(images, labels))


def grey_rows(folder, count=12) -> list[tuple[str, str]]:
    """`count` one-value PNGs (image i is all 10 * i + 5), two classes: a split's images name its rows."""
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((10, 12, 3), 10 * i + 5, np.uint8)).save(folder / f"{i}.png")
    return [(f"{folder.name}/{i}.png", "ab"[i % 2]) for i in range(count)]


def row_numbers(split) -> list[int]:
    images, _ = split.arrays()
    return sorted(int(image[0, 0, 0]) // 10 for image in images)


def test_a_csv_of_a_class_folder_gives_the_folders_classes_and_labels(image_folder, tmp_path):
    csv = write_csv(tmp_path / "labels.csv", folder_rows(image_folder, tmp_path))  # paths relative to its folder
    folder = from_folder(image_folder, 16, validation_split=0.0)
    table = from_csv(csv, 16, validation_split=0.0)
    assert table.class_names == folder.class_names == ["blue", "green", "red"]
    assert contents(table.train) == contents(folder.train) and table.train.count == 24
    held = from_csv(csv, 16, validation_split=0.25)  # no split column: the fractions cut each class
    assert held.validation.class_counts(3).tolist() == [2, 2, 2] and held.train.class_counts(3).tolist() == [6, 6, 6]


def test_a_csv_named_without_a_folder_reads_from_the_current_one(image_folder, tmp_path, monkeypatch):
    write_csv(tmp_path / "labels.csv", folder_rows(image_folder, tmp_path))
    monkeypatch.chdir(tmp_path)
    assert from_csv("labels.csv", 16, validation_split=0.0).train.count == 24  # "." beside absolute image paths


def test_a_split_column_puts_each_row_in_the_split_it_names(tmp_path):
    rows = grey_rows(tmp_path / "greys")
    splits = ["train"] * 6 + ["val", "Validation", "validation", "validation", "test", " TEST "]
    csv = write_csv(tmp_path / "t.csv", [(*row, split) for row, split in zip(rows, splits)], ("file", "class", "split"))
    data = from_csv(csv, 8)
    assert data.class_names == ["a", "b"]
    assert row_numbers(data.train) == [0, 1, 2, 3, 4, 5]
    assert row_numbers(data.validation) == [6, 7, 8, 9] and row_numbers(data.test) == [10, 11]
    assert data.origins["validation"] == f"the rows of {csv} whose split is validation"
    marked = [(*row, "test" if i >= 10 else "train") for i, row in enumerate(rows)]
    no_validation = write_csv(tmp_path / "u.csv", marked, ("image", "label", "split"))
    cut = from_csv(no_validation, 8, validation_split=0.2)  # a split it names no rows for is cut by its fraction
    assert row_numbers(cut.test) == [10, 11] and cut.validation.count == 2 and cut.train.count == 8


def test_a_dataframe_reads_its_paths_relative_to_root(image_folder, tmp_path):
    rows = folder_rows(image_folder, image_folder)  # relative to the folder itself
    frame = pd.DataFrame({"Filename": [r[0] for r in rows], "Label": [r[1] for r in rows]})
    data = from_dataframe(frame, 16, root=image_folder, validation_split=0.0)
    assert data.class_names == ["blue", "green", "red"]
    assert contents(data.train) == contents(from_folder(image_folder, 16, validation_split=0.0).train)
    ordered = from_dataframe(frame, 16, root=image_folder, class_names=["red", "green", "blue"], validation_split=0.0)
    assert ordered.class_names == ["red", "green", "blue"]
    images, labels = ordered.train.arrays()
    assert np.array_equal(images.mean(axis=(1, 2)).argmax(axis=1), labels)  # red images are labelled 0, and so on


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_tables_are_one_line_errors_naming_the_row(tmp_path):
    rows = grey_rows(tmp_path / "greys")
    good = [(*row, "train") for row in rows]
    with pytest.raises(KerastlError) as error:
        from_csv(write_csv(tmp_path / "m.csv", good[:3] + [("greys/gone.png", "a", "train")] + good[3:] +
                           [("greys/also_gone.png", "b", "train")], ("path", "label", "split")), 8)
    assert "greys/gone.png in row 5 of" in one_line(error) and "2 of its 14 files are missing" in one_line(error)
    with pytest.raises(KerastlError) as error:
        from_csv(write_csv(tmp_path / "u.csv", rows), 8, class_names=["a", "c"])
    assert one_line(error).startswith("unknown label 'b' in row 3 of") and one_line(error).endswith("known: a, c")
    with pytest.raises(KerastlError) as error:
        from_csv(write_csv(tmp_path / "c.csv", rows, ("picture", "label")), 8)
    assert "no column named path, filename, file or image; its columns: picture, label" in one_line(error)
    with pytest.raises(KerastlError) as error:
        from_csv(write_csv(tmp_path / "s.csv", good[:4] + [(*rows[4], "holdout")], ("path", "label", "split")), 8)
    assert "split 'holdout' in row 6 of" in one_line(error)
    with pytest.raises(KerastlError) as error:
        from_dataframe(pd.DataFrame({"path": [r[0] for r in rows]}, index=range(100, 112)).assign(
            label=["a"] * 11 + [None]), 8, root=tmp_path)
    assert one_line(error) == "row 111 of the DataFrame has no label"


def test_check_table_reports_the_files_a_run_would_skip(tmp_path):
    rows = grey_rows(tmp_path / "greys", 6)
    (tmp_path / "greys" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)  # damaged
    report = check_table(write_csv(tmp_path / "t.csv", rows))
    assert report.counts == [3, 2] and [f.name for f in report.skipped] == ["greys/5.png"] and report.exit_code == 1
    data = from_csv(tmp_path / "t.csv", 8, validation_split=0.0)  # the run skips it with a warning
    assert data.skipped == 1 and data.train.count == 5
    with pytest.raises(KerastlError, match="cannot be used as images: greys/5.png"):
        from_csv(tmp_path / "t.csv", 8, strict=True)


def test_train_reads_a_csv_file_and_records_its_splits(trained_run, tmp_path, fails_cleanly):
    export, csv = trained_run.export, trained_run.csv  # its validation rows named in the table's split column
    assert read_labels(export) == ["blue", "green", "red"]
    described = json.loads((export / "data.json").read_text())
    assert {split: sum(counts) for split, counts in described["counts"].items()} == {"train": 18, "validation": 6,
                                                                                     "test": 6}
    assert described["sources"]["validation"] == f"the rows of {csv} whose split is validation"
    fails_cleanly(["train", "--data", str(tmp_path / "nothing.csv"), *SMALL], "label table")
    fails_cleanly(["evaluate", "--model", str(export), "--data", str(tmp_path / "nothing.CSV")], "does not exist")
    # evaluating on the training table scores the run's own test rows
    assert main(["evaluate", "--model", str(export), "--data", csv, "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["count"] == 6
    # a table of test rows only, of one class, is images to evaluate on: all of them
    frame = pd.read_csv(csv)
    only_test = frame[frame["label"] == "red"].assign(split="test")
    only_test["path"] = [str(Path(csv).parent / path) for path in only_test["path"]]  # the table is elsewhere
    write_csv(tmp_path / "red-test.csv", only_test.values.tolist(), ("path", "label", "split"))
    assert main(["evaluate", "--model", str(export), "--data", str(tmp_path / "red-test.csv"), "--json",
                 str(tmp_path / "red.json")]) == 0
    assert json.loads((tmp_path / "red.json").read_text())["count"] == len(only_test) == 10


def test_evaluate_data_on_a_dataset_equals_evaluate_folder_on_its_files(trained_run, tmp_path):
    export, size = trained_run.export, trained_run.result.config.model.image_size
    folder = tmp_path / "other"
    write_class_folder(folder, per_class=4)  # PNG, JPEG, BMP, GIF: decoded here as the folder pipeline does
    images, labels = from_folder(folder, size, validation_split=0.0).train.arrays()
    by_folder, _ = evaluate_folder(export, str(folder))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
    by_data = evaluate_data(export, dataset, plots_dir=tmp_path / "plots")
    assert by_data.count == by_folder.count == 12
    assert by_data.accuracy == pytest.approx(by_folder.accuracy, abs=1e-9)
    assert np.array_equal(by_data.confusion_matrix, by_folder.confusion_matrix)
    assert by_data.loss == pytest.approx(by_folder.loss, rel=1e-5)
    assert (tmp_path / "plots" / "confusion.png").read_bytes().startswith(b"\x89PNG")


def coloured_arrays(per_class=8, size=20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    colours = np.array([COLOURS[name] for name in NAMES])
    y = np.repeat(np.arange(3), per_class)
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 12, (len(y), size, size, 3)), 0, 255).astype(np.uint8)
    return x, y


def test_a_dataset_batched_or_not_gives_the_images_and_labels_of_its_arrays(caplog):
    x, y = coloured_arrays()
    single = tf.data.Dataset.from_tensor_slices((x, y))
    one_hot = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), np.eye(3, dtype=np.float32)[y])).batch(5)
    expected = from_arrays(x, y, 16, NAMES, validation_split=0.25)
    with caplog.at_level(logging.INFO, logger="kerastl"):
        unbatched = from_dataset(single, NAMES, 16, validation_split=0.25)
    assert "gives single images: kerastl batches them" in caplog.text and "unbatches" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kerastl"):
        batched = from_dataset(single.batch(5), NAMES, 16, validation_split=0.25)
        from_one_hot = from_dataset(one_hot, NAMES, 16, validation_split=0.25)
    assert caplog.text.count("gives batches: kerastl unbatches them and batches by batch_size") == 2
    for data in (unbatched, batched, from_one_hot):
        assert data.class_names == NAMES
        assert data.train.count == 18 and data.validation.count == 6
        assert np.array_equal(data.train.labels, expected.train.labels)
        assert np.array_equal(data.train.arrays()[0], expected.train.arrays()[0])  # the same images, in order
        assert contents(data.validation) == contents(expected.validation)


def test_bad_datasets_are_one_line_errors():
    x, y = coloured_arrays(2)
    with pytest.raises(KerastlError) as error:
        from_dataset(tf.data.Dataset.from_tensor_slices((x, y)).repeat(), NAMES, 16)
    assert "infinite" in one_line(error)
    with pytest.raises(KerastlError) as error:
        from_dataset(tf.data.Dataset.from_tensor_slices((x, y + 1)), NAMES, 16)
    assert one_line(error).startswith("label 3 of image 4 of the dataset is not a class index")
    with pytest.raises(KerastlError) as error:
        from_dataset(tf.data.Dataset.from_tensor_slices(x), NAMES, 16)
    assert "(image, label) pairs" in one_line(error)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_run_training_and_run_search_take_a_dataset(tmp_path):
    from kerastl.runs.run import run_training
    from kerastl.tune.config import TuneConfig
    from kerastl.tune.search import run_search

    x, y = coloured_arrays(10, 16)
    data = from_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), NAMES, 16, validation_split=0.3)
    config = RunConfig(DataConfig(augment="none", batch_size=8),
                       frozen_random(),
                       TrainConfig(epochs=2, min_steps=0, fine_tune_epochs=0, validation="holdout",
                                   cache_dir=str(tmp_path / "cache")), export_dir=str(tmp_path / "run"))
    result = run_training(config, data, save="weights", verbose=0)
    assert result.class_names == NAMES and read_labels(tmp_path / "run") == NAMES
    config.export_dir = str(tmp_path / "best")
    search = run_search(config, TuneConfig(max_trials=2, project_dir=str(tmp_path / "project"),
                                           space={"dropout": [0.0, 0.3]}), data=data)
    assert [row["status"] for row in search.trials] == ["COMPLETED"] * 2
    assert read_labels(search.export_dir) == NAMES
