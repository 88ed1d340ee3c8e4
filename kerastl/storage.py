"""Atomic folder writes, and the store of trained phase-1 heads.

Several processes (search workers, trial processes) may write the same entry at
once. Every entry is written into a fresh folder and renamed into place in one
step, so readers never see half an entry and the first writer's entry is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import keras

HEAD_WEIGHTS = "head.weights.h5"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A fresh folder beside `target` to write into, renamed to `target` in one step at the end.

    Readers never see a half-written folder. If `target` appeared meanwhile (another
    process wrote the same entry first), theirs is kept and this one removed; so is
    this one if writing it failed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, target)
    except OSError:  # another process (a search worker) stored the same entry first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)


class HeadStore:
    """Trained phase-1 heads under `directory/<key>/`: `head.weights.h5` and `meta.json`.

    A run given a store looks its phase-1 head up by a key that covers the features
    and every phase-1 setting (see `kerastl.run.phase1_key`); a hit skips phase 1.
    A search keeps one store in its project folder, shared by every trial and worker.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

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
