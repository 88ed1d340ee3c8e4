"""The search space: which run settings a search varies, and over which values.

A space maps setting names to one of:

- a list: a choice among those values (`[0, 128, 512]`, `["mobilenet_v2", "resnet50"]`);
- a range: `{"min": 1e-4, "max": 1e-2, "log": true}` or `{"min": 0, "max": 0.5, "step": 0.1}`
  (whole numbers give an integer range);
- a single value: fixed for every trial.

Settings the space leaves out keep the run config's value. On the command line
`--search name=a,b,c` is a choice, `name=lo:hi` or `name=lo:hi:log` or
`name=lo:hi:step` a range, and `name=value` a fixed value.
The fine-tuning settings are conditional on `unfreeze_blocks` > 0 when it is searched,
so a head-only trial carries no fine-tuning values.
"""

from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path
from typing import Any

from kerastl.config import RunConfig, read_json
from kerastl.errors import KerastlError
from kerastl.runs.run import checked_config
from kerastl.settings import set_setting
from kerastl.tune.config import SPACE_FIELDS

log = logging.getLogger(__name__)

TOGETHER = ("loss", "label_smoothing", "augment")  # the loss must take the labels the other two give
FINE_TUNE_SETTINGS = ("fine_tune_lr_ratio", "fine_tune_epochs", "fine_tune_schedule", "layer_decay",
                      "gradual_unfreeze")

