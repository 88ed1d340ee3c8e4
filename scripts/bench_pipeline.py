"""Benchmark: training images per second of the input pipeline, measured in one run.

Writes a JPEG class folder (`--images` images of 5 classes, 128x128) and reads it at
`--size` as `kerastl train` does (`kerastl.data.pipelines.training_batches`, augmentation
off), then compares, in images per second over full epochs:

- the real pipeline from the JPEG folder, first epoch (decoding, filling the cache) and
  the next 10 (from the cache), against the same images as in-memory tensors
  (`tf.data.Dataset.from_tensor_slices`, shuffled, batched, prefetched); target >= 0.9x
  from the second epoch on;
- a naive pipeline from the same files (decode in a plain `map`, no parallel calls, no
  cache, no prefetch) against the real one's first epoch;
- one epoch of `fit` of a frozen `--backbone` classifier with the "standard" augmentation
  in `tf.data` (as kerastl trains) against the same layers inside the model.

    python scripts/bench_pipeline.py [--images 1000] [--size 96] [--backbone mobilenet_v2] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _docs  # noqa: E402  (scripts/, beside this file)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from kerastl.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from kerastl.data.augment import build_augmenter  # noqa: E402
from kerastl.data.images import load_data  # noqa: E402
from kerastl.data.pipelines import training_batches  # noqa: E402
from kerastl.models.classifier import build_classifier  # noqa: E402
from kerastl.training.compile import compile_classifier  # noqa: E402

SECTION = "bench_pipeline"
CLASSES = 5
BATCH = 32
REPEATS = 10  # epochs timed from a cache or memory: one takes a few hundredths of a second


def write_folder(root: Path, count: int) -> Path:
    """`count` JPEGs of 5 colour classes, with noise, 128x128."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % CLASSES
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        base = np.array([(label * 50) % 256, 255 - label * 40, (label * 90) % 256])
        pixels = np.clip(base + rng.normal(0, 40, (128, 128, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.jpg", quality=90)
    return root


def epoch_rate(batches: tf.data.Dataset, epochs: int = 1) -> float:
    """Images per second of `epochs` passes over `batches`."""
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in batches:
            seen += int(images.shape[0])
    return seen / (time.perf_counter() - start)


def naive(folder: Path, size: int) -> tf.data.Dataset:
    """The files decoded in a plain `map`: no parallel calls, no cache, no prefetch."""
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    labels = [int(Path(p).parent.name[-1]) for p in paths]

    def read(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(tf.cast(image, tf.float32), (size, size)), label

    return tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=0).map(read).batch(BATCH)


def fit_rate(model: keras.Model, batches: tf.data.Dataset, count: int) -> float:
    """Images per second of the second of two `fit` epochs (the first traces)."""
    model.fit(batches, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--backbone", default="mobilenet_v2")
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section(SECTION)
    folder = write_folder(Path(tempfile.mkdtemp(prefix="kerastl-bench-pipeline-")) / "images", args.images)
    dc = DataConfig(source=str(folder), validation_split=0.0, augment="none", batch_size=BATCH)
    split = load_data(dc, args.size, min_classes=2).train
    epoch_rate(training_batches(split, dc, TrainConfig(), CLASSES, False))  # warms TensorFlow up: a cache of its own
    epoch_rate(naive(folder, args.size))  # and the files into the page cache, for both pipelines alike
    real = training_batches(split, dc, TrainConfig(), CLASSES, False)
    first, second = epoch_rate(real), epoch_rate(real, REPEATS)
    x, y = split.arrays()
    memory = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=0).batch(BATCH)
              .map(lambda a, b: (tf.cast(a, tf.float32), b), num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    epoch_rate(memory)
    in_memory, plain = epoch_rate(memory, REPEATS), epoch_rate(naive(folder, args.size))

    model = build_classifier(ModelConfig(args.backbone, None, args.size, from_scratch=False), CLASSES, seed=0)
    compile_classifier(model, TrainConfig())
    augmented = DataConfig(source=str(folder), validation_split=0.0, augment="standard", batch_size=BATCH)
    in_data = fit_rate(model, training_batches(split, augmented, TrainConfig(), CLASSES, False), split.count)
    inputs = keras.Input((args.size, args.size, 3))
    inside = keras.Model(inputs, model(build_augmenter("standard", seed=0)(inputs)))
    compile_classifier(inside, TrainConfig())
    in_model = fit_rate(inside, split.batches(BATCH, training=True), split.count)

    rows = [("JPEG folder, kerastl's pipeline, epoch 1 (decoding)", f"{first:.0f}", f"{first / in_memory:.2f}x"),
            ("JPEG folder, kerastl's pipeline, epochs 2-11 (cached)", f"{second:.0f}", f"{second / in_memory:.2f}x"),
            ("the same images as in-memory tensors", f"{in_memory:.0f}", "1.00x"),
            ("JPEG folder, naive pipeline (plain map, no cache or prefetch)", f"{plain:.0f}",
             f"{plain / in_memory:.2f}x"),
            (f"`fit`, {args.backbone} frozen, augmentation in `tf.data`", f"{in_data:.0f}", "-"),
            (f"`fit`, {args.backbone} frozen, augmentation in the model", f"{in_model:.0f}", "-")]
    table = _docs.markdown_table(("pipeline", "images/s", "vs in-memory"), rows, right_from=1)
    verdict = (f"from the second epoch the folder reads at {second / in_memory:.2f}x in-memory tensors (target at "
               f"least 0.9x: {'met' if second / in_memory >= 0.9 else 'missed'}); the first epoch, decoding, at "
               f"{first / in_memory:.2f}x; the tuned first epoch is {first / plain:.1f}x the naive pipeline; "
               f"augmentation in tf.data trains at {in_data / in_model:.2f}x augmentation in the model")
    _docs.publish(SECTION, f"{split.count} JPEGs of 5 classes read at {args.size}x{args.size}, batches of {BATCH}",
                  table, verdict, args.write_docs)


if __name__ == "__main__":
    main()
