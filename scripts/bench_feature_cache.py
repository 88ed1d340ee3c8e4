"""Benchmark: phase 1 (frozen base, head only) plain vs on cached features.

Same data, backbone, head, initial weights and seed, in one process. Prints, per
backbone: per-epoch time both ways and their ratio, the one-time extraction cost,
the break-even number of epochs, total phase-1 time both ways and their ratio,
cache size per 1000 images, and the best validation accuracy both ways.

    python scripts/bench_feature_cache.py                      # digits at 96x96, offline
    python scripts/bench_feature_cache.py --weights imagenet   # needs the network once
    python scripts/bench_feature_cache.py --write-docs         # and its table into docs/benchmarks.md

Per-epoch times are medians over epochs 2..N (epoch 1 includes tracing); totals
include everything (tracing, and for the cached path the extraction). Offline, with
weights=none, the random base's BatchNorm statistics are first calibrated on the
training images (as `kerastl.recalibrate_batchnorm` does), so that its features are
a usable stand-in for pretrained ones.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _docs  # noqa: E402  (scripts/, beside this file)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from kerastl.config import ModelConfig, TrainConfig  # noqa: E402
from kerastl.data.images import from_arrays, load_digits  # noqa: E402
from kerastl.features.cache import FeatureCache  # noqa: E402
from kerastl.models.classifier import build_classifier  # noqa: E402
from kerastl.training.batchnorm import recalibrate_batchnorm  # noqa: E402
from kerastl.training.phases import train_classifier  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch (validation included)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def bench(backbone: str, size: int, weights: str | None, epochs: int, batch_size: int, seed: int) -> dict:
    x, y, names = load_digits()
    data = from_arrays(x, y, size, names, validation_split=0.2, seed=seed)
    keras.utils.set_random_seed(seed)
    model = build_classifier(ModelConfig(backbone, weights=weights, image_size=size, from_scratch=False), len(names))
    if weights is None:
        # a random base with BatchNorm at its initial 0/1 statistics gives degenerate features
        # (constant or exploding); calibrating them on the data makes it a fair stand-in
        recalibrate_batchnorm(model, data.train.sample())
    start_weights = model.get_weights()
    config = TrainConfig(epochs=epochs, fine_tune_epochs=0, patience=epochs)
    train, validation = data.train.batches(batch_size, True, seed=seed), data.validation.batches(batch_size)
    row = {"backbone": backbone, "size": size, "images": data.train.count}

    for mode in ("plain", "cached"):
        model.set_weights(start_weights)
        keras.utils.set_random_seed(seed)
        timer, features, begin = EpochTimer(), None, time.perf_counter()
        if mode == "cached":
            with tempfile.TemporaryDirectory() as folder:
                cache = FeatureCache(folder)
                features = cache.head_features(model, data.train, data.validation, batch_size=batch_size)
            row["extract_s"] = time.perf_counter() - begin
            row["cache_mb_per_1000"] = features[0].nbytes() / data.train.count * 1000 / 2**20
        result = train_classifier(model, train, validation, config, features=features, batch_size=batch_size,
                                  seed=seed, callbacks=[timer], verbose=0)
        row[f"{mode}_total_s"] = time.perf_counter() - begin
        row[f"{mode}_epoch_s"] = float(np.median(timer.seconds[1:] or timer.seconds))
        row[f"{mode}_val_acc"] = max(result.phase1.history["val_accuracy"])
    row["epoch_ratio"] = row["plain_epoch_s"] / row["cached_epoch_s"]
    row["total_ratio"] = row["plain_total_s"] / row["cached_total_s"]
    saved_per_epoch = row["plain_epoch_s"] - row["cached_epoch_s"]
    row["break_even_epochs"] = math.ceil(row["extract_s"] / saved_per_epoch) if saved_per_epoch > 0 else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--weights", default="none", help="none, imagenet or a weights file")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section("bench_feature_cache")
    weights = None if args.weights == "none" else args.weights
    rows = [bench(name, args.image_size, weights, args.epochs, args.batch_size, args.seed)
            for name in args.backbones.split(",")]
    caption = (f"phase 1, {args.epochs} epochs, scikit-learn digits ({rows[0]['images']} training images), "
               f"weights={args.weights}")
    header = ("backbone", "size", "epoch plain (s)", "epoch cached (s)", "per-epoch ratio", "extraction (s)",
              "break-even (epochs)", f"{args.epochs}-epoch plain (s)", f"{args.epochs}-epoch cached (s)",
              "total ratio", "cache MB/1000 img", "val acc plain", "val acc cached")
    table = _docs.markdown_table(header, [
        (r["backbone"], r["size"], f"{r['plain_epoch_s']:.2f}", f"{r['cached_epoch_s']:.3f}",
         f"{r['epoch_ratio']:.0f}x", f"{r['extract_s']:.1f}", r["break_even_epochs"], f"{r['plain_total_s']:.1f}",
         f"{r['cached_total_s']:.1f}", f"{r['total_ratio']:.1f}x", f"{r['cache_mb_per_1000']:.2f}",
         f"{r['plain_val_acc']:.3f}", f"{r['cached_val_acc']:.3f}") for r in rows])
    print(f"{caption}, {os.cpu_count()} CPU cores")
    print(table)
    if args.write_docs:
        _docs.write_section("bench_feature_cache",
                            f"{caption} ({_docs.measured_with('bench_feature_cache')}):\n\n{table}")


if __name__ == "__main__":
    main()
