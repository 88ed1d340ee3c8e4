"""The vocabularies of the settings: the names a setting's value may take, and the parsers of
values written as text ("3,7", "cat=2,dog=1"). No TensorFlow; `kerastl.config` and the command
line read them.
"""

from __future__ import annotations

import difflib

from kerastl.errors import KerastlError


def normalize_weights(weights: str | None) -> str | None:
    """None for "none" (any case) or an empty string; other values unchanged."""
    return None if weights is None or weights.strip().lower() in ("none", "") else weights


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


VALIDATION_MODES = ("auto", "holdout", "cv")
SCHEDULES = ("constant", "cosine", "plateau")
SAMPLING = ("shuffle", "balanced")
QUANTIZE = ("none", "float16", "dynamic", "int8")  # LiteRT export (`kerastl.models.litert`)
CLASS_WEIGHT_MODES = ("none", "auto")
# loss name -> what it is (the losses themselves are built by `kerastl.training.losses`)
LOSSES = {
    "auto": "cross-entropy: sparse categorical, or binary for a one-unit sigmoid model",
    "sparse_categorical_crossentropy": "Keras's cross-entropy on integer labels",
    "categorical_crossentropy": "cross-entropy on one-hot or mixed labels (integer labels are one-hot encoded)",
    "focal": "categorical focal loss (Keras's, gamma 2, alpha 0.25): down-weights easy examples",
    "binary_crossentropy": "sigmoid cross-entropy, for a binary (one-unit) model",
    "binary_focal": "binary focal loss (Keras's, gamma 2), for a binary (one-unit) model",
}


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


def closest_name(wanted: str, names: list[str], separator: str = "-") -> str | None:
    """The known name closest to a mistyped one: by initials (`lr` for `learning-rate`), else by
    spelling (`image_size` for `image-size`); None when none is close. `separator` joins words."""
    prefix = wanted[: len(wanted) - len(wanted.lstrip("-"))]
    wanted = prefix + wanted[len(prefix):].replace("_" if separator == "-" else "-", separator).lower()
    initials = [name for name in names if name.startswith(prefix) and separator in name[len(prefix):]
                and prefix + "".join(word[:1] for word in name[len(prefix):].split(separator)) == wanted]
    guess = initials or difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
    return guess[0] if guess else None


# augmentation: image layer -> default strength; mixer (mixes labels too) -> default; presets (`kerastl.data.augment`)
AUGMENT_LAYERS = {"flip": 0.0, "vflip": 0.0, "rotate": 0.1, "zoom": 0.1, "translate": 0.1, "contrast": 0.2,
                  "brightness": 0.2, "randaugment": 0.5, "augmix": 0.3}
AUGMENT_MIXERS = {"mixup": 0.2, "cutmix": 1.0}
AUGMENT_PRESETS = {
    "none": "",
    "light": "flip,rotate:0.05,zoom:0.1",
    "standard": "flip,rotate:0.1,zoom:0.15,translate:0.1,contrast:0.1",
    "strong": "flip,randaugment:0.5,zoom:0.2",
    "randaugment": "flip,randaugment:0.5",
    "augmix": "flip,augmix:0.3",
    "mixup": "flip,rotate:0.05,zoom:0.1,mixup:0.2",
    "cutmix": "flip,rotate:0.05,zoom:0.1,cutmix:1.0",
}


def parse_augment(spec: str) -> list[tuple[str, float]]:
    """Parses a preset name or a comma list like "flip,rotate:0.2" into (name, factor) pairs."""
    spec = AUGMENT_PRESETS.get(spec, spec)
    pairs = []
    known = {**AUGMENT_LAYERS, **AUGMENT_MIXERS}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, factor = item.partition(":")
        if name not in known:
            close = closest_name(name, [*AUGMENT_PRESETS, *known], separator="_")
            hint = f" (did you mean {close}?)" if close else ""
            raise KerastlError(f"unknown augmentation {name!r}{hint}; presets: {', '.join(AUGMENT_PRESETS)}; "
                               f"layers: {', '.join(known)}")
        try:
            value = float(factor) if factor else known[name]
        except ValueError:
            raise KerastlError(f"augmentation factor {factor!r} for {name} is not a number") from None
        if value < 0:
            raise KerastlError(f"augmentation factor for {name} must be 0 or more, got {value}")
        if name in AUGMENT_MIXERS and value <= 0:
            raise KerastlError(f"augmentation factor for {name} must be above 0, got {value}")
        pairs.append((name, value))
    if sum(name in AUGMENT_MIXERS for name, _ in pairs) > 1:
        raise KerastlError(f"augmentation {spec!r} names more than one of {', '.join(AUGMENT_MIXERS)}: choose one")
    return pairs
