"""Benchmark: what a default `kerastl train` costs, whole commands timed as a user runs them.

On class folders of PNGs (scikit-learn's digits, drawn at 96x96, with small random shifts and
noise to make up the larger sizes), with a frozen MobileNetV2 from a weights file (random, its
BatchNorm calibrated on the images: no network here) and 10 frozen epochs, at each size it runs:

- the defaults (the feature cache, `--features auto`), from a cold cache;
- the defaults with `--no-cache` (the backbone runs over every image in every epoch);
- `--features last` (the cache, no automatic choice of blocks), from a cold cache.

It prints each command's wall time and validation accuracy (or cross-validated accuracy below
100 images: a faster default must not be a worse one), the cached run's speed-up over `--no-cache` (target at
1000 images: at least 3x) and what the automatic choices cost, (defaults - features last) /
defaults (target: at most 25% at every size).

    python scripts/bench_defaults.py                         # 15, 1000 and 5000 images
    python scripts/bench_defaults.py --sizes 15 1000 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _docs  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from bench_tuning import calibrated_weights  # noqa: E402  (scripts/, beside this file)
from sklearn.datasets import load_digits  # noqa: E402

from kerastl.config import DataConfig  # noqa: E402
from kerastl.data.images import load_data  # noqa: E402

SIZE = 96
RUNS = (("defaults", []), ("--no-cache", ["--no-cache"]), ("--features last", ["--features", "last"]))


def write_folder(folder: Path, count: int, seed: int = 0) -> None:
    """`count` digit images as 96x96 PNGs in class folders (5 classes below 50 images, else 10)."""
    digits = load_digits()
    classes = 5 if count < 50 else 10
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(digits.target == c) for c in range(classes)]
    for i in range(count):
        label = i % classes
        image = digits.images[rng.choice(pools[label])] / 16.0
        image = np.roll(image, rng.integers(-1, 2, size=2), axis=(0, 1))  # a one-pixel shift
        pixels = np.kron(image, np.ones((SIZE // 8, SIZE // 8))) * 255 + rng.normal(0, 8, (SIZE, SIZE))
        out = folder / f"digit_{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").save(out / f"{i:05d}.png")


def timed_train(data: Path, weights: str, extra: list[str], root: Path, name: str) -> tuple[float, dict]:
    """One whole `kerastl train` command from a cold cache; its seconds and its metrics."""
    export, cache = root / f"export-{name}", root / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "kerastl", "train", "--data", str(data), "--backbone", "mobilenet_v2",
               "--weights", weights, "--image-size", str(SIZE), "--epochs", "10", "--fine-tune-epochs", "0",
               "--export", str(export), "--overwrite", "--cache-dir", str(cache), "-q", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    seconds = time.perf_counter() - start
    return seconds, json.loads((export / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15, 1000, 5000])
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section("bench_defaults")
    root = Path(tempfile.mkdtemp(prefix="kerastl-bench-defaults-"))
    rows, verdicts = [], []
    write_folder(root / "calibration", 300, seed=1)
    calibration = load_data(DataConfig(source=str(root / "calibration"), augment="none"), SIZE)
    weights = calibrated_weights("mobilenet_v2", SIZE, calibration, root)  # bench_tuning's, on other images
    for count in args.sizes:
        data = root / f"images-{count}"
        write_folder(data, count)
        seconds, accuracy = {}, {}
        for label, extra in RUNS:
            seconds[label], metrics = timed_train(data, weights, extra, root, f"{count}-{label.strip('-')}")
            accuracy[label] = metrics.get("val_accuracy", metrics.get("cv_accuracy", float("nan")))
            print(f"{count} images, {label}: {seconds[label]:.1f} s, val_accuracy {accuracy[label]:.3f}", flush=True)
        speedup = seconds["--no-cache"] / seconds["defaults"]
        auto = (seconds["defaults"] - seconds["--features last"]) / seconds["defaults"]
        rows.append((count, f"{seconds['defaults']:.1f}", f"{seconds['--no-cache']:.1f}", f"{speedup:.2f}x",
                     f"{seconds['--features last']:.1f}", f"{100 * auto:.0f}%",
                     " / ".join(f"{accuracy[label]:.3f}" for label, _ in RUNS)))
        verdicts.append(f"at {count} images the cache is {speedup:.2f}x `--no-cache` and the automatic choices "
                        f"cost {100 * auto:.0f}% of the default run")
    table = _docs.markdown_table(("images", "defaults (s)", "--no-cache (s)", "cached vs --no-cache",
                                  "--features last (s)", "automatic choices' share",
                                  "val accuracy (defaults / --no-cache / last)"), rows, right_from=1)
    _docs.publish("bench_defaults", f"whole `kerastl train` commands, MobileNetV2 from a weights file at {SIZE} px, "
                  "10 frozen epochs, each from a cold cache", table,
                  "; ".join(verdicts) + " (targets: at least 3x at 1000 images, at most 25% at every size)",
                  args.write_docs)


if __name__ == "__main__":
    main()
