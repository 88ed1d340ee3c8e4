"""TensorFlow's native start-up log, kept off the terminal.

Importing TensorFlow and finding its devices writes lines from C++ straight to
file descriptor 2, before any Python logging is set up: "All log messages before
absl::InitializeLog() ...", the oneDNN and CPU-instruction notices, "Could not find
cuda drivers" and "failed call to cuInit". `TF_CPP_MIN_LOG_LEVEL` cannot silence the
ones written before absl starts. `import_tensorflow` routes descriptor 2 through a
pipe while those happen, drops the lines known to be start-up notices and passes
everything else (a real error, a Python traceback) on to stderr as it comes.

`KERASTL_TF_LOG=1` (or `kerastl --verbose`) lets every native line through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Iterator

log = logging.getLogger(__name__)

NATIVE_LOG_VARIABLE = "KERASTL_TF_LOG"

_START_UP_NOISE = [
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    # absl lines at INFO or WARNING level: I0000 00:00:1795614029.384951    2150 port.cc:153] ...
    re.compile(r"[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "),
    # the same in TensorFlow's older format: 2024-01-01 12:00:00.000000: I tensorflow/... ]
    re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] "),
    re.compile(r"E\d{4} .*\] failed call to cuInit"),  # no GPU driver: an error only in name
    re.compile(r"\d{4}-\d\d-\d\d .*: E .*failed call to cuInit"),
    re.compile(r"To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."),
    # the LiteRT converter's summary of a quantization, printed by its native code (`kerastl export`)
    re.compile(r"fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"),
]


def native_log_wanted() -> bool:
    """Whether `KERASTL_TF_LOG` asks for TensorFlow's native log."""
    return os.environ.get(NATIVE_LOG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def is_start_up_noise(line: str) -> bool:
    """Whether a line is one of TensorFlow's known start-up notices."""
    return any(pattern.match(line) for pattern in _START_UP_NOISE)


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Routes file descriptor 2 through a filter during the block: start-up notices are dropped,
    every other line reaches stderr as it is written (even if the process then aborts)."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    dropped = [0]

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:  # until descriptor 2 is restored and the pipe's last writer is gone
                if is_start_up_noise(line.decode(errors="replace")):
                    dropped[0] += 1
                else:
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="kerastl-native-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        thread.join(timeout=10)
        os.close(saved)
        if dropped[0]:
            log.debug("kept %d lines of TensorFlow's start-up log off the terminal", dropped[0])


def import_tensorflow(verbose: bool = False, later_errors_only: bool = True) -> None:
    """Imports TensorFlow and initialises its devices, without its native start-up lines.

    With `later_errors_only`, sets `TF_CPP_MIN_LOG_LEVEL=2` (native errors only, later in the run:
    no "Memory patch applied" notices mid-training) unless the user set it. With `verbose` or
    `KERASTL_TF_LOG=1`, nothing is filtered.
    """
    if verbose or native_log_wanted():
        import tensorflow as tf

        tf.config.list_physical_devices()
        return
    if later_errors_only:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_native_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # finding devices is what calls cuInit
