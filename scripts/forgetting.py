"""Catastrophic forgetting: what fine-tuning on a new task does to the old one, LP-FT against plain FT.

`simple_cnn` is pretrained from scratch on scikit-learn's digits 0-4 (as `kerastl demo`
does), then trained on digits 5-9 from that backbone at several depths (the last 1, 2
or all blocks unfrozen) and fine-tuning learning rates (a high one, and kerastl's
default, a tenth of 1e-3), two ways: LP-FT, kerastl's default (`run_training`: a
converged head on the frozen base first, then fine-tuning, kept only while validation
loss beats the head alone), and FT, a fresh random head trained jointly with the
unfrozen blocks from the start (`build_classifier`, `unfreeze`, `compile_classifier`,
Keras `fit` for as many epochs as LP-FT's two phases together, keeping the epoch of least
validation loss). The old task is then scored through the OLD head: the pretrained model's head on each fine-tuned
backbone's features, on held-out digits 0-4. It prints the table (with how far each
backbone's weights moved) and saves a plot of new-task against old-task accuracy
(`forgetting.png` in `--output`).

    python scripts/forgetting.py
    python scripts/forgetting.py --limit 5 --epochs 1 --fine-tune-epochs 1 --min-steps 0 --depths 1,all
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import keras
from _examples import (
    accuracy,
    add_common_flags,
    add_training_flags,
    format_table,
    load_arrays,
    run,
    save_table,
    train_config,
)
from matplotlib.figure import Figure

import kerastl

OLD, NEW = ["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]
MARKERS = {"LP": "*", "LP-FT": "o", "FT": "s"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, data="digits", weights="none", output="saved_models/forgetting")
    add_training_flags(parser)
    parser.add_argument("--backbone", default="simple_cnn")
    parser.add_argument("--image-size", type=int, default=32, help="input size (32, as the demo)")
    parser.add_argument("--depths", default="1,2,all", help="blocks to unfreeze: numbers or all (1,2,all)")
    parser.add_argument("--lrs", default="1e-2,1e-4", help="fine-tuning learning rates (1e-2,1e-4: high, default)")
    return parser.parse_args(argv)


def fine_tune_plainly(weights: str, args: argparse.Namespace, data: kerastl.ImageData, depth: int,
                      rate: float) -> tuple[kerastl.TransferClassifier, int]:
    """FT: a fresh head and the top `depth` blocks trained together at `rate` from the first step, for as many
    epochs (and steps, at the least) as LP-FT's two phases together, keeping the epoch of least validation loss."""
    config = kerastl.ModelConfig(args.backbone, weights=weights, image_size=args.image_size, features="last")
    model = kerastl.build_classifier(config, len(data.class_names), seed=args.seed)
    model.unfreeze(blocks=depth)
    budget = train_config(args)
    kerastl.compile_classifier(model, kerastl.TrainConfig(learning_rate=rate))
    batch = kerastl.DataConfig().batch_size
    steps = (budget.min_steps + budget.fine_tune_min_steps) / math.ceil(data.train.count / batch)
    epochs = max(budget.epochs + budget.fine_tune_epochs, math.ceil(steps))
    augmenter = kerastl.build_augmenter(args.augment, seed=args.seed)
    history = model.fit(data.train.batches(batch, training=True, augmenter=augmenter, seed=args.seed),
                        validation_data=data.validation.batches(batch), epochs=epochs, verbose=0, shuffle=False,
                        callbacks=[keras.callbacks.EarlyStopping(patience=budget.patience,
                                                                 restore_best_weights=True)])
    return model, len(history.epoch)


