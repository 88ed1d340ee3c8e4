"""Benchmark: a head search on cached features against a plain KerasTuner search; 2 workers against 1.

1. The same 10-trial RandomSearch (same space, same oracle seed, so the same
   hyperparameter values in the same order) on the same data, in one run:
   - plain: `keras_tuner.RandomSearch(TransferHyperModel(...)).search(images)`,
     every trial running the frozen backbone on every image, every epoch (on a
     pipeline seeded per trial, like kerastl's, so both see the same batches);
   - kerastl: `TransferTuner` trials on features extracted once (extraction timed in).
   The plain search runs twice: reading the backbone's output, as a KerasTuner user would write it,
   and reading the blocks kerastl's probes chose (the strongest plain search: the backbone stops
   there, and its accuracy is comparable with the cached search's).
   Prints the wall-clock times, their ratios, and the best validation accuracy of each.
2. kerastl's search with `--many` trials (default 100) from a cold cache of its own, against the
   10-trial one: head-only trials train as populations (`--population`, default 32), so the
   wall time should grow far slower than the trial count (target: 100 trials at most 3x 10).
3. The kerastl search again with `workers=2` (a chief and two worker processes)
   against `workers=1`, both on the now-warm feature cache.

Targets (issue 23): the cached 10-trial search at least 50x plain KerasTuner at 96 px, with
its best accuracy within 1 point of the plain search's; 100 trials at most 3x the 10-trial time.

    python scripts/bench_tuning.py                       # digits at 96x96, MobileNetV2, offline
    python scripts/bench_tuning.py --weights imagenet    # needs the network once
    python scripts/bench_tuning.py --size 96 128 --write-docs   # both sizes, the table into docs/benchmarks.md

Offline, the backbone is a random MobileNetV2 whose BatchNorm statistics are
calibrated on the training images and saved to a weights file, so both searches
start every trial from the same, usable features (see bench_feature_cache.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _docs  # noqa: E402  (scripts/, beside this file)
import keras  # noqa: E402
import keras_tuner  # noqa: E402

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from kerastl.data.images import load_data  # noqa: E402
from kerastl.models.classifier import build_classifier  # noqa: E402
from kerastl.training.batchnorm import recalibrate_batchnorm  # noqa: E402
from kerastl.tune.config import TuneConfig  # noqa: E402
from kerastl.tune.hypermodel import TransferHyperModel  # noqa: E402
from kerastl.tune.search import prepare, run_search, search_here  # noqa: E402
from kerastl.tune.tuner import make_objective  # noqa: E402


def calibrated_weights(backbone: str, size: int, data, folder: Path) -> str:
    """A random backbone with BatchNorm statistics calibrated on the data, saved to a file."""
    keras.utils.set_random_seed(0)
    model = build_classifier(ModelConfig(backbone, weights=None, image_size=size, from_scratch=False),
                             len(data.class_names))
    recalibrate_batchnorm(model, data.train.sample())
    path = folder / f"{backbone}-{size}.weights.h5"
    model.backbone.save_weights(path)
    return str(path)


class PlainHyperModel(TransferHyperModel):
    """kerastl's HyperModel as a plain KerasTuner search runs it, on a pipeline seeded per trial.

    KerasTuner hands every trial the same dataset object, whose reshuffling then goes
    on from trial to trial; building the same pipeline afresh per trial, seeded as
    kerastl's trials seed theirs, gives both searches the same batches in the same
    order, so their scores differ only by float round-off, not by luck.
    """

    def __init__(self, *args, data, **kwargs):
        super().__init__(*args, **kwargs)
        self.data = data

    def fit(self, hp, model, x, validation_data=None, **kwargs):
        seed = self.base.data.seed
        keras.utils.set_random_seed(seed)
        x = self.data.train.batches(self.base.data.batch_size, True, None, seed)
        return super().fit(hp, model, x, validation_data=validation_data, **kwargs)


def best_accuracy(trials) -> float:
    return max(t.metrics.get_last_value("val_accuracy") for t in trials if t.status == "COMPLETED")


def best_trial(tuner):
    """The completed trial with the best validation accuracy."""
    done = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    return max(done, key=lambda t: t.metrics.get_last_value("val_accuracy"))


def measure(args: argparse.Namespace, size: int, root: Path) -> dict:
    """Both searches and both worker counts at one image size; prints what it measures as it goes."""
    root.mkdir(parents=True)
    data_config = DataConfig(source="digits", augment="none", batch_size=32, seed=args.seed)
    data = load_data(data_config, size)
    weights = calibrated_weights(args.backbone, size, data, root) if args.weights == "calibrated" \
        else args.weights
    config = RunConfig(data_config, ModelConfig(args.backbone, weights=weights, image_size=size,
                                                from_scratch=False),
                       TrainConfig(epochs=args.epochs, fine_tune_epochs=0, cache_dir=str(root / "cache")),
                       export_dir=str(root / "export"))
    # kerastl's default space; with no fine-tuning epochs its fine-tuning settings drop out, leaving the head's
    tune = TuneConfig(max_trials=args.trials, project_dir=str(root / "cached"))
    base, tune = prepare(config, tune)
    rows = []
    row = {"size": size, "images": f"{data.train.count} training / {data.validation.count} validation images"}
    print(f"{args.trials}-trial head search, {args.backbone} at {size}x{size}, digits ({row['images']}), "
          f"{args.epochs} epochs, {os.cpu_count()} CPU cores")

    start = time.perf_counter()
    cached = search_here(TransferHyperModel(base, tune.space), tune, None)  # loads its own data, as `kerastl tune`
    row["cached_s"] = time.perf_counter() - start
    row["cached_acc"] = best_accuracy(cached.oracle.trials.values())
    rows.append(("kerastl, cached features", row["cached_s"], row["cached_acc"]))
    print(f"kerastl, cached: {row['cached_s']:.1f} s, best val accuracy {row['cached_acc']:.3f}", flush=True)

    if args.many:  # the same search with more trials, from a cold cache of its own
        many_base = RunConfig.from_dict(base.to_dict())
        many_base.train.cache_dir = str(root / "cache-many")
        many = TuneConfig(max_trials=args.many, project_dir=str(root / "many"), space=tune.space)
        start = time.perf_counter()
        searched = search_here(TransferHyperModel(many_base, many.space), many, None)
        row["many_s"] = time.perf_counter() - start
        row["many_acc"] = best_accuracy(searched.oracle.trials.values())
        rows.append((f"kerastl, cached features, {args.many} trials", row["many_s"], row["many_acc"]))
        print(f"kerastl, {args.many} trials: {row['many_s']:.1f} s, best {row['many_acc']:.3f}", flush=True)

    if not args.skip_plain:
        # the plain search as a KerasTuner user writes it (the backbone's output), and the strongest plain
        # search: reading the blocks kerastl's probes chose, which stops the backbone there
        chosen = json.loads((Path(cached.get_trial_dir(best_trial(cached).trial_id)) / "config.json").read_text())
        blocks = ",".join(map(str, chosen["plan"]["feature_blocks"]))
        for key, features, label in (("plain", "last", "plain KerasTuner"),
                                     ("plain_same", blocks, f"plain KerasTuner, block(s) {blocks}")):
            plain_base = RunConfig.from_dict(base.to_dict())
            plain_base.model.features = features
            plain = keras_tuner.RandomSearch(
                PlainHyperModel(plain_base, tune.space, len(data.class_names), data=data),
                objective=make_objective(tune.objective), max_trials=args.trials, seed=base.data.seed,
                directory=str(root), project_name=key)
            train = data.train.batches(32, True, None, args.seed)
            validation = data.validation.batches(32)
            start = time.perf_counter()
            plain.search(train, validation_data=validation, verbose=0)
            row[f"{key}_s"] = time.perf_counter() - start
            row[f"{key}_acc"] = best_accuracy(plain.oracle.trials.values())
            rows.append((label, row[f"{key}_s"], row[f"{key}_acc"]))
            print(f"{label}: {row[f'{key}_s']:.1f} s, best val accuracy {row[f'{key}_acc']:.3f}", flush=True)
        same = [a.hyperparameters.values == b.hyperparameters.values
                for a, b in zip(plain.oracle.trials.values(), cached.oracle.trials.values())]
        row["same"] = f"{sum(same)}/{len(same)}"
        print(f"same hyperparameters trial by trial: {row['same']}")

    for workers in (1, 2):
        tune.workers, tune.project_dir = workers, str(root / f"workers{workers}")
        config.export_dir = str(root / f"export{workers}")
        start = time.perf_counter()
        result = run_search(config, tune)
        row[f"workers{workers}_s"] = time.perf_counter() - start
        rows.append((f"kerastl tune --workers {workers} (warm cache, incl. export)", row[f"workers{workers}_s"],
                     max(r["val_accuracy"] for r in result.trials if r["val_accuracy"] is not None)))

    print("| search | wall-clock (s) | best val accuracy |\n|---|---|---|")
    for name, seconds, accuracy in rows:
        print(f"| {name} | {seconds:.1f} | {accuracy:.3f} |")
    if not args.skip_plain:
        for key, label in (("plain", "plain (output)"), ("plain_same", "plain (the same blocks)")):
            print(f"cached vs {label}: {row[f'{key}_s'] / row['cached_s']:.1f}x faster (target 50x); best val "
                  f"accuracy {100 * (row['cached_acc'] - row[f'{key}_acc']):+.1f} points (target within 1)")
    if args.many:
        print(f"{args.many} trials vs {args.trials}: {row['many_s'] / row['cached_s']:.2f}x the wall time "
              f"(target at most 3x)")
    print(f"workers 2 vs 1: {row['workers1_s'] / row['workers2_s']:.2f}x")
    return row


def docs_table(rows: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md: one row per image size ("-" where the plain search was skipped)."""
    def cell(row, key, form):
        return format(row[key], form) if key in row else "-"

    def ratio(r, key):
        return f"{r[key] / r['cached_s']:.1f}x" if key in r else "-"

    return _docs.markdown_table(
        ("size", "plain KerasTuner (s)", "plain, same blocks (s)", "kerastl, cached (s)", "speed-up",
         "speed-up, same blocks",
         "best val acc plain / same blocks / cached", "many trials (s)", "many vs 10", "best val acc many",
         "workers 1 (s)", "workers 2 (s)"),
        [(r["size"], cell(r, "plain_s", ".1f"), cell(r, "plain_same_s", ".1f"), cell(r, "cached_s", ".1f"),
          ratio(r, "plain_s"), ratio(r, "plain_same_s"),
          " / ".join(cell(r, key, ".3f") for key in ("plain_acc", "plain_same_acc", "cached_acc")),
          cell(r, "many_s", ".1f"),
          f"{r['many_s'] / r['cached_s']:.2f}x" if "many_s" in r else "-", cell(r, "many_acc", ".3f"),
          cell(r, "workers1_s", ".1f"), cell(r, "workers2_s", ".1f")) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, nargs="+", default=[96], help="image sizes, one search pair each")
    parser.add_argument("--weights", default="calibrated", help="calibrated (offline), imagenet or a file")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--many", type=int, default=100, help="trials of the larger search (0: skip it)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-plain", action="store_true", help="only the workers comparison")
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section("bench_tuning")
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="kerastl-bench-tuning-"))
    rows = [measure(args, size, root / str(size)) for size in dict.fromkeys(args.size)]
    if args.write_docs:
        same = "" if args.skip_plain else "; the same values trial by trial: " + ", ".join(
            f"{r['same']} at {r['size']}" for r in rows)
        _docs.write_section("bench_tuning", f"{args.trials}-trial RandomSearch ({args.many} for 'many'), "
                                            f"{args.backbone}, {args.epochs} "
                                            f"epochs per trial, digits ({rows[0]['images']}){same} "
                                            f"({_docs.measured_with('bench_tuning')}):\n\n{docs_table(rows)}")


if __name__ == "__main__":
    main()