DEFAULT_SPACE: dict[str, Any] = {
    "dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
    "hidden_units": [0, 128, 512],
    "learning_rate": {"min": 1e-4, "max": 1e-2, "log": True},
    "label_smoothing": [0.0, 0.1],
    "weight_decay": [0.0, 1e-4, 1e-3],
    "unfreeze_blocks": [0, 2, 4],
    "fine_tune_lr_ratio": {"min": 0.01, "max": 0.3, "log": True},
}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_setting(text: str) -> tuple[str, Any]:
    """`name=a,b` (choice), `name=lo:hi[:log|:step]` (range) or `name=value` (fixed)."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not spec:
        raise KerastlError(f"--search wants NAME=VALUES (`dropout=0.1,0.3`), got {text!r}")
    if "," in spec:
        return name, [_number(part) for part in spec.split(",") if part]
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise KerastlError(f"a range is lo:hi, lo:hi:log or lo:hi:step, got {spec!r}")
        entry = {"min": _number(parts[0]), "max": _number(parts[1])}
        if len(parts) == 3:
            entry.update({"log": True} if parts[2] == "log" else {"step": _number(parts[2])})
        return name, entry
    return name, _number(spec)


def load_space(path: str | Path) -> dict[str, Any]:
    """A space from a JSON file (an object of setting -> list, range or value)."""
    space = read_json(path, "space file")
    if not isinstance(space, dict):
        raise KerastlError(f"space file {path} must hold a JSON object")
    return space


def _is_range(entry: Any) -> bool:
    return isinstance(entry, dict)


def candidates(entry: Any) -> list[Any]:
    """The values to check for one entry: every choice, or both ends of a range."""
    if isinstance(entry, list):
        return list(entry)
    if _is_range(entry):
        return [entry["min"], entry["max"]]
    return [entry]


def check_space(space: dict[str, Any], base: RunConfig) -> dict[str, Any]:
    """A validated copy of `space`: known settings, well-formed entries, every value valid.

    Each choice and both ends of each range are applied to `base` and validated,
    so a bad value fails before the first trial, not in the middle of the search.
    """
    unknown = sorted(set(space) - set(SPACE_FIELDS))
    if unknown:
        raise KerastlError(f"unknown search settings {unknown}; known: {sorted(SPACE_FIELDS)}")
    checked = {}
    for name, entry in space.items():
        if isinstance(entry, list):
            if not entry:
                raise KerastlError(f"search setting {name} has an empty list of choices")
            if any(isinstance(v, float) for v in entry) and all(isinstance(v, (int, float)) for v in entry):
                entry = [float(v) for v in entry]  # KerasTuner choices hold one type
        elif _is_range(entry):
            extra = sorted(set(entry) - {"min", "max", "step", "log"})
            if extra or "min" not in entry or "max" not in entry:
                raise KerastlError(f"search range {name} needs min and max (and optionally step or log), got {entry}")
            if not all(isinstance(entry[k], (int, float)) for k in ("min", "max")) or entry["min"] > entry["max"]:
                raise KerastlError(f"search range {name} needs numbers with min <= max, got {entry}")
            if entry.get("log") and entry["min"] <= 0:
                raise KerastlError(f"a log range needs min > 0; {name} has min {entry['min']}")
        for value in candidates(entry):
            checked_config(apply_values({name: value}, base))
        checked[name] = entry
    together = [name for name in TOGETHER if name in checked]  # settings valid alone may clash together
    if len(together) > 1:
        for values in itertools.product(*(candidates(checked[name]) for name in together)):
            try:
                checked_config(apply_values(dict(zip(together, values)), base))
            except KerastlError as error:
                raise KerastlError(f"search settings {dict(zip(together, values))} cannot go together: {error}") \
                    from None
    blocks = candidates(checked.get("unfreeze_blocks", base.train.unfreeze_blocks))
    epochs = candidates(checked.get("fine_tune_epochs", base.train.fine_tune_epochs))
    if max(blocks) == 0 or max(epochs) == 0:  # no trial fine-tunes: those settings would only repeat trials
        for name in ("unfreeze_blocks", *FINE_TUNE_SETTINGS):
            if checked.pop(name, None) is not None:
                log.info("no trial fine-tunes (unfreeze_blocks or fine_tune_epochs is 0): not searching %s", name)
    return checked


def _block_values(entry: Any) -> list[int]:
    if _is_range(entry):
        return list(range(int(entry["min"]), int(entry["max"]) + 1, int(entry.get("step") or 1)))
    return [int(v) for v in candidates(entry)]


def _declare_one(hp, name: str, entry: Any):
    if isinstance(entry, list):
        return hp.Choice(name, entry, default=entry[0]) if len(entry) > 1 else hp.Fixed(name, entry[0])
    if not _is_range(entry):
        return hp.Fixed(name, entry)
    low, high, step, log = entry["min"], entry["max"], entry.get("step"), bool(entry.get("log"))
    if name == "unfreeze_blocks":  # a choice, so that fine-tuning settings can depend on it
        return hp.Choice(name, _block_values(entry))
    sampling = "log" if log else "linear"
    if all(isinstance(v, int) for v in (low, high)) and isinstance(step or 1, int):
        return hp.Int(name, low, high, step=None if log else (step or 1), sampling=sampling)
    return hp.Float(name, float(low), float(high), step=None if log else step, sampling=sampling)


def declare(hp, space: dict[str, Any]) -> dict[str, Any]:
    """Registers the space's hyperparameters on `hp`; returns this trial's values (None when inactive)."""
    values = {}
    blocks = space.get("unfreeze_blocks")
    blocks_vary = blocks is not None and len(_block_values(blocks)) > 1
    for name in SPACE_FIELDS:
        if name not in space:
            continue
        if name in FINE_TUNE_SETTINGS and blocks_vary:
            with hp.conditional_scope("unfreeze_blocks", [v for v in _block_values(blocks) if v > 0]):
                values[name] = _declare_one(hp, name, space[name])
        else:
            values[name] = _declare_one(hp, name, space[name])
    return values


def apply_values(values: dict[str, Any], base: RunConfig) -> RunConfig:
    """A copy of `base` with the given settings (None values, inactive ones, are skipped)."""
    config = copy.deepcopy(base)
    for name, value in values.items():
        if value is None or name not in SPACE_FIELDS:
            continue
        set_setting(config, SPACE_FIELDS[name], value)
    return config
