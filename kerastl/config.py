"""Configuration: one dataclass per concern, each round-tripping to JSON.

A config file sets defaults, CLI flags override them, and the resolved config is
written beside every model and run. Every field is a `kerastl.settings.setting`: its
help, command-line kind, search order and whether it belongs to the machine rather than
the experiment live beside its default, and the flags, the search space and the run
digest are derived from them (`SETTINGS`).

The head and fine-tuning phases are two `PhaseConfig`s of `TrainConfig`, and the
validation settings one `ValidationConfig`. Their 0.2 names (`epochs`,
`fine_tune_epochs`, `validation="cv"`, ...) are still accepted, as keywords, attributes
and JSON keys: every `config.json` and `search.json` written by 0.1 and 0.2 still loads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerastl.choices import (LOSSES, SAMPLING, SCHEDULES, VALIDATION_MODES, normalize_weights, parse_augment,
                             parse_class_weight, parse_features)
from kerastl.devices import DeviceConfig
from kerastl.errors import KerastlError
from kerastl.settings import (
    JsonConfig,
    Setting,
    dict_at,
    group,
    read_config_file,
    read_json,
    setting,
    settings_of,
)


@dataclass
class DataConfig(JsonConfig):
    """Where images come from and how they are batched (see `SETTINGS` for each field's meaning)."""

    source: str = setting("", "class folder, CSV file (path and label columns, optional split), cifar10, a "
                          "cifar-10-batches-py folder, or digits", name="data", metavar="SRC", shown="")
    validation_dir: str | None = setting(None, "separate validation class folder", metavar="DIR")
    test_dir: str | None = setting(None, "separate test class folder", metavar="DIR")
    validation_split: float = setting(0.2, "fraction held out per class", kind="fraction", metavar="F")
    test_split: float = setting(0.0, "fraction held out for testing", kind="fraction", metavar="F")
    batch_size: int = setting(32, "batch size", kind="count:1", metavar="N", search=19)
    augment: str = setting("light", "none, light, standard, strong, randaugment, augmix, mixup, cutmix, or layers "
                           "such as flip,rotate:0.2,mixup:0.2", metavar="PRESET", search=17)
    seed: int = setting(42, "random seed for splits, shuffling, augmentation", kind="int", metavar="N")
    cache_limit_mb: int = setting(2048, "the memory kerastl may hold data in, in MB: decoded images are cached "
                                  "while they fit it, larger cached features are memory-mapped", kind="count:0",
                                  machine=True, hidden=True)
    strict: bool = setting(False, "fail before training if any file cannot be read as an image (off: skip it, "
                           "with a warning)", kind="bool", shown="")

    def validate(self) -> None:
        for name in ("validation_split", "test_split"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise KerastlError(f"{name} must be in [0, 1), got {value}")
        if self.validation_split + self.test_split >= 1.0:
            raise KerastlError("validation_split + test_split must leave some training data")
        if self.batch_size < 1:
            raise KerastlError(f"batch_size must be at least 1, got {self.batch_size}")
        parse_augment(self.augment)


@dataclass
class ModelConfig(JsonConfig):
    """The classifier: backbone plus head. `weights=None` trains from scratch; `from_scratch`
    None means "when weights is None"; `features` says where the head reads the backbone
    ("auto": linear probes choose, see `kerastl.features.probe`)."""

    backbone: str = setting("mobilenet_v2", "registry name, see `kerastl backbones`", metavar="NAME", search=1)
    weights: str | None = setting("imagenet", "imagenet, none (train from scratch) or a weights file", metavar="W")
    image_size: int | None = setting(None, "input size", kind="count:1", metavar="N", shown="the backbone's default",
                                     search=2)
    pooling: str = setting("avg", "global pooling of the feature map", kind="choice", choices=("avg", "max"),
                           search=4)
    dropout: float = setting(0.2, "dropout before the classifier", kind="fraction", metavar="F", search=5)
    hidden_units: int = setting(0, "Dense hidden layer size; 0 for none", kind="count:0", metavar="N", search=6)
    binary: bool = setting(False, "one sigmoid unit for two classes instead of a softmax", kind="bool", shown="")
    from_scratch: bool | None = setting(None, "train every layer from the start", kind="bool", hidden=True)
    features: str = setting("auto", "what the head reads: last (the backbone's output), all (every block), block "
                            "numbers such as 3,7, or auto (linear probes choose)", kind="features", metavar="SPEC",
                            search=3)
    l2: float = setting(0.0, "L2 penalty on the head's Dense kernels", kind="nonneg", metavar="W", search=15)
    max_norm: float = setting(0.0, "max-norm constraint on the head's Dense kernels; 0 for none", kind="nonneg",
                              metavar="N", search=16)

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


@dataclass
class PhaseConfig(JsonConfig):
    """One training phase: the head on a frozen base, or fine-tuning the top of the backbone.

    Its budget is `epochs` and `min_steps` optimizer steps, whichever is more (epochs are raised to reach
    the steps, patience with them; not for a linear head from the probe); `schedule` shapes its rate,
    which is `lr_ratio` times `TrainConfig.learning_rate`.
    """

    epochs: int = setting(10, "epochs at the least", kind="count:0", metavar="N")
    min_steps: int = setting(300, "optimizer steps at the least, however small the data", kind="count:0",
                             metavar="N")
    schedule: str = setting("constant", "learning-rate schedule: constant, cosine (with warmup) or plateau "
                            "(ReduceLROnPlateau)", kind="choice", choices=SCHEDULES)
    lr_ratio: float = setting(1.0, "learning rate as a fraction of --learning-rate", kind="positive", metavar="R")


@dataclass
class ValidationConfig(JsonConfig):
    """How a run validates: "holdout" (the validation split), "cv" (k-fold cross-validation on every
    labelled image, then training on them all), or "auto": cv when the smallest class has fewer than
    `cv_below` labelled images (training plus validation), holdout otherwise."""

    mode: str = setting("auto", "holdout: the validation split; cv: k-fold cross-validation on every labelled "
                        "image; auto: cv when a class has fewer than --cv-below images", kind="choice",
                        name="validation", choices=VALIDATION_MODES)
    cv_below: int = setting(30, "images per class under which auto cross-validates", kind="count:0", metavar="N")
    cv_folds: int = setting(5, "cross-validation folds", kind="count:2", metavar="K")


def _head() -> PhaseConfig:
    return PhaseConfig(epochs=10, min_steps=300)


def _fine_tune() -> PhaseConfig:
    return PhaseConfig(epochs=10, min_steps=100, lr_ratio=0.1)


@dataclass
class TrainConfig(JsonConfig):
    """Two-phase training: the head on a frozen base (`head`), then fine-tuning the top blocks
    (`fine_tune`), validated as `validation` says. See `SETTINGS` for every field's meaning.

    The 0.2 names of the phases' and the validation's settings work as keywords and attributes:
    `TrainConfig(epochs=5, fine_tune_epochs=0, validation="cv")`, `config.fine_tune_lr_ratio`.
    """

    head: PhaseConfig = group(PhaseConfig, _head, group="training", fields={
        "epochs": {"help": "phase-1 epochs at the least, base frozen", "kind": "count:1", "search": 20},
        "min_steps": {"help": "phase-1 optimizer steps at the least, however small the data (from the probe: none)"},
        "schedule": {"help": "phase-1 learning-rate schedule: constant, cosine (with warmup) or plateau "
                     "(ReduceLROnPlateau)", "search": 13},
        "lr_ratio": {"hidden": True}})
    fine_tune: PhaseConfig = group(PhaseConfig, _fine_tune, "fine_tune_", group="training", fields={
        "epochs": {"help": "phase-2 epochs at the least; 0 skips", "search": 23},
        "min_steps": {"help": "phase-2 steps at the least"},
        "schedule": {"help": "phase-2 learning-rate schedule", "search": 24},
        "lr_ratio": {"help": "phase-2 LR as a fraction", "search": 22}})
    unfreeze_blocks: int | str = setting("auto", "backbone blocks phase 2 trains, or auto: read off the probe curve",
                                         kind="blocks", metavar="K", search=21)
    unfreeze_from: str | None = setting(None, "or: train phase 2 from this backbone layer on", metavar="LAYER")
    optimizer: str = setting("adam", "Keras optimizer name", metavar="NAME", search=7)
    loss: str = setting("auto", f"{', '.join(LOSSES)}; what each is: docs/recipes.md", kind="choice",
                        choices=tuple(LOSSES), metavar="NAME", search=10)
    learning_rate: float = setting(1e-3, "phase-1 learning rate", kind="positive", metavar="LR", search=8)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", kind="fraction", metavar="F", search=9)
    weight_decay: float = setting(0.0, "decoupled weight decay", kind="nonneg", metavar="W", search=18)
    class_weight: str = setting("none", "none; auto (n / (k * count) per class); or by hand, cat=2,dog=1 or 2,1 in "
                                "class order", kind="class_weight", metavar="W", search=11)
    sampling: str = setting("shuffle", "shuffle: every image once per epoch; balanced: classes drawn equally often",
                            kind="choice", choices=SAMPLING, search=12)
    warmup: float = setting(0.1, "share of a cosine schedule's steps warming up", kind="fraction", metavar="F",
                            search=14)
    layer_decay: float = setting(1.0, "discriminative rates in phase 2: each unfrozen block down learns D times "
                                 "the one above (1: one rate)", kind="decay", metavar="D", shown="", search=25)
    gradual_unfreeze: bool = setting(False, "phase 2 opens the unfrozen blocks one at a time, the top first",
                                     kind="bool", search=26)
    patience: int = setting(5, "EarlyStopping patience in epochs", kind="count:0", metavar="N")
    feature_cache: bool = setting(True, "train the head on cached backbone features while the base is frozen",
                                  kind="bool", name="cache", group="feature cache")
    cache_views: int = setting(4, "views per image when augmenting: plain + K-1 augmented; epoch e reads view e %% K",
                               kind="count:1", metavar="K", group="feature cache")
    cache_dir: str | None = setting(None, "feature cache folder", metavar="DIR", shown="~/.cache/kerastl",
                                    machine=True, group="feature cache")
    validation: ValidationConfig = group(ValidationConfig, ValidationConfig, group="validation")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "validation" and isinstance(value, str):  # 0.2: validation="cv" sets the mode
            self.validation.mode = value
            return
        super().__setattr__(name, value)  # the other 0.2 names are properties (`_ALIASES`)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Also reads 0.1 and 0.2 `train` sections, whose phase and validation settings were flat."""
        values = dict(values)
        legacy = _legacy(values)
        config = super().from_dict(values)
        for name, value in legacy.items():
            setattr(config, name, value)
        return config

    def validate(self) -> None:
        if self.unfreeze_blocks != "auto" and not isinstance(self.unfreeze_blocks, int):
            raise KerastlError(f"unfreeze_blocks must be a whole number or auto, got {self.unfreeze_blocks!r}")
        numbers = ("epochs", "min_steps", "fine_tune_epochs", "fine_tune_min_steps", "patience", "cv_below")
        for name in (*numbers, *(("unfreeze_blocks",) if self.unfreeze_blocks != "auto" else ())):
            if getattr(self, name) < 0:
                raise KerastlError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.validation.mode not in VALIDATION_MODES:
            raise KerastlError(f"validation must be one of {list(VALIDATION_MODES)}, got {self.validation.mode!r}")
        if self.cv_folds < 2:
            raise KerastlError(f"cv_folds must be at least 2, got {self.cv_folds}")
        if self.cache_views < 1:
            raise KerastlError(f"cache_views must be at least 1, got {self.cache_views}")
        if self.epochs < 1:
            raise KerastlError("epochs must be at least 1")
        if self.learning_rate <= 0 or self.fine_tune_lr_ratio <= 0 or self.head.lr_ratio <= 0:
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
        return self.fine_tune.epochs > 0 and (blocks or bool(self.unfreeze_from))


# the 0.2 flat names of the phases' and the validation's settings -> (TrainConfig field, its field)
_ALIASES = {"epochs": ("head", "epochs"), "min_steps": ("head", "min_steps"), "schedule": ("head", "schedule"),
            "fine_tune_epochs": ("fine_tune", "epochs"), "fine_tune_min_steps": ("fine_tune", "min_steps"),
            "fine_tune_schedule": ("fine_tune", "schedule"), "fine_tune_lr_ratio": ("fine_tune", "lr_ratio"),
            "cv_below": ("validation", "cv_below"), "cv_folds": ("validation", "cv_folds")}


def flat_train(values: dict[str, Any]) -> dict[str, Any]:
    """A `train` section (a dict, as `config.json` holds it) in the 0.2 layout, whatever wrote it:
    the phases' and the validation's settings under their flat names (`fine_tune_epochs`,
    `validation`, `cv_folds`). The head's `lr_ratio` is kept only when it is not 1 (0.2 had none)."""
    values = dict(values)
    for name, (part, field_name) in _ALIASES.items():
        if isinstance(values.get(part), dict) and field_name in values[part]:
            values[name] = values[part][field_name]
    for part in ("head", "fine_tune"):
        inner = values.pop(part, None)
        if isinstance(inner, dict) and part == "head" and inner.get("lr_ratio", 1.0) != 1.0:
            values["head_lr_ratio"] = inner["lr_ratio"]
    if isinstance(values.get("validation"), dict):
        values["validation"] = values["validation"].get("mode", "auto")
    return values


def _alias(part: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value))


for _name, (_part, _field) in _ALIASES.items():
    setattr(TrainConfig, _name, _alias(_part, _field))
_dataclass_init = TrainConfig.__init__


def _legacy(values: dict[str, Any]) -> dict[str, Any]:
    """Takes the 0.2 flat names (and a `validation` mode given as text) out of `values`."""
    legacy = {name: values.pop(name) for name in list(values) if name in _ALIASES}
    if isinstance(values.get("validation"), str):
        legacy["validation"] = values.pop("validation")
    return legacy


def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    legacy = _legacy(kwargs)
    _dataclass_init(self, *args, **kwargs)
    for name, value in legacy.items():
        setattr(self, name, value)


_init.__signature__ = inspect.signature(_dataclass_init)  # type: ignore[attr-defined]
TrainConfig.__init__ = _init  # type: ignore[method-assign]


# keys that kerastl 0.1 wrote into a search export's config.json (0.2 keeps them in tune.json), and the
# plan a run records there: what it chose, not a setting (the config alone reproduces the run)
LEGACY_KEYS = ("tune", "best_trial", "plan")


@dataclass
class RunConfig(JsonConfig):
    """Everything one training run needs; written as `config.json` beside its outputs.

    A search's own settings live in `kerastl.tune.config.TuneConfig`, saved as
    `tune.json` beside a search's export.

    Attributes:
        name: the run's name; the default export folder is `saved_models/<name>`.
        export_dir: where the run's SavedModel and files go.
    """

    data: DataConfig = group(DataConfig, DataConfig, group="data")
    model: ModelConfig = group(ModelConfig, ModelConfig, group="model")
    train: TrainConfig = group(TrainConfig, TrainConfig, group="training")
    devices: DeviceConfig = group(DeviceConfig, DeviceConfig, group="devices")
    name: str = setting("", "run name", shown="backbone-date-time")
    export_dir: str | None = setting(None, "output folder", name="export", metavar="DIR", shown="saved_models/NAME")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        values = {key: value for key, value in values.items() if key not in LEGACY_KEYS}
        parts = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "devices": DeviceConfig}
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
        self.devices.validate()

    def experiment_dict(self) -> dict[str, Any]:
        """`to_dict` without the machine's settings (cache folder, memory budget): what `config.json`
        records and the run digest covers, so another machine's folders are not carried along."""
        return _machine_settings(self.to_dict(), drop=True)

    def digest(self) -> str:
        """A digest of the experiment this (resolved) config sets, not of its name, folder or machine settings
        (another `--cache-dir` finds the same unfinished run). It is taken over the 0.2 layout (`flat_train`)
        with the machine's settings at their defaults, so that a run 0.2 left unfinished resumes (and only the
        device settings that change what it learns: `DeviceConfig.learned`)."""
        values = {**_machine_settings(self.to_dict(), drop=False), "devices": self.devices.learned()}
        values = {key: value for key, value in values.items() if value is not None}
        values["train"] = flat_train(values["train"])
        values.pop("name", None)
        values.pop("export_dir", None)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def trains_head_only(self) -> bool:
        """Whether the run trains the head alone on cached features, never running or changing the backbone."""
        return self.train.feature_cache and not self.model.trains_from_scratch and not self.train.wants_fine_tuning

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.experiment_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_json(path, "config file"))

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """A run config from a JSON or TOML file (see `read_config_file`); a `tune` table is left
        to `kerastl.tune.config.TuneConfig`."""
        return cls.from_dict(read_config_file(path))


def _machine_settings(values: dict[str, Any], drop: bool) -> dict[str, Any]:
    """`values` (a `RunConfig.to_dict`) with the machine's settings dropped, or set to their defaults."""
    for item in SETTINGS.values():
        if item.machine:
            inner, key = dict_at(values, item)
            inner.pop(key, None)
            inner.update({} if drop else {key: item.default})
    return values


# setting name -> `Setting`: the one table that the command line's flags, the search space's names
# and the run digest read (derived from the fields above, see `kerastl.settings`)
SETTINGS: dict[str, Setting] = settings_of(RunConfig)
