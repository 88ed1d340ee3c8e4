"""Which layer of a frozen backbone reads a dataset best: a tuned linear probe on each, against kerastl's head.

The globally pooled output of chosen layers (`--layers`: block numbers such as 3,7, or
all of them, or backbone layer names) is fed to the strongest linear probe,
scikit-learn's `LogisticRegressionCV` in a `StandardScaler` pipeline (the L2 strength
chosen by 5-fold cross-validation on the labelled images), and scored on the held-out
test images; with several readings, their concatenation is probed too. Against it,
kerastl's own head (`kerastl.run_training` on the same labelled images and backbone,
`features=auto`, no fine-tuning unless `--fine-tune-epochs` asks) shows what the library
gets by itself. With `--weights none` the backbone is random but frozen (saved to
`--output`), so the probes and kerastl's head read the same one.

    python scripts/layer_features.py                                  # mobilenet_v2 (ImageNet), digits
    python scripts/layer_features.py --backbone resnet50 --layers conv3_block4_out,conv4_block6_out
    python scripts/layer_features.py --weights none --limit 5 --image-size 32 --layers 2,3 --min-steps 0
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from _examples import add_common_flags, add_training_flags, format_table, load_arrays, run, save_table, train_config
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import kerastl

FOLDS = 5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, data="digits", weights="imagenet", output="saved_models/layer_features",
                     augment="none")
    add_training_flags(parser)
    parser.set_defaults(fine_tune_epochs=0)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the registry's)")
    parser.add_argument("--layers", default="all",
                        help="block numbers (3,7), all (every block), or backbone layer names (default all)")
    return parser.parse_args(argv)


def block_readings(model: kerastl.TransferClassifier, blocks: list[int], data: kerastl.ImageData) -> dict:
    """reading name -> (training features, test features) of each block's pooled output."""
    extractor = model.features_model(blocks)  # the blocks' pooled outputs, concatenated in order
    train, test = (extractor.predict(split.batches(64, cache_limit_mb=0), verbose=0) for split in
                   (data.train, data.test))
    ends = np.cumsum(model.block_widths(blocks))
    names = model.block_names()
    return {f"block {b} ({names[b - 1]})": (train[:, end - width:end], test[:, end - width:end])
            for b, end, width in zip(blocks, ends, model.block_widths(blocks))}


def layer_readings(config: kerastl.ModelConfig, layers: list[str], data: kerastl.ImageData) -> dict:
    """reading name -> (training features, test features) of each named layer's pooled output."""
    train, test = (kerastl.extract_features(config, kerastl.ImageData(data.class_names, split), layers)
                   for split in (data.train, data.test))
    return {name: (train[name], test[name]) for name in layers}


def probe(train: np.ndarray, y: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int) -> tuple[float, float]:
    """Test accuracy of a logistic regression on standardised features, its L2 strength C chosen by
    cross-validated log loss, and that C."""
    folds = StratifiedKFold(min(FOLDS, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    regression = LogisticRegressionCV(Cs=10, cv=folds, scoring="neg_log_loss", max_iter=3000)
    pipeline = make_pipeline(StandardScaler(), regression)
    with warnings.catch_warnings():  # scikit-learn's notices of coming changes to its defaults, and L-BFGS's
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(train, y)
    return float(np.mean(pipeline.predict(test) == y_test)), float(np.ravel(regression.C_)[0])


def compare(args: argparse.Namespace) -> None:
    size = args.image_size or kerastl.get_spec(args.backbone).default_size
    arrays = load_arrays(args.data, size, args.seed).limited(args.limit, args.seed)
    weights = args.weights
    if weights.lower() == "none":  # a random backbone, frozen, in a file: the same one for every reading
        Path(args.output).mkdir(parents=True, exist_ok=True)
        weights = str(Path(args.output) / "random_backbone.weights.h5")
        kerastl.build_backbone(args.backbone, size, None).save_weights(weights)
    config = kerastl.ModelConfig(args.backbone, weights=weights, image_size=size, from_scratch=False)
    labelled = arrays.image_data(size, args.seed, validation_split=0.0)  # every labelled image trains the probes
    model = kerastl.build_classifier(config, len(arrays.class_names))
    items = [item.strip() for item in args.layers.split(",") if item.strip()]
    if items == ["all"] or all(item.isdigit() for item in items):
        blocks = list(range(1, model.block_count() + 1)) if items == ["all"] else sorted({int(i) for i in items})
        readings = block_readings(model, blocks, labelled)
    else:
        readings = layer_readings(config, items, labelled)
    if len(readings) > 1:
        readings["all of the above"] = tuple(np.concatenate([r[i] for r in readings.values()], axis=1)
                                             for i in (0, 1))
    print(f"{args.backbone} at {size}x{size} ({args.weights} weights) on {args.data}: {labelled.train.count} "
          f"labelled, {labelled.test.count} test images")
    rows = []
    y, y_test = labelled.train.labels, labelled.test.labels
    for name, (train, test) in readings.items():
        score, c = probe(train, y, test, y_test, args.seed)
        rows.append((f"probe: {name}", train.shape[1], f"{score:.3f}", f"{c:.3g}"))
    run_config = kerastl.RunConfig(kerastl.DataConfig(source=args.data, augment=args.augment, seed=args.seed),
                                   config, train_config(args))
    result = kerastl.run_training(run_config, data=arrays.image_data(size, args.seed), save="none", verbose=0)
    tuned = "fine-tuned" if result.history.phase2 is not None else "head only"
    every = ",".join(map(str, range(1, result.model.block_count() + 1)))
    features = "all" if result.config.model.features == every else result.config.model.features
    rows.append((f"kerastl: features {features}, {tuned}", result.model.feature_dim,
                 f"{result.metrics['test_accuracy']:.3f}", "-"))
    header = ("features", "dims", "test acc", "C")
    print(format_table(header, rows))
    print(f"table in {save_table(Path(args.output) / 'layer_features.csv', header, rows)}")
    print(f"probes: StandardScaler + LogisticRegressionCV ({FOLDS}-fold); kerastl: run_training on the same "
          "labelled images (its own probe start, then head training)")


def main(argv: Sequence[str] | None = None) -> int:
    return run(compare, parse_args(argv), "layer_features")


if __name__ == "__main__":
    raise SystemExit(main())
