"""Benchmark: training recipes on an imbalanced few-shot task, against the strongest baselines.

Digits 0-4 -> 5-9, as in `kerastl demo`: `simple_cnn` is pretrained from scratch on
digits 0-4; each run then gets an imbalanced training set of digits 5-9 (by default
60, 30, 15, 8 and 4 images: 15:1) and is tested on every other image of 5-9 (about
170 per class, balanced). For each recipe it prints test accuracy, test macro-F1 (the
score imbalance hurts) and seconds, averaged over `--seeds` draws:

- defaults: `kerastl train --weights backbone.weights.h5` and nothing else;
- one recipe at a time: `--class-weight auto`, `--sampling balanced`, `--loss focal`,
  focal with automatic weights, `--augment mixup` (the demo's augmentation plus MixUp),
  cosine schedules with warmup in both phases, and discriminative rates (0.7) with
  gradual unfreezing;
- baselines: scikit-learn's `LogisticRegressionCV` (C chosen by cross-validation, at most 5
  folds, `class_weight="balanced"`) on the frozen backbone's standardised output features, the
  strongest probe; and the same network from scratch with automatic class weights,
  trained to convergence (`SCRATCH_STEPS` optimizer steps).

    python scripts/bench_recipes.py                     # 2 draws, every recipe
    python scripts/bench_recipes.py --seeds 3 --recipes defaults weights balanced
    python scripts/bench_recipes.py --write-docs        # and its table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _docs  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from kerastl import (  # noqa: E402
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build_classifier,
    from_arrays,
    load_digits,
    run_training,  # noqa: E402
)
from kerastl.cli.demo import AUGMENT, NEW, SCRATCH_STEPS, SIZE, pretrain  # noqa: E402
from kerastl.runs.folder import BACKBONE_WEIGHTS  # noqa: E402

RECIPES = {
    "defaults": ({}, {}),
    "weights": ({"class_weight": "auto"}, {}),
    "balanced": ({"sampling": "balanced"}, {}),
    "focal": ({"loss": "focal"}, {}),
    "focal+weights": ({"loss": "focal", "class_weight": "auto"}, {}),
    "mixup": ({}, {"augment": AUGMENT + ",mixup:0.2"}),
    "cosine": ({"schedule": "cosine", "fine_tune_schedule": "cosine"}, {}),
    "layerwise": ({"layer_decay": 0.7, "gradual_unfreeze": True}, {}),
}
COUNTS = (60, 30, 15, 8, 4)
PROBE, SCRATCH = "probe (LogisticRegressionCV, balanced)", "scratch (auto weights, converged)"
# each row's name in docs/benchmarks.md (--write-docs)
DOCS_NAMES = {
    "defaults": "defaults",
    "weights": "`--class-weight auto`",
    "balanced": "`--sampling balanced`",
    "focal": "`--loss focal`",
    "focal+weights": "`--loss focal --class-weight auto`",
    "mixup": "`--augment` plus `mixup:0.2`",
    "cosine": "`--schedule cosine --fine-tune-schedule cosine`",
    "layerwise": "`--layer-decay 0.7 --gradual-unfreeze`",
    PROBE: ("baseline: `LogisticRegressionCV` (C by cross-validation, at most 5 folds; balanced weights) "
            "on the frozen backbone"),
    SCRATCH: f"baseline: the same network from scratch, automatic class weights, {SCRATCH_STEPS} steps",
}


def imbalanced(counts: tuple[int, ...], seed: int):
    """Digits 5-9 with `counts` training images per class; every other image is the test set."""
    x, y, names = load_digits(NEW)
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c, n in zip(np.unique(y), counts)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return from_arrays(x[train], y[train], SIZE, names, test=(x[test], y[test]), seed=seed)


def run(weights: str | None, data, seed: int, train: dict, data_values: dict, **model) -> tuple[dict, float]:
    """One run; its test metrics and seconds."""
    config = RunConfig(DataConfig(**{"augment": AUGMENT, "seed": seed, **data_values}),
                       ModelConfig("simple_cnn", weights=weights, image_size=SIZE, **model), TrainConfig(**train))
    start = time.perf_counter()
    result = run_training(config, data=data, verbose=0, save="none")
    return result.metrics, time.perf_counter() - start


def probe(weights: str, data) -> dict:
    """`LogisticRegressionCV` (balanced class weights) on the frozen backbone's output features."""
    model = build_classifier(ModelConfig("simple_cnn", weights=weights, image_size=SIZE), len(data.class_names))
    extractor = model.features_model()
    (x, y), (xt, yt) = data.train.arrays(), data.test.arrays()
    features, test = (np.asarray(extractor.predict(a.astype(np.float32), verbose=0)) for a in (x, xt))
    fit = make_pipeline(StandardScaler(), LogisticRegressionCV(cv=min(5, int(np.bincount(y).min())),
                                                               class_weight="balanced", max_iter=5000))
    with warnings.catch_warnings():  # scikit-learn's notices of coming changes to its defaults
        warnings.simplefilter("ignore", FutureWarning)
        predicted = fit.fit(features, y).predict(test)
    return {"test_accuracy": float(np.mean(predicted == yt)),
            "test_macro_f1": float(f1_score(yt, predicted, average="macro"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="draws of the training images, averaged")
    parser.add_argument("--counts", type=int, nargs=5, default=list(COUNTS), help="training images of 5..9")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--no-baselines", action="store_true")
    _docs.add_flag(parser)
    args = parser.parse_args(argv)
    if args.write_docs:
        _docs.check_section("bench_recipes")
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_recipes-"))
    os.environ.setdefault("KERASTL_CACHE", str(work / "cache"))
    pretrained = pretrain(work / "pretrain", 0)
    weights = str(pretrained.export_dir / BACKBONE_WEIGHTS)
    counts = tuple(args.counts)
    print(f"simple_cnn pretrained on digits 0-4 (validation accuracy {pretrained.metrics['val_accuracy']:.3f}); "
          f"digits 5-9 with {', '.join(map(str, counts))} training images ({max(counts) / min(counts):.0f}:1), "
          f"{args.seeds} draws")
    rows = {name: [] for name in args.recipes}
    if not args.no_baselines:
        rows[PROBE] = []
        rows[SCRATCH] = []
    for seed in range(args.seeds):
        data = imbalanced(counts, seed)
        for name in args.recipes:
            train, data_values = RECIPES[name]
            rows[name].append(run(weights, data, seed, train, data_values))
        if not args.no_baselines:
            start = time.perf_counter()
            rows[PROBE].append((probe(weights, data), time.perf_counter() - start))
            rows[SCRATCH].append(run(None, data, seed, {"min_steps": SCRATCH_STEPS, "class_weight": "auto"}, {}))
    print(f"{'recipe':40} | test accuracy | test macro-F1 | seconds")
    table = []
    for name, results in rows.items():
        accuracy = np.mean([m["test_accuracy"] for m, _ in results])
        f1 = np.mean([m["test_macro_f1"] for m, _ in results])
        spread = np.std([m["test_macro_f1"] for m, _ in results])
        seconds = np.mean([s for _, s in results])
        print(f"{name:40} | {accuracy:13.3f} | {f1:.3f} +- {spread:.3f} | {seconds:7.0f}")
        table.append((DOCS_NAMES[name], f"{accuracy:.3f}", f"{f1:.3f} ± {spread:.3f}", f"{seconds:.0f}"))
    if args.write_docs:
        caption = (f"{args.seeds} draws of the training images ({', '.join(map(str, counts))} of digits 5-9), "
                   f"averaged; simple_cnn pretrained on digits 0-4 (validation accuracy "
                   f"{pretrained.metrics['val_accuracy']:.3f}); {_docs.measured_with('bench_recipes')}:")
        header = ("recipe", "test accuracy", "test macro-F1 (± std over draws)", "seconds")
        _docs.write_section("bench_recipes", f"{caption}\n\n{_docs.markdown_table(header, table)}")


if __name__ == "__main__":
    main()
