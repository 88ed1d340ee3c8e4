"""Training callbacks: keep the best epoch, snapshot every epoch for resuming, stop on NaN.

`EpochSnapshots` writes the whole training state at the end of every epoch: every
model and optimizer variable (dropout seeds and the optimizer's step count
included), `KeepBest`'s best weights and patience, and the history so far. Each
snapshot is a folder written aside and renamed into place, with a checksum of
each file; the newest two are kept. `restore_snapshot` loads the newest snapshot
that checks out, falling back to the one before it.

Keras's `BackupAndRestore` does not fit here: it writes weights and then their
epoch in two steps (a kill between them resumes from the wrong epoch), it keeps no
EarlyStopping state (a resumed run would forget its best epoch), and it resumes by
setting a private attribute of the model. Our phases call `fit` with the restored
`initial_epoch` instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np

from kerastl.errors import KerastlError
from kerastl.storage import file_digest, staged_folder

log = logging.getLogger(__name__)

STATE_FILE = "state.npz"
BEST_FILE = "best.npz"
META_FILE = "state.json"


class KeepBest(keras.callbacks.EarlyStopping):
    """EarlyStopping on `val_loss` that restores the best weights, seeded with a known best.

    With `initial_best` (phase 1's best validation loss) the weights at the start
    of training count as the best so far, so training can only end better or equal.
    `resume` carries a snapshot's state into the next `fit`.
    """

    def __init__(self, patience: int, initial_best: float | None = None):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self.initial_best = initial_best
        self._resumed: dict | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.initial_best is not None:
            self.best = self.initial_best
            self.best_weights = self.model.get_weights()
        if self._resumed is not None:
            self.best, self.wait, self.best_epoch = (self._resumed[k] for k in ("best", "wait", "best_epoch"))
            self.best_weights = self._resumed["best_weights"] or self.best_weights

    def state(self) -> dict:
        """What a snapshot keeps of this callback."""
        return {"best": None if self.best is None else float(self.best), "wait": int(self.wait),
                "best_epoch": int(self.best_epoch)}

    def resume(self, state: dict, best_weights: list[np.ndarray] | None) -> None:
        """Starts the next `fit` from a snapshot's state instead of from scratch."""
        self._resumed = {**state, "best_weights": best_weights}


class NaNLoss(RuntimeError):
    """Training reached a NaN or infinite loss."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"the loss became {loss} in epoch {epoch + 1}")
        self.epoch = epoch


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite batch loss by raising `NaNLoss`.

    Keras's `TerminateOnNaN` stops gracefully by default, which runs every callback's
    `on_train_end` (Keras's `BackupAndRestore` deletes its backup there, and early
    stopping restores weights); its `raise_error=True` exists only in recent Keras.
    Raising here skips that clean-up on every Keras 3, so the snapshots stay.
    """

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NaNLoss(self.epoch, float(loss))


DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a damaged file raises


def save_values(path: Path, values) -> str:
    """Writes arrays (or variables' values) to an `.npz` file; returns its SHA-256."""
    np.savez(path, *(np.asarray(keras.ops.convert_to_numpy(v)) for v in values))
    return file_digest(path)


def load_values(path: Path, digest: str, variables: list | None = None) -> list[np.ndarray]:
    """The arrays of a `save_values` file, checked against its digest (and the variables' shapes).

    Raises one of `DAMAGED` when the file is damaged or does not fit.
    """
    if file_digest(path) != digest:
        raise ValueError(f"{path.name} does not match its checksum")
    with np.load(path) as arrays:
        values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    if variables is not None and [tuple(v.shape) for v in values] != [tuple(v.shape) for v in variables]:
        raise ValueError(f"the variables in {path.name} do not fit this model")
    return values


def _state_variables(model: keras.Model) -> list:
    optimizer = getattr(model, "optimizer", None)
    return list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])


class EpochSnapshots(keras.callbacks.Callback):
    """Writes `directory/epoch-NNNNN/` at the end of every epoch (see the module docstring).

    Put it after `KeepBest` in the callback list, so it saves that epoch's best.
    """

    def __init__(self, directory: str | os.PathLike, keep_best: KeepBest | None = None,
                 history: dict[str, list] | None = None):
        super().__init__()
        self.directory = Path(directory)
        self.keep_best = keep_best
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self._saved_best_epoch: int | None = None
        self._saved_best_digest = ""

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.history.setdefault("epoch", []).append(int(epoch))
        previous = snapshot_folders(self.directory)
        with staged_folder(self.directory / f"epoch-{epoch + 1:05d}") as staging:
            meta = {"epoch": epoch + 1, "history": self.history, "stopped": bool(self.model.stop_training),
                    "digests": {STATE_FILE: save_values(staging / STATE_FILE, _state_variables(self.model))}}
            keep = self.keep_best
            if keep is not None and keep.best_weights is not None:
                reuse = previous and self._saved_best_epoch == keep.best_epoch and (previous[-1] / BEST_FILE).is_file()
                if reuse:  # the best has not changed: link the previous snapshot's copy
                    os.link(previous[-1] / BEST_FILE, staging / BEST_FILE)
                    digest = self._saved_best_digest
                else:
                    digest = save_values(staging / BEST_FILE, keep.best_weights)
                self._saved_best_epoch, self._saved_best_digest = keep.best_epoch, digest
                meta["keep_best"] = keep.state()
                meta["digests"][BEST_FILE] = digest
            (staging / META_FILE).write_text(json.dumps(meta))
        for old in previous[:-1]:  # keep this one and the one before it
            shutil.rmtree(old, ignore_errors=True)


def snapshot_folders(directory: Path) -> list[Path]:
    """The snapshots in `directory`, oldest first."""
    return sorted(p for p in Path(directory).glob("epoch-*") if p.is_dir()) if Path(directory).is_dir() else []


def restore_snapshot(directory: str | os.PathLike, model: keras.Model, keep_best: KeepBest | None = None,
                     what: str = "the backup") -> dict | None:
    """Loads the newest good snapshot into `model` (and `keep_best`); None when there is none.

    Returns the snapshot's meta: `epoch` (epochs done), `history`, `stopped`. A
    damaged snapshot is logged and removed, and the one before it is tried; when
    none loads, a one-line `KerastlError` says how to start over.
    """
    folders = snapshot_folders(Path(directory))
    if not folders:
        return None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = _state_variables(model)
    for folder in reversed(folders):
        try:
            meta = json.loads((folder / META_FILE).read_text())
            values = load_values(folder / STATE_FILE, meta["digests"][STATE_FILE], variables)
            best = load_values(folder / BEST_FILE, meta["digests"][BEST_FILE]) if BEST_FILE in meta["digests"] else None
        except DAMAGED as error:
            log.warning("snapshot %s is damaged (%s); trying the one before it", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for variable, value in zip(variables, values):
            variable.assign(value)
        if keep_best is not None and "keep_best" in meta:
            keep_best.resume(meta["keep_best"], best)
        log.info("resuming from %s (%d epochs done)", folder, meta["epoch"])
        meta["best_weights"] = best
        return meta
    raise KerastlError(f"{what} in {directory} is damaged and has no good earlier copy; "
                       "rerun with restart=True to start over")

