"""The backbone registry: every supported network in one literal table.

Each entry names the constructor, the preprocessing the family expects, the
default and minimum input size, and a regular expression that finds the blocks
fine-tuning unfreezes by. Everything else in kerastl reads from here.

The table holds dotted names, resolved on first use, so this module imports
neither Keras nor TensorFlow: the command line checks a backbone name, an image
size or a weights file before TensorFlow is loaded.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from kerastl.config import normalize_weights
from kerastl.errors import KerastlError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def _resolve(dotted: str) -> Callable:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: registry name, e.g. "mobilenet_v2".
        constructor_path: dotted name of a `keras.applications`-style function.
        preprocess_path: dotted name of the function mapping 0-255 RGB float pixels
            to what the network expects.
        default_size: the input size the network was designed (and pretrained) for.
        min_size: the smallest input size the constructor accepts.
        blocks: regex, matched in full against layer names; group 1 names the block a
            layer belongs to. A block ends at the last layer carrying its name.
        imagenet: whether ImageNet weights exist for this entry.
    """

    name: str
    constructor_path: str
    preprocess_path: str
    default_size: int
    min_size: int
    blocks: str
    imagenet: bool = True

    @property
    def constructor(self) -> Callable[..., keras.Model]:
        """The constructor (imports Keras)."""
        return _resolve(self.constructor_path)

    @property
    def preprocess(self) -> Callable:
        """The preprocessing function (imports Keras)."""
        return _resolve(self.preprocess_path)

    @property
    def preprocess_family(self) -> str:
        """The preprocessing's module name, e.g. "mobilenet_v2", without importing it."""
        return self.preprocess_path.rsplit(".", 2)[-2]


def _entry(name, constructor, module, default_size, min_size, blocks):
    return BackboneSpec(name, f"keras.applications.{constructor}", f"keras.applications.{module}.preprocess_input",
                        default_size, min_size, blocks)


_VGG = r"(block\d+)_.*"
_RESNET = r"(conv\d_block\d+)_.*"
_DENSENET = r"(conv\d_block\d+|pool\d)_.*"
_EFFICIENTNET = r"(block\d+[a-z])_.*"
_CONVNEXT = r".*_(stage_\d+_block_\d+)_.*"
_NASNET = r"((?:normal|reduction)_concat_.*)"

