"""Benchmark: images per second of the exports against in-process Keras `predict`.

Builds a classifier (`--backbone`, random weights: speed does not depend on them) at
`--size`, writes its SavedModel (`kerastl.models.export`) and its float32 LiteRT file
(`kerastl.models.litert`), and times, at batch 1 and at batch 32, over the same `--images`
random images:

- Keras `predict` on the in-memory model, one call over every image with `batch_size` set
  (the reference, 1.0x);
- the SavedModel's `serving_default` (float32 pixels), loaded with TensorFlow alone;
- its `serve_bytes` (PNG files' bytes, decoded and resized inside);
- the LiteRT file in LiteRT's own interpreter.

The exports are called once per batch, as a server answers requests. Each is run once to
warm up, then timed over every image; the ratio is its images per second over Keras's at
the same batch size. The target: the SavedModel's `serving_default`
at batch 32 at least 0.9x Keras.

    python scripts/bench_export.py [--backbone mobilenet_v2] [--size 96] [--images 256] [--write-docs]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _docs  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kerastl.config import ModelConfig  # noqa: E402
from kerastl.models.classifier import build_classifier  # noqa: E402
from kerastl.models.export import export_saved_model, load_export  # noqa: E402
from kerastl.models.litert import export_litert, load_litert  # noqa: E402

SECTION = "bench_export"


def rate(predict, inputs, batch: int) -> float:
    """Images per second of `predict` called on `inputs` in batches of `batch`, after one warm-up batch."""
    predict(inputs[:batch])
    start = time.perf_counter()
    for first in range(0, len(inputs), batch):
        predict(inputs[first:first + batch])
    return len(inputs) / (time.perf_counter() - start)


def keras_rate(model, images: np.ndarray, batch: int) -> float:
    """Images per second of one Keras `predict` over `images` at `batch_size=batch`, after a warm-up."""
    model.predict(images[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=batch, verbose=0)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--images", type=int, default=256)
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section(SECTION)
    root = Path(tempfile.mkdtemp(prefix="kerastl-bench-export-"))
    model = build_classifier(ModelConfig(args.backbone, None, args.size, from_scratch=False), 5, seed=0)
    names = [f"class{i}" for i in range(5)]
    export_saved_model(model, root / "export", names)
    exported = load_export(root / "export")
    lite = load_litert(export_litert(model, root / "lite" / "model.tflite", names).path)
    images = np.random.default_rng(0).uniform(0, 255, (args.images, args.size, args.size, 3)).astype(np.float32)
    encoded = []
    for image in images.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    encoded = np.array(encoded, dtype=object)
    runs = {
        "SavedModel `serving_default`": (exported.predict, images),
        "SavedModel `serve_bytes` (PNG)": (lambda x: exported.predict_bytes(list(x)), encoded),
        "LiteRT float32": (lambda x: lite.predict(x, batch_size=len(x)), images),
    }
    measured = {(name, batch): rate(predict, inputs, batch) for name, (predict, inputs) in runs.items()
                for batch in (1, 32)}
    measured.update({("Keras `predict`", batch): keras_rate(model, images, batch) for batch in (1, 32)})
    rows = []
    for name in ("Keras `predict`", *runs):
        cells = [name]
        for batch in (1, 32):
            speed, keras = measured[(name, batch)], measured[("Keras `predict`", batch)]
            cells += [f"{speed:.0f}", f"{speed / keras:.2f}x"]
        rows.append(cells)
        print(" | ".join(cells))
    table = _docs.markdown_table(("", "images/s, batch 1", "vs Keras", "images/s, batch 32", "vs Keras"), rows,
                                 right_from=1)
    ratio = measured[("SavedModel `serving_default`", 32)] / measured[("Keras `predict`", 32)]
    verdict = (f"`serving_default` at batch 32: {ratio:.2f}x Keras (the target, at least 0.9x, is "
               f"{'met' if ratio >= 0.9 else 'missed'})")
    _docs.publish(SECTION, f"{args.backbone} at {args.size}x{args.size}, {args.images} images", table, verdict,
                  args.write_docs)


if __name__ == "__main__":
    main()
