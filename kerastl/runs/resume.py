"""Unfinished runs: the `<export>.partial` folder that lets a killed `kerastl train` resume.

While a run trains into the export folder F, its state lives beside it in `F.partial/`:

- `lock`: held (`flock`) by the process training; a second run into F refuses.
  The kernel drops the lock when that process dies, however it dies.
- `run.json`: the resolved config, its digest and the training data's fingerprint.
- `backup/`: epoch snapshots of each phase and the result of a finished phase 1
  (see `kerastl.training.phases.train_classifier` and `kerastl.training.callbacks`).

Running the same command again resumes from the last completed epoch. An
unfinished run of another config (or on other data) is refused with one line;
`restart=True` (`--restart`) discards it. A run given neither a name nor an
export folder takes the folder of the unfinished run of the same config under
the default export root, so the same command finds its own run. When the run
folder has been written, `F.partial` is removed.

No TensorFlow here: the command line checks the lock and the config before
TensorFlow loads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kerastl.errors import KerastlError
from kerastl.storage import remove_stale_writes, replace_file

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"
LOCK_FILE = "lock"


def partial_folder(export_dir: str | os.PathLike) -> Path:
    """Where the unfinished state of a run into `export_dir` lives."""
    export_dir = Path(export_dir)
    return export_dir.with_name(export_dir.name + PARTIAL_SUFFIX)


def unfinished_run(digest: str, root: str | os.PathLike) -> tuple[str, str] | None:
    """The (name, export folder) of an unfinished run under `root` that a run with a default name and
    this config `digest` (`RunConfig.digest`) takes over, if there is one."""
    for path in sorted(Path(root).glob(f"*{PARTIAL_SUFFIX}/{RUN_FILE}")):
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if values.get("digest") == digest and not values.get("named", True) and not _locked(path.parent):
            log.debug("found the unfinished run %s of this config", values["config"]["export_dir"])
            return values["config"]["name"], values["config"]["export_dir"]
    return None


def _locked(folder: Path) -> bool:
    """Whether a live process holds the lock of an unfinished run's folder."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _holder(lock_path: Path) -> str:
    try:
        return f" (pid {lock_path.read_text().strip()})"
    except OSError:
        return ""


class RunState:
    """The `F.partial` folder of one run, locked while this process trains (see the module docstring)."""

    def __init__(self, export_dir: str | os.PathLike):
        self.export_dir = Path(export_dir)
        self.folder = partial_folder(export_dir)
        self.resuming = False
        self._lock: int | None = None

    @property
    def logs_dir(self) -> Path:
        """The run's TensorBoard logs while it trains (copied into the export at the end)."""
        return self.folder / "logs"

    @property
    def backup_dir(self) -> Path:
        return self.folder / "backup"

    def has_progress(self) -> bool:
        """Whether the unfinished run got as far as an epoch snapshot or a finished phase or fold."""
        return self.backup_dir.is_dir() and any(p.is_file() for p in self.backup_dir.rglob("*"))

    def _try_lock(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KerastlError(f"another kerastl run{_holder(path)} is writing {self.export_dir}; wait for it to "
                               "finish or choose another export folder") from None
        return fd

    def _check_config(self, digest: str, restart: bool) -> dict | None:
        path = self.folder / RUN_FILE
        if not path.is_file() or restart:
            return None
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            raise KerastlError(f"the unfinished run in {self.folder} is damaged; rerun with restart=True to start "
                               "over") from None
        if values.get("digest") != digest:
            if not self.has_progress():  # it failed before its first epoch: nothing to keep
                return None
            raise KerastlError(f"{self.folder} holds an unfinished run of another config; rerun that command to "
                               "finish it, or pass restart=True to discard it")
        return values

    def check(self, digest: str, restart: bool = False) -> None:
        """Fails now, with one line, where `acquire` would fail: locked, or the run of another config
        (`digest`: `RunConfig.digest`)."""
        if not self.folder.is_dir():
            return
        os.close(self._try_lock())
        self._check_config(digest, restart)

    def acquire(self, config: dict[str, Any], digest: str, named: bool, restart: bool = False) -> RunState:
        """Locks the folder and resumes the unfinished run of the config whose digest is `digest`, or
        starts one, recording `config` (the resolved config, `RunConfig.to_dict`)."""
        self._lock = self._try_lock()
        try:
            os.ftruncate(self._lock, 0)
            os.write(self._lock, f"{os.getpid()}\n".encode())
            previous = self._check_config(digest, restart)
            if previous is None and (self.backup_dir.exists() or self.logs_dir.exists()):
                if restart:
                    log.info("discarding the unfinished run in %s (restart)", self.folder)
                shutil.rmtree(self.backup_dir, ignore_errors=True)
                shutil.rmtree(self.logs_dir, ignore_errors=True)  # its curves are not this run's
            remove_stale_writes(self.export_dir)
            self.resuming = previous is not None and self.has_progress()
            if previous is None:
                self._write({"digest": digest, "named": named, "config": config})
            elif self.resuming:
                log.info("resuming the unfinished run in %s", self.folder)
        except BaseException:
            self.release()
            raise
        return self

    def _write(self, values: dict) -> None:
        text = json.dumps(values, indent=2) + "\n"
        replace_file(self.folder / RUN_FILE, lambda path: path.write_text(text))

    def check_data(self, fingerprint: str) -> None:
        """Records the training data's fingerprint, or refuses to resume on other data."""
        values = json.loads((self.folder / RUN_FILE).read_text())
        known = values.get("data")
        if known is None:
            self._write({**values, "data": fingerprint})
        elif known != fingerprint:
            raise KerastlError(f"the training images changed since the unfinished run in {self.folder} started; "
                               "pass restart=True to start over on them")

    def release(self) -> None:
        """Unlocks, keeping the state for a later run to resume."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def abandon(self) -> None:
        """After a failure: removes the state when there is nothing to resume (no epoch snapshot or
        finished phase), so a run refused before training leaves nothing behind; then unlocks."""
        if self._lock is not None and not self.has_progress():
            shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def finish(self) -> None:
        """Removes the state of a run whose folder is written, then unlocks."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()
