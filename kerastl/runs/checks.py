"""Checks of a run's input that need no TensorFlow, made before anything loads or trains.

`resolve_run_config` fills in the registry's defaults (size, canonical name) and the
run's name and folder; `check_run` adds every check the command line makes
before it imports TensorFlow: the data folder and its classes, the backbone, the
image size, the weights file, the export folder, and an unfinished run in it.
`kerastl.runs.run.run_training` makes the same checks, so the Python API fails as early.
The data source itself is checked by `kerastl.data.tables.check_data_source`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from kerastl.config import SETTINGS, ModelConfig, RunConfig, TrainConfig, normalize_weights
from kerastl.data.tables import check_data_source
from kerastl.models.backbones import check_weights, get_spec, resolve_size
from kerastl.runs.resume import RunState, unfinished_run
from kerastl.storage import check_export_dir

DEFAULT_EXPORT_ROOT = Path("saved_models")
# what only phase 2, or a head on a pretrained backbone, reads: nothing, when every layer trains from the start
FINE_TUNING_SETTINGS = ("fine_tune_epochs", "fine_tune_min_steps", "fine_tune_schedule", "fine_tune_lr_ratio",
                        "unfreeze_blocks", "unfreeze_from", "layer_decay", "gradual_unfreeze", "features")


def resolve_run_config(config: RunConfig, find_unfinished: bool = False) -> RunConfig:
    """A validated copy with registry defaults filled in (size, canonical name, folders).

    With `find_unfinished`, a run given neither a name nor a folder takes those of the unfinished run of
    the same config under `DEFAULT_EXPORT_ROOT`, if there is one: the same command finds its run.
    """
    named = bool(config.name or config.export_dir)
    config = copy.deepcopy(config)
    config.validate()
    config.model.weights = normalize_weights(config.model.weights)
    spec = get_spec(config.model.backbone)
    config.model.backbone = spec.name
    config.model.image_size = resolve_size(spec, config.model.image_size)
    check_weights(spec, config.model.weights)
    if not config.name:
        config.name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.export_dir is None:
        config.export_dir = str(DEFAULT_EXPORT_ROOT / config.name)
    found = None if named or not find_unfinished else unfinished_run(config.digest(), DEFAULT_EXPORT_ROOT)
    if found is not None:
        config.name, config.export_dir = found
    return config


def setting_notes(model: ModelConfig, train: TrainConfig) -> list[str]:
    """One line for each thing a user may not expect this run to do with its settings: a backbone
    name taken by a loose match, and settings that do nothing in this run (fine-tuning settings
    when every layer trains from scratch). Parameters are named `name=value`."""
    notes = []
    spec = get_spec(model.backbone)
    if model.backbone != spec.name:  # matched ignoring case, '_' and '-': say so, in case it was a typo
        notes.append(f"backbone {model.backbone}: using {spec.name}")
    weights, scratch = normalize_weights(model.weights), model.from_scratch
    if (weights is None) if scratch is None else scratch:  # the flags hold "none" until the config is resolved
        changed = []
        for name in FINE_TUNING_SETTINGS:
            first, *rest = SETTINGS[name].path
            value = {"model": model, "train": train}[first]
            for part in rest:
                value = getattr(value, part)
            if value != SETTINGS[name].default:
                changed.append(f"{name}={value}")
        if changed:
            why = "weights=None" if weights is None else "from_scratch=True"
            notes.append(f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} nothing in this run: with "
                         f"{why} every layer trains from the start, in one phase")
    return notes


def check_output(export_dir: str, chosen: bool, overwrite: bool) -> None:
    """The export folder can be written; the default root is created, a `chosen` folder's parent is not."""
    check_export_dir(export_dir, overwrite, create_parent=not chosen)


def check_run(config: RunConfig, overwrite: bool = False, restart: bool = False) -> RunConfig:
    """Every check of a training run that needs no TensorFlow; returns the resolved config.

    Raises a one-line `KerastlError` for: a missing data folder, one class, a class
    without images, an unknown backbone, a size below the backbone's minimum, bad
    numbers, a missing or unusable weights file, an export folder that cannot be
    written, and another run (or another config's unfinished run) in that folder.
    Without a name or folder, the run takes over the unfinished run of the same
    config under `DEFAULT_EXPORT_ROOT`, if there is one.
    """
    resolved = resolve_run_config(config, find_unfinished=True)
    check_data_source(resolved.data)
    check_output(resolved.export_dir, config.export_dir is not None, overwrite)
    RunState(resolved.export_dir).check(resolved.digest(), restart)
    return resolved


def check_search(config: RunConfig, overwrite: bool = False) -> RunConfig:
    """The checks of a search's run settings and export folder that need no TensorFlow."""
    resolved = resolve_run_config(config)
    check_data_source(resolved.data)
    check_output(resolved.export_dir, config.export_dir is not None, overwrite)
    return resolved
