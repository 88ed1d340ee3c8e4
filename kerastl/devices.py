"""Devices: find GPUs, turn on memory growth, pick the device, mixed precision, CPU threads.

On a CPU-only machine the same code runs on the CPU. Mixed precision is for GPUs;
the classifier's softmax stays float32 either way (see `kerastl.models.classifier`).
How a search spreads its workers over GPUs is `kerastl.tune.distribute`'s business.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass
class DeviceSetup:
    """What `setup_devices` found and chose."""

    gpus: list[str]
    device: str
    mixed_precision: bool


def list_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can see (after any CUDA_VISIBLE_DEVICES)."""
    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


THREADS_VARIABLE = "KERASTL_THREADS"  # a worker's share of a CPU (see kerastl.tune.distribute)


def setup_devices(mixed_precision: bool | None = None, threads: int | None = None) -> DeviceSetup:
    """Prepares this process: GPU memory growth, mixed precision, CPU threads.

    Call it before building any model. Memory growth stops one process from taking
    every GPU's memory up front, so other workers and the system can share.

    Args:
        mixed_precision: float16 compute on GPUs; None means "when a GPU is visible".
            On a CPU it is never turned on (it is slower there).
        threads: TensorFlow intra-op threads; default: $KERASTL_THREADS, the share
            a search gave this worker of a CPU, if set.
    """
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
    mixed = bool(gpus) if mixed_precision is None else bool(mixed_precision and gpus)
    if mixed_precision and not gpus:
        log.warning("mixed precision needs a GPU; none is visible, so training stays float32")
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    device = "/GPU:0" if gpus else "/CPU:0"
    log.info("devices: %s; trials run on %s%s", [g.name for g in gpus] or "CPU only", device,
             " with mixed precision" if mixed else "")
    return DeviceSetup([g.name for g in gpus], device, mixed)
