"""The offline demo: transfer learning on real data with no network, against the strongest baselines.

1. Pretrain `simple_cnn` (32x32) from scratch on scikit-learn's digits 0-4.
2. For 3 and for 10 labelled images per class of digits 5-9, train with the
   library's defaults from that backbone (`kerastl train --weights FILE` and
   nothing else: converged probe, chosen blocks, cross-validated fine-tuning).
3. Baselines on the same images: the same network from scratch, trained to
   convergence (`SCRATCH_STEPS` optimizer steps); and, as a reference, a
   scikit-learn linear probe on the pretrained backbone's output.
4. Test accuracy on the remaining images of 5-9; export the transferred model,
   reload the SavedModel and predict raw 8x8 digits with it.

The demo's choices are its data, its backbone and the augmentation suited to
digits (no flips); every training setting of the transfer runs is the default.
`scripts/bench_transfer.py` runs the same comparison at more sizes and backbones.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import ImageData, from_arrays, load_digits
from kerastl.features.blocks import block_columns
from kerastl.models.classifier import build_classifier
from kerastl.models.export import load_export
from kerastl.runs.folder import BACKBONE_WEIGHTS
from kerastl.runs.run import RunResult, run_training

log = logging.getLogger(__name__)

BACKBONE = "simple_cnn"
SIZE = 32
SHOTS = (3, 10)
AUGMENT = "rotate:0.05,zoom:0.1"  # digits are not mirror-symmetric: no flips
SCRATCH_STEPS = 1000  # a from-scratch baseline's budget: its test accuracy no longer rises by then
OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def pretrain(output: Path, seed: int = 0, backbone: str = BACKBONE, classes: tuple[int, ...] = OLD) -> RunResult:
    """`backbone` from scratch on digits `classes` (0-4; 20% held out); its folder has `backbone.weights.h5`."""
    x, y, names = load_digits(classes)
    config = RunConfig(DataConfig(augment=AUGMENT, seed=seed), ModelConfig(backbone, weights=None, image_size=SIZE),
                       name=f"pretrain_{classes[0]}-{classes[-1]}_{backbone}", export_dir=str(output))
    return run_training(config, data=from_arrays(x, y, SIZE, names, validation_split=0.2, seed=seed),
                        overwrite=True, verbose=0)


def few_shot(per_class: int, seed: int = 0, classes: tuple[int, ...] = NEW) -> tuple[ImageData, np.ndarray,
                                                                                    np.ndarray]:
    """Digits `classes` (5-9): `per_class` labelled training images per class, every other image for testing.

    Returns the data (training and test splits) and the test images' indices and raw digits' labels.
    """
    x, y, names = load_digits(classes)
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return from_arrays(x[train], y[train], SIZE, names, test=(x[test], y[test]), seed=seed), test, y


def transfer(weights: str, data: ImageData, output: Path | None, seed: int = 0, backbone: str = BACKBONE,
             features: str = "auto", unfreeze_blocks: int | str = "auto", fine_tune: bool = True) -> RunResult:
    """A run with the library's defaults from a pretrained backbone file (written to `output`, or not).

    `features`, `unfreeze_blocks` and `fine_tune` (False: phase 1 alone) are there for the
    benchmark's comparisons; the demo keeps the defaults.
    """
    train = TrainConfig(unfreeze_blocks=unfreeze_blocks, **({} if fine_tune else {"fine_tune_epochs": 0}))
    config = RunConfig(DataConfig(augment=AUGMENT, seed=seed),
                       ModelConfig(backbone, weights=weights, image_size=SIZE, features=features), train,
                       name="transfer", export_dir=str(output) if output else None)
    return run_training(config, data=data, overwrite=True, verbose=0, save="export" if output else "none")


def scratch(data: ImageData, seed: int = 0, backbone: str = BACKBONE) -> RunResult:
    """`backbone` from scratch on the same images, trained to convergence (`SCRATCH_STEPS` steps)."""
    config = RunConfig(DataConfig(augment=AUGMENT, seed=seed), ModelConfig(backbone, weights=None, image_size=SIZE),
                       TrainConfig(min_steps=SCRATCH_STEPS), name="scratch")
    return run_training(config, data=data, overwrite=True, verbose=0, save="none")


def probe_accuracies(weights: str, data: ImageData, backbone: str = BACKBONE) -> dict[str, float]:
    """scikit-learn's `LogisticRegressionCV` (C chosen by stratified k-fold cross-validation on the
    training images, k up to 5) on standardised pooled features of the frozen pretrained backbone:
    the strongest linear probe the labelled images allow.

    Returns test accuracy reading the backbone's output ("last"), all blocks concatenated ("all"),
    and the best over single blocks and all blocks ("best", chosen on the test set: a ceiling, not
    a method) with the reading that gave it ("best_reading"); "all_fixed" is the all-block probe
    at a fixed C=0.1, with no tuning at all, and "best_block" the best single block's.
    """
    model = build_classifier(ModelConfig(backbone, weights=weights, image_size=SIZE), len(data.class_names))
    count = model.block_count()
    widths = model.block_widths(list(range(1, count + 1)))
    extractor = model.features_model(list(range(1, count + 1)))
    (x, y), (xt, yt) = data.train.arrays(), data.test.arrays()
    features, test_features = (np.asarray(extractor.predict(a.astype(np.float32), verbose=0)) for a in (x, xt))
    readings = {f"block {b}": block_columns(widths, [b]) for b in range(1, count + 1)}
    readings["all blocks"] = block_columns(widths, list(range(1, count + 1)))
    accuracies, folds = {}, min(5, int(np.bincount(y).min()))
    def untuned():  # the all-block reference with no tuning at all, and the fallback where nothing can be folded
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))

    for name, columns in readings.items():  # one image per class cannot be folded: C=0.1 there
        probe = make_pipeline(StandardScaler(), LogisticRegressionCV(cv=folds, max_iter=5000)) if folds > 1 \
            else untuned()
        with warnings.catch_warnings():  # scikit-learn's notices of coming changes to its defaults
            warnings.simplefilter("ignore", FutureWarning)
            probe.fit(features[:, columns], y)
        accuracies[name] = float(probe.score(test_features[:, columns], yt))
    every = readings["all blocks"]
    fixed = untuned().fit(features[:, every], y)
    best = max(accuracies, key=accuracies.get)
    return {"last": accuracies[f"block {count}"], "best": accuracies[best], "best_reading": best,
            "all": accuracies["all blocks"], "all_fixed": float(fixed.score(test_features[:, every], yt)),
            "best_block": max(accuracy for name, accuracy in accuracies.items() if name != "all blocks")}


@dataclass
class ShotResult:
    """One few-shot size: test accuracies of the transfer, the baseline and the probes."""

    per_class: int
    transfer: float
    scratch: float
    probe_last: float
    probe_best: float
    probe_best_reading: str
    features: str
    unfreeze_blocks: int
    fine_tune_epochs: float
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoResult:
    """The pretraining score, one `ShotResult` per size, and what the reloaded export predicted."""

    pretrain_accuracy: float
    shots: list[ShotResult]
    test_images: int
    samples: list[tuple[str, str, float]]
    export_parity: float
    export_dir: Path
    seconds: float


def timed(function, *args, **kwargs):
    """`function(*args, **kwargs)` and the seconds it took."""
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def run_demo(output: str | Path = "saved_models/demo", seed: int = 0) -> DemoResult:
    """Pretrains, then compares transfer and baselines at each of `SHOTS`; exports the last transfer."""
    start = time.time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)  # the demo's own folder; its runs go inside it
    log.info("pretraining %s from scratch on digits 0-4", BACKBONE)
    pretrained = pretrain(output / "pretrain_0-4", seed)
    weights = str(pretrained.export_dir / BACKBONE_WEIGHTS)
    shots, exported = [], None
    for per_class in SHOTS:
        data, test, labels = few_shot(per_class, seed)
        log.info("digits 5-9 from %d images per class", per_class)
        folder = output / f"transfer_5-9_{per_class}"
        moved, moved_s = timed(transfer, weights, data, folder, seed)
        baseline, baseline_s = timed(scratch, data, seed)
        probes, probes_s = timed(probe_accuracies, weights, data)
        shots.append(ShotResult(
            per_class, moved.metrics["test_accuracy"], baseline.metrics["test_accuracy"], probes["last"],
            probes["best"], probes["best_reading"], moved.config.model.features, moved.config.train.unfreeze_blocks,
            moved.metrics.get("cv_fine_tune_epochs", 0.0),
            {"transfer": moved_s, "scratch": baseline_s, "probes": probes_s},
        ))
        exported = (moved, test, labels)
    moved, test, labels = exported
    reloaded = load_export(moved.export_dir)
    x, _, names = load_digits(NEW)
    shown = [next(i for i in test if labels[i] == label) for label in range(len(names))]
    raw = np.repeat(x[shown], 3, axis=-1).astype(np.float32)  # raw 8x8 digits: the export resizes
    probabilities = reloaded.predict(raw)
    parity = float(np.abs(probabilities - moved.model.predict(raw, verbose=0)).max())
    samples = [(names[label], top[0][0], top[0][1])
               for label, top in zip(labels[shown], reloaded.top_k(probabilities, 1))]
    return DemoResult(pretrained.metrics["val_accuracy"], shots, len(test), samples, parity, moved.export_dir,
                      time.time() - start)


def format_report(result: DemoResult) -> str:
    """A short human-readable report of a `DemoResult`."""
    lines = [
        f"kerastl demo: {BACKBONE} at {SIZE}x{SIZE}, scikit-learn digits, offline",
        f"  pretrained from scratch on digits 0-4 (validation accuracy {result.pretrain_accuracy:.3f})",
        "  digits 5-9, test accuracy on the images not used for training:",
        "    per class | transfer, defaults | same network from scratch | linear probe: output, best reading",
    ]
    for shot in result.shots:
        lines.append(
            f"    {shot.per_class:9d} | {shot.transfer:18.3f} | {shot.scratch:25.3f} | "
            f"{shot.probe_last:.3f}, {shot.probe_best:.3f} ({shot.probe_best_reading})")
    for shot in result.shots:
        lines.append(
            f"  {shot.per_class} per class: features {shot.features}, fine-tuning depth {shot.unfreeze_blocks}, "
            f"{shot.fine_tune_epochs:.0f} fine-tuning epochs chosen by cross-validation; seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in shot.seconds.items()))
    lines += [
        f"  exported SavedModel: {result.export_dir} (reloaded; max |export - Keras| = {result.export_parity:.1e})",
        "  predictions of the reloaded export on raw 8x8 test digits (true -> predicted, probability):",
        "    " + ", ".join(f"{t}->{p} {q:.2f}" for t, p, q in result.samples),
        f"  took {result.seconds:.0f} s",
    ]
    return "\n".join(lines)
