"""Configuration: one dataclass per concern, each round-tripping to JSON.

A config file sets defaults, CLI flags override them, and the resolved config is
written beside every model and run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerastl.errors import KerastlError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_SUFFIXES = (".json", ".toml")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's value; a missing or malformed file is a one-line `KerastlError` naming `what`."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KerastlError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise KerastlError(f"{what} {path} is not valid JSON: {error}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's values: JSON (`.json`) or TOML (`.toml`, tables `[data]`, `[model]`, `[train]`,
    and `[tune]` for a search). TOML has no null: a key left out keeps its default, and
    `weights = "none"` trains from scratch. A bad file is a one-line `KerastlError`."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise KerastlError(f"config file {path} must end in .json or .toml")
    if path.suffix.lower() == ".json":
        values = read_json(path, "config file")
    else:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise KerastlError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise KerastlError(f"config file {path} is not valid TOML: {error}") from None
    if not isinstance(values, dict):
        raise KerastlError(f"config file {path} must hold an object of settings, not {type(values).__name__}")
    return values


def normalize_weights(weights: str | None) -> str | None:
    """None for "none" (any case) or an empty string; other values unchanged."""
    return None if weights is None or weights.strip().lower() in ("none", "") else weights


class JsonConfig:
    """`to_dict`/`from_dict` for flat dataclasses; unknown keys are an error, not ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KerastlError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
        return cls(**values)


