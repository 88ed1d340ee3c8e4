"""Benchmark: what a default `kerastl train` costs in wall time, for the docs' cost table.

Whole commands, timed as a user runs them, on class folders of PNGs (scikit-learn's digits
drawn at 96x96 with small shifts and noise, 10 classes; `bench_defaults.write_folder`), with
MobileNetV2 at each image size:

- "frozen base, cached": from a weights file (random, its BatchNorm calibrated on other images:
  no network here; ImageNet weights cost the same), the defaults with `--fine-tune-epochs 0`:
  features computed once, the head trained on them;
- "from scratch": `--weights none`, every layer trained, with the defaults' step floor.

Each row gives the seconds, the optimizer steps the run's plan allowed at most (the line
`kerastl train` logs before training) and the epochs it ran. A run whose estimate is over
`--max-seconds` is not run (a cached run of `--measure-up-to` images or fewer always is, since
the smallest sizes cross-validate), and its row says it is estimated, from the largest run measured at
the same size and mode: a cached run by the ratio of images (extraction dominates), a run from
scratch by the ratio of planned optimizer steps (the defaults: 10 epochs at least, 300 steps at
least, batches of 32 from the 80% that trains).

    python scripts/bench_cost.py                                   # 100, 1000, 10000 images; 96, 224 px
    python scripts/bench_cost.py --sizes 100 1000 --pixels 96 --write-docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _docs  # noqa: E402  (scripts/, beside this file)
from bench_defaults import write_folder  # noqa: E402  (scripts/, beside this file)
from bench_tuning import calibrated_weights  # noqa: E402

from kerastl.config import DataConfig  # noqa: E402
from kerastl.data.images import load_data  # noqa: E402

MODES = (("frozen base, cached", ["--fine-tune-epochs", "0"]), ("from scratch", ["--weights", "none"]))
STEPS = re.compile(r"optimizer steps at most: (.*) \(early stopping|(no optimizer steps): ")


def timed_train(data: Path, size: int, weights: str, extra: list[str], export: Path) -> tuple[float, str, int]:
    """One whole `kerastl train` command: its seconds, the plan's steps line and the epochs it ran."""
    command = [sys.executable, "-m", "kerastl", "train", "--data", str(data), "--backbone", "mobilenet_v2",
               "--weights", weights, "--image-size", str(size), "--export", str(export), "--overwrite",
               "--cache-dir", str(export.parent / f"cache-{export.name}"), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    steps = STEPS.search(done.stderr)
    history = json.loads((export / "history.json").read_text())
    epochs = sum(len(phase.get("epoch", [])) for phase in history.values() if isinstance(phase, dict))
    return seconds, (steps.group(1) or steps.group(2)) if steps else "not logged", epochs


def planned_steps(count: int, epochs: int = 10, min_steps: int = 300, batch_size: int = 32) -> int:
    """A default from-scratch holdout run's optimizer steps at most: `epochs`, raised to `min_steps`."""
    per_epoch = math.ceil(0.8 * count / batch_size)
    return max(epochs, math.ceil(min_steps / per_epoch)) * per_epoch


def scale(label: str, measured: int, count: int) -> float:
    """How much longer a run of `count` images is than one of `measured` (see the module docstring)."""
    return planned_steps(count) / planned_steps(measured) if label == "from scratch" else count / measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--pixels", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--max-seconds", type=float, default=1200.0,
                        help="runs predicted to take longer are estimated, not run (1200)")
    parser.add_argument("--measure-up-to", type=int, default=1000,
                        help="cached runs of this many images or fewer are always measured (1000)")
    _docs.add_flag(parser)
    args = parser.parse_args(argv)
    if args.write_docs:
        _docs.check_section("bench_cost")
    root = Path(tempfile.mkdtemp(prefix="kerastl-bench-cost-"))
    write_folder(root / "calibration", 200, seed=1)
    rows = []
    for size in args.pixels:
        calibration = load_data(DataConfig(source=str(root / "calibration"), augment="none"), size)
        weights = calibrated_weights("mobilenet_v2", size, calibration, root)
        for label, extra in MODES:
            last: tuple[int, float] | None = None
            for count in sorted(args.sizes):
                predicted = None if last is None else last[1] * scale(label, last[0], count)
                # a cached run at 100 images cross-validates: it says nothing of a holdout run's cost
                trusted = label == "from scratch" or count > args.measure_up_to
                if predicted is not None and trusted and predicted > args.max_seconds:
                    rows.append((count, size, label, f"~{predicted:.0f} (estimated from the {last[0]}-image run, "
                                 f"x{scale(label, last[0], count):.1f})", f"{planned_steps(count):,}"
                                 if label == "from scratch" else "", ""))
                    continue
                data = root / f"images-{count}"
                if not data.exists():
                    write_folder(data, count)
                export = root / f"run-{size}-{count}-{label.split()[0]}"
                seconds, steps, epochs = timed_train(data, size, weights, extra, export)
                last = (count, seconds)
                rows.append((count, size, label, f"{seconds:.0f}", steps, str(epochs)))
                print(f"{count} images at {size} px, {label}: {seconds:.1f} s; {steps}; {epochs} epochs", flush=True)
    table = _docs.markdown_table(("images", "px", "run", "wall time (s)", "optimizer steps at most (plan)",
                                  "epochs run"), rows, right_from=3)
    _docs.publish("bench_cost", f"whole `kerastl train` commands with MobileNetV2 on {os.cpu_count()} CPU cores, "
                  "each from a cold feature cache", table,
                  "the cached frozen base costs the extraction once plus a head on features; from scratch costs "
                  "every step of the whole network", args.write_docs)


if __name__ == "__main__":
    main()
