"""kerastl: transfer learning on images with Keras 3.

Build a classifier on any `keras.applications` backbone, train the head on the
frozen base, fine-tune the top blocks, export a SavedModel that takes raw pixels
or encoded images and returns class probabilities. Search both phases' settings
with KerasTuner (`run_search`, `TransferHyperModel`).

The names below are imported when first used (PEP 562), so `import kerastl`
does not import TensorFlow; the first name that needs it imports it without its native
start-up lines, as the command line does, and sets `TF_CPP_MIN_LOG_LEVEL=2` for TensorFlow's later
native notices unless it is set already (`KERASTL_TF_LOG=1` shows everything).
"""

from __future__ import annotations

import importlib
import sys

from kerastl.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "DataConfig": "kerastl.config",
    "ModelConfig": "kerastl.config",
    "RunConfig": "kerastl.config",
    "TrainConfig": "kerastl.config",
    "PhaseConfig": "kerastl.config",
    "ValidationConfig": "kerastl.config",
    "DeviceConfig": "kerastl.devices",
    "KerastlError": "kerastl.errors",
    "build_backbone": "kerastl.models.backbones",
    "get_spec": "kerastl.models.backbones",
    "list_backbones": "kerastl.models.backbones",
    "build_augmenter": "kerastl.data.augment",
    "check_data": "kerastl.data.checks",
    "ImageData": "kerastl.data.images",
    "from_arrays": "kerastl.data.images",
    "from_folder": "kerastl.data.images",
    "load_cifar10": "kerastl.data.images",
    "load_data": "kerastl.data.images",
    "load_digits": "kerastl.data.images",
    "from_csv": "kerastl.data.sources",
    "from_dataframe": "kerastl.data.sources",
    "from_dataset": "kerastl.data.sources",
    "TransferClassifier": "kerastl.models.classifier",
    "build_classifier": "kerastl.models.classifier",
    "compile_classifier": "kerastl.training.compile",
    "make_loss": "kerastl.training.losses",
    "class_weights": "kerastl.data.pipelines",
    "training_batches": "kerastl.data.pipelines",
    "FeatureCache": "kerastl.features.cache",
    "extract_features": "kerastl.features.extract",
    "layer_features_model": "kerastl.features.extract",
    "recalibrate_batchnorm": "kerastl.training.batchnorm",
    "train_classifier": "kerastl.training.phases",
    "Evaluation": "kerastl.reports.evaluation",
    "evaluate_predictions": "kerastl.reports.evaluation",
    "evaluate_folder": "kerastl.runs.scoring",
    "evaluate_data": "kerastl.runs.scoring",
    "write_report": "kerastl.reports.html",
    "write_model_card": "kerastl.reports.card",
    "RunPlan": "kerastl.runs.plan",
    "plan_run": "kerastl.runs.plan",
    "RunResult": "kerastl.runs.run",
    "run_training": "kerastl.runs.run",
    "ImageClassifier": "kerastl.runs.estimator",
    "export_saved_model": "kerastl.models.export",
    "load_export": "kerastl.models.export",
    "Predictions": "kerastl.models.predict",
    "predict_images": "kerastl.models.predict",
    "export_litert": "kerastl.models.litert",
    "load_litert": "kerastl.models.litert",
    "load_model": "kerastl.runs.folder",
    "TuneConfig": "kerastl.tune.config",
    "TransferHyperModel": "kerastl.tune.hypermodel",
    "TransferTuner": "kerastl.tune.tuner",
    "run_search": "kerastl.tune.search",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


# modules that import without TensorFlow: the configs, the errors, the reports and the data checks
_LIGHT = ("kerastl.config", "kerastl.devices", "kerastl.errors", "kerastl.tune.config", "kerastl.reports.",
          "kerastl.data.checks")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kerastl' has no attribute {name!r}")
    if "tensorflow" not in sys.modules and not _EXPORTS[name].startswith(_LIGHT):
        # as quietly as the command line: TensorFlow's native start-up lines are kept off stderr
        # (KERASTL_TF_LOG=1 shows them; importing TensorFlow before kerastl shows them too)
        importlib.import_module("kerastl.quiet").import_tensorflow()
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
