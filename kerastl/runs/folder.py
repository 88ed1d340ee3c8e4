"""Run folders: the one writer and the readers of what a run leaves behind.

An exported run folder (`kerastl train`, a search's best model) holds:

- the SavedModel and `labels.txt` (see `kerastl.models.export`);
- `model.keras`, the `TransferClassifier` (loads with `safe_mode=True`);
- `backbone.weights.h5`, a pretrained start for a later run (`--weights FILE`);
- `config.json` (the resolved `RunConfig`), `history.json`, `metrics.json`;
- `metadata.json`: the kerastl version and folder format that wrote it;
- `logs/`: TensorBoard logs of both phases (`tensorboard --logdir FOLDER`);
- `data.json` (sources, images per class per split, warnings) and `evaluation.json`
  (`kerastl.reports.evaluation`: the held-out test split's, else the validation split's; none
  when the run cross-validated);
- `plots/` (curves, confusion matrix, reliability diagram, class counts, the most
  confidently wrong images), `report.html` and `MODEL_CARD.md`, drawn from those files
  (`kerastl report FOLDER` redraws them).

A weights-only run folder (each search trial) holds the same files but, instead
of the SavedModel, `model.keras` and `backbone.weights.h5`, only the weights: the
head's alone (`head.weights.h5`) when the backbone never trained, so that a trial
on a frozen ResNet costs kilobytes, not a copy of ResNet. It has no evaluation,
plots, report or model card; its TensorBoard logs are written in place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from kerastl.config import DataConfig, RunConfig
from kerastl.data.images import load_data
from kerastl.errors import KerastlError
from kerastl.features.cache import weights_digest
from kerastl.features.blocks import BlockCurve
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.models.export import CONFIG_FILE, export_saved_model, read_labels, write_labels
from kerastl.models.litert import LITE_FILE, REPRESENTATIVE_IMAGES, LiteExport, check_quantize, export_litert
from kerastl.reports.evaluation import Evaluation
from kerastl.reports.card import write_model_card
from kerastl.reports.html import write_run_files, write_run_report
from kerastl.reports.plots import plot_path, plot_wrong
from kerastl.storage import HEAD_WEIGHTS, disk_full_error, staged_folder
from kerastl.training.phases import TrainResult
from kerastl.version import FOLDER_FORMAT, __version__

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
METADATA_FILE = "metadata.json"
MODEL_FILE = "model.keras"
BACKBONE_WEIGHTS = "backbone.weights.h5"
MODEL_WEIGHTS = "model.weights.h5"
PROBE_FILE = "probe.json"  # the probe curve that features="auto" chose from
EVALUATION_FILE = "evaluation.json"
DATA_FILE = "data.json"
LOGS = "logs"


def write_json(path: Path, value: Any) -> None:
    """One JSON file, indented, ending in a newline."""
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_run_folder(
    folder: str | os.PathLike,
    model: TransferClassifier,
    class_names: Sequence[str],
    config: RunConfig,
    history: TrainResult,
    metrics: dict[str, float],
    export: bool = True,
    extra: dict[str, Any] | None = None,
    backbone_digest: str | None = None,
    curve: BlockCurve | None = None,
    logs: str | os.PathLike | None = None,
    evaluation: Evaluation | None = None,
    wrong_images: np.ndarray | None = None,
    data: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> Path:
    """Writes a run folder (see the module docstring); the only writer of one.

    Everything is written into a temporary folder beside `folder`, then an export is
    swapped in whole (`kerastl.storage.publish_folder`): a kill or a full disk while
    writing leaves the previous folder as it was and nothing half-written. A
    weights-only folder (a search trial's, which holds KerasTuner's files too) takes
    each finished file by an atomic rename instead.

    Args:
        folder: created if missing.
        model: the trained classifier.
        class_names: names in output order.
        config: the resolved run config.
        history: both phases' histories.
        metrics: `val_*` and `test_*` scores.
        export: the SavedModel, `model.keras` and `backbone.weights.h5`; else weights only.
        extra: more JSON files to write, name -> value (a search's `tune.json`).
        backbone_digest: `weights_digest(model.backbone)` when the caller has it already.
        curve: the probe curve the run chose its blocks from: `probe.json` (an export draws `probe.png`).
        logs: the run's TensorBoard logs, copied in as `logs/` (unless already inside `folder`).
        evaluation: the held-out evaluation (`evaluation.json`), with `wrong_images`, the
            images of its `most_wrong` predictions (`plots/wrong.png`).
        data: `data.json`, from `kerastl.runs.scoring.describe_data`.
        plan: the run's resolved choices (`RunPlan.to_dict()`), recorded in `config.json` as "plan".
    """
    folder = Path(folder)
    try:  # an export is swapped in whole; a trial's folder holds KerasTuner's files too: files move in
        with staged_folder(folder, "replace" if export else "merge") as staging:
            record = {**config.experiment_dict(), **({"plan": plan} if plan is not None else {})}  # config.json
            _write_files(staging, model, class_names, record, history, metrics, export, extra, backbone_digest, curve)
            _write_report_files(staging, folder, logs, evaluation, wrong_images, data, export)
    except Exception as error:
        if isinstance(error, OSError) or "No space left on device" in str(error):  # TensorFlow's own writes too
            raise disk_full_error(error, f"the run folder {folder}") from None
        raise
    log.debug("wrote %s", folder)
    return folder


def _write_files(folder: Path, model, class_names, record: dict, history, metrics, export, extra, backbone_digest,
                 curve) -> None:
    metadata = {"kerastl_version": __version__, "format": FOLDER_FORMAT, "export": export,
                "normalize": model.normalize}
    if export:
        export_saved_model(model, folder, class_names)
        model.save(folder / MODEL_FILE)
        model.backbone.save_weights(folder / BACKBONE_WEIGHTS)
    else:
        write_labels(folder, class_names)
        if model.from_scratch or history.phase2 is not None:
            model.save_weights(folder / MODEL_WEIGHTS)
        else:  # the backbone is the one it was built with: the head is all that changed
            model.head_model().save_weights(folder / HEAD_WEIGHTS)
            metadata["backbone_digest"] = backbone_digest or weights_digest(model.backbone)
    write_json(folder / CONFIG_FILE, record)
    write_json(folder / HISTORY_FILE, history.to_dict())
    write_json(folder / METRICS_FILE, metrics)
    write_json(folder / METADATA_FILE, metadata)
    for name, value in (extra or {}).items():
        write_json(folder / name, value)
    if curve is not None:  # its plot, probe.png, is drawn from it with the others
        write_json(folder / PROBE_FILE, curve.to_dict())


def _write_report_files(staging: Path, folder: Path, logs: str | os.PathLike | None, evaluation: Evaluation | None,
                        wrong_images: np.ndarray | None, data: dict | None, export: bool) -> None:
    """The TensorBoard logs; for an export, the evaluation, plots, `report.html` and `MODEL_CARD.md`."""
    if logs is not None and Path(logs).is_dir() and Path(folder).resolve() not in Path(logs).resolve().parents:
        shutil.copytree(logs, staging / LOGS)
    if not export:
        return
    if data is not None:
        write_json(staging / DATA_FILE, data)
    if evaluation is not None:
        evaluation.save(staging / EVALUATION_FILE)
        plot_path(staging, "wrong").parent.mkdir(exist_ok=True)
        plot_wrong(wrong_images, evaluation.most_wrong, plot_path(staging, "wrong"))
    try:
        write_run_files(staging, location=folder)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - a drawing problem must not lose a trained model
        log.warning("the model is exported, but its report could not be drawn (%s); `kerastl report %s` tries "
                    "again", error, folder)


def read_config(folder: str | os.PathLike) -> RunConfig:
    """The run config of a run folder or export (0.1's extra search keys are accepted)."""
    return RunConfig.from_json(Path(folder) / CONFIG_FILE)


def read_json_file(folder: str | os.PathLike, name: str) -> Any:
    """A JSON file of a run folder, e.g. `metrics.json` or `history.json`."""
    path = Path(folder) / name
    if not path.is_file():
        raise KerastlError(f"{folder} has no {name} (is it a kerastl run folder?)")
    return json.loads(path.read_text())


def load_model(folder: str | os.PathLike) -> TransferClassifier:
    """The trained `TransferClassifier` of a run folder, exported or weights-only.

    `model.keras` loads in safe mode. A run folder written by kerastl 0.1 holds a
    plain functional model: it is rebuilt as a `TransferClassifier` from its
    `config.json` and takes the saved weights, or fails with one line saying what to do.
    Loading seeds no global generator, and Python's `random` is left as it was (Keras's
    unseeded initialisers draw from it once, to seed their own generator).
    """
    state = random.getstate()
    try:
        return _load_model(Path(folder))
    finally:
        random.setstate(state)


def _load_model(folder: Path) -> TransferClassifier:
    """`load_model` itself."""
    metadata_path = folder / METADATA_FILE
    if (folder / MODEL_FILE).is_file():
        loaded = load_keras_file(folder / MODEL_FILE)
        if isinstance(loaded, TransferClassifier):
            return loaded
        return _from_version_0_1(folder, loaded)
    if not metadata_path.is_file():
        raise KerastlError(f"{folder} has no {MODEL_FILE} (is it a kerastl run folder?)")
    metadata = json.loads(metadata_path.read_text())
    config = read_config(folder)
    # config.json names the blocks the head reads; format 2 folders predate the standardisation layer
    model = build_classifier(config.model, len(read_labels(folder)), config.data.seed,
                              normalize=metadata.get("normalize", False))
    if (folder / MODEL_WEIGHTS).is_file():
        model.load_weights(folder / MODEL_WEIGHTS)
        return model
    if weights_digest(model.backbone) != metadata.get("backbone_digest"):
        raise KerastlError(f"the backbone rebuilt for {folder} differs from the one its head was trained on; "
                           "was its weights file changed?")
    model.head_model().load_weights(folder / HEAD_WEIGHTS)
    return model


def load_keras_file(path: str | os.PathLike) -> keras.Model:
    """A `.keras` file loaded in safe mode: a file that holds code (a Lambda layer) is refused, in one line."""
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except ValueError as error:
        if "safe_mode" in str(error) or "lambda" in str(error).lower():
            raise KerastlError(f"refusing {path}: it holds Python code (a Lambda layer), and kerastl loads models "
                               "only in safe mode; load it with keras.saving.load_model(safe_mode=False) only if "
                               "you trust where it came from") from None
        raise


def _from_version_0_1(folder: Path, loaded: keras.Model) -> TransferClassifier:
    """A 0.1 model.keras (a plain functional model with the same layers, in the same order) as a classifier."""
    advice = (f"{folder} was written by kerastl 0.1 and cannot be read as a 0.2 classifier: load "
              f"{folder / MODEL_FILE} with keras.saving.load_model after `import kerastl.models.classifier`, or "
              f"retrain with `kerastl train --config {folder / CONFIG_FILE}`")
    try:
        config = read_config(folder)
        config.model.from_scratch = config.model.trains_from_scratch  # before the weights are cleared
        config.model.weights = None  # the saved weights replace whatever the backbone started from
        model = build_classifier(config.model, len(read_labels(folder)), config.data.seed, normalize=False)
        model.set_weights(loaded.get_weights())
    except (KerastlError, ValueError) as error:
        raise KerastlError(f"{advice} ({str(error).splitlines()[0]})") from None
    log.info("read %s as a kerastl 0.1 run folder", folder)
    return model


def copy_run_folder(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A copy of a run folder at `target`, swapped in whole: its `config.json` records the new folder, and
    its model card and report say to load the model from there (`kerastl.ImageClassifier.export`)."""
    target = Path(target)
    with staged_folder(target, "replace") as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        record = json.loads((staging / CONFIG_FILE).read_text())
        write_json(staging / CONFIG_FILE, {**record, "export_dir": str(target)})
        if (staging / "report.html").is_file():
            write_model_card(staging, target)
            write_run_report(staging, target)
    return target


def export_folder_litert(folder: str | os.PathLike, out: str | os.PathLike | None = None, quantize: str = "none",
                         source: str | None = None) -> LiteExport:
    """The classifier of a run folder (or a search's export) as a LiteRT file (`kerastl.models.litert`):
    `out`, by default `model.tflite` inside the folder, with `labels.txt` beside it.

    int8 calibrates on training images: those of `source` (a class folder, CSV or "digits"), by
    default the training split of the source the run trained on, cut as the run cut it.
    """
    folder = Path(folder)
    check_quantize(quantize)
    class_names, model, representative = read_labels(folder), load_model(folder), None
    if quantize == "int8":
        config = read_config(folder) if (folder / CONFIG_FILE).is_file() else None
        if source is None and (config is None or not config.data.source):
            raise KerastlError(f"{folder} trained on in-memory images: int8 quantization calibrates on training "
                               "images, so give them (--data SRC)")
        data = config.data if source is None else DataConfig(source=source, validation_split=0.0)
        representative = load_data(data, model.image_size).train.sample(REPRESENTATIVE_IMAGES).numpy()
    return export_litert(model, out or folder / LITE_FILE, class_names, quantize, representative)