def plot(rows: list[dict], pretrained: float, path: Path) -> None:
    """New-task against old-task accuracy, one point per run."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    rates = sorted({row["lr"] for row in rows if row["lr"] is not None})
    for row in rows:
        colour = f"C{rates.index(row['lr'])}" if row["lr"] is not None else "black"
        axes.scatter(row["new"], row["old"], marker=MARKERS[row["method"]], c=colour,
                     s=60, zorder=3 if row["method"] == "LP" else 2)
        if row["method"] == "FT":  # LP and LP-FT crowd the top right corner
            axes.annotate(f"d{row['depth']}", (row["new"], row["old"]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
    axes.axhline(pretrained, color="grey", linestyle="--", linewidth=1, label=f"pretrained: {pretrained:.3f}")
    for index, rate in enumerate(rates):
        axes.scatter([], [], c=f"C{index}", label=f"fine-tuning lr {rate:g}")
    for method, marker in MARKERS.items():
        axes.scatter([], [], marker=marker, c="grey", label=method)
    axes.set(xlabel="new task (digits 5-9) test accuracy", ylabel="old task (digits 0-4) accuracy, old head",
             title="Forgetting: the old head on each fine-tuned backbone", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axes.legend(fontsize=8, loc="lower left")
    figure.savefig(path, dpi=100)


def experiment(args: argparse.Namespace) -> None:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    digits = load_arrays(args.data, args.image_size, args.seed)
    old, new = (digits.classes(classes).limited(args.limit, args.seed) for classes in (OLD, NEW))
    old_data, new_data = old.image_data(args.image_size, args.seed), new.image_data(args.image_size, args.seed)
    model_config = kerastl.ModelConfig(args.backbone, weights=args.weights, image_size=args.image_size,
                                       features="last")
    source = kerastl.DataConfig(source=args.data, augment=args.augment, seed=args.seed)
    pretrained = kerastl.run_training(kerastl.RunConfig(source, model_config, train_config(args)), data=old_data,
                                      save="none", verbose=0).model
    weights = str(output / "pretrained_0-4.weights.h5")
    pretrained.backbone.save_weights(weights)
    old_head = pretrained.head_model()  # the pretrained model's own head: kept as it is
    start = pretrained.backbone.get_weights()
    rows = []

    def scores(model: kerastl.TransferClassifier) -> tuple[float, float]:
        new_acc = accuracy(model.predict(new_data.test.batches(64), verbose=0), new_data.test.labels)
        features = model.features_model(pretrained.feature_blocks).predict(old_data.test.batches(64), verbose=0)
        return new_acc, accuracy(old_head.predict(features, verbose=0), old_data.test.labels)

    def record(method: str, depth: int, rate: float | None, epochs: int, model: kerastl.TransferClassifier):
        moved = max(float(abs(now - then).max()) for now, then in zip(model.backbone.get_weights(), start))
        rows.append(dict(method=method, depth=depth, lr=rate, epochs=epochs, moved=moved,
                         **dict(zip(("new", "old"), scores(model)))))

    before = scores(pretrained)[1]
    print(f"{args.backbone} pretrained on digits 0-4 ({old_data.train.count} images): old-task accuracy "
          f"{before:.3f} on {old_data.test.count} held-out images; digits 5-9: {new_data.train.count} training, "
          f"{new_data.test.count} test images")
    count = pretrained.block_count()
    depths = [count if d.strip() == "all" else int(d) for d in args.depths.split(",")]
    rates = [float(r) for r in args.lrs.split(",")]
    default_rate = kerastl.TrainConfig().learning_rate
    transfer = kerastl.ModelConfig(args.backbone, weights=weights, image_size=args.image_size, features="last")

    def lp_ft(depth: int, rate: float | None) -> kerastl.RunResult:
        train = train_config(args, validation="holdout", unfreeze_blocks=depth,
                             **({"fine_tune_lr_ratio": rate / default_rate} if rate else {"fine_tune_epochs": 0}))
        return kerastl.run_training(kerastl.RunConfig(source, transfer, train), data=new_data, save="none", verbose=0)

    record("LP", 0, None, 0, lp_ft(0, None).model)
    for depth in depths:
        for rate in rates:
            result = lp_ft(depth, rate)
            record("LP-FT", depth, rate, len(result.history.phase2.epoch) if result.history.phase2 else 0,
                   result.model)
            model, epochs = fine_tune_plainly(weights, args, new_data, depth, rate)
            record("FT", depth, rate, epochs, model)
    table = [(row["method"], "all" if row["depth"] == count else row["depth"], f"{row['lr']:g}" if row["lr"] else "-",
              row["epochs"], f"{row['moved']:.2g}", f"{row['new']:.3f}", f"{row['old']:.3f}") for row in rows]
    header = ("method", "depth", "lr", "FT epochs", "max dw", "new acc", "old acc (old head)")
    print(format_table(header, table))
    save_table(output / "forgetting.csv", header, table)
    plot(rows, before, output / "forgetting.png")
    print(f"old acc before fine-tuning: {before:.3f}. FT epochs: those run (both keep their best epoch on "
          f"validation loss); max dw: the largest change of a backbone weight (0: the backbone was kept as "
          f"pretrained). Wrote forgetting.png and forgetting.csv in {output}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(experiment, parse_args(argv), "forgetting")


if __name__ == "__main__":
    raise SystemExit(main())
