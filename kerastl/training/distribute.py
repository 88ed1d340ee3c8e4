"""Devices, in TensorFlow: GPUs, memory growth, CPU threads, and the `tf.distribute` strategy, Keras
dtype policy and XLA setting a run computes with (`DevicePlan`, from a `kerastl.devices.DeviceConfig`).

A run builds, compiles and trains inside `DevicePlan.scope()`: Keras models created under a
strategy's scope keep it, and their `fit`, `evaluate` and `predict` split every global batch over its
replicas (feature extraction does the same, see `kerastl.features.extract`). `--batch-size` stays
the global batch. The classifier's softmax stays float32 under mixed precision (see
`kerastl.models.classifier`), and Keras scales the loss of a mixed_float16 model itself.
How a search spreads its workers and trials over GPUs is `kerastl.tune.distribute`'s business.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import keras
import tensorflow as tf

from kerastl.devices import THREADS_VARIABLE, DeviceConfig, auto_precision, auto_strategy, lr_scale

log = logging.getLogger(__name__)


def list_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can see (after any CUDA_VISIBLE_DEVICES)."""
    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


def prepare_process(threads: int | None = None) -> list:
    """GPU memory growth (one process does not take every GPU's memory up front) and TensorFlow's
    intra-op threads (default: $KERASTL_THREADS, a search worker's share of a CPU); the GPUs."""
    threads = threads or int(os.environ.get(THREADS_VARIABLE) or 0) or None
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth must be set before first use
            log.debug("memory growth for %s could not be changed (GPU already in use)", gpu.name)
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            log.debug("TensorFlow threads already fixed")
    return gpus


@dataclass
class DevicePlan:
    """What a run computes on, resolved from its `DeviceConfig` and the machine.

    Attributes:
        strategy: "one" or "mirrored", as resolved.
        replicas: the strategy's replicas in sync.
        devices: this process's devices that take part.
        precision: the Keras dtype policy's name.
        jit_compile: what `compile` gets: True, False, or Keras's "auto" (on for one GPU when every
            layer supports XLA; off on a CPU and under tf.distribute).
        xla: whether XLA is expected on, for the record.
        lr_scale: the learning rates' multiplier (`lr_scaling` linear: the global batch over 32).
        batch_size: the global batch.
    """

    strategy: str
    replicas: int
    devices: list[str]
    precision: str
    jit_compile: bool | str
    xla: bool
    lr_scale: float
    batch_size: int
    tf_strategy: tf.distribute.Strategy = field(repr=False, compare=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        """The choices, as `config.json` (under "plan") and the card record them."""
        return {"strategy": self.strategy, "replicas": self.replicas, "devices": self.devices,
                "precision": self.precision, "xla": self.xla, "lr_scale": self.lr_scale,
                "batch_size": self.batch_size, "per_replica_batch": self.per_replica_batch}

    @property
    def per_replica_batch(self) -> int:
        """The largest share of a global batch a replica computes."""
        return -(-self.batch_size // self.replicas)

    def summary(self) -> str:
        """Every automatic choice, in one line."""
        where = (f"{self.strategy} over {self.replicas} replicas ({', '.join(self.devices)})" if self.replicas > 1
                 else f"one device ({self.devices[0]})")
        share = f" = {self.per_replica_batch} per replica at most" if self.replicas > 1 else ""
        scale = f"; learning rates x{self.lr_scale:g} (linear scaling)" if self.lr_scale != 1 else ""
        return (f"devices: {where}; batch {self.batch_size}{share}; precision {self.precision}; "
                f"XLA {'on' if self.xla else 'off'}{scale}")

    @contextlib.contextmanager
    def scope(self) -> Iterator[DevicePlan]:
        """The strategy's scope with the plan's dtype policy; the policy before is restored after."""
        before = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            with self.tf_strategy.scope():
                yield self
        finally:
            keras.mixed_precision.set_global_policy(before)


def plan_devices(config: DeviceConfig, batch_size: int) -> DevicePlan:
    """The devices, precision and XLA setting of a run. Choices that cannot be had here (mixed_float16 on a
    CPU, mirrored over one device, XLA under several replicas) are warned about in one line, and the run goes on
    without them. A strategy whose scope the caller entered is the run's (with a note when it differs)."""
    gpus = prepare_process()
    name = auto_strategy(len(gpus)) if config.strategy == "auto" else config.strategy
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    if tf.distribute.has_strategy():  # the caller's own scope (KerasTuner's distribution_strategy, say)
        strategy = tf.distribute.get_strategy()
        name = "mirrored" if strategy.num_replicas_in_sync > 1 else "one"
        devices = list(getattr(strategy.extended, "worker_devices", devices[:1]))
        if config.strategy not in ("auto", name):
            log.warning("strategy %s: the caller's %s is entered, so this run uses it", config.strategy,
                        type(strategy).__name__)
    else:
        if name == "mirrored" and len(devices) < 2:
            log.warning("strategy mirrored: only one device (%s) is visible, so this run uses it alone", devices[0])
            name = "one"
        strategy = _mirrored(tuple(devices)) if name == "mirrored" else tf.distribute.get_strategy()
        devices = devices if name == "mirrored" else devices[:1]
    precision = resolve_precision(config.precision, gpus)
    replicas = strategy.num_replicas_in_sync
    jit = {"on": True, "off": False}.get(config.jit_compile, "auto" if gpus else False)
    if jit is True and replicas > 1:  # measured failing (2 logical CPUs); Keras's own auto leaves it off there
        log.warning("jit_compile=on: Keras's XLA-compiled step fails under a strategy of %d replicas, so this run "
                    "trains without XLA", replicas)
    if replicas > 1:
        jit = False  # explicitly: Keras's auto would turn it on for a model built outside the strategy's scope
    return DevicePlan(name, replicas, devices, precision, jit, jit is True or (jit == "auto" and bool(gpus)),
                      lr_scale(config, batch_size), batch_size, strategy)


def resolve_precision(asked: str, gpus: list) -> str:
    """What `--precision` takes here: "auto" keeps a dtype policy the caller set, else mixed_float16 on GPUs of
    compute capability 7.0 or more and float32 elsewhere; mixed_float16 without a GPU is float32, with a warning."""
    policy = keras.mixed_precision.global_policy().name
    if asked == "auto" and policy != "float32":  # a policy the caller set stays
        return policy
    if asked == "auto":
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
                        for gpu in gpus]
        return auto_precision([tuple(c) for c in capabilities])
    if asked == "mixed_float16" and not gpus:
        log.warning("precision mixed_float16 needs a GPU; none is visible, so this run computes in float32")
        return "float32"
    return asked


@functools.lru_cache(maxsize=None)
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy(list(devices))
