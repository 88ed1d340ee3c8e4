"""Benchmark: the LiteRT (TFLite) export's variants, run by LiteRT's own interpreter.

Trains a classifier on scikit-learn's digits (all ten, from scratch, with the library's
defaults, a test split held out), exports it once per `--quantize` value
(`kerastl.models.litert.export_litert`; int8 calibrates on 200 training images) and measures
on the held-out test digits, for each file: its size, its test accuracy against Keras's,
the share of images where its top class is Keras's, the largest |probability - Keras's|,
and images per second at batch 1 (one `predict` call per image, as a phone app classifies),
with Keras beside it at its best at batch 1: one `predict` over every image, `batch_size=1`.

    python scripts/bench_litert.py [--backbone simple_cnn] [--size 32] [--write-docs]

Needs `pip install -e ".[lite]"` (ai-edge-litert).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _docs  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402

from kerastl.choices import QUANTIZE  # noqa: E402
from kerastl.config import DataConfig, ModelConfig, RunConfig  # noqa: E402
from kerastl.data.images import load_data  # noqa: E402
from kerastl.models.litert import REPRESENTATIVE_IMAGES, export_litert, load_litert  # noqa: E402
from kerastl.runs.run import run_training  # noqa: E402

SECTION = "bench_litert"


def per_second(predict, images: np.ndarray) -> float:
    """Images per second, one call per image, after one warm-up call."""
    predict(images[:1])
    start = time.perf_counter()
    for image in images:
        predict(image[None])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="simple_cnn")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--timed", type=int, default=200, help="test images timed at batch 1 (200)")
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section(SECTION)
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="kerastl-bench-litert-"))
    config = RunConfig(DataConfig("digits", test_split=0.3), ModelConfig(args.backbone, None, args.size),
                       export_dir=str(root / "run"))
    start = time.perf_counter()
    result = run_training(config, verbose=0, save="none")
    trained = time.perf_counter() - start
    data = load_data(result.config.data, result.config.model.image_size)  # the same split, cut again
    images, labels = data.test.arrays()
    images = images.astype(np.float32)
    model, names = result.model, data.class_names
    keras_probabilities = model.predict(images, verbose=0)
    keras_top = keras_probabilities.argmax(-1)
    model.predict(images[:1], batch_size=1, verbose=0)  # warm-up; then one predict over the timed images
    start = time.perf_counter()
    model.predict(images[:args.timed], batch_size=1, verbose=0)
    keras_speed = args.timed / (time.perf_counter() - start)
    print(f"{args.backbone} at {args.size}x{args.size}, trained from scratch on digits in {trained:.0f} s; "
          f"{len(labels)} held-out test images; Keras test accuracy {(keras_top == labels).mean():.3f}, "
          f"{keras_speed:.0f} images/s at batch 1 (one predict, batch_size=1)")
    representative = data.train.sample(REPRESENTATIVE_IMAGES).numpy()
    model.save(root / "model.keras")
    keras_accuracy = (keras_top == labels).mean()
    keras_kb = (root / "model.keras").stat().st_size / 1024
    rows = [("Keras `model.keras` (one `predict`, `batch_size=1`)", f"{keras_kb:.0f}", f"{keras_accuracy:.3f}", "-",
             "-", f"{keras_speed:.0f}")]
    losses = []
    for quantize in QUANTIZE:
        written = export_litert(model, root / quantize / "model.tflite", names, quantize, representative)
        lite = load_litert(written.path)
        probabilities = lite.predict(images)
        top = probabilities.argmax(-1)
        speed = per_second(lite.predict, images[:args.timed])
        kept = f" (float32: {', '.join(written.float_ops)})" if written.float_ops else ""
        rows.append((f"LiteRT `{quantize}`{kept}", f"{written.size_bytes / 1024:.0f}", f"{(top == labels).mean():.3f}",
                     f"{(top == keras_top).mean():.3f}", f"{np.abs(probabilities - keras_probabilities).max():.1e}",
                     f"{speed:.0f}"))
        print(" | ".join(rows[-1]))
        lost = keras_accuracy - (top == labels).mean()
        if lost > 0.01:
            losses.append(f"`{quantize}` loses {100 * lost:.1f} points of accuracy")
    table = _docs.markdown_table(("model", "size (KB)", "test accuracy", "top-1 = Keras", "max abs diff",
                                  "images/s, batch 1"), rows, right_from=1)
    verdict = "; ".join(losses) if losses else "no variant loses more than 1 point of accuracy"
    _docs.publish(SECTION, f"{args.backbone} at {args.size}x{args.size}, {len(labels)} held-out test digits", table,
                  verdict, args.write_docs)


if __name__ == "__main__":
    main()
