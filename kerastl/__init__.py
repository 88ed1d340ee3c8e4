"""kerastl: transfer learning on images with Keras 3.

Build a classifier on any `keras.applications` backbone, train the head on the
frozen base, fine-tune the top blocks, export a SavedModel that takes raw pixels
or encoded images and returns class probabilities. Search both phases' settings
with KerasTuner (`run_search`, `TransferHyperModel`).
"""

from kerastl.augment import build_augmenter
from kerastl.backbones import build_backbone, get_spec, list_backbones
from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig, TuneConfig
from kerastl.data import ImageData, from_arrays, from_folder, load_cifar10, load_data, load_digits
from kerastl.errors import KerastlError
from kerastl.features import FeatureCache, extract_features, feature_extractor
from kerastl.export import export_saved_model, load_export, load_model
from kerastl.model import build_classifier, freeze_base, get_backbone, unfreeze
from kerastl.run import run_training
from kerastl.search import run_search
from kerastl.train import recalibrate_batchnorm, train_classifier
from kerastl.tuning import TransferHyperModel, TransferTuner

__all__ = [
    "DataConfig",
    "FeatureCache",
    "ImageData",
    "KerastlError",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TransferHyperModel",
    "TransferTuner",
    "TuneConfig",
    "build_augmenter",
    "build_backbone",
    "build_classifier",
    "export_saved_model",
    "extract_features",
    "feature_extractor",
    "freeze_base",
    "from_arrays",
    "from_folder",
    "get_backbone",
    "get_spec",
    "list_backbones",
    "load_cifar10",
    "load_data",
    "load_digits",
    "load_export",
    "load_model",
    "recalibrate_batchnorm",
    "run_search",
    "run_training",
    "train_classifier",
    "unfreeze",
]
