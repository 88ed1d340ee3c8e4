"""Atomic, safe files: a full disk or a kill mid-write leaves the previous export intact, and a run
cleans up only its own killed writes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_run_folder

from kerastl.errors import KerastlError


def test_a_full_disk_during_a_write_gives_one_line_and_leaves_the_previous_export(tmp_path, monkeypatch):
    from kerastl.runs import folder as runfolder

    folder = tiny_run_folder(tmp_path / "export")
    before = sorted(p.name for p in folder.iterdir())

    def full(path, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder, "write_json", full)
    with pytest.raises(KerastlError, match="no space left on the device") as caught:
        tiny_run_folder(folder)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no half-written folder beside it


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_kill_during_export_leaves_the_previous_export_intact(tmp_path):
    folder = tiny_run_folder(tmp_path / "export")
    (folder / "marker").write_text("the previous export")
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from kerastl.runs import folder as runfolder\n"
        "from helpers import tiny_run_folder\n"
        "def killed(path, value):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "runfolder.write_json = killed  # after the SavedModel and model.keras, before the JSON files\n"
        f"tiny_run_folder({str(folder)!r})\n"
    )

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (folder / "marker").read_text() == "the previous export"
    assert (folder / "saved_model.pb").is_file() and (folder / "metrics.json").is_file()


def test_an_unwritable_export_parent_is_reported_before_training(tmp_path, image_folder, fails_cleanly):
    (tmp_path / "file").write_text("")
    fails_cleanly(["train", "--data", str(image_folder), "--export", str(tmp_path / "file" / "run")],
                  "not a folder")
    fails_cleanly(["train", "--data", str(image_folder), "--export", str(tmp_path / "missing" / "run")],
                  "does not exist")


def test_a_run_cleans_up_only_its_own_killed_writes_not_a_siblings(tmp_path):
    from kerastl.storage import remove_stale_writes, staged_folder

    with staged_folder(tmp_path / "run-2") as sibling:  # another export, being written right now
        (tmp_path / ".run-writing-abc").mkdir()  # left by a killed writer of "run"
        (tmp_path / ".run-old-def").mkdir()
        remove_stale_writes(tmp_path / "run")
        assert sibling.is_dir()
        (sibling / "f").write_text("x")
    assert not (tmp_path / ".run-writing-abc").exists() and not (tmp_path / ".run-old-def").exists()
    assert (tmp_path / "run-2" / "f").read_text() == "x"
