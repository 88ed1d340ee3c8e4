"""The classifier object: a functional Keras model that knows its parts.

raw pixels (0-255, any size) -> Resizing -> the backbone's own preprocessing ->
backbone (BatchNorm in inference mode) -> global pooling of its output, or of
several blocks' outputs, concatenated -> standardisation -> Dropout ->
[Dense hidden] -> float32 softmax (or one sigmoid unit).

Blocks are numbered from 1 in the registry's order; the backbone's output is the
last number (`block_count()`). The standardisation is a layer with fixed mean and
scale, set from the training features (`FeatureNormalization`), so the export
carries it.

`TransferClassifier` resolves its registry entry once and keeps every part as an
attribute, in the manner of keras-hub's `ImageClassifier`. Its features model
(raw images -> pooled features) and head model (pooled features ->
probabilities) are built from the classifier's own layer objects, so training the
head on cached features trains the classifier in place. No Lambda layers: it
saves to `.keras` and loads with `safe_mode=True`.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import keras
from keras import layers

from kerastl.config import ModelConfig, parse_features
from kerastl.errors import KerastlError
from kerastl.models.backbones import BackboneSpec, block_boundaries, build_backbone, get_spec, resolve_size
from kerastl.models.layers import BackbonePreprocessing, FeatureNormalization, seed_initialisation

log = logging.getLogger(__name__)


def numbered_blocks(backbone: keras.Model, name: str) -> list[int]:
    """Indices into `backbone.layers` of the layers ending blocks 1, 2, ...: the registry's
    block boundaries, then the backbone's output layer when it ends no block."""
    bounds = block_boundaries(backbone, name)
    output = len(backbone.layers) - 1
    return bounds if bounds and bounds[-1] == output else [*bounds, output]


def check_classes(num_classes: int, binary: bool) -> None:
    """Two or more classes; exactly two for a binary (one sigmoid unit) classifier."""
    if num_classes < 2:
        raise KerastlError(f"a classifier needs two or more classes, got {num_classes}")
    if binary and num_classes != 2:
        raise KerastlError(f"binary=True needs exactly two classes, got {num_classes}")


