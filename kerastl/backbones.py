"""The backbone registry: every supported network in one literal table.

Each entry names the constructor, the preprocessing the family expects, the
default and minimum input size, and a regular expression that finds the blocks
fine-tuning unfreezes by. Everything else in kerastl reads from here.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import keras
from keras import applications as apps
from keras import layers

from kerastl.errors import KerastlError

log = logging.getLogger(__name__)


def scale_to_unit(x):
    """Maps 0-255 pixels to 0-1 (the preprocessing of `simple_cnn`)."""
    return x / 255.0


def simple_cnn(include_top: bool = False, weights=None, input_shape=(64, 64, 3), name="simple_cnn"):
    """A small from-scratch convolutional base, as in the classic Keras tutorial.

    Three blocks of Conv2D(3x3, ReLU) + MaxPool; the classifier head adds pooling,
    dropout and the softmax. It takes the `keras.applications` arguments so the
    registry can treat it like any other family.
    """
    del include_top  # the head is always kerastl's own
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: registry name, e.g. "mobilenet_v2".
        constructor: a `keras.applications`-style function.
        preprocess: maps 0-255 RGB float pixels to what the network expects.
        default_size: the input size the network was designed (and pretrained) for.
        min_size: the smallest input size the constructor accepts.
        blocks: regex, matched in full against layer names; group 1 names the block a
            layer belongs to. A block ends at the last layer carrying its name.
        imagenet: whether ImageNet weights exist for this entry.
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocess: Callable
    default_size: int
    min_size: int
    blocks: str
    imagenet: bool = True


def _entry(name, constructor, module, default_size, min_size, blocks):
    return BackboneSpec(name, constructor, module.preprocess_input, default_size, min_size, blocks)


_VGG = r"(block\d+)_.*"
_RESNET = r"(conv\d_block\d+)_.*"
_DENSENET = r"(conv\d_block\d+|pool\d)_.*"
_EFFICIENTNET = r"(block\d+[a-z])_.*"
_CONVNEXT = r".*_(stage_\d+_block_\d+)_.*"
_NASNET = r"((?:normal|reduction)_concat_.*)"

_ENTRIES = [
    _entry("vgg16", apps.VGG16, apps.vgg16, 224, 32, _VGG),
    _entry("vgg19", apps.VGG19, apps.vgg19, 224, 32, _VGG),
    _entry("resnet50", apps.ResNet50, apps.resnet, 224, 32, _RESNET),
    _entry("resnet101", apps.ResNet101, apps.resnet, 224, 32, _RESNET),
    _entry("resnet152", apps.ResNet152, apps.resnet, 224, 32, _RESNET),
    _entry("resnet50_v2", apps.ResNet50V2, apps.resnet_v2, 224, 32, _RESNET),
    _entry("resnet101_v2", apps.ResNet101V2, apps.resnet_v2, 224, 32, _RESNET),
    _entry("resnet152_v2", apps.ResNet152V2, apps.resnet_v2, 224, 32, _RESNET),
    _entry("inception_v3", apps.InceptionV3, apps.inception_v3, 299, 75, r"(mixed\d+)"),
    _entry(
        "inception_resnet_v2", apps.InceptionResNetV2, apps.inception_resnet_v2, 299, 75,
        r"(mixed_5b|mixed_6a|mixed_7a|block(?:35|17|8)_\d+)(?:_.*)?",
    ),
    _entry("xception", apps.Xception, apps.xception, 299, 71, r"(block\d+)_.*"),
    _entry("densenet121", apps.DenseNet121, apps.densenet, 224, 32, _DENSENET),
    _entry("densenet169", apps.DenseNet169, apps.densenet, 224, 32, _DENSENET),
    _entry("densenet201", apps.DenseNet201, apps.densenet, 224, 32, _DENSENET),
    _entry("mobilenet", apps.MobileNet, apps.mobilenet, 224, 32, r"conv_(?:pad|dw|pw)_(\d+)(?:_.*)?"),
    _entry("mobilenet_v2", apps.MobileNetV2, apps.mobilenet_v2, 224, 32, r"(expanded_conv|block_\d+)_.*"),
    _entry("mobilenet_v3_small", apps.MobileNetV3Small, apps.mobilenet_v3, 224, 32,
           r"(expanded_conv(?:_\d+)?)_.*"),
    _entry("mobilenet_v3_large", apps.MobileNetV3Large, apps.mobilenet_v3, 224, 32,
           r"(expanded_conv(?:_\d+)?)_.*"),
    _entry("efficientnet_b0", apps.EfficientNetB0, apps.efficientnet, 224, 32, _EFFICIENTNET),
    _entry("efficientnet_b1", apps.EfficientNetB1, apps.efficientnet, 240, 32, _EFFICIENTNET),
    _entry("efficientnet_b2", apps.EfficientNetB2, apps.efficientnet, 260, 32, _EFFICIENTNET),
    _entry("efficientnet_b3", apps.EfficientNetB3, apps.efficientnet, 300, 32, _EFFICIENTNET),
    _entry("efficientnet_b4", apps.EfficientNetB4, apps.efficientnet, 380, 32, _EFFICIENTNET),
    _entry("efficientnet_b5", apps.EfficientNetB5, apps.efficientnet, 456, 32, _EFFICIENTNET),
    _entry("efficientnet_b6", apps.EfficientNetB6, apps.efficientnet, 528, 32, _EFFICIENTNET),
    _entry("efficientnet_b7", apps.EfficientNetB7, apps.efficientnet, 600, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b0", apps.EfficientNetV2B0, apps.efficientnet_v2, 224, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b1", apps.EfficientNetV2B1, apps.efficientnet_v2, 240, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b2", apps.EfficientNetV2B2, apps.efficientnet_v2, 260, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_b3", apps.EfficientNetV2B3, apps.efficientnet_v2, 300, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_s", apps.EfficientNetV2S, apps.efficientnet_v2, 384, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_m", apps.EfficientNetV2M, apps.efficientnet_v2, 480, 32, _EFFICIENTNET),
    _entry("efficientnet_v2_l", apps.EfficientNetV2L, apps.efficientnet_v2, 480, 32, _EFFICIENTNET),
    _entry("convnext_tiny", apps.ConvNeXtTiny, apps.convnext, 224, 32, _CONVNEXT),
    _entry("convnext_small", apps.ConvNeXtSmall, apps.convnext, 224, 32, _CONVNEXT),
    _entry("convnext_base", apps.ConvNeXtBase, apps.convnext, 224, 32, _CONVNEXT),
    _entry("convnext_large", apps.ConvNeXtLarge, apps.convnext, 224, 32, _CONVNEXT),
    _entry("convnext_xlarge", apps.ConvNeXtXLarge, apps.convnext, 224, 32, _CONVNEXT),
    _entry("nasnet_mobile", apps.NASNetMobile, apps.nasnet, 224, 32, _NASNET),
    _entry("nasnet_large", apps.NASNetLarge, apps.nasnet, 331, 32, _NASNET),
    BackboneSpec("simple_cnn", simple_cnn, scale_to_unit, 64, 16, r"(block\d+)_.*", imagenet=False),
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


def normalize_weights(weights: str | None) -> str | None:
    """None for "none" (any case) or an empty string; other values unchanged."""
    return None if weights is None or weights.strip().lower() in ("none", "") else weights


def check_weights(spec: BackboneSpec, weights: str | None) -> None:
    """Fails early, before anything is built or written, on a weights value that cannot work."""
    if weights is None or (weights == "imagenet" and spec.imagenet):
        return
    if weights == "imagenet":
        raise KerastlError(f"{spec.name} has no ImageNet weights; pass weights=none or a weights file")
    if not os.path.isfile(weights):
        raise KerastlError(f"weights file {weights} does not exist")


def keras_home() -> str:
    """The folder Keras downloads into: $KERAS_HOME, else ~/.keras (Keras's documented rule)."""
    return os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))


def _imagenet_download_error(spec: BackboneSpec, error: Exception) -> KerastlError:
    match = re.search(r"URL fetch failure on (\S+):\s", str(error))
    filename = os.path.basename(match.group(1)) if match else "its weights file"
    cache = os.path.join(keras_home(), "models")
    return KerastlError(
        f"cannot download ImageNet weights for {spec.name} (no network?): put {filename} in "
        f"{cache}/, or pass weights=PATH to a local weights file, or weights=none"
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
        try:
            model.load_weights(weights)
        except Exception as error:
            raise KerastlError(f"weights file {weights} does not fit {spec.name}: {error}") from error
        log.info("loaded %s weights from %s", spec.name, weights)
    return model


def block_boundaries(backbone: keras.Model, name: str) -> list[int]:
    """Indices into `backbone.layers` of the last layer of each block, in order."""
    pattern = re.compile(get_spec(name).blocks)
    last: dict[str, int] = {}
    for index, layer in enumerate(backbone.layers):
        match = pattern.fullmatch(layer.name)
        if match:
            last[match.group(1)] = index
    return sorted(last.values())
