"""Run in a subprocess by tests/test_devices.py: the CPU split into 2 logical devices, then one check.

`python devices_check.py CHECK OUT` writes CHECK's findings as JSON to OUT. The split must come
before TensorFlow does anything else, hence a process of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import base_config  # noqa: E402

from kerastl.data.images import load_data  # noqa: E402
from kerastl.features.extract import extract  # noqa: E402
from kerastl.models.classifier import build_classifier  # noqa: E402
from kerastl.runs.run import run_training  # noqa: E402
from kerastl.devices import DeviceConfig  # noqa: E402
from kerastl.training.distribute import plan_devices  # noqa: E402


def extraction(tmp: Path) -> dict:
    """Features of 65 images (batches of 32, 32 and 1: one replica gets nothing of the last) on one device and
    over 2 replicas."""
    data = load_data(base_config(tmp).data, 16)
    model = build_classifier(base_config(tmp).model, 10, seed=0)
    batches = data.train.batches(32, cache_limit_mb=0).take(3)
    one, labels_one = extract(model.features_model(), batches.unbatch().take(65).batch(32))
    with plan_devices(DeviceConfig("mirrored"), 32).scope():
        two, labels_two = extract(model.features_model(), batches.unbatch().take(65).batch(32))
    forced = plan_devices(DeviceConfig("mirrored", jit_compile="on"), 32)  # XLA asked for over 2 replicas
    return {"rows": [len(one), len(two)], "labels_equal": bool((labels_one == labels_two).all()),
            "max_difference": float(np.abs(one - two).max()), "forced_xla": [forced.jit_compile, forced.xla]}


def training(tmp: Path) -> dict:
    """Both phases (the head on cached features, then the top block) and cross-validation, one device
    against mirrored over 2 replicas, with the same global batch and seed."""
    found = {}
    for mode in ("holdout", "cv"):
        for strategy in ("one", "mirrored"):
            keras.utils.set_random_seed(0)
            (tmp / f"{mode}-{strategy}").mkdir()
            config = base_config(tmp / f"{mode}-{strategy}", epochs=10, fine_tune_epochs=2, unfreeze_blocks=1,
                                 validation=mode, cv_folds=2, patience=10)
            config.model.dropout = 0.0  # each replica draws its own dropout masks
            if mode == "holdout":
                config.model.hidden_units = 16  # a head trained by steps, not only the closed-form probe
            config.devices.strategy = strategy
            result = run_training(config, verbose=0, save="export")
            plan = json.loads((Path(config.export_dir) / "config.json").read_text())["plan"]["devices"]
            history = {f"{phase}.{key}": values for phase, logs in result.history.to_dict().items()
                       for key, values in logs.items() if key in ("loss", "val_loss")}
            found[f"{mode}-{strategy}"] = {"weights": [w.tolist() for w in result.model.get_weights()[-4:]],
                                           "metrics": result.metrics, "devices": plan, "history": history,
                                           "epochs": {name: len(v) for name, v in history.items()}}
    found["scratch"] = scratch(tmp / "scratch")
    found["resume"] = resume(tmp / "resume")
    return found


def resume(tmp: Path) -> dict:
    """A mirrored run from scratch stopped after its third epoch, then the same call again: it resumes."""

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt  # as Ctrl-C would

    class Count(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            Count.epochs += 1

    tmp.mkdir()
    config = base_config(tmp, epochs=5, patience=10)
    config.model.from_scratch, config.model.features = True, "auto"
    config.devices.strategy = "mirrored"
    try:
        run_training(config, verbose=0, callbacks=[Stop()])
    except KeyboardInterrupt:
        pass
    partial = sorted(p.name for p in (tmp / "export.partial" / "backup" / "phase1").iterdir())
    result = run_training(config, verbose=0, callbacks=[Count()])
    finished = (tmp / "export" / "saved_model.pb").is_file()
    return {"snapshots": partial, "trained_again": Count.epochs, "finished": finished,
            "epochs": len(result.history.to_dict()["phase1"]["loss"]), "metrics": result.metrics}


def scratch(tmp: Path) -> dict:
    """From scratch (BatchNorm calibrated on each replica's share) over 2 replicas, with the learning rate
    scaled linearly: it learns."""
    tmp.mkdir()
    config = base_config(tmp, epochs=6)
    config.model.from_scratch, config.model.features = True, "auto"
    config.devices.strategy, config.devices.lr_scaling = "mirrored", "linear"
    result = run_training(config, verbose=0, save="none")
    return {"metrics": result.metrics, "devices": result.plan.devices,
            "learning_rate": result.plan.phases[0].learning_rate}


if __name__ == "__main__":
    check, out = sys.argv[1], Path(sys.argv[2])
    out.write_text(json.dumps({"extraction": extraction, "training": training}[check](out.parent)))
