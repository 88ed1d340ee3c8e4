"""The `kerastl` command: a thin shell over the Python API.

`main(argv)` parses, calls the library, prints for people and returns an exit
code; bad input prints one line on stderr and returns 2. Every check that needs
no TensorFlow (`kerastl.runs.checks`) runs before TensorFlow is imported, so
`--help` and bad input answer at once; TensorFlow's native start-up lines are
kept off the terminal (`kerastl.quiet`) unless `--verbose` or `KERASTL_TF_LOG=1`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import logging
import os
import sys
from typing import Sequence

import numpy as np

from kerastl.cli.arguments import build_parser, in_flags
from kerastl.config import SETTINGS, DataConfig, ModelConfig, RunConfig, normalize_weights, read_config_file
from kerastl.data.checks import check_data, check_table
from kerastl.data.imagefiles import describe, list_image_files, skipped_line
from kerastl.data.tables import check_data_source, is_csv
from kerastl.errors import KerastlError
from kerastl.models.backbones import REGISTRY, check_weights, get_spec, list_backbones, resolve_size
from kerastl.quiet import filtered_native_stderr, import_tensorflow, native_log_wanted
from kerastl.runs.checks import check_run, check_search
from kerastl.settings import set_setting
from kerastl.storage import check_parent, replace_file
from kerastl.tune.config import TUNE_SETTINGS, TuneConfig

# The modules that import TensorFlow are imported inside the commands that need them,
# so that `--help` and bad flags answer before TensorFlow loads.


def _config_file(args: argparse.Namespace) -> dict:
    """The `--config` file's values (JSON or TOML), read once; {} without one."""
    return read_config_file(args.config) if args.config else {}


def _run_config(args: argparse.Namespace, values: dict) -> RunConfig:
    """The config file's run settings (`values`), with the flags given overriding them."""
    config = RunConfig.from_dict(values)
    for name, item in SETTINGS.items():  # a flag left out keeps the config file's value
        value = None if item.hidden else getattr(args, name, None)
        if value is not None:
            set_setting(config, item, value)
    return config


def _train(args: argparse.Namespace) -> int:
    config = _run_config(args, _config_file(args))
    _check_litert(args)
    check_run(config, args.overwrite, args.restart)
    import_tensorflow(args.verbose)
    from kerastl.runs.run import run_training

    result = run_training(config, overwrite=args.overwrite, verbose=_progress(args), restart=args.restart)
    if result.curve is not None:
        print(result.curve.summary())
    print_metrics(result.metrics)
    _also_litert(args, result.export_dir)
    print_files(result.export_dir)
    return 0


def _progress(args: argparse.Namespace) -> int:
    """Keras's verbosity: progress bars on a terminal, one line per epoch in a log file, none with --quiet."""
    return 0 if args.quiet else 1 if sys.stdout.isatty() else 2


# what a run or search folder may hold, in the order the summary names them
FOLDER_FILES = (
    ("saved_model.pb", "the SavedModel: kerastl predict --model {folder} IMAGE"),
    ("model.tflite", "the LiteRT file (phones and boards): kerastl predict --model {folder}/model.tflite IMAGE"),
    ("report.html", "the report: open it in a browser"),
    ("MODEL_CARD.md", "the model card"),
    ("evaluation.json", "the held-out evaluation"),
    ("plots", "curves, confusion matrix, reliability, class counts, wrong images (PNG)"),
    ("logs", "TensorBoard logs: tensorboard --logdir {folder}"),
    ("config.json", "the resolved config: --config reproduces the run"),
    ("trials.csv", "every trial, best first"),
)


def print_files(folder: str | os.PathLike) -> None:
    """The one-screen end of a command: the folder and what the files in it are for."""
    print(f"wrote {folder}")
    for name, what in FOLDER_FILES:
        if os.path.exists(os.path.join(folder, name)):
            print(f"  {name:<16}{what.format(folder=folder)}")


def print_metrics(metrics: dict[str, float]) -> None:
    """One line per metric; a cross-validated estimate says so, with its spread."""
    for key, value in sorted(metrics.items()):
        if key == "cv_accuracy":
            print(f"cv_accuracy: {value:.4f} +- {metrics.get('cv_accuracy_std', 0.0):.4f} "
                  f"(cross-validated estimate, {metrics.get('cv_folds', 0):.0f} folds: no held-out split)")
        elif key not in ("cv_accuracy_std", "cv_folds"):
            print(f"{key}: {value:.4f}")


