"""The `kerastl` command's flags: the argparse parser, its value checks and help texts.

No TensorFlow here: `--help` and bad flags answer before it loads (see `kerastl.cli.main`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from kerastl.choices import QUANTIZE, closest_name, parse_class_weight, parse_features
from kerastl.config import SETTINGS
from kerastl.errors import KerastlError
from kerastl.quiet import NATIVE_LOG_VARIABLE
from kerastl.settings import GROUPS, Setting
from kerastl.tune.config import SPACE_FIELDS, TUNE_SETTINGS


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, and whose unknown flags get a
    "did you mean" from the flags of the command they were given to. Flags are never abbreviated: `--lr`
    would be taken for `--lr-scaling`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})
        self.commands: dict[str, argparse.ArgumentParser] = {}  # on the top parser: each command's own

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            self.error(unknown_flags(unknown, sorted(_flags(command) | _flags(self))))
        return parsed

    def all_flags(self) -> set[str]:
        """Every flag of every command, as its help shows it."""
        return set().union(_flags(self), *map(_flags, self.commands.values()))

    def error(self, message: str):
        self.exit(2, f"kerastl: error: {message}\n")


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", parser.format_help()))


_PARAMETER = re.compile(r"\b([a-z][a-z0-9_]*)=(True|False|None|[^\s,;)]+)")


def in_flags(message: str, flags: set[str]) -> str:
    """A library message in the command line's words: each name=value that is a flag becomes the
    flag (weights=None -> --weights none, overwrite=True -> --overwrite, strict=False -> --no-strict);
    anything else is left as it is, and so is text in quotes or backquotes."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1).replace("_", "-"), match.group(2)
        if f"--{name}" not in flags:
            return match.group(0)
        if value in ("True", "False"):
            switch = f"--{name}" if value == "True" else f"--no-{name}"
            return switch if switch in flags else match.group(0)
        return f"--{name} {'none' if value == 'None' else value}"

    # the user's own text ('...') and examples (`...`) are left as they are
    parts = re.split(r"('[^']*'|`[^`]*`)", message)
    return "".join(part if index % 2 else _PARAMETER.sub(flag, part) for index, part in enumerate(parts))


def unknown_flags(unknown: list[str], flags: list[str]) -> str:
    """One line naming each unknown argument, with the closest known flag where one is close (by
    spelling, `--image_size` for `--image-size`, or by initials, `--lr` for `--learning-rate`)."""
    parts, after_flag = [], False
    for token in unknown:
        name = token.split("=", 1)[0]
        if not name.startswith("-"):
            if not after_flag:  # a value right after an unknown flag is that flag's, not named again
                parts.append(repr(token))
            after_flag = False
            continue
        after_flag = "=" not in token
        guess = closest_name(name, [flag for flag in flags if flag.startswith("--")])
        parts.append(f"{name} (did you mean {guess}?)" if guess else name)
    return "unrecognized arguments: " + ", ".join(parts)


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


# a setting's kind (see `kerastl.settings.setting`) -> the argparse type that reads it
KINDS = {"int": int, "fraction": _fraction, "positive": _positive, "nonneg": _number(lambda v: v >= 0, "negative"),
         "decay": _number(lambda v: 0 < v <= 1, "not in (0, 1]"), "features": _features, "blocks": _blocks,
         "class_weight": _class_weight}
GROUP_TITLES = {"feature cache": "feature cache (phase 1 on features computed once)"}


def _add_setting(group: Any, item: Setting) -> None:
    """One flag for a setting, from its declaration: kind, metavar, choices, help and shown default."""
    options: dict = {"dest": item.name, "help": item.help_text}
    if item.kind == "bool":
        options.update(action=argparse.BooleanOptionalAction, default=None)
    elif item.kind == "choice":
        options.update(choices=item.choices, metavar=item.metavar)
    else:
        options.update(metavar=item.metavar, type=_count(int(item.kind.split(":")[1]))
                       if item.kind.startswith("count:") else KINDS.get(item.kind))
    group.add_argument(item.flag, **options)


