"""Scoring: a model's class probabilities -> the scores kerastl reports and searches on, and the
full evaluation (`kerastl.reports.evaluation`) of a held-out split, of any data source
(`evaluate_folder`) or of data in memory (`evaluate_data`).

One vocabulary everywhere: Keras's `val_` names for the validation split
(`val_loss`, `val_accuracy`, `val_macro_f1`, `val_auc`), `test_` for the test split
and `cv_` for a cross-validated estimate (see `kerastl.training.crossval`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import f1_score, roc_auc_score

from kerastl.config import DataConfig, RunConfig
from kerastl.data.images import ImageData, Split, load_data, merge_splits
from kerastl.data.sources import from_dataset
from kerastl.data.tables import BUILT_IN_SOURCES
from kerastl.errors import KerastlError
from kerastl.models.export import CONFIG_FILE, read_labels
from kerastl.models.litert import load_exported, read_stamp
from kerastl.reports.evaluation import Evaluation, as_probabilities, cross_entropy, data_warnings, evaluate_predictions
from kerastl.reports.facts import read_optional_json
from kerastl.reports.plots import PLOT_FILES, plot_confusion, plot_reliability, plot_wrong
from kerastl.runs.folder import DATA_FILE, load_model, read_config

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224  # a bare export (no config.json) resizes whatever it is given: any size works

METRICS = ("loss", "accuracy", "macro_f1", "auc")


def score(probabilities: np.ndarray, labels: np.ndarray, prefix: str = "val_") -> dict[str, float]:
    """The metrics of predicted probabilities: every objective kerastl offers, named `prefix` + metric.

    The loss is plain cross-entropy (no label smoothing), so runs with different
    smoothing compare fairly. The AUC is the mean one-vs-rest ROC AUC over the
    classes present; macro F1 the unweighted mean F1 over the classes present, as
    `kerastl.reports.evaluation` reports it.
    """
    p = as_probabilities(probabilities)
    labels = np.asarray(labels).astype(int)
    predicted = p.argmax(axis=1)
    present = np.unique(labels)
    aucs = [roc_auc_score(labels == c, p[:, c]) for c in present] if len(present) > 1 else [np.nan]
    values = (
        cross_entropy(p, labels),
        float(np.mean(predicted == labels)),
        float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        float(np.mean(aucs)),
    )
    return {prefix + name: value for name, value in zip(METRICS, values)}


def predict_split(model: keras.Model, batches: tf.data.Dataset,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of batched (images, labels), in order (`batches` must not shuffle).
    Pass the split's `labels` when they are known: the images are then read once, not twice."""
    probabilities = model.predict(batches.map(lambda images, *labels_and_weights: images), verbose=0)
    if labels is None:  # (images, labels) or (images, labels, sample weights) batches
        labels = np.concatenate([batch[1].numpy() for batch in batches])
    return probabilities, np.asarray(labels)


def evaluate_split(probabilities: np.ndarray, labels: np.ndarray, split: Split, class_names: list[str], name: str,
                   top_k: int = 3) -> tuple[Evaluation, np.ndarray]:
    """The evaluation of predictions on `split` (in its order), and the images of its most
    confidently wrong predictions (uint8, in `most_wrong` order)."""
    evaluation = evaluate_predictions(probabilities, labels, class_names, name, top_k=top_k, paths=split.paths)
    return evaluation, images_at(split, [row["index"] for row in evaluation.most_wrong])


def images_at(split: Split, indices: list[int]) -> np.ndarray:
    """The split's images at `indices` (uint8 [n, size, size, 3]), in that order; reads the split once."""
    wanted = {index: position for position, index in enumerate(indices)}
    found: list[np.ndarray | None] = [None] * len(indices)
    if wanted:
        for index, (image, _) in enumerate(split.dataset):
            if index in wanted:
                found[wanted[index]] = image.numpy()
            if index >= max(wanted):
                break
    size = split.image_size
    return np.stack(found) if indices else np.zeros((0, size, size, 3), np.uint8)


def split_counts(data: ImageData) -> dict[str, list[int]]:
    """Images per class of each split the data has, as `data.json` records them."""
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    return {name: split.class_counts(len(data.class_names)).tolist() for name, split in splits.items()
            if split is not None}


