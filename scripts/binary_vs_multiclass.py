"""Two classes, two heads: one sigmoid unit (binary cross-entropy) against a two-way softmax.

The same two classes (digits 3 and 8 by default, or `--classes`; any two class names of
the source) are trained twice with `kerastl.run_training`, on the same images, backbone
and settings: once with `ModelConfig(binary=True)` (one sigmoid unit; `loss="auto"` is
binary cross-entropy) and once as a two-class softmax (sparse categorical
cross-entropy). Both are scored by scikit-learn on the same held-out test images: accuracy,
log loss and ROC AUC of the second class's probability, with each run's training
seconds. The two are the same model in different clothes (a softmax over two logits
depends only on their difference), so any gap is the optimisation's, not the model's.

    python scripts/binary_vs_multiclass.py                               # digits 3 vs 8, ImageNet weights
    python scripts/binary_vs_multiclass.py --weights none --limit 5 --image-size 32 --epochs 1 --min-steps 0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from _examples import (
    accuracy,
    add_common_flags,
    add_training_flags,
    format_table,
    load_arrays,
    run,
    save_table,
    timed,
    train_config,
)
from sklearn.metrics import log_loss, roc_auc_score

import kerastl


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, data="digits", weights="imagenet", output="saved_models/binary_vs_multiclass")
    add_training_flags(parser)
    parser.add_argument("--classes", default="3,8", help="the two class names (3,8)")
    parser.add_argument("--backbone", default=kerastl.ModelConfig().backbone)
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the registry's)")
    return parser.parse_args(argv)


def second_class_probability(probabilities: np.ndarray) -> np.ndarray:
    """P(second class): the sigmoid unit itself, or the softmax's second column."""
    return probabilities[:, -1]


def compare(args: argparse.Namespace) -> None:
    names = [name.strip() for name in args.classes.split(",") if name.strip()]
    if len(names) != 2:
        raise kerastl.KerastlError(f"--classes takes two class names, got {names}")
    size = args.image_size or kerastl.get_spec(args.backbone).default_size
    arrays = load_arrays(args.data, size, args.seed).classes(names).limited(args.limit, args.seed)
    data = arrays.image_data(size, args.seed)
    print(f"{args.backbone} at {size}x{size} ({args.weights} weights), classes {names[0]} and {names[1]} of "
          f"{args.data}: {data.train.count} training, {data.validation.count} validation, {data.test.count} test")
    rows = []
    for binary, head in ((True, "binary: 1 sigmoid unit"), (False, "multiclass: 2-way softmax")):
        config = kerastl.RunConfig(
            kerastl.DataConfig(source=args.data, augment=args.augment, seed=args.seed),
            kerastl.ModelConfig(args.backbone, weights=args.weights, image_size=size, binary=binary),
            train_config(args), name="binary" if binary else "multiclass")
        result, seconds = timed(kerastl.run_training, config, data=data, save="none", verbose=0)
        probabilities = result.model.predict(data.test.batches(64), verbose=0)
        p, y = second_class_probability(probabilities), data.test.labels
        rows.append((head, f"{accuracy(probabilities, y):.4f}", f"{log_loss(y, p, labels=[0, 1]):.4f}",
                     f"{roc_auc_score(y, p):.4f}", f"{seconds:.1f}", result.model.output_dense.units))
    header = ("head", "test acc", "log loss", "AUC", "train s", "outputs")
    print(format_table(header, rows))
    path = save_table(Path(args.output) / "binary_vs_multiclass.csv", header, rows)
    print(f"scored by scikit-learn on the {data.test.count} test images; AUC and log loss of P({names[1]}); "
          f"table in {path}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(compare, parse_args(argv), "binary_vs_multiclass")


if __name__ == "__main__":
    raise SystemExit(main())
