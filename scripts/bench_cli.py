"""Benchmark: how quickly the command line answers, and how many native log lines a train prints.

Runs the real `kerastl` command in child processes, as a user would, and prints:

- the wall time (median of `--repeat` runs) of `--help`, `backbones`, and each bad-input
  check that needs no TensorFlow; the target is under 1 s each;
- the lines of TensorFlow's native log (absl's start-up notice, `I0000 ...`-style lines)
  on stderr of a normal `kerastl train` on a small class folder; the target is 0.

    python scripts/bench_cli.py [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _docs  # scripts/, beside this file
import numpy as np
from PIL import Image

NATIVE_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |"
                         r"WARNING: All log messages before absl)")


def _folders(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    good, one, empty = root / "good", root / "one", root / "empty"
    for name, rgb in (("red", (230, 30, 20)), ("blue", (20, 40, 230))):
        (good / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(good / name / f"{i}.png")
    (one / "red").mkdir(parents=True)
    (empty / "red").mkdir(parents=True)
    (empty / "blue").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "red" / "0.png")
    return {"good": good, "one": one, "empty": empty}


def _time(argv: list[str], repeat: int) -> tuple[float, int, int]:
    times, code, lines = [], 0, 0
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kerastl", *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        code, lines = done.returncode, len(done.stderr.splitlines())
    return statistics.median(times), code, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section("bench_cli")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f = _folders(root)
        (root / "w.h5").write_bytes(b"")
        cases = {
            "--help": ["--help"],
            "backbones": ["backbones"],
            "train --help": ["train", "--help"],
            "missing folder": ["train", "--data", str(root / "nope")],
            "one class": ["train", "--data", str(f["one"])],
            "empty class": ["train", "--data", str(f["empty"])],
            "unknown backbone": ["train", "--data", str(f["good"]), "--backbone", "nonet"],
            "size below minimum": ["train", "--data", str(f["good"]), "--image-size", "8"],
            "bad number": ["train", "--data", str(f["good"]), "--epochs", "x"],
            "missing weights file": ["train", "--data", str(f["good"]), "--weights", str(root / "no.h5")],
            "missing model": ["predict", "--model", str(root / "nope"), "a.jpg"],
        }
        rows = []
        for name, argv in cases.items():
            seconds, code, lines = _time(argv, args.repeat)
            rows.append((name, f"{seconds:.2f}", code, lines))
        table = _docs.markdown_table(("command", f"seconds (median of {args.repeat})", "exit code", "stderr lines"),
                                     rows, right_from=1)
        print(table)
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERASTL_TF_LOG")}
        env["KERASTL_CACHE"] = str(root / "cache")
        train = ["train", "--data", str(f["good"]), "--backbone", "simple_cnn", "--image-size", "16",
                 "--weights", "none", "--epochs", "2", "--min-steps", "0", "--export", str(root / "run")]
        done = subprocess.run([sys.executable, "-m", "kerastl", *train], capture_output=True, text=True, env=env)
        native = [line for line in done.stderr.splitlines() if NATIVE_LINE.match(line)]
        train_line = (f"normal train (exit {done.returncode}): {len(native)} native log lines on stderr "
                      f"(of {len(done.stderr.splitlines())} stderr lines in all)")
        print(f"\n{train_line}")
        for line in native:
            print("  " + line)
    if args.write_docs:
        _docs.write_section("bench_cli", f"{_docs.measured_with('bench_cli')}:\n\n{table}\n\n{train_line}.")


if __name__ == "__main__":
    main()
