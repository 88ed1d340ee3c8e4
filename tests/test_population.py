"""Head-only trials trained together: the same scores as lone trials, and a search that survives a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import base_config

from kerastl.tune.config import TuneConfig
from kerastl.tune.search import run_search
from kerastl.tune.trial import TrialContext
from kerastl.tune.space import apply_values

# the stated tolerance: same seeds, same batches, same optimizers; only the order of float sums may differ
# (measured: equal to the last digit on this machine)
LOSS_TOLERANCE = 1e-4
HEADS = [  # linear heads from the probe start, hidden layers from a random start, each setting its own
    {"dropout": 0.0, "hidden_units": 0, "learning_rate": 3e-3},
    {"dropout": 0.2, "hidden_units": 0, "learning_rate": 1e-2, "label_smoothing": 0.1},
    {"dropout": 0.0, "hidden_units": 32, "learning_rate": 3e-3, "weight_decay": 1e-3},
    {"dropout": 0.3, "hidden_units": 32, "learning_rate": 1e-2},
    # trains on its own in the population: an L2 penalty on its kernels is not a stacked head's
    {"dropout": 0.1, "hidden_units": 32, "learning_rate": 3e-3, "l2": 1e-3},
    # a cosine schedule of its own, stacked with the linear heads' constant rates
    {"dropout": 0.0, "hidden_units": 0, "learning_rate": 1e-2, "schedule": "cosine", "weight_decay": 1e-4},
    # another optimizer kind: a stack of its own (AdamW, with and without decay)
    {"dropout": 0.0, "hidden_units": 0, "learning_rate": 3e-3, "optimizer": "adamw", "weight_decay": 1e-3},
    {"dropout": 0.1, "hidden_units": 0, "learning_rate": 1e-2, "optimizer": "adamw"},
]


def _alone_and_together(tmp_path, configs):
    """Each config as a lone trial (lone/t<i>), then all as one population (together/t<i>): their metrics."""
    for name in ("lone", "together"):
        (tmp_path / name).mkdir()
    lone = TrialContext(tmp_path / "lone")
    alone = [lone.run([config], [tmp_path / "lone" / f"t{i}"])[0] for i, config in enumerate(configs)]
    together = TrialContext(tmp_path / "together").run(configs, [tmp_path / "together" / f"t{i}"
                                                                 for i in range(len(configs))])
    return alone, together


def test_heads_trained_together_score_as_lone_trials(tmp_path):
    base = base_config(tmp_path, epochs=6, patience=2)
    alone, together = _alone_and_together(tmp_path, [apply_values(values, base) for values in HEADS])
    for i, (one, many) in enumerate(zip(alone, together)):
        assert not isinstance(many, Exception), many
        assert abs(one["val_loss"] - many["val_loss"]) <= LOSS_TOLERANCE, (i, one, many)
        assert one["val_accuracy"] == pytest.approx(many["val_accuracy"], abs=1e-9), (i, one, many)
        lone_history = json.loads((tmp_path / "lone" / f"t{i}" / "history.json").read_text())["phase1"]
        many_history = json.loads((tmp_path / "together" / f"t{i}" / "history.json").read_text())["phase1"]
        assert lone_history["epoch"] == many_history["epoch"]  # each head stopped where it would alone
        np.testing.assert_allclose(lone_history["val_loss"], many_history["val_loss"], atol=LOSS_TOLERANCE)
        result = json.loads((tmp_path / "together" / f"t{i}" / "result.json").read_text())
        assert result["info"]["population"] == len(HEADS)


def test_heads_of_one_shape_stack_and_the_rest_train_on_their_own(tmp_path):
    """Stacking is an implementation detail that must not change a score: this checks what stacks."""
    from kerastl.config import ModelConfig
    from kerastl.models.classifier import build_classifier
    from kerastl.training.compile import compile_classifier
    from kerastl.training.phase import PhasePlan
    from kerastl.training.population import HeadPopulation, PopulationHead

    base = base_config(tmp_path)
    heads = []
    for values in HEADS:
        config = apply_values(values, base)
        model = build_classifier(ModelConfig(**{**config.model.to_dict(), "weights": None}), 3, seed=1)
        head = model.head_model()
        compile_classifier(head, config.train, schedule=config.train.head.schedule, steps=10)
        heads.append(PopulationHead(head, PhasePlan("head", 2, 2, 1e-3, "constant"), classifier=model))
    population = HeadPopulation(heads)
    assert sorted(members for members, _ in population.stacks) == [[0, 1, 5], [2, 3], [6, 7]]
    assert population.alone == [4]
    assert [type(stack.optimizer).__name__ for _, stack in population.stacks] == ["Adam", "Adam", "AdamW"]
    assert len(HeadPopulation(heads, stack=False).alone) == len(HEADS)


def test_under_mixed_precision_heads_trained_together_still_score_as_lone_trials(tmp_path):
    """Keras scales the loss under mixed_float16 (and unscales the gradients); a population must too."""
    import keras

    base = base_config(tmp_path, epochs=4, patience=4)
    configs = [apply_values(values, base) for values in HEADS[2:]]  # hidden layers from a random start
    keras.config.set_dtype_policy("mixed_float16")
    try:
        alone, together = _alone_and_together(tmp_path, configs)
    finally:
        keras.config.set_dtype_policy("float32")
    for one, many in zip(alone, together):
        assert not isinstance(many, Exception), many
        assert abs(one["val_loss"] - many["val_loss"]) < 0.02, (one, many)  # float16 round-off, not 1/32768 steps
        assert abs(one["val_accuracy"] - many["val_accuracy"]) < 0.02, (one, many)


def test_a_search_trains_head_only_trials_as_populations_and_reports_each(tmp_path, caplog, capsys):
    space = {"dropout": [0.0, 0.2], "hidden_units": [0, 32], "learning_rate": [3e-3, 1e-2]}
    with caplog.at_level("INFO", logger="kerastl"):
        result = run_search(base_config(tmp_path), TuneConfig(max_trials=5, project_dir=str(tmp_path / "p"),
                                                              space=space, population=3))
    assert "training 3 heads at once" in caplog.text and "training 2 heads at once" in caplog.text
    assert len(result.trials) == 5 and {row["status"] for row in result.trials} == {"COMPLETED"}
    assert len({row["trial"] for row in result.trials}) == 5
    assert sorted(row["population"] for row in result.trials) == [2, 2, 3, 3, 3]  # in the trial tables too
    assert (result.export_dir / "saved_model.pb").exists()
    assert "Trial" not in capsys.readouterr().out  # KerasTuner's own per-trial display stays off, as in lone trials


SEARCH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from helpers import base_config
    from kerastl.tune.config import TuneConfig
    from kerastl.tune.search import run_search
    root = Path({root!r})
    space = {{"dropout": [0.0, 0.1, 0.2], "hidden_units": [0, 16, 32], "learning_rate": [1e-3, 3e-3]}}
    run_search(base_config(root, epochs=400, patience=400),
               TuneConfig(max_trials=6, population=4, project_dir=str(root / "p"), space=space), overwrite=True)
""")