_ENTRIES = [
    _entry("vgg16", "VGG16", "vgg16", 224, 32, _VGG),
    _entry("vgg19", "VGG19", "vgg19", 224, 32, _VGG),
    _entry("resnet50", "ResNet50", "resnet", 224, 32, _RESNET),
    _entry("resnet101", "ResNet101", "resnet", 224, 32, _RESNET),
    _entry("resnet152", "ResNet152", "resnet", 224, 32, _RESNET),
    _entry("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 32, _RESNET),
    _entry("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 32, _RESNET),
    _entry("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 32, _RESNET),
    _entry("inception_v3", "InceptionV3", "inception_v3", 299, 75, r"(mixed\d+)"),
    _entry(
        "inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 75,
        r"(mixed_5b|mixed_6a|mixed_7a|block(?:35|17|8)_\d+)(?:_.*)?",
    ),
    _entry("xception", "Xception", "xception", 299, 71, r"(block\d+)_.*"),
    _entry("densenet121", "DenseNet121", "densenet", 224, 32, _DENSENET),
    _entry("densenet169", "DenseNet169", "densenet", 224, 32, _DENSENET),
    _entry("densenet201", "DenseNet201", "densenet", 224, 32, _DENSENET),
    _entry("mobilenet", "MobileNet", "mobilenet", 224, 32, r"conv_(?:pad|dw|pw)_(\d+)(?:_.*)?"),
    _entry("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 32, r"(expanded_conv|block_\d+)_.*"),
    _entry("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 32,
           r"(expanded_conv(?:_\d+)?)_.*"),
    _entry("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 32,
           r"(expanded_conv(?:_\d+)?)_.*"),
    _entry("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 32, _EFFICIENTNET),
    _entry("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 32, _EFFICIENTNET),
    _entry("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 32, _EFFICIENTNET),
    _entry("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 32, _EFFICIENTNET),
    _entry("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 32, _EFFICIENTNET),
    _entry("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 32, _EFFICIENTNET),
    _entry("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 32, _EFFICIENTNET),
    _entry("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 32, _EFFICIENTNET),
    _entry("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 32, _CONVNEXT),
    _entry("convnext_small", "ConvNeXtSmall", "convnext", 224, 32, _CONVNEXT),
    _entry("convnext_base", "ConvNeXtBase", "convnext", 224, 32, _CONVNEXT),
    _entry("convnext_large", "ConvNeXtLarge", "convnext", 224, 32, _CONVNEXT),
    _entry("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 32, _CONVNEXT),
    _entry("nasnet_mobile", "NASNetMobile", "nasnet", 224, 32, _NASNET),
    _entry("nasnet_large", "NASNetLarge", "nasnet", 331, 32, _NASNET),
    BackboneSpec("simple_cnn", "kerastl.models.simple_cnn.simple_cnn", "kerastl.models.simple_cnn.scale_to_unit", 64, 16,
                 r"(block\d+)_.*", imagenet=False),
]

REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _ENTRIES}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): spec for name, spec in REGISTRY.items()}


def list_backbones(pattern: str = "*") -> list[str]:
    """Registry names matching a shell-style pattern, e.g. "efficientnet*"."""
    return [name for name in REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name` (case, '_' and '-' are ignored: "MobileNetV2" works)."""
    spec = _BY_KEY.get(_key(name))
    if spec is None:
        raise KerastlError(f"unknown backbone {name!r}; known backbones: {', '.join(REGISTRY)}")
    return spec


def resolve_size(spec: BackboneSpec, image_size: int | None) -> int:
    """The input size to build with: the entry's default, or `image_size` if it is allowed."""
    size = spec.default_size if image_size is None else int(image_size)
    if size < spec.min_size:
        raise KerastlError(
            f"image size {size} is too small for {spec.name}: it needs at least {spec.min_size}"
        )
    return size


def check_weights(spec: BackboneSpec, weights: str | None) -> None:
    """Fails early, before anything is built or written, on a weights value that cannot work."""
    if weights is None or (weights == "imagenet" and spec.imagenet):
        return
    if weights == "imagenet":
        raise KerastlError(f"{spec.name} has no ImageNet weights; pass weights=None (train from scratch) or a "
                           "weights file, weights=PATH")
    if not os.path.isfile(weights):
        raise KerastlError(f"weights file {weights} does not exist")
    if is_legacy_full_model(weights):
        raise KerastlError(f"{weights} is a legacy .h5 full model, which kerastl does not load (it can hold code); "
                           "save its weights with model.save_weights('backbone.weights.h5') and pass that file")


def is_legacy_full_model(path: str) -> bool:
    """Whether `path` is an HDF5 file holding a whole model (`model.save("x.h5")`), not just weights."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89HDF\r\n\x1a\n":
            return False
    import h5py  # only for HDF5 files, so the command line stays quick

    try:
        with h5py.File(path, "r") as handle:
            return "model_config" in handle.attrs
    except OSError:
        return False


def keras_home() -> str:
    """The folder Keras downloads into: $KERAS_HOME, else ~/.keras (Keras's documented rule)."""
    return os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))


def _imagenet_download_error(spec: BackboneSpec, error: Exception) -> KerastlError:
    match = re.search(r"URL fetch failure on (\S+):\s", str(error))
    filename = os.path.basename(match.group(1)) if match else "its weights file"
    cache = os.path.join(keras_home(), "models")
    return KerastlError(
        f"cannot download ImageNet weights for {spec.name} (no network?): put {filename} in "
        f"{cache}/, or pass weights=PATH to a local weights file, or weights=None"
    )


def build_backbone(name: str, image_size: int | None = None, weights: str | None = "imagenet") -> keras.Model:
    """Builds a headless backbone.

    Args:
        name: registry name.
        image_size: square input size; the entry's default when None.
        weights: "imagenet", None (random initialisation) or a path to a weights file,
            e.g. the `backbone.weights.h5` that every kerastl run saves.

    Returns:
        A `keras.Model` mapping preprocessed images to feature maps.
    """
    spec = get_spec(name)
    size = resolve_size(spec, image_size)
    weights = normalize_weights(weights)
    check_weights(spec, weights)
    shape = (size, size, 3)
    if weights == "imagenet":
        try:
            return spec.constructor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as error:  # keras.utils.get_file raises a bare Exception offline
            if "URL fetch failure" in str(error):
                raise _imagenet_download_error(spec, error) from error
            raise
    model = spec.constructor(include_top=False, weights=None, input_shape=shape)
    if weights is not None:
        with warnings.catch_warnings(record=True) as caught:  # Keras warns per layer it skips
            warnings.simplefilter("always")
            try:
                model.load_weights(weights)
                skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
                if skipped:
                    raise ValueError(skipped[0])
            except Exception as error:
                raise KerastlError(f"weights file {weights} does not fit {spec.name} at {size}x{size}: "
                                   f"{first_mismatch(error)}") from None
        log.info("loaded %s weights from %s", spec.name, weights)
    return model


def first_mismatch(error: Exception) -> str:
    """The first mismatch in a Keras weight-loading error, as one line.

    Keras reports a weights file that does not fit as "A total of N objects could
    not be loaded. Example error message for object <...>: <the first mismatch>"
    followed by the full list; only the example is kept.
    """
    text = str(error)
    match = re.search(r"Example error message for object (<[^>]*>):\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if match:
        text = f"{match.group(1)}: {match.group(2)}"
    text = text.split(" Target variable:")[0]  # Keras appends the variable with all its values
    if match:
        return " ".join(text.split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def block_boundaries(backbone: keras.Model, name: str) -> list[int]:
    """Indices into `backbone.layers` of the last layer of each block, in order."""
    pattern = re.compile(get_spec(name).blocks)
    last: dict[str, int] = {}
    for index, layer in enumerate(backbone.layers):
        match = pattern.fullmatch(layer.name)
        if match:
            last[match.group(1)] = index
    return sorted(last.values())