@keras.saving.register_keras_serializable(package="kerastl")
class TransferClassifier(keras.Model):
    """A backbone from the registry with a pooling, dropout and softmax head.

    Build one with `build_classifier(ModelConfig(...), num_classes)`, which makes
    the backbone (ImageNet, a weights file or a random start); the constructor
    takes an already built backbone, as keras-hub's tasks do.

    Args:
        backbone: a headless `keras.applications`-style model (see `build_backbone`).
        backbone_name: its registry name; preprocessing and blocks come from the entry.
        num_classes: classes of the softmax (2 with `binary`).
        image_size: square input size of the backbone; the entry's default when None.
        pooling: "avg" or "max" global pooling of the feature map.
        dropout: dropout rate before the classifier.
        hidden_units: a Dense ReLU layer of this size before the classifier (0: none).
        l2: L2 penalty on the head's Dense kernels (0: none).
        max_norm: max-norm constraint on the head's Dense kernels (0: none).
        binary: one sigmoid unit instead of a softmax (two classes only).
        from_scratch: the backbone trains with BatchNorm learning its statistics;
            otherwise it always runs BatchNorm in inference mode.
        feature_blocks: the block numbers whose pooled outputs the head reads
            (None: the backbone's output).
        normalize: standardise the pooled features (`FeatureNormalization`) before the head.
        seed: fixes the head's initial weights and dropout masks, whatever
            randomness building the backbone used.

    Example:
    ```python
    model = kerastl.build_classifier(ModelConfig("mobilenet_v2", image_size=96), num_classes=5)
    data = kerastl.from_folder("flowers", model)      # the data side asks the model for its size
    model.features_model()(images)                    # pooled features of raw images
    model.unfreeze(blocks=2)                          # BatchNorm stays frozen
    ```
    """

    def __init__(
        self,
        backbone: keras.Model,
        backbone_name: str,
        num_classes: int,
        image_size: int | None = None,
        pooling: str = "avg",
        dropout: float = 0.2,
        hidden_units: int = 0,
        l2: float = 0.0,
        max_norm: float = 0.0,
        binary: bool = False,
        from_scratch: bool = False,
        feature_blocks: list[int] | None = None,
        normalize: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        spec = get_spec(backbone_name)
        size = resolve_size(spec, image_size)
        check_classes(num_classes, binary)
        if pooling not in ("avg", "max"):
            raise KerastlError(f"pooling must be avg or max, got {pooling!r}")

        def init(offset: int):
            return "glorot_uniform" if seed is None else keras.initializers.GlorotUniform(seed + offset)

        # === Layers ===
        self.spec: BackboneSpec = spec
        self.backbone = backbone
        last = len(self._block_layers())
        blocks = sorted(set(feature_blocks or [last]))
        if blocks[0] < 1 or blocks[-1] > last:
            raise KerastlError(f"{spec.name} has blocks 1 to {last}; features cannot read block(s) {blocks}")
        self.feature_blocks = blocks
        self.resizing = layers.Resizing(size, size, name="resize")
        self.preprocessing = BackbonePreprocessing(spec.name, name="preprocess")
        pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        self.pooler = pool(name="pool")
        # float32 whatever the policy: 1 / std of a near-constant feature overflows float16
        self.feature_norm = FeatureNormalization(dtype="float32", name="normalize") if normalize else None
        self.output_dropout = layers.Dropout(dropout, seed=seed, name="dropout")
        penalties = {"kernel_regularizer": keras.regularizers.L2(l2) if l2 else None,
                     "kernel_constraint": keras.constraints.MaxNorm(max_norm) if max_norm else None}
        self.hidden = (layers.Dense(hidden_units, activation="relu", kernel_initializer=init(1), name="hidden",
                                    **penalties) if hidden_units else None)
        units, activation = (1, "sigmoid") if binary else (num_classes, "softmax")
        self.output_dense = layers.Dense(units, activation=activation, dtype="float32",
                                         kernel_initializer=init(2), name="probabilities", **penalties)

        # === Functional model ===
        inputs = keras.Input(shape=(None, None, 3), name="images")
        if from_scratch:
            maps = self._as_list(backbone(self.preprocess_images(inputs)))
        else:
            maps = self._backbone_maps(inputs, blocks)
        outputs = self.head_layers_on(self.pool_features(maps))
        super().__init__(inputs=inputs, outputs=outputs, name=kwargs.pop("name", f"kerastl_{spec.name}"), **kwargs)

        # === Config ===
        self.backbone_name = spec.name
        self.num_classes = num_classes
        self.image_size = size
        self.pooling = pooling
        self.dropout = dropout
        self.hidden_units = hidden_units
        self.l2, self.max_norm = l2, max_norm
        self.binary = binary
        self.from_scratch = from_scratch
        self.normalize = normalize
        self.seed = seed
        if not from_scratch:
            self.freeze_backbone()

    # --- the parts, as models that share this classifier's layers ---

    def preprocess_images(self, images):
        """Raw 0-255 images of any size -> the backbone's input (resized and preprocessed)."""
        return self.preprocessing(self.resizing(images))

    def _block_layers(self) -> list[int]:
        """Indices into `backbone.layers` of each numbered block's last layer; the output's layer is last."""
        return numbered_blocks(self.backbone, self.spec.name)

    def block_count(self) -> int:
        """How many blocks the features can read; the last number is the backbone's output."""
        return len(self._block_layers())

    def block_names(self) -> list[str]:
        """The backbone layer that ends each numbered block."""
        return [self.backbone.layers[index].name for index in self._block_layers()]

    def block_widths(self, blocks: list[int]) -> list[int]:
        """The pooled feature width (channels) of each of `blocks`."""
        index = self._block_layers()
        return [int(self.backbone.layers[index[b - 1]].output.shape[-1]) for b in blocks]

    def read_widths(self) -> tuple[int, ...]:
        """The width of each block the head reads, in order (their standardisation weighs them by it)."""
        return tuple(self.block_widths(self.feature_blocks))

    def _backbone_maps(self, images, blocks: list[int] | None = None) -> list:
        """The feature maps of `blocks` (default: those the head reads), BatchNorm in inference mode.

        Reading only the backbone's output calls the backbone itself; other blocks are
        read through one model over the backbone's own layers, in one pass.
        """
        blocks = blocks or self.feature_blocks
        x = self.preprocess_images(images)
        if blocks == [self.block_count()]:
            return self._as_list(self.backbone(x, training=False))
        index = self._block_layers()
        outputs = [self.backbone.layers[index[b - 1]].output for b in blocks]
        taps = keras.Model(self.backbone.inputs, outputs, name="blocks_" + "_".join(map(str, blocks)))
        return self._as_list(taps(x, training=False))

    @staticmethod
    def _as_list(maps) -> list:
        return list(maps) if isinstance(maps, (list, tuple)) else [maps]

    def pool_features(self, maps: list):
        """Globally pools each feature map; several maps are concatenated into one vector."""
        pooled = [self.pooler(feature_map) for feature_map in maps]
        return pooled[0] if len(pooled) == 1 else layers.Concatenate(name="features")(pooled)

    def head_layers_on(self, features):
        """The head (standardisation, dropout, optional hidden layer, classifier) on pooled features."""
        x = self.head_inputs_on(features)
        for dense in self.head_dense_layers():
            x = dense(x)
        return x

    def head_inputs_on(self, features, training=None):
        """The head's fixed first steps on pooled features: standardisation and dropout (no trainable weights)."""
        x = self.feature_norm(features) if self.feature_norm is not None else features
        return self.output_dropout(x, training=training)

    def head_dense_layers(self) -> list[layers.Dense]:
        """The head's trainable layers, in order: the hidden layer (if any), then the classifier."""
        return [dense for dense in (self.hidden, self.output_dense) if dense is not None]

    @property
    def feature_dim(self) -> int:
        """The width of the pooled features the head reads."""
        if self.from_scratch or self.feature_blocks == [self.block_count()]:  # every output of the backbone
            return sum(int(feature_map.shape[-1]) for feature_map in self.backbone.outputs)
        return sum(self.block_widths(self.feature_blocks))

    def features_model(self, blocks: list[int] | None = None) -> keras.Model:
        """Raw images -> pooled backbone features, in inference mode.

        Args:
            blocks: the block numbers to read, concatenated in this order; default
                the blocks the head reads (what the head model takes).
        """
        inputs = keras.Input(shape=(None, None, 3), name="images")
        pooled = [self.pooler(m) for m in self._backbone_maps(inputs, sorted(set(blocks or self.feature_blocks)))]
        outputs = pooled[0] if len(pooled) == 1 else keras.ops.concatenate(pooled, axis=-1)
        return keras.Model(inputs, outputs, name="features")

    def head_model(self) -> keras.Model:
        """Pooled features -> probabilities, on this classifier's own head layers.

        Training it (phase 1 on cached features) trains the classifier's head in place.
        """
        inputs = keras.Input(shape=(self.feature_dim,), name="features")
        return keras.Model(inputs, self.head_layers_on(inputs), name="head")

    # --- freezing ---

    def freeze_backbone(self) -> None:
        """Freezes the whole backbone."""
        self.backbone.trainable = False

    def block_boundaries(self) -> list[int]:
        """Indices into `backbone.layers` of the last layer of each registry block."""
        return block_boundaries(self.backbone, self.spec.name)

    def unfreeze(self, blocks: int = 0, from_layer: str | None = None) -> int:
        """Makes the top of the backbone trainable; BatchNormalization layers stay frozen.

        Layers after the deepest block the head reads stay frozen too: they do not
        reach the output.

        Args:
            blocks: unfreeze the last `blocks` blocks (registry boundaries), or, when the head
                reads earlier blocks, the `blocks` blocks up to the deepest it reads; 0 freezes
                the backbone.
            from_layer: alternatively, unfreeze every backbone layer from this one (by name) on.

        Returns:
            The number of weighted backbone layers now trainable.
        """
        names = [layer.name for layer in self.backbone.layers]
        if from_layer is not None:
            if from_layer not in names:
                raise KerastlError(f"layer {from_layer!r} is not in backbone {self.backbone.name}")
            start = names.index(from_layer)
        elif blocks <= 0:
            self.freeze_backbone()
            return 0
        elif self.from_scratch or self.feature_blocks == [self.block_count()]:  # the registry's last blocks
            bounds = self.block_boundaries()
            start = 0 if blocks >= len(bounds) else bounds[-blocks - 1] + 1
        else:  # the `blocks` numbered blocks up to the deepest one the head reads
            first = max(self.feature_blocks) - blocks
            start = 0 if first <= 0 else self._block_layers()[first - 1] + 1
        self.backbone.trainable = True
        # layers after the deepest block the head reads never reach the output: they stay frozen
        end = len(names) if self.from_scratch else self._block_layers()[max(self.feature_blocks) - 1]
        count = 0
        for index, layer in enumerate(self.backbone.layers):
            layer.trainable = start <= index <= end and not isinstance(layer, layers.BatchNormalization)
            count += int(layer.trainable and bool(layer.weights))
        log.info("unfroze %d weighted layers of %s from %s on", count, self.backbone.name, names[start])
        return count

    def trainable_blocks(self) -> list[list[keras.Variable]]:
        """The backbone's trainable variables grouped by block, the top block first (empty when frozen).

        Blocks are the registry's boundaries (or the numbered blocks up to the deepest the
        head reads, as `unfreeze` counts them); layers after the last boundary count with it.
        """
        if not self.backbone.trainable:
            return []
        last_blocks = self.from_scratch or self.feature_blocks == [self.block_count()]
        ends = self.block_boundaries() if last_blocks else self._block_layers()
        groups: dict[int, list[keras.Variable]] = {}
        for index, layer in enumerate(self.backbone.layers):
            if layer.trainable and layer.trainable_weights:
                block = min(bisect.bisect_left(ends, index), len(ends) - 1)
                groups.setdefault(block, []).extend(layer.trainable_weights)
        return [groups[block] for block in sorted(groups, reverse=True)]

    def batchnorm_layers(self) -> list[layers.BatchNormalization]:
        """The backbone's BatchNormalization layers."""
        return [layer for layer in self.backbone.layers if isinstance(layer, layers.BatchNormalization)]

    # --- saving ---

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.layers.serialize(self.backbone),
            "backbone_name": self.backbone_name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "pooling": self.pooling,
            "dropout": self.dropout,
            "hidden_units": self.hidden_units,
            "l2": self.l2,
            "max_norm": self.max_norm,
            "binary": self.binary,
            "from_scratch": self.from_scratch,
            "feature_blocks": self.feature_blocks,
            "normalize": self.normalize,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransferClassifier:
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)