@dataclass
class DataConfig(JsonConfig):
    """Where images come from and how they are batched.

    Attributes:
        source: a folder with one subfolder per class, a CSV file of path and label
            columns (an optional split column; see `kerastl.sources.from_csv`), an extracted
            `cifar-10-batches-py` folder, "cifar10" (downloaded) or "digits".
        validation_dir: a separate validation folder; otherwise `validation_split`
            of each class is held out.
        test_dir: a separate test folder; otherwise `test_split` of each class.
        augment: a preset ("none", "light", "standard", "strong") or a comma list
            of layer names, each optionally with a factor ("flip,rotate:0.2").
        cache_limit_mb: the memory kerastl may hold data in, in MB: decoded training and
            validation images are cached in memory while they fit it together, and
            cached features larger than it are memory-mapped from disk, never read in.
        strict: fail before training when any file in a class folder cannot be read
            as an image; otherwise such files are skipped with one warning listing them.
    """

    source: str = ""
    validation_dir: str | None = None
    test_dir: str | None = None
    validation_split: float = 0.2
    test_split: float = 0.0
    batch_size: int = 32
    augment: str = "light"
    seed: int = 42
    cache_limit_mb: int = 2048
    strict: bool = False

    def validate(self) -> None:
        for name in ("validation_split", "test_split"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise KerastlError(f"{name} must be in [0, 1), got {value}")
        if self.validation_split + self.test_split >= 1.0:
            raise KerastlError("validation_split + test_split must leave some training data")
        if self.batch_size < 1:
            raise KerastlError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class ModelConfig(JsonConfig):
    """The classifier: backbone plus head.

    Attributes:
        backbone: registry name (see `kerastl.list_backbones()`).
        weights: "imagenet", None (train from scratch) or a weights file path.
        image_size: square input size of the backbone; the registry default when None.
        from_scratch: train every layer from the start, BatchNorm learning its
            statistics; None means "when weights is None".
        binary: one sigmoid unit instead of a softmax (two classes only).
        l2: L2 penalty on the head's Dense kernels (0 is none).
        max_norm: a max-norm constraint on the head's Dense kernels: each unit's incoming
            weight vector is rescaled to at most this norm after every step (0 is none).
        features: where the head reads the backbone: "last" (its output), "all"
            (every block's pooled output, concatenated), block numbers "3,7"
            (1 is the first block, `kerastl backbones --blocks NAME` lists them;
            the backbone's output is the last number), or "auto": linear probes on
            the cached features choose among the single blocks and "all", keeping
            the last unless another reads clearly better (see `kerastl.probe`).
    """

    backbone: str = "mobilenet_v2"
    weights: str | None = "imagenet"
    image_size: int | None = None
    pooling: str = "avg"
    dropout: float = 0.2
    hidden_units: int = 0
    binary: bool = False
    from_scratch: bool | None = None
    features: str = "auto"
    l2: float = 0.0
    max_norm: float = 0.0

    def __post_init__(self) -> None:
        self.weights = normalize_weights(self.weights)  # "none" in a config file (TOML has no null)

    @property
    def trains_from_scratch(self) -> bool:
        return self.weights is None if self.from_scratch is None else self.from_scratch

    def validate(self) -> None:
        if self.pooling not in ("avg", "max"):
            raise KerastlError(f"pooling must be avg or max, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise KerastlError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_units < 0:
            raise KerastlError(f"hidden_units must be 0 or more, got {self.hidden_units}")
        if self.l2 < 0 or self.max_norm < 0:
            raise KerastlError(f"l2 and max_norm must be 0 or more, got {self.l2} and {self.max_norm}")
        parse_features(self.features)


FEATURE_MODES = ("last", "auto", "all")


def parse_features(text: str) -> str | tuple[int, ...]:
    """ "last", "auto" or "all", or a tuple of block numbers (1 or more, ascending) from "3,7"."""
    text = str(text).strip().lower()
    if text in FEATURE_MODES:
        return text
    try:
        blocks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        blocks = ()
    if not blocks or blocks[0] < 1:
        raise KerastlError(f"features must be last, auto, all or block numbers from 1 such as 3,7; got {text!r}")
    return blocks


@dataclass
class TrainConfig(JsonConfig):
    """Two-phase training: frozen base, then fine-tuning the top blocks.

    Attributes:
        epochs: phase-1 epochs at the least (head only; the whole network when from scratch).
        min_steps: phase 1 runs at least this many optimizer steps, however small the
            data: epochs are raised to reach it (and patience with them).
        fine_tune_epochs: phase-2 epochs at the least; 0 skips fine-tuning.
        fine_tune_min_steps: phase 2 runs at least this many steps (epochs raised to reach it).
        unfreeze_blocks: how many of the backbone's last blocks phase 2 trains, or
            "auto": chosen from the probe curve (the blocks after the best-reading one).
        unfreeze_from: alternatively, the layer name from which phase 2 trains.
        optimizer: a Keras optimizer name ("adam", "sgd", "adamw", ...).
        loss: one of `LOSSES` (`kerastl train --help` lists them); "auto" is sparse
            categorical cross-entropy (categorical when labels are mixed or smoothed), or
            binary cross-entropy for a one-unit sigmoid model.
        class_weight: "none", "auto" (n / (k * count_c) for k classes, n images), or weights
            by hand: "cat=2,dog=1" (by class name) or "2,1" (in class order).
        sampling: "shuffle" (every image once per epoch) or "balanced" (each batch draws
            the classes equally often, rare classes' images repeating).
        schedule: phase 1's learning-rate schedule, one of `SCHEDULES`: "constant",
            "cosine" (cosine decay to 0 over the phase's step budget after a linear warmup
            of `warmup` of it) or "plateau" (Keras's ReduceLROnPlateau on validation loss).
        fine_tune_schedule: phase 2's schedule, the same choices.
        warmup: the share of a cosine schedule's steps spent warming up from 0.
        layer_decay: discriminative learning rates in phase 2: the top unfrozen block
            learns at `layer_decay` times the head's rate, the next at its square, and
            so on (1 is one rate for all).
        gradual_unfreeze: phase 2 opens the unfrozen blocks one at a time, the top block
            first, an equal share of the phase's epochs apart (ULMFiT's gradual unfreezing).
        fine_tune_lr_ratio: phase-2 learning rate as a fraction of `learning_rate`.
        label_smoothing: cross-entropy label smoothing (0 is none).
        weight_decay: decoupled weight decay of the optimizer (0 is none).
        patience: EarlyStopping patience on validation loss, in epochs.
        feature_cache: while the base is frozen, train the head on backbone features
            computed once (see `kerastl.features`) instead of running the base every epoch.
        cache_views: with augmentation on, how many augmented views of each image the
            cache holds; epoch e trains on view e % cache_views.
        cache_dir: where cached features live (default `kerastl.features.default_cache_dir()`).
        validation: "holdout" (stop and choose on the validation split), "cv" (k-fold
            cross-validation on every labelled image, then train on them all), or
            "auto": cv when the smallest class has fewer than `cv_below` labelled
            images (training plus validation), holdout otherwise.
        cv_below: the per-class count under which "auto" cross-validates.
        cv_folds: folds of the cross-validation (fewer when a class has fewer images).
    """

    epochs: int = 10
    min_steps: int = 300
    fine_tune_epochs: int = 10
    fine_tune_min_steps: int = 100
    unfreeze_blocks: int | str = "auto"
    unfreeze_from: str | None = None
    optimizer: str = "adam"
    loss: str = "auto"
    learning_rate: float = 1e-3
    fine_tune_lr_ratio: float = 0.1
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    class_weight: str = "none"
    sampling: str = "shuffle"
    schedule: str = "constant"
    fine_tune_schedule: str = "constant"
    warmup: float = 0.1
    layer_decay: float = 1.0
    gradual_unfreeze: bool = False
    patience: int = 5
    feature_cache: bool = True
    cache_views: int = 4
    cache_dir: str | None = None
    validation: str = "auto"
    cv_below: int = 30
    cv_folds: int = 5

    def validate(self) -> None:
        if self.unfreeze_blocks != "auto" and not isinstance(self.unfreeze_blocks, int):
            raise KerastlError(f"unfreeze_blocks must be a whole number or auto, got {self.unfreeze_blocks!r}")
        numbers = ("epochs", "min_steps", "fine_tune_epochs", "fine_tune_min_steps", "patience", "cv_below")
        for name in (*numbers, *(("unfreeze_blocks",) if self.unfreeze_blocks != "auto" else ())):
            if getattr(self, name) < 0:
                raise KerastlError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.validation not in VALIDATION_MODES:
            raise KerastlError(f"validation must be one of {list(VALIDATION_MODES)}, got {self.validation!r}")
        if self.cv_folds < 2:
            raise KerastlError(f"cv_folds must be at least 2, got {self.cv_folds}")
        if self.cache_views < 1:
            raise KerastlError(f"cache_views must be at least 1, got {self.cache_views}")
        if self.epochs < 1:
            raise KerastlError("epochs must be at least 1")
        if self.learning_rate <= 0 or self.fine_tune_lr_ratio <= 0:
            raise KerastlError("learning_rate and fine_tune_lr_ratio must be positive")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise KerastlError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0:
            raise KerastlError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.loss not in LOSSES:
            raise KerastlError(f"unknown loss {self.loss!r}; losses: {', '.join(LOSSES)}")
        for name in ("schedule", "fine_tune_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise KerastlError(f"{name} must be one of {', '.join(SCHEDULES)}, got {getattr(self, name)!r}")
        if self.sampling not in SAMPLING:
            raise KerastlError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise KerastlError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise KerastlError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        parse_class_weight(self.class_weight)

    @property
    def wants_fine_tuning(self) -> bool:
        """Whether phase 2 has epochs and something to unfreeze (blocks or a layer name)."""
        blocks = self.unfreeze_blocks == "auto" or self.unfreeze_blocks > 0
        return self.fine_tune_epochs > 0 and (blocks or bool(self.unfreeze_from))


VALIDATION_MODES = ("auto", "holdout", "cv")

# loss name -> what it is (the losses themselves are built by `kerastl.losses`)
LOSSES = {
    "auto": "cross-entropy: sparse categorical, or binary for a one-unit sigmoid model",
    "sparse_categorical_crossentropy": "Keras's cross-entropy on integer labels",
    "categorical_crossentropy": "cross-entropy on one-hot or mixed labels (integer labels are one-hot encoded)",
    "focal": "categorical focal loss (Keras's, gamma 2, alpha 0.25): down-weights easy examples",
    "binary_crossentropy": "sigmoid cross-entropy, for a binary (one-unit) model",
    "binary_focal": "binary focal loss (Keras's, gamma 2), for a binary (one-unit) model",
}
SCHEDULES = ("constant", "cosine", "plateau")
SAMPLING = ("shuffle", "balanced")
CLASS_WEIGHT_MODES = ("none", "auto")
# classes count as imbalanced when the largest has more than this many times the smallest's images:
# data.json warns, and a search's default objective becomes val_macro_f1
IMBALANCE_RATIO = 3.0


def parse_class_weight(text: str) -> str | dict[str, float] | list[float]:
    """ "none", "auto", {class name: weight} from "cat=2,dog=1", or [weights] in class order from "2,1"."""
    text = str(text).strip()
    if text.lower() in CLASS_WEIGHT_MODES:
        return text.lower()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        if parts and all("=" in part for part in parts):
            weights: dict[str, float] | list[float] = {
                name.strip(): float(value) for name, value in (part.rsplit("=", 1) for part in parts)}
            values = list(weights.values())
        else:
            weights = values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or min(values) < 0 or max(values) == 0:
        raise KerastlError(f"class_weight must be none, auto, weights by class such as cat=2,dog=1 or in class "
                           f"order such as 2,1 (0 or more, not all 0); got {text!r}")
    return weights

# the scores a search may optimise, and their direction (the search wing and the reports read it)
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min", "val_macro_f1": "max", "val_auc": "max"}

# keys that kerastl 0.1 wrote into a search export's config.json; 0.2 keeps them in tune.json
LEGACY_KEYS = ("tune", "best_trial")


@dataclass
class RunConfig(JsonConfig):
    """Everything one training run needs; written as `config.json` beside its outputs.

    A search's own settings live in `kerastl.tune.config.TuneConfig`, saved as
    `tune.json` beside a search's export.

    Attributes:
        name: the run's name; the default export folder is `saved_models/<name>`.
        export_dir: where the run's SavedModel and files go.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""
    export_dir: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        values = {key: value for key, value in values.items() if key not in LEGACY_KEYS}
        parts = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        nested = {key: kind.from_dict(values.pop(key, {})) for key, kind in parts.items()}
        known = {"name", "export_dir"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KerastlError(f"unknown config keys {unknown}; known keys: {sorted(known | set(parts))}")
        return cls(**nested, **values)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.train.validate()

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_json(path, "config file"))

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """A run config from a JSON or TOML file (see `read_config_file`); a `tune` table is left
        to `kerastl.tune.config.TuneConfig`."""
        return cls.from_dict(read_config_file(path))


# setting name -> (RunConfig section, or None for the run itself, field): the one table that
# the command line's flags and the search space's settings name the config by
SETTINGS: dict[str, tuple[str | None, str]] = {
    "data": ("data", "source"),
    "validation_dir": ("data", "validation_dir"),
    "test_dir": ("data", "test_dir"),
    "validation_split": ("data", "validation_split"),
    "test_split": ("data", "test_split"),
    "batch_size": ("data", "batch_size"),
    "augment": ("data", "augment"),
    "seed": ("data", "seed"),
    "strict": ("data", "strict"),
    "backbone": ("model", "backbone"),
    "weights": ("model", "weights"),
    "image_size": ("model", "image_size"),
    "dropout": ("model", "dropout"),
    "hidden_units": ("model", "hidden_units"),
    "pooling": ("model", "pooling"),
    "binary": ("model", "binary"),
    "features": ("model", "features"),
    "epochs": ("train", "epochs"),
    "min_steps": ("train", "min_steps"),
    "fine_tune_epochs": ("train", "fine_tune_epochs"),
    "fine_tune_min_steps": ("train", "fine_tune_min_steps"),
    "unfreeze_blocks": ("train", "unfreeze_blocks"),
    "unfreeze_from": ("train", "unfreeze_from"),
    "optimizer": ("train", "optimizer"),
    "loss": ("train", "loss"),
    "learning_rate": ("train", "learning_rate"),
    "fine_tune_lr_ratio": ("train", "fine_tune_lr_ratio"),
    "label_smoothing": ("train", "label_smoothing"),
    "weight_decay": ("train", "weight_decay"),
    "class_weight": ("train", "class_weight"),
    "sampling": ("train", "sampling"),
    "schedule": ("train", "schedule"),
    "fine_tune_schedule": ("train", "fine_tune_schedule"),
    "warmup": ("train", "warmup"),
    "layer_decay": ("train", "layer_decay"),
    "gradual_unfreeze": ("train", "gradual_unfreeze"),
    "l2": ("model", "l2"),
    "max_norm": ("model", "max_norm"),
    "patience": ("train", "patience"),
    "feature_cache": ("train", "feature_cache"),
    "cache_views": ("train", "cache_views"),
    "cache_dir": ("train", "cache_dir"),
    "validation": ("train", "validation"),
    "cv_below": ("train", "cv_below"),
    "cv_folds": ("train", "cv_folds"),
    "name": (None, "name"),
    "export": (None, "export_dir"),
}
