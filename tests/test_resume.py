"""Resuming: one run per export folder, only an unfinished run of the same config resumes, damaged
backups fall back or fail in one line, a NaN loss keeps the backup."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from kerastl.config import DataConfig
from kerastl.errors import KerastlError


def test_a_second_run_into_the_same_export_folder_refuses_with_one_line(tmp_path, image_folder, fails_cleanly):
    export = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kerastl.runs.resume import RunState; "
         "from kerastl.config import RunConfig; "
         f"RunState({str(export)!r}).acquire({{}}, RunConfig().digest(), named=True); "
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails_cleanly(["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--weights", "none",
                       "--export", str(export)],
                      "another kerastl run (pid")
    finally:
        holder.kill()
        holder.wait()


def test_only_an_unfinished_run_of_the_same_config_resumes(tmp_path, image_folder, fails_cleanly, capsys):
    from kerastl.config import ModelConfig, RunConfig
    from kerastl.runs.checks import check_run, resolve_run_config

    export = tmp_path / "run"
    config = RunConfig(DataConfig(str(image_folder)), ModelConfig("simple_cnn", None, 16), export_dir=str(export))
    state = acquire(export, resolve_run_config(config))
    state.release()
    other = dataclasses_replace_dropout(config)
    check_run(other)  # a run that failed before its first epoch does not hold its folder
    (state.backup_dir / "phase1" / "epoch-00001").mkdir(parents=True)
    (state.backup_dir / "phase1" / "epoch-00001" / "state.json").write_text("{}")
    check_run(config)  # the same config: resumes
    resumed = acquire(export, resolve_run_config(config))
    assert resumed.resuming
    resumed.release()
    capsys.readouterr()  # its log line, when an earlier test left the CLI's log handler in place
    fails_cleanly(["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--image-size", "16",
                   "--weights", "none", "--dropout", "0.5", "--export", str(export)], "another config")
    check_run(other, restart=True)  # --restart discards it
    acquire(export, resolve_run_config(other), restart=True).release()
    assert not state.has_progress()


def acquire(export, resolved, named=True, restart=False):
    from kerastl.runs.resume import RunState

    return RunState(export).acquire(resolved.to_dict(), resolved.digest(), named, restart)


def dataclasses_replace_dropout(config):

    config = copy.deepcopy(config)
    config.model.dropout = 0.5
    return config


def test_the_same_command_without_a_name_finds_its_unfinished_run(tmp_path, image_folder, monkeypatch):
    from kerastl.config import ModelConfig, RunConfig
    from kerastl.runs.checks import check_run

    monkeypatch.chdir(tmp_path)
    config = RunConfig(DataConfig(str(image_folder)), ModelConfig("simple_cnn", None, 16))
    first = check_run(config)
    acquire(first.export_dir, first, named=False).release()
    (tmp_path / "saved_models" / f"{first.name}.partial" / "backup").mkdir()

    time.sleep(1.1)  # a later default name
    assert check_run(config).export_dir == first.export_dir
    other = dataclasses_replace_dropout(config)
    assert check_run(other).export_dir != first.export_dir


def _snapshotted_model(tmp_path, epochs: int = 3):
    from kerastl.training.callbacks import EpochSnapshots, KeepBest

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    x, y = np.ones((8, 4)), np.zeros((8, 2))
    stop = KeepBest(patience=10)
    model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0,
              callbacks=[stop, EpochSnapshots(tmp_path / "snapshots", stop)])
    return model, stop


def test_a_damaged_backup_falls_back_to_the_previous_copy_or_fails_with_one_line(tmp_path):
    from kerastl.training.callbacks import KeepBest, restore_snapshot, snapshot_folders

    model, _ = _snapshotted_model(tmp_path)
    folders = snapshot_folders(tmp_path / "snapshots")
    assert [f.name for f in folders] == ["epoch-00002", "epoch-00003"]  # the newest two are kept
    latest = folders[-1] / "state.npz"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    meta = restore_snapshot(tmp_path / "snapshots", model, KeepBest(patience=10))
    assert meta["epoch"] == 2 and len(meta["history"]["loss"]) == 2
    earlier = folders[0] / "state.json"
    earlier.write_text("{not json")
    with pytest.raises(KerastlError, match="restart=True") as caught:
        restore_snapshot(tmp_path / "snapshots", model)
    assert "\n" not in str(caught.value)


def test_a_damaged_finished_phase_one_runs_again_instead_of_failing(tmp_path):
    from kerastl.training.phases import load_phase1, save_phase1

    model, _ = _snapshotted_model(tmp_path)
    history = keras.callbacks.History()
    history.history, history.epoch = {"val_loss": [0.5]}, [0]
    save_phase1(tmp_path, model, history, drawn=1)
    kept = load_phase1(tmp_path, model)
    assert kept is not None and kept[1] == 1 and kept[0].history["val_loss"] == [0.5]
    stored = tmp_path / "phase1-done" / "variables.npz"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit
    stored.write_bytes(bytes(data))
    assert load_phase1(tmp_path, model) is None


def test_nan_loss_stops_with_one_line_and_keeps_the_backup(tmp_path, image_folder):
    from kerastl.config import ModelConfig, RunConfig, TrainConfig
    from kerastl.runs.run import run_training

    class Poison(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])

    config = RunConfig(DataConfig(str(image_folder), augment="none"), ModelConfig("simple_cnn", None, 16),
                       TrainConfig(epochs=6, min_steps=0, fine_tune_epochs=0, validation="holdout", patience=10),
                       export_dir=str(tmp_path / "run"))
    with pytest.raises(KerastlError, match="NaN|nan") as caught:
        run_training(config, callbacks=[Poison()], verbose=0)
    assert "\n" not in str(caught.value) and "restart=True" in str(caught.value)
    assert not (tmp_path / "run").exists()
    snapshots = sorted(p.name for p in (tmp_path / "run.partial" / "backup" / "phase1").iterdir())
    assert snapshots == ["epoch-00002", "epoch-00003"]
    assert (tmp_path / "run.partial" / "backup" / "phase1" / "epoch-00003" / "best.npz").is_file()
