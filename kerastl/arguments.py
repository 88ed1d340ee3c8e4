"""The `kerastl` command's flags: the argparse parser, its value checks and help texts.

No TensorFlow here: `--help` and bad flags answer before it loads (see `kerastl.cli`).
"""

from __future__ import annotations

import argparse

from kerastl.config import (IMBALANCE_RATIO, LOSSES, SAMPLING, SCHEDULES, VALIDATION_MODES, parse_class_weight,
                            parse_features)
from kerastl.errors import KerastlError
from kerastl.quiet import NATIVE_LOG_VARIABLE
from kerastl.tune.config import AUTO_OBJECTIVE, ISOLATION, OBJECTIVES, SPACE_FIELDS, TUNERS


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"kerastl: error: {message}\n")


def _count(min_value: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < min_value:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {min_value}")
        return value

    return parse


def _number(valid, problem: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{value} is {problem}")
        return value

    return parse


def _class_weight(text: str) -> str:
    try:
        parse_class_weight(text)
    except KerastlError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _features(text: str) -> str:
    try:
        parse_features(text)
    except KerastlError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("features must be ")) from None
    return text.strip().lower()


def _blocks(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _count(0)(text)


_fraction = _number(lambda v: 0.0 <= v < 1.0, "not in [0, 1)")
_positive = _number(lambda v: v > 0, "not positive")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="SRC", help="class folder, CSV file (path and label columns, optional split), "
                   "cifar10, a cifar-10-batches-py folder, or digits")
    d.add_argument("--validation-dir", metavar="DIR", help="separate validation class folder")
    d.add_argument("--test-dir", metavar="DIR", help="separate test class folder")
    d.add_argument("--validation-split", type=_fraction, metavar="F", help="fraction held out per class (0.2)")
    d.add_argument("--test-split", type=_fraction, metavar="F", help="fraction held out for testing (0)")
    d.add_argument("--batch-size", type=_count(1), metavar="N", help="batch size (32)")
    d.add_argument("--augment", metavar="PRESET", help="none, light, standard, strong, randaugment, augmix, mixup, "
                   "cutmix, or layers such as flip,rotate:0.2,mixup:0.2 (light)")
    d.add_argument("--seed", type=int, metavar="N", help="random seed for splits, shuffling, augmentation (42)")
    d.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="fail before training if any file cannot be read as an image (off: skip it, with a warning)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", metavar="NAME", help="registry name, see `kerastl backbones` (mobilenet_v2)")
    m.add_argument("--weights", metavar="W", help="imagenet, none (train from scratch) or a weights file (imagenet)")
    m.add_argument("--image-size", type=_count(1), metavar="N", help="input size (the backbone's default)")
    m.add_argument("--dropout", type=_fraction, metavar="F", help="dropout before the classifier (0.2)")
    m.add_argument("--hidden-units", type=_count(0), metavar="N", help="Dense hidden layer size; 0 for none (0)")
    m.add_argument("--pooling", choices=("avg", "max"), help="global pooling of the feature map (avg)")
    m.add_argument("--binary", action=argparse.BooleanOptionalAction, default=None,
                   help="one sigmoid unit for two classes instead of a softmax")
    m.add_argument("--l2", type=_number(lambda v: v >= 0, "negative"), metavar="W",
                   help="L2 penalty on the head's Dense kernels (0)")
    m.add_argument("--max-norm", type=_number(lambda v: v >= 0, "negative"), metavar="N",
                   help="max-norm constraint on the head's Dense kernels; 0 for none (0)")
    m.add_argument("--features", type=_features, metavar="SPEC",
                   help="what the head reads: last (the backbone's output), all (every block), block numbers "
                   "such as 3,7, or auto (linear probes choose) (auto)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_count(1), metavar="N", help="phase-1 epochs at the least, base frozen (10)")
    t.add_argument("--min-steps", type=_count(0), metavar="N",
                   help="phase-1 optimizer steps at the least, however small the data (300)")
    t.add_argument("--fine-tune-epochs", type=_count(0), metavar="N", help="phase-2 epochs at the least; 0 skips (10)")
    t.add_argument("--fine-tune-min-steps", type=_count(0), metavar="N", help="phase-2 steps at the least (100)")
    t.add_argument("--unfreeze-blocks", type=_blocks, metavar="K",
                   help="backbone blocks phase 2 trains, or auto: read off the probe curve (auto)")
    t.add_argument("--unfreeze-from", metavar="LAYER", help="or: train phase 2 from this backbone layer on")
    t.add_argument("--optimizer", metavar="NAME", help="Keras optimizer name (adam)")
    t.add_argument("--loss", choices=tuple(LOSSES), metavar="NAME",
                   help="; ".join(f"{name}: {what}" for name, what in LOSSES.items()) + " (auto)")
    t.add_argument("--learning-rate", type=_positive, metavar="LR", help="phase-1 learning rate (0.001)")
    t.add_argument("--fine-tune-lr-ratio", type=_positive, metavar="R", help="phase-2 LR as a fraction (0.1)")
    t.add_argument("--label-smoothing", type=_fraction, metavar="F", help="cross-entropy label smoothing (0)")
    t.add_argument("--weight-decay", type=_number(lambda v: v >= 0, "negative"), metavar="W",
                   help="decoupled weight decay (0)")
    t.add_argument("--patience", type=_count(0), metavar="N", help="EarlyStopping patience in epochs (5)")
    t.add_argument("--class-weight", type=_class_weight, metavar="W",
                   help="none; auto (n / (k * count) per class); or by hand, cat=2,dog=1 or 2,1 in class order "
                   "(none)")
    t.add_argument("--sampling", choices=SAMPLING,
                   help="shuffle: every image once per epoch; balanced: classes drawn equally often (shuffle)")
    t.add_argument("--schedule", choices=SCHEDULES, help="phase-1 learning-rate schedule: constant, cosine "
                   "(with warmup) or plateau (ReduceLROnPlateau) (constant)")
    t.add_argument("--fine-tune-schedule", choices=SCHEDULES, help="phase-2 learning-rate schedule (constant)")
    t.add_argument("--warmup", type=_fraction, metavar="F", help="share of a cosine schedule's steps warming up "
                   "(0.1)")
    t.add_argument("--layer-decay", type=_number(lambda v: 0 < v <= 1, "not in (0, 1]"), metavar="D",
                   help="discriminative rates in phase 2: each unfrozen block down learns D times the one "
                   "above (1: one rate)")
    t.add_argument("--gradual-unfreeze", action=argparse.BooleanOptionalAction, default=None,
                   help="phase 2 opens the unfrozen blocks one at a time, the top first (off)")
    v = p.add_argument_group("validation")
    v.add_argument("--validation", choices=VALIDATION_MODES,
                   help="holdout: the validation split; cv: k-fold cross-validation on every labelled image; "
                   "auto: cv when a class has fewer than --cv-below images (auto)")
    v.add_argument("--cv-below", type=_count(0), metavar="N", help="images per class under which auto "
                   "cross-validates (30)")
    v.add_argument("--cv-folds", type=_count(2), metavar="K", help="cross-validation folds (5)")
    c = p.add_argument_group("feature cache (phase 1 on features computed once)")
    c.add_argument("--cache", dest="feature_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="train the head on cached backbone features while the base is frozen (on)")
    c.add_argument("--cache-views", type=_count(1), metavar="K",
                   help="augmented views cached per image when augmenting; epoch e uses view e %% K (4)")
    c.add_argument("--cache-dir", metavar="DIR", help="feature cache folder (~/.cache/kerastl)")
    o = p.add_argument_group("output")
    o.add_argument("--config", metavar="FILE", help="a run config, JSON or TOML (tables [data], [model], [train], "
                   "and [tune] for a search); flags override its values")
    o.add_argument("--name", help="run name (backbone-date-time)")
    o.add_argument("--export", metavar="DIR", help="output folder (saved_models/NAME)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The `kerastl` parser: one subcommand per command, errors as one line with exit code 2."""
    parser = _Parser(prog="kerastl", description="Transfer learning on images with Keras.",
                     epilog=f"TensorFlow's native start-up log is hidden; --verbose or {NATIVE_LOG_VARIABLE}=1 "
                     "shows it.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and TensorFlow's native log")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train", help="train a classifier (frozen base, then fine-tuning) and export it",
        description="Train a classifier and export it. A killed run resumes from its last completed epoch when "
        "the same command runs again (its state is kept in EXPORT.partial).")
    _add_train_flags(train)
    train.add_argument("--restart", action="store_true",
                       help="discard an unfinished run into the same export folder instead of resuming it")
    predict = sub.add_parser("predict", help="classify images with an exported model")
    predict.add_argument("--model", required=True, metavar="DIR", help="an export folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, GIF or BMP files")
    predict.add_argument("--top-k", type=_count(1), default=3, metavar="K", help="classes to show (3)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image")
    extract = sub.add_parser(
        "extract", help="save pooled backbone features of a source's training images (all of a class folder or "
        "digits; CIFAR-10's 50,000 training images) to an .npz file")
    extract.add_argument("--data", required=True, metavar="SRC", help="class folder, cifar10 folder, or digits")
    extract.add_argument("--backbone", default="mobilenet_v2", metavar="NAME", help="registry name (mobilenet_v2)")
    extract.add_argument("--weights", default="imagenet", metavar="W", help="imagenet, none or a weights file")
    extract.add_argument("--image-size", type=_count(1), metavar="N", help="input size (the backbone's default)")
    extract.add_argument("--layers", metavar="NAME[,NAME]", help="backbone layers to pool, one array each")
    extract.add_argument("--features", type=_features, default="last", metavar="SPEC",
                         help="blocks to pool and concatenate: last, all or numbers such as 3,7 (last)")
    extract.add_argument("--batch-size", type=_count(1), default=64, metavar="N", help="(64)")
    extract.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    evaluate = sub.add_parser(
        "evaluate", help="score an export or run folder on labelled images: per-class metrics, confusion matrix, "
        "calibration", description="Evaluate a model on every image of a data source (CIFAR-10: its test set). "
        "The source's classes must be some or all of the model's (labels.txt).")
    evaluate.add_argument("--model", required=True, metavar="DIR", help="an export or run folder")
    evaluate.add_argument("--data", required=True, metavar="SRC", help="class folder, digits, cifar10 or its folder")
    evaluate.add_argument("--json", metavar="FILE", help="also write the evaluation as JSON")
    evaluate.add_argument("--plots", metavar="DIR", help="also write the confusion matrix, reliability diagram and "
                          "most confidently wrong images as PNGs")
    evaluate.add_argument("--top-k", type=_count(1), default=3, metavar="K", help="top-k accuracy (3)")
    evaluate.add_argument("--batch-size", type=_count(1), default=64, metavar="N", help="(64)")
    report = sub.add_parser("report", help="rebuild report.html (and the plots) of a run folder or search project",
                            description="A run folder gets its plots, report.html and MODEL_CARD.md redrawn from its "
                            "files; a search project folder gets a report.html with its trial table.")
    report.add_argument("folder", metavar="DIR", help="a run folder or a search's --project-dir")
    backbones = sub.add_parser("backbones", help="list the backbones in the registry")
    backbones.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'efficientnet*'")
    backbones.add_argument("--blocks", action="store_true",
                           help="also list each matching backbone's numbered blocks (what --features reads): the "
                           "layer that ends each and its width (builds each backbone, untrained)")
    tune = sub.add_parser(
        "tune", help="search hyperparameters of both phases with KerasTuner and export the best model",
        description="Search head, optimizer and fine-tuning settings with KerasTuner. Head-only trials train on "
        "shared cached features; trials that fine-tune run in their own process. Running again on the same "
        "--project-dir resumes. Settings not searched keep the values of the train flags below.")
    _add_train_flags(tune)
    s = tune.add_argument_group("search")
    s.add_argument("--tuner", choices=TUNERS, help="(random)")
    s.add_argument("--objective", choices=(AUTO_OBJECTIVE, *OBJECTIVES),
                   help="scored on the validation split; loss is minimised, the others maximised; auto: "
                   f"val_accuracy, or val_macro_f1 when classes are imbalanced beyond {IMBALANCE_RATIO:g}:1 (auto)")
    s.add_argument("--max-trials", type=_count(1), metavar="N", help="trials to run (10)")
    s.add_argument("--project-dir", metavar="DIR",
                   help="search state, trials and results; rerun to resume (tuning)")
    s.add_argument("--workers", type=_count(0), metavar="N",
                   help="1: trials one at a time here; N>1: a chief and N worker processes, one per GPU when "
                   "there are GPUs; 0: one per GPU (1)")
    s.add_argument("--space", metavar="FILE", help="JSON search space replacing the default one")
    s.add_argument("--search", action="append", default=[], metavar="NAME=VALUES",
                   help="set one entry of the space: name=a,b (choice), name=lo:hi[:log|:step] (range), "
                   "name=value (fixed); repeatable. Names: " + ", ".join(SPACE_FIELDS))
    s.add_argument("--isolate", choices=ISOLATION,
                   help="one process per trial: auto does so for trials that run the backbone (auto)")
    s.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute on GPUs (on when there is a GPU)")
    s.add_argument("--max-failures", type=_count(1), metavar="N",
                   help="stop after N failed trials in a row (3)")
    s.add_argument("--restart", action="store_true", help="delete --project-dir first instead of resuming")
    check = sub.add_parser("check-data", help="report every file of a class folder that training would skip "
                           "or convert, and what happens to it",
                           description="Exit code 0: every file is usable; 1: some files will be skipped; 2: the "
                           "folder cannot train.")
    check.add_argument("folder", metavar="SRC", help="a folder with one subfolder per class, or a CSV file of "
                       "path and label columns")
    demo = sub.add_parser("demo", help="offline demo: transfer from digits 0-4 to 5-9 vs training from scratch")
    demo.add_argument("--output", default="saved_models/demo", metavar="DIR", help="(saved_models/demo)")
    return parser
