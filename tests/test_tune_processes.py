"""`kerastl tune` as people run it: one-line errors, resuming after SIGKILL, a chief with workers."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

SEARCH = ["tune", "--data", "digits", "--backbone", "simple_cnn", "--weights", "none", "--no-binary",
          "--image-size", "16", "--augment", "none", "--batch-size", "64", "--fine-tune-epochs", "0", "-q",
          "--search", "dropout=0.0,0.2", "--search", "hidden_units=0,32", "--search", "learning_rate=0.003,0.01"]


@pytest.mark.parametrize("extra, match", [
    (["--search", "nonsense=1,2"], "unknown search settings"),
    (["--search", "dropout"], "NAME=VALUES"),
    (["--search", "learning_rate=0:0.1:log"], "log range needs min > 0"),
    (["--search", "backbone=simple_cnn,nonet"], "unknown backbone"),
    (["--objective", "f1"], "invalid choice"),
    (["--max-trials", "0"], "below the minimum"),
    (["--space", "missing.json"], "space file missing.json does not exist"),
])
def test_bad_tune_input_is_one_line_exit_2_and_writes_nothing(tmp_path, fails_cleanly, extra, match):
    project = tmp_path / "project"
    fails_cleanly([*SEARCH, "--project-dir", str(project), "--export", str(tmp_path / "e"), *extra], match)
    assert not project.exists() and not (tmp_path / "e").exists()


def _tune(tmp_path, *extra, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERASTL_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "kerastl", *SEARCH, "--project-dir", str(tmp_path / "p"),
                             "--export", str(tmp_path / "export"), "--overwrite", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _started(log: str) -> list[str]:
    return re.findall(r"^trial (\d+): ", log, flags=re.M)


@pytest.mark.slow  # about 45 s: processes killed and restarted; CI runs it
def test_a_search_killed_mid_trial_resumes_without_rerunning_completed_trials(tmp_path):
    project = tmp_path / "p"
    first = _tune(tmp_path, "--max-trials", "4", "--epochs", "12", "--patience", "12")
    oracle = project / "oracle.json"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:  # wait until a trial after the first is running
        try:
            state = json.loads(oracle.read_text())
        except (OSError, ValueError):
            state = {}
        running = list(state.get("ongoing_trials", {}).values())
        if running and running[0] != "0" and not (project / f"trial_{running[0]}" / "result.json").exists():
            os.kill(first.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the search ended before it could be killed mid-trial"
    interrupted = running[0]
    done = {p.parent.name: json.loads(p.read_text()) for p in project.glob("trial_*/trial.json")
            if json.loads(p.read_text())["status"] == "COMPLETED"}
    assert done and f"trial_{interrupted}" not in done
    hps = json.loads((project / f"trial_{interrupted}" / "trial.json").read_text())["hyperparameters"]["values"]

    second = _tune(tmp_path, "--max-trials", "4", "--epochs", "12", "--patience", "12")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    started = _started(err)
    assert interrupted in started and not any(f"trial_{t}" in done for t in started), started
    assert "resuming the search" in err
    trials = json.loads((project / "trials.json").read_text())
    assert len(trials) == 4 and {t["status"] for t in trials} == {"COMPLETED"}
    for name, before in done.items():  # completed trials were not touched
        assert json.loads((project / name / "trial.json").read_text())["score"] == before["score"]
    assert json.loads((project / f"trial_{interrupted}" / "trial.json").read_text())[
        "hyperparameters"]["values"] == hps
    assert (tmp_path / "export" / "saved_model.pb").exists()


@pytest.mark.slow  # about 35 s: a chief and two worker processes; CI runs it
def test_a_chief_and_two_workers_run_every_trial_once_and_all_end(tmp_path):
    search = _tune(tmp_path, "--max-trials", "4", "--epochs", "3", "--workers", "2", "--isolate", "always")
    out, err = search.communicate(timeout=400)
    assert search.returncode == 0, err[-2000:]
    logs = tmp_path / "p" / "logs"
    started = [t for worker in ("tuner0", "tuner1") for t in _started(
        re.sub(r"^\S+ \S+ kerastl\.tune\.tuner ", "", (logs / f"{worker}.log").read_text(), flags=re.M))]
    assert sorted(started) == ["0", "1", "2", "3"], started  # every trial exactly once over both workers
    for trial in range(4):  # each trial ran in a process of its own
        assert (tmp_path / "p" / f"trial_{trial}" / "trial.log").exists()
    trials = json.loads((tmp_path / "p" / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["COMPLETED"] * 4
    assert (tmp_path / "export" / "saved_model.pb").exists() and f"wrote {tmp_path / 'export'}" in out


@pytest.mark.slow  # about 40 s: a chief and two worker processes; CI runs it
def test_two_workers_train_head_only_trials_as_populations_and_all_end(tmp_path):
    frozen = tmp_path / "frozen.toml"  # a frozen random base: every trial trains a head on cached features
    frozen.write_text('[model]\nfrom_scratch = false\nfeatures = "last"\n')
    search = _tune(tmp_path, "--config", str(frozen), "--max-trials", "6", "--epochs", "3", "--workers", "2",
                   "--population", "2")
    out, err = search.communicate(timeout=400)
    assert search.returncode == 0, err[-2000:]
    logs = tmp_path / "p" / "logs"
    texts = [(logs / f"{worker}.log").read_text() for worker in ("tuner0", "tuner1")]
    started = [t for text in texts for t in _started(re.sub(r"^\S+ \S+ kerastl\.tune\.tuner ", "", text, flags=re.M))]
    assert sorted(started) == [str(i) for i in range(6)], started  # every trial exactly once over both workers
    # a claim takes 2 trials unless the oracle runs out after its first: when both workers claim at the
    # end, each may get one of the last 2 trials, which then runs alone; every other trial is in a pair
    assert any("heads at once" in text for text in texts) and not any("failed" in text for text in texts)
    trials = json.loads((tmp_path / "p" / "trials.json").read_text())
    populations = [t["population"] for t in trials]
    assert [t["status"] for t in trials] == ["COMPLETED"] * 6
    assert set(populations) <= {2, None} and populations.count(2) >= 4, populations
    assert (tmp_path / "export" / "saved_model.pb").exists()
