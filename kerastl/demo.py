"""The offline demo: transfer learning on real data with no network.

1. Pretrain MobileNetV2 (32x32) from scratch on scikit-learn's digits 0-4.
2. Transfer its backbone to digits 5-9 with 10 labelled training images per class
   (and 10 per class for validation): head on the frozen base, then fine-tuning.
3. Train the same architecture from scratch on the same images.
4. Compare test accuracy on the remaining ~800 images of 5-9; export the
   transferred model, reload the SavedModel and predict raw 8x8 digits with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data import from_arrays, load_digits
from kerastl.export import load_export
from kerastl.run import run_training
from kerastl.runfolder import BACKBONE_WEIGHTS

log = logging.getLogger(__name__)

BACKBONE = "mobilenet_v2"
SIZE = 32
PER_CLASS = 10
AUGMENT = "rotate:0.05,zoom:0.1"  # digits are not mirror-symmetric: no flips


@dataclass
class DemoResult:
    """Accuracies of the three runs and what the reloaded export predicted."""

    pretrain_accuracy: float
    transfer_accuracy: float
    scratch_accuracy: float
    train_images: int
    test_images: int
    samples: list[tuple[str, str, float]]
    export_parity: float
    export_dir: Path
    seconds: float


def _few_shot_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    train, validation, test = [], [], []
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        train += list(index[:per_class])
        validation += list(index[per_class : 2 * per_class])
        test += list(index[2 * per_class :])
    return train, validation, test


def run_demo(output: str | Path = "saved_models/demo", seed: int = 0) -> DemoResult:
    """Runs the three trainings into `output` and returns the comparison."""
    start = time.time()
    output = Path(output)
    data = DataConfig(augment=AUGMENT, batch_size=32, seed=seed)

    log.info("1/3 pretraining %s from scratch on digits 0-4", BACKBONE)
    x, y, names = load_digits((0, 1, 2, 3, 4))
    pretrain = run_training(
        RunConfig(data, ModelConfig(BACKBONE, weights=None, image_size=SIZE), TrainConfig(epochs=20, patience=5),
                  name="pretrain_0-4", export_dir=str(output / "pretrain_0-4")),
        data=from_arrays(x, y, SIZE, names, validation_split=0.2, seed=seed), overwrite=True, verbose=0,
    )

    x, y, names = load_digits((5, 6, 7, 8, 9))
    train, validation, test = _few_shot_split(y, PER_CLASS, seed)
    few_shot = from_arrays(
        x[train], y[train], SIZE, names, validation=(x[validation], y[validation]), test=(x[test], y[test])
    )
    small = DataConfig(augment=AUGMENT, batch_size=16, seed=seed)
    weights = str(pretrain.export_dir / BACKBONE_WEIGHTS)
    log.info("2/3 transferring to digits 5-9 from %d images", len(train))
    transfer = run_training(
        RunConfig(small, ModelConfig(BACKBONE, weights=weights, image_size=SIZE),
                  TrainConfig(epochs=30, fine_tune_epochs=50, unfreeze_blocks=16, learning_rate=3e-3,
                              patience=15),
                  name="transfer_5-9", export_dir=str(output / "transfer_5-9")),
        data=few_shot, overwrite=True, verbose=0,
    )
    log.info("3/3 training the same network from scratch on the same %d images", len(train))
    scratch = run_training(
        RunConfig(small, ModelConfig(BACKBONE, weights=None, image_size=SIZE), TrainConfig(epochs=70, patience=20),
                  name="scratch_5-9", export_dir=str(output / "scratch_5-9")),
        data=few_shot, overwrite=True, verbose=0,
    )

    exported = load_export(transfer.export_dir)
    shown = [next(i for i in test if y[i] == label) for label in range(len(names))]
    raw = np.repeat(x[shown], 3, axis=-1).astype(np.float32)  # raw 8x8 digits: the export resizes
    probabilities = exported.predict(raw)
    parity = float(np.abs(probabilities - transfer.model.predict(raw, verbose=0)).max())
    samples = [
        (names[label], top[0][0], top[0][1])
        for label, top in zip(y[shown], exported.top_k(probabilities, 1))
    ]
    return DemoResult(
        pretrain.metrics["val_accuracy"], transfer.metrics["test_accuracy"],
        scratch.metrics["test_accuracy"], len(train), len(test), samples, parity,
        transfer.export_dir, time.time() - start,
    )


def format_report(result: DemoResult) -> str:
    """A short human-readable report of a `DemoResult`."""
    lines = [
        f"kerastl demo: {BACKBONE} at {SIZE}x{SIZE}, scikit-learn digits, offline",
        f"  pretrained on digits 0-4 (validation accuracy {result.pretrain_accuracy:.3f})",
        f"  digits 5-9, {result.train_images} training images, test on {result.test_images}:",
        f"    transfer (frozen head, then fine-tuning): test accuracy {result.transfer_accuracy:.3f}",
        f"    same network from scratch:                test accuracy {result.scratch_accuracy:.3f}",
        f"  exported SavedModel: {result.export_dir} (reloaded; max |export - Keras| = {result.export_parity:.1e})",
        "  predictions of the reloaded export on raw 8x8 test digits (true -> predicted, probability):",
        "    " + ", ".join(f"{t}->{p} {q:.2f}" for t, p, q in result.samples),
        f"  took {result.seconds:.0f} s",
    ]
    return "\n".join(lines)
