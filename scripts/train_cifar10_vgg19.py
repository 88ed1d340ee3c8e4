"""The seed tutorial: VGG19 on CIFAR-10, a frozen base first and then fine-tuning.

VGG19's ImageNet weights (when they can be had) start the backbone; kerastl trains the
head on the frozen base (from a converged linear probe, on cached features), then
fine-tunes the backbone's top blocks at a tenth of the learning rate, keeping
fine-tuning only where it does not end worse on validation. The images stay at
CIFAR's own 32x32 (VGG19's smallest input, as in the tutorial; `--image-size 224`, the
registry's default, reads ImageNet features better at about 49 times the compute and
memory). It prints each phase's epochs, the scores, the test accuracy on CIFAR-10's
10,000 test images, and where the export (SavedModel, report, model card) went.

    python scripts/train_cifar10_vgg19.py                                   # the full run (downloads)
    python scripts/train_cifar10_vgg19.py --data cifar-10-batches-py --weights none --limit 20 --epochs 1
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from _examples import add_common_flags, add_training_flags, format_table, load_arrays, run, train_config

import kerastl

BACKBONE = "vgg19"
CIFAR_SIZE = 32


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, data="cifar10", weights="imagenet", output="saved_models/cifar10_vgg19",
                     augment="light")
    add_training_flags(parser)
    parser.add_argument("--image-size", type=int, default=CIFAR_SIZE,
                        help=f"input size (default {CIFAR_SIZE}; {BACKBONE} needs at least "
                             f"{kerastl.get_spec(BACKBONE).min_size})")
    parser.add_argument("--unfreeze-blocks", default="auto",
                        type=lambda text: text if text == "auto" else int(text),
                        help="VGG blocks phase 2 trains (default auto: chosen from the probes)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    arrays = load_arrays(args.data, args.image_size, args.seed).limited(args.limit, args.seed)
    data = arrays.image_data(args.image_size, args.seed)
    config = kerastl.RunConfig(
        kerastl.DataConfig(source=args.data, augment=args.augment, seed=args.seed),
        kerastl.ModelConfig(BACKBONE, weights=args.weights, image_size=args.image_size),
        train_config(args, unfreeze_blocks=args.unfreeze_blocks), name="cifar10_vgg19", export_dir=args.output)
    print(f"{BACKBONE} at {args.image_size}x{args.image_size} on {args.data}: {data.train.count} training, "
          f"{data.validation.count} validation, {data.test.count} test images; weights {args.weights}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    result = kerastl.run_training(config, data=data, overwrite=True, verbose=2)
    first = "1: every layer, from scratch" if result.model.from_scratch else "1: head, frozen base"
    phases = [(first, result.history.phase1), ("2: fine-tuning", result.history.phase2)]
    rows = [(name, len(history.epoch) if history is not None else 0) for name, history in phases]
    print(format_table(("phase", "epochs"), rows) + "\n")
    print(format_table(("score", "value"), [(key, f"{value:.4f}") for key, value in sorted(result.metrics.items())
                                            if key.endswith(("accuracy", "loss"))]))
    chosen = result.config
    if result.model.from_scratch:
        print("trained from scratch (weights none): every layer in phase 1, no fine-tuning phase")
    else:
        print(f"features read: {chosen.model.features}; fine-tuning depth: {chosen.train.unfreeze_blocks} blocks")
    print(f"test accuracy: {result.metrics['test_accuracy']:.4f} on {data.test.count} images")
    print(f"exported to {result.export_dir} (kerastl predict --model {result.export_dir} IMAGE)")


def main(argv: Sequence[str] | None = None) -> int:
    return run(train, parse_args(argv), "train_cifar10_vgg19")


if __name__ == "__main__":
    raise SystemExit(main())