# the flags a first run needs, listed first in `train --help` and `tune --help`; the rest are "advanced"
KEY_FLAGS = ("data", "backbone", "weights", "image_size", "epochs", "export")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The run's settings as flags (derived from `SETTINGS`): the key flags first, then one
    "advanced" group per part of the config, each flag with a short help line (docs/ has the rest)."""
    p.usage = "%(prog)s --data SRC [--backbone NAME] [--weights W] [--image-size N] [--epochs N] [--export DIR] [...]"
    key = p.add_argument_group("the flags that matter (advanced ones follow; docs/training.md explains them)")
    for name in KEY_FLAGS:
        _add_setting(key, SETTINGS[name])
    groups = {name: p.add_argument_group(f"advanced: {GROUP_TITLES.get(name, name)}") for name in GROUPS}
    for item in SETTINGS.values():
        if not item.hidden and item.name not in KEY_FLAGS:
            _add_setting(groups[item.group], item)
    o = groups["output"]
    o.add_argument("--config", metavar="FILE", help="a run config, JSON or TOML (tables [data], [model], [train], "
                   "[devices], and [tune] for a search); flags override its values")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars: the run's one-line notes, warnings and results only")
    o.add_argument("--format", choices=["savedmodel", "tflite"], default="savedmodel",
                   help="tflite: also write model.tflite (LiteRT) beside the SavedModel (savedmodel)")
    o.add_argument("--quantize", choices=QUANTIZE, default="none", help="the model.tflite's quantization (none)")


def build_parser() -> argparse.ArgumentParser:
    """The `kerastl` parser: one subcommand per command, errors as one line with exit code 2."""
    parser = _Parser(prog="kerastl", description="Transfer learning on images with Keras.",
                     epilog=f"TensorFlow's native start-up log is hidden; --verbose or {NATIVE_LOG_VARIABLE}=1 "
                     "shows it.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and TensorFlow's native log")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # each command's parser, for "did you mean" among its flags
    train = sub.add_parser(
        "train", help="train a classifier (frozen base, then fine-tuning) and export it",
        description="Train a classifier and export it. A killed run resumes from its last completed epoch when "
        "the same command runs again (its state is kept in EXPORT.partial).")
    _add_train_flags(train)
    train.add_argument("--restart", action="store_true",
                       help="discard an unfinished run into the same export folder instead of resuming it")
    predict = sub.add_parser(
        "predict", help="classify images with an exported model",
        description="Classify image files, and every image under folders (recursively), in batches. A file that "
        "does not decode is named on stderr and skipped; the exit status is then 1 (--strict stops instead).")
    predict.add_argument("--model", required=True, metavar="DIR", help="an export folder, or a .tflite file")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, GIF or BMP files, or folders of them")
    predict.add_argument("--top-k", type=_count(1), default=3, metavar="K", help="classes to show (3)")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per image")
    output.add_argument("--csv", action="store_true", help="CSV: a header, then one row per image")
    predict.add_argument("--batch-size", type=_count(1), default=32, metavar="N", help="images read at once (32)")
    predict.add_argument("--strict", action="store_true", help="stop at the first file that is not an image")
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
    evaluate.add_argument("--model", required=True, metavar="DIR", help="an export or run folder, or a .tflite file")
    evaluate.add_argument("--data", required=True, metavar="SRC", help="class folder, digits, cifar10 or its folder")
    evaluate.add_argument("--json", metavar="FILE", help="also write the evaluation as JSON")
    evaluate.add_argument("--plots", metavar="DIR", help="also write the confusion matrix, reliability diagram and "
                          "most confidently wrong images as PNGs")
    evaluate.add_argument("--top-k", type=_count(1), default=3, metavar="K", help="top-k accuracy (3)")
    evaluate.add_argument("--batch-size", type=_count(1), default=64, metavar="N", help="(64)")
    export = sub.add_parser(
        "export", help="write a run folder's model as a LiteRT (TFLite) file for phones and boards",
        description="Write the classifier of a run folder (or a search's export) as one .tflite file that takes "
        "0-255 RGB pixels at the model's size and returns class probabilities; labels.txt goes beside it. "
        "Running it needs pip install 'kerastl[lite]'.")
    export.add_argument("folder", metavar="DIR", help="a run folder, a search's export or one of its trial folders")
    export.add_argument("--format", choices=["tflite"], default="tflite", help="(tflite)")
    export.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="none (float32), float16 (half the size), dynamic (int8 weights) or int8 (weights and "
                        "activations, calibrated on training images) (none)")
    export.add_argument("--out", metavar="FILE.tflite", help="(DIR/model.tflite)")
    export.add_argument("--data", metavar="SRC", help="int8: the training images to calibrate on (default: the "
                        "source the run trained on)")
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
    for item in TUNE_SETTINGS.values():
        if not item.hidden:
            _add_setting(s, item)
    s.add_argument("--space", metavar="FILE", help="JSON search space replacing the default one")
    s.add_argument("--search", action="append", default=[], metavar="NAME=VALUES",
                   help="set one entry of the space: name=a,b (choice), name=lo:hi[:log|:step] (range), "
                   "name=value (fixed); repeatable. Names: " + ", ".join(SPACE_FIELDS))
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
