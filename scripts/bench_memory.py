"""Benchmark: peak resident memory of `kerastl train` against image size and image count.

Each configuration runs the real command line, `python -m kerastl train`, in a child
process of its own; its peak RSS is read from that child's own resource usage
(`os.wait4`), so peaks of different runs never mix. Two modes, MobileNetV2 both:

- frozen: a pretrained-style run. ImageNet weights cannot be downloaded offline, so
  `--weights` is a weights file saved from a randomly initialised MobileNetV2 (its
  BatchNorm statistics calibrated on a few of the images, so its features are not
  degenerate): the base is frozen, phase 1 trains on cached features (extraction,
  probes), phase 2 fine-tunes the top blocks.
- scratch: `--weights none`, trained from scratch, with BatchNorm recalibrated on a
  sample of training images before every validation.

The images are synthetic JPEGs (256x256, noisy class colours with random boxes) in
class folders, generated once into a temporary folder (or `--images`), and shared by
hard links between the per-count folders.

To keep it affordable, the training settings are minimal: `--epochs 1 --min-steps 0
--fine-tune-epochs 1 --fine-tune-min-steps 0 --validation holdout --augment none`, a
fresh `--cache-dir` per run (so frozen runs extract) and `--quiet`. Peak memory is
reached in the first epoch, the extraction and the calibration, so more epochs would
take longer without raising it; the seconds are those of these short runs only.

    python scripts/bench_memory.py                                   # the full grid (long)
    python scripts/bench_memory.py --modes scratch --sizes 160 --counts 1000
    python scripts/bench_memory.py --sizes 96 160 224 --counts 1000  # one count, every size
    python scripts/bench_memory.py --write-docs                      # and its table into docs/benchmarks.md

Prints a markdown table: mode, image size, image count, peak RSS (GB), seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _docs  # scripts/, beside this file
import numpy as np
from PIL import Image

SETTINGS = ["--epochs", "1", "--min-steps", "0", "--fine-tune-epochs", "1", "--fine-tune-min-steps", "0",
            "--validation", "holdout", "--augment", "none", "--quiet"]
BACKBONE = "mobilenet_v2"
CLASSES = ("amber", "blue", "green", "violet")
COLOURS = ((230, 150, 20), (20, 60, 220), (30, 200, 60), (150, 40, 200))
WEIGHTS_SCRIPT = """
import sys
import numpy as np
from kerastl.training.batchnorm import recalibrate_batchnorm
from kerastl.models.classifier import build_classifier
from kerastl.config import ModelConfig
from kerastl.data.images import from_folder
folder, path = sys.argv[1], sys.argv[2]
model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=96, from_scratch=False), 4)
images, _ = from_folder(folder, model, validation_split=0.0).train.arrays()
recalibrate_batchnorm(model, images[:128])
model.backbone.save_weights(path)
"""


def write_images(root: Path, count: int, size: int = 256) -> None:
    """Synthetic JPEGs 0..count-1 spread over the class folders (class colour, noise, random boxes);
    each is the same whenever it is written, and those already there are kept."""
    for index in range(count):
        label = index % len(CLASSES)
        folder = root / CLASSES[label]
        if (folder / f"{index:05d}.jpg").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(index)
        pixels = np.array(COLOURS[label], np.float32) + rng.normal(0, 30, (size, size, 3))
        for _ in range(3):
            top, left = rng.integers(0, size - 32, 2)
            height, width = rng.integers(16, size // 2, 2)
            pixels[top : top + height, left : left + width] = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def subset(pool: Path, target: Path, count: int) -> Path:
    """A class folder of the first `count` images of `pool` (hard links, so nothing is copied)."""
    if target.is_dir():
        return target
    for index in range(count):
        name = CLASSES[index % len(CLASSES)]
        (target / name).mkdir(parents=True, exist_ok=True)
        os.link(pool / name / f"{index:05d}.jpg", target / name / f"{index:05d}.jpg")
    return target


def measure(command: list[str], log_path: Path, timeout: float | None) -> tuple[float, float, int]:
    """Runs `command` as a child; returns its peak RSS in GB, its seconds and its exit code."""
    start = time.perf_counter()
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, child.kill) if timeout else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)  # this child's own usage, not all children's
        finally:
            if timer is not None:
                timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 2**20, time.perf_counter() - start, child.returncode  # ru_maxrss is in KiB


def weights_file(pool: Path, path: Path) -> Path:
    """A random MobileNetV2's backbone weights, BatchNorm calibrated on the pool, for the frozen runs."""
    if not path.is_file():
        subprocess.run([sys.executable, "-c", WEIGHTS_SCRIPT, str(pool), str(path)], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--modes", nargs="+", choices=["frozen", "scratch"], default=["frozen", "scratch"])
    parser.add_argument("--images", type=Path, help="folder for the generated images, kept (default: temporary)")
    parser.add_argument("--timeout", type=float, help="seconds after which a run is killed")
    _docs.add_flag(parser)
    args = parser.parse_args(argv)
    if args.write_docs:
        _docs.check_section("bench_memory")

    work = Path(tempfile.mkdtemp(prefix="kerastl-bench-memory-"))
    images = args.images or work / "images"
    try:
        pool = images / "pool"
        print(f"synthetic 256x256 JPEGs of {len(CLASSES)} classes in {pool}", flush=True)
        write_images(pool, max(*args.counts, 128))
        weights = None
        if "frozen" in args.modes:
            weights = weights_file(subset(pool, images / "calibration", 128), images / "random.weights.h5")
        print(f"\n{BACKBONE}, minimal training settings: {' '.join(SETTINGS)}, a fresh --cache-dir per run "
              "(peak memory is reached in the first epoch, the extraction and the calibration)\n")
        table = [_docs.markdown_table(("mode", "image size", "images", "peak RSS (GB)", "seconds"), [], right_from=1)]
        print(table[0], flush=True)
        for mode in args.modes:
            for size in args.sizes:
                for count in args.counts:
                    run = work / f"{mode}-{size}-{count}"
                    run.mkdir()
                    data = subset(pool, images / str(count), count)
                    command = [
                        sys.executable, "-m", "kerastl", "train", "--data", str(data),
                        "--backbone", BACKBONE, "--weights", str(weights) if mode == "frozen" else "none",
                        "--image-size", str(size), *SETTINGS, "--cache-dir", str(run / "cache"),
                        "--export", str(run / "model"),
                    ]
                    peak, seconds, code = measure(command, run / "log.txt", args.timeout)
                    note = "" if code == 0 else f" (exit {code}, see {run / 'log.txt'})"
                    table.append(f"| {mode} | {size} | {count} | {peak:.2f}{note} | {seconds:.0f} |")
                    print(table[-1], flush=True)
                    if code == 0:
                        shutil.rmtree(run)
        if args.write_docs:
            _docs.write_section("bench_memory", f"{BACKBONE}, the minimal settings above "
                                                f"({_docs.measured_with('bench_memory')}):\n\n" + "\n".join(table))
    finally:
        if args.images is None:
            shutil.rmtree(images, ignore_errors=True)
        if not any(work.glob("*/log.txt")):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