def _tune(args: argparse.Namespace) -> int:
    values = _config_file(args)
    config = _run_config(args, values)
    _check_litert(args)
    check_search(config, args.overwrite)
    tune = _tune_config(args, values)
    import_tensorflow(args.verbose)
    from kerastl.reports.html import REPORT_FILE
    from kerastl.tune.search import run_search
    from kerastl.tune.space import DEFAULT_SPACE, load_space, parse_setting
    from kerastl.tune.tables import format_table

    space = load_space(args.space) if args.space else dict(tune.space or DEFAULT_SPACE)
    space.update(parse_setting(text) for text in args.search)
    tune.space = space
    result = run_search(config, tune, overwrite=args.overwrite, restart=args.restart, verbose=_progress(args))
    if result.model is None:
        print(f"worker {os.environ.get('KERASTUNER_TUNER_ID')} finished; the chief reports and exports")
        return 0
    print(format_table(result.trials, result.objective))
    for key, value in sorted(result.metrics.items()):
        print(f"{key}: {value:.4f}")
    print(f"best trial {result.trials[0]['trial']}")
    print(f"wrote {tune.project_dir}: trials.csv, trials.json, {REPORT_FILE} (the trial table and the objective "
          f"against each setting); tensorboard --logdir {tune.project_dir} compares the trials")
    _also_litert(args, result.export_dir)
    print_files(result.export_dir)
    return 0


def _tune_config(args: argparse.Namespace, values: dict) -> TuneConfig:
    """The config file's `tune` table, if any, with the search flags given overriding it. (A 0.1
    search export's config.json holds its search's `tune` too, beside `best_trial`: not adopted.)"""
    tune = TuneConfig.from_dict(values.get("tune", {}) if "best_trial" not in values else {})
    for name, item in TUNE_SETTINGS.items():  # a flag left out keeps the config file's value
        if not item.hidden and getattr(args, name, None) is not None:
            set_setting(tune, item, getattr(args, name))
    tune.validate()
    return tune


def _is_litert(model: str) -> bool:
    """Whether `--model` names a LiteRT file (which must exist) rather than an export folder."""
    if model.endswith(".tflite") and not os.path.isfile(model):
        raise KerastlError(f"{model} does not exist")
    return model.endswith(".tflite")


