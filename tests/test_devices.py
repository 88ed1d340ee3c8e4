"""Devices: --strategy, --precision, --jit-compile and --lr-scaling, on this machine's CPU.

Mirrored runs are checked in a subprocess whose CPU is split into 2 logical devices
(`devices_check.py`): a split must come before TensorFlow does anything else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import SMALL, base_config

from kerastl.cli.arguments import build_parser
from kerastl.cli.main import main
from kerastl.config import RunConfig
from kerastl.devices import DeviceConfig, auto_precision, auto_strategy, read_tf_config
from kerastl.errors import KerastlError
from kerastl.runs.run import run_training
from kerastl.tune.config import TuneConfig
from kerastl.tune.search import prepare, run_search

CHECK = Path(__file__).parent / "devices_check.py"
WORKERS = {"cluster": {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}, "task": {"type": "worker", "index": 0}}


def _check(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(CHECK), name, str(out)], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_auto_takes_every_gpu_and_float16_only_where_it_pays():
    assert [auto_strategy(n) for n in (0, 1, 2, 8)] == ["one", "one", "mirrored", "mirrored"]
    assert auto_precision([]) == "float32"  # a CPU: bfloat16 measured 0.5x float32 there
    assert auto_precision([(8, 0), (9, 0)]) == "mixed_float16"
    assert auto_precision([(7, 0), (6, 1)]) == "float32"  # one GPU without tensor cores


def test_device_settings_round_trip_through_json_and_are_flags_of_train_and_tune():
    args = build_parser().parse_args(["train", "--data", "x", "--strategy", "mirrored", "--precision",
                                      "mixed_bfloat16", "--jit-compile", "off", "--lr-scaling", "linear"])
    assert (args.strategy, args.precision, args.jit_compile, args.lr_scaling) == ("mirrored", "mixed_bfloat16",
                                                                                  "off", "linear")
    assert build_parser().parse_args(["tune", "--data", "x", "--trial-strategy", "mirrored"]).trial_strategy == \
        "mirrored"
    config = RunConfig()
    config.devices = DeviceConfig("mirrored", "mixed_bfloat16", "off", "linear")
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.devices == config.devices and again.digest() != RunConfig().digest()  # precision changes results
    where = RunConfig()
    where.devices = DeviceConfig(strategy="mirrored", jit_compile="on")  # where it computes: the same run resumes
    assert where.digest() == RunConfig().digest()
    assert RunConfig.from_dict({k: v for k, v in RunConfig().to_dict().items() if k != "devices"}).devices == \
        DeviceConfig()
    with pytest.raises(KerastlError, match="precision must be one of"):
        DeviceConfig(precision="float16").validate()


@pytest.mark.parametrize("tf_config, message", [
    (None, "--strategy multiworker needs TF_CONFIG"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    (json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}), "list of host:port"),
    (json.dumps({**WORKERS, "task": {"type": "worker", "index": 5}}), "is not one of its cluster's"),
    (json.dumps(WORKERS), "keras-team/keras#20585"),
])
def test_multiworker_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, image_folder,
                                                                             fails_cleanly, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    export = tmp_path / "run"
    fails_cleanly(["train", "--data", str(image_folder), *SMALL, "--strategy", "multiworker", "--export",
                   str(export)], message)
    assert not export.exists() and not Path(f"{export}.partial").exists()
    if tf_config is not None and message != "keras-team/keras#20585":
        with pytest.raises(KerastlError, match=message):
            read_tf_config({"TF_CONFIG": tf_config})


def test_what_cannot_be_had_here_is_one_warning_and_the_card_records_what_ran(tmp_path, image_folder, capsys):
    export = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), *SMALL, "--strategy", "mirrored", "--precision",
                 "mixed_float16", "--lr-scaling", "linear", "--learning-rate", "0.002", "--export", str(export)]) == 0
    err = capsys.readouterr().err
    assert "strategy mirrored: only one device (/device:CPU:0) is visible, so this run uses it alone" in err
    assert "precision mixed_float16 needs a GPU; none is visible, so this run computes in float32" in err
    assert "devices: one device (/device:CPU:0); batch 8; precision float32; XLA off" in err
    config = json.loads((export / "config.json").read_text())
    assert config["devices"] == {"strategy": "mirrored", "precision": "mixed_float16", "jit_compile": "auto",
                                 "lr_scaling": "linear"}  # as asked: the plan says what ran
    plan = config["plan"]
    assert plan["devices"] == {"strategy": "one", "replicas": 1, "devices": ["/device:CPU:0"], "precision": "float32",
                               "xla": False, "lr_scale": 0.25, "batch_size": 8, "per_replica_batch": 8}
    assert plan["phases"][0]["learning_rate"] == pytest.approx(0.0005)  # linear scaling: 0.002 x 8 / 32
    assert plan["phases"][0]["jit_compile"] is False
    card = (export / "MODEL_CARD.md").read_text()
    assert "- devices: one (1 replica(s): /device:CPU:0), batch 8, precision float32, XLA off, learning rates x0.25" \
        in card


def _small(tmp_path: Path, folder: Path, **train) -> RunConfig:
    config = base_config(tmp_path, validation="holdout", **train)
    config.data.source, config.data.batch_size = str(folder), 8
    return config


def test_a_mixed_precision_export_takes_and_returns_float32_like_keras(tmp_path, image_folder):
    config = _small(tmp_path, image_folder, epochs=2, fine_tune_epochs=1, unfreeze_blocks=1)
    config.devices.precision = "mixed_bfloat16"  # asked for, it runs on a CPU too (slower than float32 there)
    result = run_training(config, verbose=0)
    model = result.model
    assert model.dtype_policy.name == "mixed_bfloat16" and model.output.dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # the caller's policy is back
    images = np.random.default_rng(0).uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    served = tf.saved_model.load(str(result.export_dir)).signatures["serving_default"]
    assert served.structured_input_signature[1]["images"].dtype == tf.float32
    probabilities = served(images=tf.constant(images))["probabilities"]
    assert probabilities.dtype == tf.float32
    assert np.abs(probabilities.numpy() - model.predict(images, verbose=0)).max() < 1e-2
    assert np.allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-3)


def test_mixed_float16_scales_its_loss(tmp_path, image_folder):
    keras.mixed_precision.set_global_policy("mixed_float16")  # a policy the caller set stays under auto
    try:
        config = _small(tmp_path, image_folder, epochs=1, feature_cache=False)
        config.model.from_scratch, config.model.features = True, "auto"
        result = run_training(config, verbose=0, save="none")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert result.plan.devices["precision"] == "mixed_float16" and result.model.output.dtype == "float32"


def test_a_search_folds_0_2s_mixed_precision_into_precision_and_places_its_trials(tmp_path):
    config = base_config(tmp_path)
    base, tune = prepare(config, TuneConfig(mixed_precision=False, project_dir=str(tmp_path / "p"),
                                            space={"dropout": [0.0, 0.2]}))
    assert base.devices.precision == "float32" and base.devices.strategy == "one" and tune.mixed_precision is None
    base, _ = prepare(config, TuneConfig(trial_strategy="mirrored", space={"dropout": [0.0, 0.2]}))
    assert base.devices.strategy == "mirrored" and base.devices.precision == "auto"
    with pytest.raises(KerastlError, match="trial_strategy must be one of"):
        prepare(config, TuneConfig(trial_strategy="all"))
    with pytest.raises(KerastlError, match="workers=1"):  # a worker per GPU would leave each trial none
        prepare(config, TuneConfig(trial_strategy="mirrored", workers=2))
    config.devices.strategy = "mirrored"
    with pytest.raises(KerastlError, match="places its trials with trial_strategy"):
        prepare(config, TuneConfig(space={"dropout": [0.0, 0.2]}))


def test_extraction_over_two_replicas_gives_one_devices_features_in_order(tmp_path):
    found = _check("extraction", tmp_path)
    assert found["rows"] == [65, 65] and found["labels_equal"]  # 32 + 32 + 1: a replica gets none of the last
    assert found["max_difference"] < 1e-5
    assert found["forced_xla"] == [False, False]  # --jit-compile on over 2 replicas: refused, the run trains without


@pytest.mark.slow  # about 2 minutes: four runs, one from scratch and one resumed, over 2 logical CPUs; CI runs it
def test_a_mirrored_run_matches_one_device_in_both_phases_and_cross_validation_and_resumes(tmp_path):
    found = _check("training", tmp_path)
    for mode in ("holdout", "cv"):
        one, mirrored = found[f"{mode}-one"], found[f"{mode}-mirrored"]
        assert mirrored["devices"]["strategy"] == "mirrored" and mirrored["devices"]["replicas"] == 2
        assert mirrored["devices"]["per_replica_batch"] == 32
        assert one["epochs"] == mirrored["epochs"]
        # tf.data reshuffles each epoch in another order once a dataset is distributed, so the runs are not
        # bit-identical. Measured: each epoch's training loss within 3.5%, the weights within 0.034; phase 2's
        # validation loss, after two epochs at a tenth of the rate, moved by up to 20% (0.252 against 0.231)
        for name, phase in one["history"].items():
            rtol = 0.05 if name.endswith(".loss") else 0.3
            assert np.allclose(phase, mirrored["history"][name], rtol=rtol), (name, phase, mirrored["history"][name])
        for a, b in zip(one["weights"], mirrored["weights"]):
            assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1
        for key in one["metrics"]:
            tolerance = 0.03 if "accuracy" in key or "f1" in key or "auc" in key else 0.3 * abs(one["metrics"][key])
            assert abs(one["metrics"][key] - mirrored["metrics"][key]) <= tolerance + 1e-6, key
    scratch = found["scratch"]
    assert scratch["metrics"]["val_accuracy"] > 0.5  # BatchNorm calibrated and trained from scratch, over 2 replicas
    assert scratch["devices"]["lr_scale"] == 2.0 and scratch["learning_rate"] == pytest.approx(2e-3)  # 64 / 32
    resumed = found["resume"]  # stopped after epoch 3 of 5, then run again: it goes on from its last snapshot
    assert resumed["snapshots"] and resumed["finished"] and resumed["epochs"] == 5, resumed
    done = int(resumed["snapshots"][-1].split("-")[1])  # epoch-00003: the last completed epoch kept
    assert done >= 1 and resumed["trained_again"] == 5 - done, resumed  # not from the start


@pytest.mark.slow  # over 10 s: a search of two trials; CI runs it
def test_a_search_with_mirrored_trials_on_one_device_says_so_once_and_runs(tmp_path, caplog):
    config = base_config(tmp_path)
    tune = TuneConfig(max_trials=2, trial_strategy="mirrored", project_dir=str(tmp_path / "p"),
                      space={"dropout": [0.0, 0.2]}, population=1)
    with caplog.at_level("WARNING", logger="kerastl"):
        result = run_search(config, tune)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("kerastl")]
    assert warnings == ["trial strategy mirrored: no GPU is visible, so each trial runs on one device"], warnings
    assert len(result.trials) == 2 and all(row["status"] == "COMPLETED" for row in result.trials)


@pytest.mark.slow  # about 90 s: six processes; CI runs it
def test_the_device_benchmark_measures_every_combination_against_float32_on_one_device():
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_devices.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--backbones", "simple_cnn", "--size", "32",
                           "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| simple_cnn")]
    combos = {(row[1], row[2], row[3]) for row in rows}
    assert combos == {(p, x, r) for p in ("float32", "mixed_bfloat16") for x, r in
                      (("off", "1"), ("on", "1"), ("off", "2"))}, done.stdout  # XLA is off over 2 replicas
    baseline = next(row for row in rows if row[1:4] == ["float32", "off", "1"])
    assert baseline[5] == "1.00" and baseline[7].startswith("1.00")
    assert all(float(row[4]) > 0 and float(row[6]) > 0 for row in rows)
