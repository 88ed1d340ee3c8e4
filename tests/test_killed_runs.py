"""Resuming after SIGKILL (slow: two or three training runs each): a killed train resumes and ends
with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# a deterministic run: no augmentation, no dropout, the head reads the output (no probing)
RUN = ["train", "--data", "digits", "--backbone", "simple_cnn", "--image-size", "16", "--augment", "none",
       "--dropout", "0", "--features", "last", "--unfreeze-blocks", "1", "--validation", "holdout", "--quiet",
       "--epochs", "6", "--min-steps", "0", "--fine-tune-epochs", "6", "--fine-tune-min-steps", "0",
       "--patience", "20"]


def _kerastl(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "kerastl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def run_env(tmp_path, backbone_weights):
    env = {**os.environ, "KERASTL_CACHE": str(tmp_path / "cache"), "TF_DETERMINISTIC_OPS": "1"}
    return env, ["--weights", str(backbone_weights), "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture
def backbone_weights(tmp_path):
    from kerastl.models.backbones import build_backbone

    path = tmp_path / "cnn.weights.h5"
    build_backbone("simple_cnn", 16, None).save_weights(path)
    return path


def _weights(folder: Path) -> list[np.ndarray]:
    from kerastl.runs.folder import load_model

    return load_model(folder).get_weights()


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    start = time.time()
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


# where to kill: the flags that make the run, and the backup file whose appearance means "mid-way"
KILLS = {
    "phase1": (["--no-cache"], "phase1/epoch-00002"),  # phase 1 on images: epochs long enough to kill in
    "phase2": ([], "phase2/epoch-*"),
    "cv": (["--validation", "cv", "--cv-folds", "3", "--fine-tune-epochs", "2"], "cv-folds/1.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(KILLS))
def test_a_killed_train_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, run_env, where):
    env, extra = run_env
    flags, mark = KILLS[where]
    flags = [*RUN, *extra, *flags]
    whole = _kerastl([*flags, "--export", str(tmp_path / "whole")], env)
    assert whole.wait() == 0, whole.communicate()
    target = tmp_path / "killed"
    backup = tmp_path / "killed.partial" / "backup"
    process = _kerastl([*flags, "--export", str(target)], env)
    _kill_when(process, lambda: any(backup.glob(mark)))
    assert not target.exists()
    again = _kerastl([*flags, "--export", str(target)], env)
    out, err = again.communicate()
    assert again.returncode == 0, err
    assert "resuming" in err
    assert not (tmp_path / "killed.partial").exists()
    for a, b in zip(_weights(tmp_path / "whole"), _weights(target)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