def build_classifier(config: ModelConfig, num_classes: int, seed: int | None = None,
                     backbone: keras.Model | None = None,
                     feature_blocks: list[int] | None = None,
                     normalize: bool | None = None) -> TransferClassifier:
    """The classifier that `config` describes: backbone from the registry (with its weights) and head.

    The backbone starts frozen unless the config trains from scratch. `seed` fixes
    the head's initial weights and dropout masks (see `TransferClassifier`), and a randomly
    initialised backbone's weights (`seed_initialisation`): the same seed builds the same
    classifier in every process, and no global random generator is seeded.
    `backbone` reuses one already built for this config (a search's frozen base,
    shared by its head-only trials) instead of building it again.
    `feature_blocks` are the blocks the head reads, when `config.features` names
    no blocks itself ("auto" is chosen by a run, see `kerastl.features.probe`; until then,
    and for "last", the head reads the backbone's output). `normalize` (default:
    unless training from scratch) gives the head its standardisation layer; run
    folders written before it existed are rebuilt without.
    """
    config.validate()
    spec = get_spec(config.backbone)
    size = resolve_size(spec, config.image_size)
    check_classes(num_classes, config.binary)  # before the backbone, which may take a while to build
    if backbone is None:
        backbone = build_backbone(spec.name, size, config.weights)
        if config.weights is None and seed is not None:
            seed_initialisation(backbone, seed)
    scratch = config.trains_from_scratch
    mode = parse_features(config.features)
    if not scratch and feature_blocks is None and mode == "all":
        feature_blocks = list(range(1, len(numbered_blocks(backbone, spec.name)) + 1))
    elif not scratch and feature_blocks is None and isinstance(mode, tuple):
        feature_blocks = list(mode)
    return TransferClassifier(
        backbone, spec.name, num_classes, size,
        pooling=config.pooling, dropout=config.dropout, hidden_units=config.hidden_units, binary=config.binary,
        l2=config.l2, max_norm=config.max_norm,
        from_scratch=scratch, feature_blocks=None if scratch else feature_blocks,
        normalize=not scratch if normalize is None else normalize, seed=seed,
    )
