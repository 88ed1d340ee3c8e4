"""Several backbones on one dataset: test accuracy, size, speed and export size side by side.

Each backbone (VGG16, ResNet50, InceptionV3, DenseNet121 and MobileNetV2 by default) runs
`kerastl.run_training` with the same data, the same held-out test images and the same
training settings, at its own registry input size (`kerastl.get_spec`), or at
`--image-size` where the registry allows it (InceptionV3 needs at least 75x75: below
that it runs at its minimum, and the table says so). The table gives test accuracy, the
classifier's parameters, the median seconds per epoch of the epochs that ran the whole
network (fine-tuning, or training from scratch; phase 1 on cached features is not
counted), the whole run's seconds, and the size on disk of each SavedModel.

    python scripts/compare_backbones.py                                     # digits, ImageNet weights
    python scripts/compare_backbones.py --weights none --limit 5 --epochs 1 --min-steps 0 --image-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Sequence

import keras
from _examples import (
    add_common_flags,
    add_training_flags,
    format_table,
    load_arrays,
    run,
    save_table,
    timed,
    train_config,
)

import kerastl

BACKBONES = ("vgg16", "resnet50", "inception_v3", "densenet121", "mobilenet_v2")
SAVED_MODEL_PARTS = ("saved_model.pb", "fingerprint.pb", "variables", "assets")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, data="digits", weights="imagenet", output="saved_models/compare_backbones")
    add_training_flags(parser)
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated registry names")
    parser.add_argument("--image-size", type=int, default=None,
                        help="one input size for all (raised to a backbone's minimum); default: each one's own")
    return parser.parse_args(argv)


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch that trains the whole classifier (not the head model on cached features)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if isinstance(self.model, kerastl.TransferClassifier):
            self.seconds.append(time.perf_counter() - self.start)


def size_for(name: str, wanted: int | None) -> tuple[int, str]:
    """The input size for backbone `name` (the registry's default, or `wanted` raised to its minimum) and a note."""
    spec = kerastl.get_spec(name)
    if wanted is None:
        return spec.default_size, ""
    if wanted < spec.min_size:
        return spec.min_size, f" (min, not {wanted})"
    return wanted, ""


def saved_model_mb(folder: Path) -> float:
    """MB on disk of the SavedModel in an export folder (its graph and variables, not kerastl's other files)."""
    paths = [folder / part for part in SAVED_MODEL_PARTS]
    files = [p for path in paths if path.is_dir() for p in path.rglob("*")] + [p for p in paths if p.is_file()]
    return sum(path.stat().st_size for path in files if path.is_file()) / 2**20


def compare(args: argparse.Namespace) -> None:
    names = [kerastl.get_spec(name).name for name in args.backbones.split(",") if name.strip()]
    print(f"{len(names)} backbones on {args.data}, weights {args.weights}"
          + (f", at most {args.limit} training images per class" if args.limit else ""))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        size, note = size_for(name, args.image_size)
        arrays = load_arrays(args.data, size, args.seed).limited(args.limit, args.seed)
        timer = EpochTimer()
        config = kerastl.RunConfig(
            kerastl.DataConfig(source=args.data, augment=args.augment, seed=args.seed),
            kerastl.ModelConfig(name, weights=args.weights, image_size=size), train_config(args),
            name=name, export_dir=str(Path(args.output) / name))
        result, seconds = timed(kerastl.run_training, config, data=arrays.image_data(size, args.seed),
                                overwrite=True, verbose=0, callbacks=[timer])
        per_epoch = f"{statistics.median(timer.seconds):.2f}" if timer.seconds else "-"
        rows.append((name, f"{size}{note}", f"{result.metrics['test_accuracy']:.3f}",
                     f"{result.model.count_params() / 1e6:.1f}M", per_epoch, f"{seconds:.0f}",
                     f"{saved_model_mb(result.export_dir):.1f}"))
        print(f"  {name}: test accuracy {rows[-1][2]} in {seconds:.0f} s")
    header = ("backbone", "size", "test acc", "params", "s/epoch", "run s", "export MB")
    print(format_table(header, rows))
    save_table(Path(args.output) / "compare_backbones.csv", header, rows)
    print(f"exports and compare_backbones.csv in {args.output}; s/epoch: median of the epochs through the whole "
          "network, the first one's tracing included ('-': none ran, the head trained on cached features only)")


def main(argv: Sequence[str] | None = None) -> int:
    return run(compare, parse_args(argv), "compare_backbones")


if __name__ == "__main__":
    raise SystemExit(main())