@pytest.mark.slow  # about 30 s: a search killed mid-population and resumed; CI runs it
def test_a_search_killed_mid_population_records_every_trial_once(tmp_path):
    script = SEARCH.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    project = tmp_path / "p"
    first = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline, running = time.time() + 240, []
    while time.time() < deadline and first.poll() is None:  # the second population (trials 4 and 5) is training
        try:
            running = sorted(json.loads((project / "oracle.json").read_text()).get("ongoing_trials", {}).values())
        except (OSError, ValueError):
            running = []
        if running == ["4", "5"] and not (project / "trial_4" / "result.json").exists():
            os.kill(first.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the search ended before it could be killed mid-population"
    before = {p.parent.name: json.loads(p.read_text())["score"] for p in project.glob("trial_*/trial.json")
              if json.loads(p.read_text())["status"] == "COMPLETED"}
    assert sorted(before) == [f"trial_{i}" for i in range(4)]

    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    trials = json.loads((project / "trials.json").read_text())
    assert sorted(row["trial"] for row in trials) == [str(i) for i in range(6)]  # each recorded once
    assert {row["status"] for row in trials} == {"COMPLETED"}
    for name, score in before.items():  # the first population was not run again
        assert json.loads((project / name / "trial.json").read_text())["score"] == score
    assert all((project / f"trial_{i}" / "result.json").exists() for i in range(6))
