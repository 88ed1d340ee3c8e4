"""Devices, as settings: the strategy, the precision and XLA a run asks for (`DeviceConfig`), and the
choices "auto" makes from what a machine has. No TensorFlow here: the config and the command line
check these before TensorFlow loads. `kerastl.training.distribute` turns them into a
`tf.distribute` strategy, a Keras dtype policy and `jit_compile`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from kerastl.errors import KerastlError
from kerastl.settings import JsonConfig, setting

STRATEGIES = ("auto", "one", "mirrored", "multiworker")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
SWITCHES = ("auto", "on", "off")
LR_SCALINGS = ("none", "linear")
THREADS_VARIABLE = "KERASTL_THREADS"  # a search worker's share of a CPU (see kerastl.tune.distribute)
MIXED_FLOAT16_CAPABILITY = (7, 0)  # tensor cores: float16 pays from Volta (compute capability 7.0) on
REFERENCE_BATCH = 32  # the batch the default learning rates are chosen for (`DataConfig.batch_size`'s default)
# Keras 3's `fit` fails under MultiWorkerMirroredStrategy (measured with Keras 3.15 and TensorFlow 2.21, on
# two workers on one host: the first batch cannot be reduced, and with that step skipped the metrics fail next)
MULTIWORKER_BLOCKED = ("strategy=multiworker cannot run yet: Keras 3's fit fails under TensorFlow's "
                       "MultiWorkerMirroredStrategy (keras-team/keras#20585); on one host, strategy=mirrored uses "
                       "every GPU")


@dataclass
class DeviceConfig(JsonConfig):
    """Where and how a run computes; recorded in `config.json` and the card, with what "auto" chose.

    `batch_size` (in `DataConfig`) stays the global batch: each of N replicas takes batch/N.
    """

    strategy: str = setting("auto", "auto: mirrored over every GPU when there are several, else one device "
                            "(multiworker: refused for now, docs/devices.md)", kind="choice",
                            choices=STRATEGIES, group="devices")
    precision: str = setting("auto", "auto: mixed_float16 on GPUs of compute capability 7.0 or more, else float32",
                             kind="choice", choices=PRECISIONS,
                             group="devices")
    jit_compile: str = setting("auto", "XLA; auto: on for one GPU when the model allows it, off on a CPU and over "
                               "several replicas", kind="choice", choices=SWITCHES, group="devices")
    lr_scaling: str = setting("none", f"linear: the learning rates times batch / {REFERENCE_BATCH} (raise "
                              "--batch-size with the GPUs)", kind="choice", choices=LR_SCALINGS, group="devices")

    def validate(self) -> None:
        for name, allowed in (("strategy", STRATEGIES), ("precision", PRECISIONS), ("jit_compile", SWITCHES),
                              ("lr_scaling", LR_SCALINGS)):
            if getattr(self, name) not in allowed:
                raise KerastlError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.strategy == "multiworker":
            read_tf_config()
            raise KerastlError(MULTIWORKER_BLOCKED)

    def learned(self) -> dict[str, str] | None:
        """The settings that change what a run learns (precision, learning-rate scaling), for the run digest;
        None at their defaults. Where it computes (strategy, XLA) is left out: a run resumes on other devices."""
        learned = {"precision": self.precision, "lr_scaling": self.lr_scaling}
        return None if learned == {"precision": "auto", "lr_scaling": "none"} else learned


def read_tf_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`TF_CONFIG`, checked: a cluster with workers (a chief too, optionally) and this task's type and index.
    Missing or malformed, it is a one-line `KerastlError` saying what to set."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\' on the first host, index 1 on the second')
    if not raw:
        raise KerastlError(f"strategy=multiworker needs TF_CONFIG, naming every worker and this one ({example})")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise KerastlError(f"TF_CONFIG is not valid JSON ({error}); {example}") from None
    cluster = value.get("cluster") if isinstance(value, dict) else None
    task = value.get("task") if isinstance(value, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise KerastlError(f"TF_CONFIG needs a 'cluster' and a 'task' object; {example}")
    hosts = {kind: cluster.get(kind) for kind in ("chief", "worker") if cluster.get(kind) is not None}
    if not hosts or not all(isinstance(h, list) and h and all(isinstance(a, str) and ":" in a for a in h)
                            for h in hosts.values()):
        raise KerastlError(f"TF_CONFIG's cluster needs a 'worker' (and optionally a 'chief') list of host:port; "
                           f"{example}")
    kind, index = task.get("type"), task.get("index")
    if kind not in hosts or not isinstance(index, int) or not 0 <= index < len(hosts[kind]):
        raise KerastlError(f"TF_CONFIG's task {task} is not one of its cluster's {sorted(hosts)} entries; {example}")
    return value


def auto_strategy(gpus: int) -> str:
    """What strategy="auto" takes: mirrored over several GPUs, one device otherwise."""
    return "mirrored" if gpus > 1 else "one"


def lr_scale(config: DeviceConfig, batch_size: int) -> float:
    """The learning rates' multiplier: 1, or for linear scaling the global batch over `REFERENCE_BATCH`."""
    return batch_size / REFERENCE_BATCH if config.lr_scaling == "linear" else 1.0


def auto_precision(capabilities: list[tuple[int, int]]) -> str:
    """What precision="auto" takes: mixed_float16 when every GPU has compute capability 7.0 or more
    (tensor cores), float32 on CPUs (bfloat16 measured 0.5x float32 there) and older GPUs."""
    if capabilities and all(c >= MIXED_FLOAT16_CAPABILITY for c in capabilities):
        return "mixed_float16"
    return "float32"
