"""The `kerastl` command: a thin shell over the Python API.

`main(argv)` parses, calls the library, prints for people and returns an exit
code; bad input prints one line on stderr and returns 2. Every check that needs
no TensorFlow (`kerastl.preflight`) runs before TensorFlow is imported, so
`--help` and bad input answer at once; TensorFlow's native start-up lines are
kept off the terminal (`kerastl.quiet`) unless `--verbose` or `KERASTL_TF_LOG=1`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

import numpy as np

from kerastl.backbones import REGISTRY, check_weights, get_spec, list_backbones, normalize_weights, resolve_size
from kerastl.config import SETTINGS, VALIDATION_MODES, DataConfig, ModelConfig, RunConfig, parse_features
from kerastl.errors import KerastlError
from kerastl.imagefiles import check_data
from kerastl.preflight import check_data_source, check_run, check_search
from kerastl.quiet import NATIVE_LOG_VARIABLE, import_tensorflow
from kerastl.storage import check_parent, replace_file
from kerastl.tune.config import ISOLATION, OBJECTIVES, SPACE_FIELDS, TUNERS, TuneConfig

# The modules that import TensorFlow are imported inside the commands that need them,
# so that `--help` and bad flags answer before TensorFlow loads.

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
    d.add_argument("--data", metavar="SRC", help="class folder, cifar10, a cifar-10-batches-py folder, or digits")
    d.add_argument("--validation-dir", metavar="DIR", help="separate validation class folder")
    d.add_argument("--test-dir", metavar="DIR", help="separate test class folder")
    d.add_argument("--validation-split", type=_fraction, metavar="F", help="fraction held out per class (0.2)")
    d.add_argument("--test-split", type=_fraction, metavar="F", help="fraction held out for testing (0)")
    d.add_argument("--batch-size", type=_count(1), metavar="N", help="batch size (32)")
    d.add_argument("--augment", metavar="PRESET", help="none, light, standard, strong, or e.g. flip,rotate:0.2")
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
    t.add_argument("--loss", metavar="NAME", help="Keras loss name; auto picks cross-entropy (auto)")
    t.add_argument("--learning-rate", type=_positive, metavar="LR", help="phase-1 learning rate (0.001)")
    t.add_argument("--fine-tune-lr-ratio", type=_positive, metavar="R", help="phase-2 LR as a fraction (0.1)")
    t.add_argument("--label-smoothing", type=_fraction, metavar="F", help="cross-entropy label smoothing (0)")
    t.add_argument("--weight-decay", type=_number(lambda v: v >= 0, "negative"), metavar="W",
                   help="decoupled weight decay (0)")
    t.add_argument("--patience", type=_count(0), metavar="N", help="EarlyStopping patience in epochs (5)")
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
    o.add_argument("--config", metavar="FILE", help="JSON run config; flags override its values")
    o.add_argument("--name", help="run name (backbone-date-time)")
    o.add_argument("--export", metavar="DIR", help="output folder (saved_models/NAME)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")


def build_parser() -> argparse.ArgumentParser:
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
    backbones = sub.add_parser("backbones", help="list the backbones in the registry")
    backbones.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'efficientnet*'")
    tune = sub.add_parser(
        "tune", help="search hyperparameters of both phases with KerasTuner and export the best model",
        description="Search head, optimizer and fine-tuning settings with KerasTuner. Head-only trials train on "
        "shared cached features; trials that fine-tune run in their own process. Running again on the same "
        "--project-dir resumes. Settings not searched keep the values of the train flags below.")
    _add_train_flags(tune)
    s = tune.add_argument_group("search")
    s.add_argument("--tuner", choices=TUNERS, default="random", help="(random)")
    s.add_argument("--objective", choices=tuple(OBJECTIVES), default="val_accuracy",
                   help="scored on the validation split; loss is minimised, the others maximised (val_accuracy)")
    s.add_argument("--max-trials", type=_count(1), default=10, metavar="N", help="trials to run (10)")
    s.add_argument("--project-dir", default="tuning", metavar="DIR",
                   help="search state, trials and results; rerun to resume (tuning)")
    s.add_argument("--workers", type=_count(0), default=1, metavar="N",
                   help="1: trials one at a time here; N>1: a chief and N worker processes, one per GPU when "
                   "there are GPUs; 0: one per GPU (1)")
    s.add_argument("--space", metavar="FILE", help="JSON search space replacing the default one")
    s.add_argument("--search", action="append", default=[], metavar="NAME=VALUES",
                   help="set one entry of the space: name=a,b (choice), name=lo:hi[:log|:step] (range), "
                   "name=value (fixed); repeatable. Names: " + ", ".join(SPACE_FIELDS))
    s.add_argument("--isolate", choices=ISOLATION, default="auto",
                   help="one process per trial: auto does so for trials that run the backbone (auto)")
    s.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute on GPUs (on when there is a GPU)")
    s.add_argument("--max-failures", type=_count(1), default=3, metavar="N",
                   help="stop after N failed trials in a row (3)")
    s.add_argument("--restart", action="store_true", help="delete --project-dir first instead of resuming")
    check = sub.add_parser("check-data", help="report every file of a class folder that training would skip "
                           "or convert, and what happens to it",
                           description="Exit code 0: every file is usable; 1: some files will be skipped; 2: the "
                           "folder cannot train.")
    check.add_argument("folder", metavar="DIR", help="a folder with one subfolder per class")
    demo = sub.add_parser("demo", help="offline demo: transfer from digits 0-4 to 5-9 vs training from scratch")
    demo.add_argument("--output", default="saved_models/demo", metavar="DIR", help="(saved_models/demo)")
    return parser


def _run_config(args: argparse.Namespace):
    config = RunConfig.from_json(args.config) if args.config else RunConfig()
    for dest, (section, field) in SETTINGS.items():  # a flag left out keeps the config file's value
        value = getattr(args, dest)
        if value is None:
            continue
        setattr(getattr(config, section) if section else config, field, value)
    return config


def _train(args: argparse.Namespace) -> int:
    config = _run_config(args)
    check_run(config, args.overwrite, args.restart)
    import_tensorflow(args.verbose)
    from kerastl.run import run_training

    result = run_training(config, overwrite=args.overwrite, verbose=0 if args.quiet else 2, restart=args.restart)
    if result.probe is not None:
        print(result.probe.summary())
    print_metrics(result.metrics)
    print(f"exported to {result.export_dir}")
    return 0


def print_metrics(metrics: dict[str, float]) -> None:
    """One line per metric; a cross-validated estimate says so, with its spread."""
    for key, value in sorted(metrics.items()):
        if key == "cv_accuracy":
            print(f"cv_accuracy: {value:.4f} +- {metrics.get('cv_accuracy_std', 0.0):.4f} "
                  f"(cross-validated estimate, {metrics.get('cv_folds', 0):.0f} folds: no held-out split)")
        elif key not in ("cv_accuracy_std", "cv_folds"):
            print(f"{key}: {value:.4f}")


def _tune(args: argparse.Namespace) -> int:
    config = _run_config(args)
    check_search(config, args.overwrite)
    import_tensorflow(args.verbose)
    from kerastl.tune.search import run_search
    from kerastl.tune.space import DEFAULT_SPACE, load_space, parse_setting
    from kerastl.tune.tables import format_table

    space = load_space(args.space) if args.space else dict(DEFAULT_SPACE)
    space.update(parse_setting(text) for text in args.search)
    tune = TuneConfig(args.tuner, args.objective, args.max_trials, args.project_dir, space, args.workers,
                      args.isolate, args.mixed_precision, args.max_failures)
    result = run_search(config, tune, overwrite=args.overwrite, restart=args.restart,
                        verbose=0 if args.quiet else 2)
    if result.model is None:
        print(f"worker {os.environ.get('KERASTUNER_TUNER_ID')} finished; the chief reports and exports")
        return 0
    print(format_table(result.trials, args.objective))
    for key, value in sorted(result.metrics.items()):
        print(f"{key}: {value:.4f}")
    print(f"best trial {result.trials[0]['trial']}; trials.csv and trials.json in {args.project_dir} and "
          f"{result.export_dir}; exported to {result.export_dir}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.model, "saved_model.pb")):
        raise KerastlError(f"{args.model} is not a kerastl export (no saved_model.pb)")
    for path in args.images:
        if not os.path.isfile(path):
            raise KerastlError(f"image file {path} does not exist")
    import_tensorflow(args.verbose)
    from kerastl.export import load_export

    model = load_export(args.model)
    probabilities = model.predict_files(args.images)
    for path, row, top in zip(args.images, probabilities, model.top_k(probabilities, args.top_k)):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "probability": p} for c, p in top],
                              "probabilities": dict(zip(model.class_names, map(float, row)))}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    return 0


def _extract(args: argparse.Namespace) -> int:
    if not args.out.endswith(".npz"):
        raise KerastlError(f"--out must name an .npz file, got {args.out}")
    if args.features == "auto":
        raise KerastlError("extract reads last, all or block numbers; auto is chosen by a training run")
    spec = get_spec(args.backbone)
    resolve_size(spec, args.image_size)
    check_weights(spec, normalize_weights(args.weights))
    check_data_source(DataConfig(source=args.data))
    check_parent(args.out)
    import_tensorflow(args.verbose)
    from kerastl.data import load_data
    from kerastl.features import extract_features
    from kerastl.run import resolve_config

    config = resolve_config(RunConfig(DataConfig(source=args.data, validation_split=0.0),
                                      ModelConfig(args.backbone, args.weights, args.image_size,
                                                  from_scratch=False, features=args.features)))
    data = load_data(config.data, config.model.image_size)
    layers = [name for name in (args.layers or "").split(",") if name]
    arrays = extract_features(config.model, data, layers, args.batch_size, progress=True)
    replace_file(args.out, lambda path: np.savez(path, **arrays), suffix=".npz")
    skipped = ("labels", "class_names", "blocks", "block_widths")
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items() if k not in skipped)
    print(f"saved features of {len(arrays['labels'])} images ({shapes}) to {args.out}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    names = list_backbones(args.pattern)
    if not names:
        raise KerastlError(f"no backbone matches {args.pattern!r}; `kerastl backbones` lists them all")
    print(f"{'name':<22}{'default':>8}{'min':>6}  {'imagenet':<9}preprocessing")
    for name in names:
        spec = REGISTRY[name]
        module = spec.preprocess_family
        print(f"{name:<22}{spec.default_size:>8}{spec.min_size:>6}  {'yes' if spec.imagenet else 'no':<9}{module}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    report = check_data(args.folder)
    print(report.format())
    return report.exit_code  # 0: every file is usable, 1: some will be skipped, 2: the folder cannot train


def _demo(args: argparse.Namespace) -> int:
    import_tensorflow(args.verbose)
    from kerastl.demo import format_report, run_demo

    print(format_report(run_demo(args.output)))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever `sys.stderr` is when a record is emitted (it may be replaced)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


COMMANDS = {"train": _train, "tune": _tune, "predict": _predict, "extract": _extract, "backbones": _backbones,
            "check-data": _check_data, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in `argv` (default: sys.argv[1:]); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a flag error (2, already printed as one line)
        return int(stop.code or 0)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("kerastl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logger.propagate = False  # TensorFlow's absl gives the root logger a handler of its own

    try:
        return COMMANDS[args.command](args)
    except KerastlError as error:
        print(f"kerastl: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, always
        return 2


def entry_point() -> None:
    """Console-script entry: `kerastl ...`."""
    sys.exit(main())
