"""Atomic folder writes, output-folder checks, and the store of trained phase-1 heads.

Several processes (search workers, trial processes) may write the same entry at
once. Every entry is written into a fresh folder and renamed into place in one
step, so readers never see half an entry and the first writer's entry is kept.
An export replaces the one before it the same way (`publish_folder`), so a kill
while writing leaves the previous export whole. No TensorFlow here: the command
line checks output folders before it loads TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kerastl.errors import KerastlError

if TYPE_CHECKING:
    import keras

HEAD_WEIGHTS = "head.weights.h5"
WRITING, OLD = "-writing-", "-old-"  # `.NAME-writing-*`: a folder being written; `.NAME-old-*`: one being replaced


def remove_stale_writes(target: Path) -> None:
    """Removes what a killed writer of `target` left beside it (only `target`'s own, never a
    sibling's such as `.NAME-2-writing-*`); call it only while no other process writes `target`."""
    for marker in (WRITING, OLD):
        for stale in target.parent.glob(f".{target.name}{marker}*"):
            shutil.rmtree(stale, ignore_errors=True)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(target: Path, mode: str = "keep") -> Iterator[Path]:
    """A fresh folder beside `target` (`.NAME-writing-*`) to write into, moved to `target` at the end.

    Readers never see a half-written folder, and a failed write leaves nothing behind.
    When `target` exists by then, `mode` says what happens: "keep" keeps it (another
    process, a search worker, stored the same entry first), "replace" swaps the new
    folder in (`publish_folder`), "merge" moves each new file into it by rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{WRITING}", dir=target.parent))
    try:
        yield staging
        if mode == "replace":
            publish_folder(staging, target)
        elif mode == "merge":
            target.mkdir(exist_ok=True)
            for path in staging.iterdir():
                os.replace(path, target / path.name)
            staging.rmdir()
        else:
            try:
                os.replace(staging, target)
            except OSError:  # the same entry was stored first: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_export_dir(path: str | os.PathLike, overwrite: bool, create_parent: bool = False) -> None:
    """Refuses an output folder that cannot be written, before anything is trained.

    A file, a non-empty folder (unless `overwrite`), a missing parent (unless
    `create_parent`: the default `saved_models/`) or a parent where nothing can be
    written are one-line `KerastlError`s.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KerastlError(f"export path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise KerastlError(f"export folder {path} is not empty; choose another or pass overwrite=True")
    check_parent(path, create_parent)


def check_parent(path: str | os.PathLike, create: bool = False) -> None:
    """Refuses a path whose parent folder is missing (unless `create`) or cannot be written."""
    parent = Path(path).absolute().parent
    if not parent.exists() and create:
        parent.mkdir(parents=True, exist_ok=True)
    if not parent.is_dir():
        raise KerastlError(f"the parent folder of {path} ({parent}) does not exist or is not a folder")
    try:  # os.access says yes to root even on a read-only file system: try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise KerastlError(f"cannot write in {parent}: {error.strerror}") from None


def replace_file(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> None:
    """Writes a file through `write(temporary)` beside `path`, then renames it into place in one step."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.absolute().parent)
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException as error:
        Path(name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise disk_full_error(error, str(path)) from None
        raise


def disk_full_error(error: Exception, what: str) -> KerastlError:
    """The one-line error for a failed write (a full disk, a quota, a read-only file system)."""
    number = getattr(error, "errno", None)
    if number in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
        reason = "no space left on the device"
    else:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return KerastlError(f"writing {what} failed ({reason}); what was there before is kept")


_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths in one step (Linux 3.15+)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths atomically where the system can; False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0


def publish_folder(staging: Path, target: Path) -> None:
    """Moves a fully written `staging` folder to `target`, replacing whatever was there.

    The old `target` is swapped out in one step (or, where the system cannot swap,
    renamed aside just before), so a kill at any point leaves either the old folder
    or the new one at `target`, never a half-written one.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD}", dir=target.parent))
    os.replace(target, aside / target.name)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


class HeadStore:
    """Trained phase-1 heads under `directory/<key>/`: `head.weights.h5` and `meta.json`.

    A run given a store looks its phase-1 head up by a key that covers the features
    and every phase-1 setting (see `kerastl.runs.plan.head_key`); a hit skips phase 1.
    A search keeps one store in its project folder, shared by every trial and worker.
    It also remembers, in memory, what the trials of one process compute alike before
    phase 1 (the probe curve and the probe start): `shared(key, compute)`.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._shared: dict[str, Any] = {}

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time `key` is asked for in this process, the same value after."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def load(self, key: str) -> dict | None:
        """The head's meta (as saved, e.g. its phase-1 history, plus "weights": its file), or None."""
        folder = self.directory / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return {**meta, "weights": str(folder / HEAD_WEIGHTS)}

    def save(self, key: str, head: keras.Model, meta: dict) -> None:
        """Stores a head model's weights atomically; if another worker stored the key first, keeps theirs."""
        with staged_folder(self.directory / key) as staging:
            head.save_weights(staging / HEAD_WEIGHTS)
            (staging / "meta.json").write_text(json.dumps(meta))
