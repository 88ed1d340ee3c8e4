"""kerastl: transfer learning on images with Keras 3.

Build a classifier on any `keras.applications` backbone, train the head on the
frozen base, fine-tune the top blocks, export a SavedModel that takes raw pixels
or encoded images and returns class probabilities. Search both phases' settings
with KerasTuner (`run_search`, `TransferHyperModel`).

The names below are imported when first used (PEP 562), so `import kerastl`
does not import TensorFlow.
"""

from __future__ import annotations

import importlib

from kerastl.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "DataConfig": "kerastl.config",
    "ModelConfig": "kerastl.config",
    "RunConfig": "kerastl.config",
    "TrainConfig": "kerastl.config",
    "KerastlError": "kerastl.errors",
    "build_backbone": "kerastl.backbones",
    "get_spec": "kerastl.backbones",
    "list_backbones": "kerastl.backbones",
    "build_augmenter": "kerastl.augment",
    "check_data": "kerastl.imagefiles",
    "ImageData": "kerastl.data",
    "from_arrays": "kerastl.data",
    "from_folder": "kerastl.data",
    "load_cifar10": "kerastl.data",
    "load_data": "kerastl.data",
    "load_digits": "kerastl.data",
    "from_csv": "kerastl.sources",
    "from_dataframe": "kerastl.sources",
    "from_dataset": "kerastl.sources",
    "TransferClassifier": "kerastl.classifier",
    "build_classifier": "kerastl.classifier",
    "compile_classifier": "kerastl.compile",
    "make_loss": "kerastl.losses",
    "class_weights": "kerastl.pipelines",
    "training_batches": "kerastl.pipelines",
    "FeatureCache": "kerastl.features",
    "extract_features": "kerastl.features",
    "layer_features_model": "kerastl.features",
    "recalibrate_batchnorm": "kerastl.batchnorm",
    "train_classifier": "kerastl.train",
    "Evaluation": "kerastl.evaluation",
    "evaluate_predictions": "kerastl.evaluation",
    "evaluate_folder": "kerastl.scoring",
    "evaluate_data": "kerastl.scoring",
    "write_report": "kerastl.htmlreport",
    "write_model_card": "kerastl.modelcard",
    "RunResult": "kerastl.run",
    "run_training": "kerastl.run",
    "export_saved_model": "kerastl.export",
    "load_export": "kerastl.export",
    "load_model": "kerastl.runfolder",
    "TuneConfig": "kerastl.tune.config",
    "TransferHyperModel": "kerastl.tune.hypermodel",
    "TransferTuner": "kerastl.tune.tuner",
    "run_search": "kerastl.tune.search",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kerastl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