def _predict(args: argparse.Namespace) -> int:
    if not _is_litert(args.model) and not os.path.isfile(os.path.join(args.model, "saved_model.pb")):
        raise KerastlError(f"{args.model} is not a kerastl export (no saved_model.pb)")
    listing = list_image_files(args.images)  # before TensorFlow loads: a missing path is one line
    if args.strict and listing.skipped:
        raise KerastlError(f"{skipped_line(listing.skipped[0])} is not an image; without --strict it is skipped")
    import_tensorflow(args.verbose)
    from kerastl.models.litert import load_exported
    from kerastl.models.predict import iter_predictions

    model, skipped, count = load_exported(args.model), [], 0  # a model that cannot load is named first
    if not listing.paths:
        shown = f": {describe(listing.skipped, 3)}" if listing.skipped else ""
        raise KerastlError(f"no JPEG, PNG, GIF or BMP images in {' '.join(args.images)}{shown}")
    writer = csv.writer(sys.stdout, lineterminator="\n") if args.csv else None
    if writer:
        writer.writerow(["image", "class", "probability", *model.class_names])
    for paths, probabilities in iter_predictions(model, listing, args.batch_size, args.strict, skipped):
        count += len(paths)
        for path, row, top in zip(paths, probabilities, model.top_k(probabilities, args.top_k)):
            if writer:
                writer.writerow([path, top[0][0], f"{top[0][1]:.6f}", *(f"{p:.6f}" for p in row)])
            elif args.json:
                print(json.dumps({"image": path, "top": [{"class": c, "probability": p} for c, p in top],
                                  "probabilities": dict(zip(model.class_names, map(float, row)))}))
            else:
                print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
        sys.stdout.flush()
    for finding in skipped:
        print(f"kerastl: skipped {skipped_line(finding)}", file=sys.stderr)
    if skipped:
        print(f"kerastl: predicted {count} images, skipped {len(skipped)} files (exit status 1; --strict stops "
              "at the first)", file=sys.stderr)
    return 1 if skipped else 0


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
    from kerastl.data.images import load_data
    from kerastl.features.extract import extract_features
    from kerastl.runs.run import checked_config

    config = checked_config(RunConfig(DataConfig(source=args.data, validation_split=0.0),
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


def _evaluate(args: argparse.Namespace) -> int:
    folder = os.path.dirname(args.model) if _is_litert(args.model) else args.model
    if not os.path.isfile(os.path.join(folder, "labels.txt")):
        raise KerastlError(f"{args.model} is not a kerastl export or run folder (no labels.txt)")
    check_data_source(DataConfig(source=args.data), min_classes=1)
    if args.json:
        check_parent(args.json)
    if args.plots:
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            raise KerastlError(f"--plots {args.plots} is a file, not a folder")
        check_parent(os.path.join(args.plots, "x") if os.path.isdir(args.plots) else args.plots)
    import_tensorflow(args.verbose)
    from kerastl.runs.scoring import draw_evaluation, evaluate_folder

    evaluation, wrong = evaluate_folder(args.model, args.data, args.batch_size, args.top_k)
    print(evaluation.format())
    written = []
    if args.json:
        evaluation.save(args.json)
        written.append(args.json)
    if args.plots:
        written.extend(str(path) for path in draw_evaluation(evaluation, wrong, args.plots))
    if written:
        print("wrote " + ", ".join(written))
    return 0


def _write_litert(args: argparse.Namespace, folder: str | os.PathLike, out: str | None = None,
                  source: str | None = None) -> None:
    """`kerastl.runs.folder.export_folder_litert`, the converter's native summary kept off the terminal."""
    from kerastl.runs.folder import export_folder_litert

    with contextlib.nullcontext() if args.verbose or native_log_wanted() else filtered_native_stderr():
        written = export_folder_litert(folder, out, args.quantize, source)
    kept = f"; float32 ops (no int8 kernel): {', '.join(written.float_ops)}" if written.float_ops else ""
    print(f"wrote {written.path} ({written.quantize}, {written.size_bytes / 2**20:.2f} MB{kept}) and labels.txt "
          "beside it")


def _check_litert(args: argparse.Namespace) -> None:
    """Before TensorFlow loads: `--format tflite` can be written here, and `--quantize` asks for it."""
    if args.format != "tflite":
        if args.quantize != "none":
            raise KerastlError(f"--quantize {args.quantize} applies to a LiteRT file: add --format tflite")
        return
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise KerastlError("--format tflite needs LiteRT's own tools: pip install 'kerastl[lite]' (ai-edge-litert)")


def _also_litert(args: argparse.Namespace, folder: str | os.PathLike) -> None:
    """`--format tflite` of train and tune: the LiteRT file beside the SavedModel."""
    if args.format == "tflite":
        _write_litert(args, folder)


def _export(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        raise KerastlError(f"{args.folder} is not a kerastl run folder (no config.json)")
    if args.out is not None and not args.out.endswith(".tflite"):
        raise KerastlError(f"--out must name a .tflite file, got {args.out}")
    if args.data is not None:
        check_data_source(DataConfig(source=args.data), min_classes=1)
    check_parent(args.out or os.path.join(args.folder, "model.tflite"))
    _check_litert(args)
    import_tensorflow(args.verbose)
    _write_litert(args, args.folder, args.out, args.data)
    return 0


def _report(args: argparse.Namespace) -> int:
    from kerastl.reports.html import write_report  # matplotlib, not TensorFlow: loaded only when needed

    path = write_report(args.folder)
    print(f"wrote {path}")
    return 0


MAX_BLOCK_LISTINGS = 3


def _backbones(args: argparse.Namespace) -> int:
    names = list_backbones(args.pattern)
    if not names:
        raise KerastlError(f"no backbone matches {args.pattern!r}; `kerastl backbones` lists them all")
    if args.blocks and len(names) > MAX_BLOCK_LISTINGS:  # each listing builds its backbone
        raise KerastlError(f"--blocks builds each backbone it lists: name at most {MAX_BLOCK_LISTINGS} (the pattern "
                           f"{args.pattern!r} matches {len(names)})")
    print(f"{'name':<22}{'default':>8}{'min':>6}  {'imagenet':<9}preprocessing")
    for name in names:
        spec = REGISTRY[name]
        module = spec.preprocess_family
        print(f"{name:<22}{spec.default_size:>8}{spec.min_size:>6}  {'yes' if spec.imagenet else 'no':<9}{module}")
    if args.blocks:
        import_tensorflow(args.verbose)
        from kerastl.models.classifier import build_classifier

        for name in names:
            model = build_classifier(ModelConfig(name, weights=None, from_scratch=False), 2)
            blocks = list(range(1, model.block_count() + 1))
            print(f"\n{name}: blocks for --features (the last is the backbone's output)")
            for number, layer, width in zip(blocks, model.block_names(), model.block_widths(blocks)):
                print(f"  {number:>3}  {layer:<40}{width:>6}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    report = check_table(args.folder) if is_csv(args.folder) else check_data(args.folder)
    print(report.format())
    return report.exit_code  # 0: every file is usable, 1: some will be skipped, 2: the folder cannot train


def _demo(args: argparse.Namespace) -> int:
    import_tensorflow(args.verbose)
    from kerastl.cli.demo import format_report, run_demo

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


class _FlagsFormatter(logging.Formatter):
    """The library's log lines in the command line's words (`in_flags`: `weights=None` -> `--weights none`)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("%(message)s")
        self.parser = parser

    @functools.cached_property
    def flags(self) -> set[str]:
        """Every flag of every command: read from the help texts once, when a message first needs them."""
        return self.parser.all_flags()

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return in_flags(message, self.flags) if "=" in message else message


COMMANDS = {"train": _train, "tune": _tune, "predict": _predict, "evaluate": _evaluate, "export": _export,
            "report": _report,
            "extract": _extract, "backbones": _backbones, "check-data": _check_data, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a flag error (2, already printed as one line)
        return int(stop.code or 0)
    handler = _StderrHandler()
    handler.setFormatter(_FlagsFormatter(parser))
    logger = logging.getLogger("kerastl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)  # -q hides progress bars, not the run's lines
    logger.propagate = False  # TensorFlow's absl gives the root logger a handler of its own

    try:
        return COMMANDS[args.command](args)
    except KerastlError as error:  # one line, always, naming flags where the library names parameters
        message = in_flags(" ".join(str(error).split()), handler.formatter.flags)
        print(f"kerastl: error: {message}", file=sys.stderr)
        return 2


def entry_point() -> None:
    """Console-script entry: `kerastl ...`."""
    sys.exit(main())