def describe_data(data: ImageData, dc: DataConfig, mode: str, folds: int = 0) -> dict:
    """What a run trained and was measured on (`dc`: its data settings), as `data.json` records it:
    sources, images per class per split, the validation mode (with the `folds` cross-validation
    used) and warnings about small or imbalanced classes. In "cv" mode the training split holds
    every labelled image."""
    names, counts = data.class_names, split_counts(data)
    source = dc.source or "the in-memory data"  # the Python API's arrays or ImageData
    held = {"validation": (dc.validation_dir, dc.validation_split), "test": (dc.test_dir, dc.test_split)}
    sources = {"train": data.origins.get("train") or dc.source or "in-memory images (the Python API)"}
    for name, (folder, fraction) in held.items():
        if name in counts:
            cut = f"{fraction:g} of each class of {source}, held out" if fraction else f"{name} images of {source}"
            sources[name] = data.origins.get(name) or folder or cut
    if mode == "cv":
        sources["validation"] = (f"{folds}-fold cross-validation on the training images" if folds else
                                 "none: every labelled image trains, with no validation estimate")
    return {"sources": sources, "class_names": list(names), "counts": counts, "validation_mode": mode,
            "warnings": data_warnings(counts, list(names)), "skipped_files": data.skipped}


def evaluate_folder(model_dir: str | Path, source: str, batch_size: int = 64, top_k: int = 3,
                    strict: bool = False) -> tuple[Evaluation, np.ndarray]:
    """Evaluates an export or run folder on labelled images; returns the evaluation and the
    images of its most confidently wrong predictions.

    `source` is a class folder (one class or more), a CSV label table (its test rows when its
    split column names some), "digits", or CIFAR-10 (its test set).
    Its classes must be some or all of the model's (`labels.txt`), matched by name. When it
    is the source the model was trained on, only the run's held-out images are scored:
    its test split, else its validation split, cut as the run cut them (never its
    training images; a cross-validated run has none held out, and then every image is
    scored with a warning, named so in the evaluation's `split`).

    Example:
    ```python
    evaluation, wrong = evaluate_folder("saved_models/flowers", "flowers_2026/")
    print(evaluation.format())
    ```
    """
    model, folder = _model_and_folder(model_dir)
    class_names = read_labels(folder)
    config, size = _config_and_size(model)
    if config is not None and _same_source(config.data.source, source):
        mode = (read_optional_json(folder / DATA_FILE) or {}).get("validation_mode", config.train.validation.mode)
        split, name = _held_out_of_run(folder, config.data, mode, source, size, strict)
        data_names = class_names
    else:
        data = load_data(DataConfig(source=source, validation_split=0.0, strict=strict), size, min_classes=1)
        split, data_names = _scored_split(data), data.class_names
        name = source + (" (its test set)" if data.test is not None else "")
    return _predict_and_evaluate(model, class_names, split, data_names, name, source, batch_size, top_k)


def evaluate_data(model_dir: str | Path, data: ImageData | Split | tf.data.Dataset, batch_size: int = 64,
                  top_k: int = 3, plots_dir: str | Path | None = None) -> Evaluation:
    """Evaluates an export or run folder on labelled images in memory, as `evaluate_folder` does a source.

    `data` is an `ImageData` (its test split if it has one, else all its images; its classes
    must be some or all of the model's, matched by name), a `Split` (labels in the model's
    class order) or a `tf.data.Dataset` of (image, label) pairs or batches of them, labels
    indexing the model's classes (`labels.txt`; read with `kerastl.data.sources.from_dataset`).
    With `plots_dir`, the confusion matrix, reliability diagram and most confidently
    wrong images are drawn there.

    Example:
    ```python
    evaluation = evaluate_data("saved_models/flowers", test_ds, plots_dir="eval_plots")
    print(evaluation.format())
    ```
    """
    model, folder = _model_and_folder(model_dir)
    class_names = read_labels(folder)
    if isinstance(data, tf.data.Dataset):
        data = from_dataset(data, class_names, _config_and_size(model)[1], validation_split=0.0)
    if isinstance(data, Split):
        split, data_names, name = data, class_names, "the given split"
    else:
        split, data_names = _scored_split(data), data.class_names
        name = "the given data" + (" (its test split)" if data.test is not None else "")
    evaluation, wrong = _predict_and_evaluate(model, class_names, split, data_names, name, "the given data",
                                              batch_size, top_k)
    if plots_dir is not None:
        draw_evaluation(evaluation, wrong, plots_dir)
    return evaluation


