"""Devices: find GPUs, turn on memory growth, pick a trial's device, mixed precision.

With several GPUs a search runs one worker process per GPU, each pinned with
`CUDA_VISIBLE_DEVICES` so it sees exactly one; on a CPU-only machine the same
code runs on the CPU. Mixed precision is for GPUs; the classifier's softmax stays
float32 either way (see `kerastl.model.head_layers`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class DeviceSetup:
    """What `setup_devices` found and chose."""

    gpus: list[str]
    device: str
    mixed_precision: bool


def list_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can see (after any CUDA_VISIBLE_DEVICES)."""
    import tensorflow as tf

    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


THREADS_VARIABLE = "KERASTL_THREADS"  # set by `worker_environments` for workers sharing a CPU


def setup_devices(mixed_precision: bool | None = None, threads: int | None = None) -> DeviceSetup:
    """Prepares this process: GPU memory growth, mixed precision, CPU threads.

    Call it before building any model. Memory growth stops one process from taking
    every GPU's memory up front, so other workers and the system can share.

    Args:
        mixed_precision: float16 compute on GPUs; None means "when a GPU is visible".
            On a CPU it is never turned on (it is slower there).
        threads: TensorFlow intra-op threads; default: $KERASTL_THREADS, the share
            `worker_environments` gave this worker of a CPU, if set.
    """
    import keras
    import tensorflow as tf

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


def worker_environments(workers: int, gpus: int, cpu_count: int | None = None) -> list[dict[str, str]]:
    """Environment additions for `workers` processes: one GPU each (round robin), or a share of the CPU.

    With GPUs, worker i sees only GPU i % gpus. Without, each worker gets
    cpu_count // workers TensorFlow threads so they do not fight over cores.
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    envs = []
    for index in range(workers):
        if gpus:
            envs.append({"CUDA_VISIBLE_DEVICES": str(index % gpus)})
        else:
            envs.append({"CUDA_VISIBLE_DEVICES": "", THREADS_VARIABLE: str(max(1, cpu_count // workers))})
    return envs


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for the chief oracle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Called first thing in a child process: on Linux, it is killed when its parent dies.

    A search killed with SIGKILL then leaves no trial or worker running on behind it.
    (Called in the child, not as `preexec_fn`: forking a process that holds a gRPC
    channel and running Python before `exec` makes gRPC abort the child.)
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
