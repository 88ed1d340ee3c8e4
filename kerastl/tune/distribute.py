"""Processes of a distributed search: KerasTuner's chief and workers on this machine, and where a worker's
trials run (`setup_devices`).

The chief serves KerasTuner's oracle over gRPC; each worker is a process running
`python -m kerastl.tune.worker search PROJECT` with KerasTuner's own variables
(KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT). With several
GPUs each worker sees exactly one (`CUDA_VISIBLE_DEVICES`); on a CPU-only machine
each gets a share of the threads. Every child dies with its parent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from kerastl.devices import THREADS_VARIABLE, DeviceConfig
from kerastl.errors import KerastlError
from kerastl.training.distribute import prepare_process, resolve_precision
from kerastl.tune.config import TuneConfig
from kerastl.tune.internals import search_finished, serve_oracle

log = logging.getLogger(__name__)

CHIEF_GRACE_S = 60


@dataclass
class DeviceSetup:
    """What `setup_devices` found and chose for a search worker's trials."""

    gpus: list[str]
    device: str  # where its trials are placed ("": nowhere in particular, each trial mirrored over every GPU)
    precision: str  # the trials' dtype policy, resolved once for the worker


def setup_devices(devices: DeviceConfig, threads: int | None = None) -> DeviceSetup:
    """Prepares a search worker's process (see `prepare_process`), sets the dtype policy its trials' models are
    built in (`devices.precision`, as `resolve_precision` takes it) and places its trials: on its first GPU
    (`devices.strategy` "one": a worker per GPU), or each over all its GPUs ("mirrored")."""
    gpus = prepare_process(threads)
    precision = resolve_precision(devices.precision, gpus)
    keras.mixed_precision.set_global_policy(precision)
    device = "" if devices.strategy == "mirrored" and gpus else "/GPU:0" if gpus else "/CPU:0"
    log.info("devices: %s; trials run %s in %s", [g.name for g in gpus] or "CPU only",
             f"on {device}" if device else f"over all {len(gpus)} GPUs", precision)
    return DeviceSetup([g.name for g in gpus], device, precision)


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
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve_chief(tuner) -> None:
    """The chief: the tuner's oracle over gRPC until every worker has been told to stop.

    Polled every 0.2 s, so the chief ends as soon as the last worker has (see
    `kerastl.tune.internals`).
    """
    tuner.save()
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server, servicer = serve_oracle(tuner.oracle, address)
    try:
        while not search_finished(servicer, tuner.oracle):
            time.sleep(0.2)
    finally:
        server.stop(grace=1)


def launch(tune: TuneConfig, workers: int, gpus: int) -> None:
    """Starts a chief and `workers` worker processes on this machine and waits for all of them.

    The same command with a shared project folder runs them on several machines (see README).
    """
    project = Path(tune.project_dir)
    logs = project / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    command = [sys.executable, "-m", "kerastl.tune.worker", "search", str(project)]

    def start(tuner_id: str, extra: dict) -> subprocess.Popen:
        out = open(logs / f"{tuner_id}.log", "w")
        return subprocess.Popen(command, env={**common, **extra, "KERASTUNER_TUNER_ID": tuner_id},
                                stdout=out, stderr=subprocess.STDOUT)

    chief = start("chief", {"CUDA_VISIBLE_DEVICES": ""})
    pool = {f"tuner{i}": start(f"tuner{i}", env) for i, env in enumerate(worker_environments(workers, gpus))}
    log.info("started a chief and %d workers (logs in %s)", workers, logs)
    codes = {name: proc.wait() for name, proc in pool.items()}
    try:  # after a clean finish the chief ends by itself; after a worker died it would wait for it forever
        codes["chief"] = chief.wait(timeout=CHIEF_GRACE_S if not any(codes.values()) else 1)
    except subprocess.TimeoutExpired:
        chief.terminate()
        codes["chief"] = chief.wait()
        log.warning("the chief was still waiting for a trial after every worker ended; stopped it")
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        name = sorted(failed, key=lambda n: (n == "chief", n))[0]  # a worker's error explains the chief's
        lines = [line for line in (logs / f"{name}.log").read_text().splitlines() if line.strip()]
        raise KerastlError(f"{name} exited with code {failed[name]}: {lines[-1] if lines else 'no output'} "
                           f"(logs in {logs})")