def draw_evaluation(evaluation: Evaluation, wrong: np.ndarray, plots_dir: str | Path) -> list[Path]:
    """The evaluation's confusion matrix, reliability diagram and most confidently wrong images (PNG
    files named as in a run folder's plots), drawn in `plots_dir`."""
    os.makedirs(plots_dir, exist_ok=True)
    drawings = {"confusion": lambda p: plot_confusion(evaluation.confusion_matrix, evaluation.class_names, p),
                "reliability": lambda p: plot_reliability(evaluation.reliability, evaluation.ece, p),
                "wrong": lambda p: plot_wrong(wrong, evaluation.most_wrong, p)}
    return [Path(draw(Path(plots_dir) / Path(PLOT_FILES[name]).name)) for name, draw in drawings.items()]


def _model_and_folder(model: str | Path) -> tuple[Path, Path]:
    """The model's path and the folder of its labels and config: a `.tflite` file's is the one it is in."""
    model = Path(model)
    return model, model.parent if model.suffix == ".tflite" else model


def _config_and_size(model: Path) -> tuple[RunConfig | None, int]:
    """The run config of an export or run folder, or of the folder a `.tflite` file is in (None for a
    bare export), and the image size the model reads."""
    folder = _model_and_folder(model)[1]
    config = read_config(folder) if (folder / CONFIG_FILE).is_file() else None
    if model.suffix == ".tflite":  # the file says its own size, wherever it was written
        return config, int(read_stamp(model)["image_size"])
    return config, config.model.image_size if config is not None and config.model.image_size else DEFAULT_SIZE


def _scored_split(data: ImageData) -> Split:
    """What evaluating a source scores: its test split, else every image it has."""
    if data.test is not None:
        return data.test
    return data.train if data.validation is None else merge_splits(data.train, data.validation)


def _predict_and_evaluate(folder: Path, class_names: list[str], split: Split, data_names: list[str], name: str,
                          source: str, batch_size: int, top_k: int) -> tuple[Evaluation, np.ndarray]:
    """Scores the model in `folder` (or the `.tflite` file it names) on `split`, whose labels index
    `data_names` (some or all of the model's `class_names`); returns the evaluation and the most
    confidently wrong images."""
    unknown = [c for c in data_names if c not in class_names]
    if unknown:
        raise KerastlError(f"{source} has classes {unknown} that the model at {folder} does not know; its classes "
                           f"(labels.txt) are {class_names}")
    to_model = np.array([class_names.index(c) for c in data_names])
    if folder.suffix == ".tflite" or (folder / "saved_model.pb").is_file():
        predict = load_exported(folder).predict
    else:  # a weights-only run folder (a search trial's)
        model = load_model(folder)
        predict = lambda images: keras.ops.convert_to_numpy(model(images, training=False))  # noqa: E731
    probabilities, labels = [], []
    for images, batch_labels in split.batches(batch_size, cache_limit_mb=0):
        probabilities.append(predict(images.numpy()))
        labels.append(to_model[batch_labels.numpy()])
    log.info("evaluated %s on %d images of %s", folder, split.count, name)
    return evaluate_split(np.concatenate(probabilities), np.concatenate(labels), split, class_names, name, top_k)


def _same_source(trained: str, source: str) -> bool:
    """Whether two data sources are the same: the same name, or the same folder."""
    if trained in BUILT_IN_SOURCES or source in BUILT_IN_SOURCES:
        return trained == source
    return bool(trained) and os.path.realpath(trained) == os.path.realpath(source)


def _held_out_of_run(folder: Path, dc: DataConfig, mode: str, source: str, size: int,
                     strict: bool) -> tuple[Split, str]:
    """The run's own held-out split of its training source (cut with its seed and fractions, `dc`;
    `mode`: the run's validation mode)."""
    data = load_data(dataclasses.replace(dc, strict=strict), size)
    if data.test is not None:
        return data.test, f"{source} (the run's held-out test split)"
    if mode != "cv" and data.validation is not None:
        return data.validation, f"{source} (the run's validation split)"
    log.warning("%s trained on every image of %s (cross-validated, no test split): scoring them all, so these "
                "numbers are not held out", folder, source)
    merged = data.train if data.validation is None else merge_splits(data.train, data.validation)
    return merged, f"{source} (every image, the training images included: not held out)"
