"""Benchmark: transfer with the defaults against the strongest baselines, from 1 to 20 images per class.

Digits 0-4 -> 5-9, as in `kerastl demo`: the backbone is pretrained from scratch on
digits 0-4, then each run gets N labelled images per class of digits 5-9 and is
tested on every other image of 5-9. For each N it prints test accuracy and seconds of:

- defaults: `kerastl train --weights backbone.weights.h5` and nothing else
  (features=auto, unfreeze_blocks=auto, cross-validation below 30 per class);
- last: the same with features=last (the head reads the backbone's output, and
  the probe curve still sets the fine-tuning depth), and last, depth 2 (no probing
  at all): what `auto` adds to a run's time;
- scratch: simple_cnn and the backbone itself from scratch on the same images,
  each for `SCRATCH_STEPS` optimizer steps (trained to convergence); the best of them;
- phase 1: the defaults with features=last and no fine-tuning: kerastl's own linear
  head on the backbone's output, against
- probes: scikit-learn LogisticRegressionCV (C by cross-validation) on the frozen backbone's standardised
  features of the same images: its output ("last"), and the best of every single block and
  all blocks concatenated ("best", chosen on the test set itself: a ceiling, not a method).

    python scripts/bench_transfer.py                       # simple_cnn, 1 3 5 10 20 per class
    python scripts/bench_transfer.py --backbone mobilenet_v2 --shots 3 10
    python scripts/bench_transfer.py --write-docs          # and its table into docs/benchmarks.md

With `--write-docs` the table replaces the section `bench_transfer_BACKBONE` of docs/benchmarks.md.

`--pretrain-seeds N` measures how the defaults hold across pretrainings instead: the backbone is
pretrained N times (seeds 0..N-1) on the split's first classes, and each pretraining transfers
to the same few-shot draw of the other classes. Per size it prints the defaults, the all-block
probe (every block's pooled features concatenated and standardised, scikit-learn's logistic
regression at a fixed C=0.1, and with C by cross-validation), the best single block (chosen on
the test set: a ceiling), the best from-scratch model, seconds, and the mean and the worst
pretraining of (defaults - all-block probe at C=0.1), the reference of issue 24 (targets: mean
at least -1 point, worst at least -3). `--split even:odd` pretrains on 0,2,4,6,8 and transfers to
the odd digits.

    python scripts/bench_transfer.py --pretrain-seeds 3 --shots 1 3 5 10 20
    python scripts/bench_transfer.py --pretrain-seeds 3 --split even:odd --backbone mobilenet_v3_small
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _docs  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402

from kerastl.cli.demo import few_shot, pretrain, probe_accuracies, scratch, timed, transfer  # noqa: E402
from kerastl.runs.folder import BACKBONE_WEIGHTS  # noqa: E402


def scratch_backbones(backbone: str) -> list[str]:
    """The networks trained from scratch as baselines: `simple_cnn`, and the backbone itself."""
    return ["simple_cnn"] + ([backbone] if backbone != "simple_cnn" else [])


SPLITS = {"0-4:5-9": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), "even:odd": ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9))}


def across_pretrainings(args: argparse.Namespace, work: Path) -> list[str]:
    """The defaults against the all-block probe for each of `args.pretrain_seeds` pretrainings;
    returns the table's lines."""
    old, new = SPLITS[args.split]
    weights = []
    for seed in range(args.pretrain_seeds):
        run, seconds = timed(pretrain, work / f"pretrain-{seed}", seed, args.backbone, old)
        weights.append(str(run.export_dir / BACKBONE_WEIGHTS))
        print(f"pretraining {seed}: {args.backbone} on digits {old} in {seconds:.0f} s, validation accuracy "
              f"{run.metrics['val_accuracy']:.3f}", flush=True)
    header = ("per class", "defaults", "s", "all-block probe C=0.1", "all-block probe CV C", "best block (test)",
              "best scratch", "s", "defaults - probe C=0.1: mean", "worst", "chosen")
    table = [_docs.markdown_table(header, [])]
    print(table[0], flush=True)
    for per_class in args.shots:
        data, _, _ = few_shot(per_class, 0, new)
        scratches = [(*timed(scratch, data, 0, name), name) for name in scratch_backbones(args.backbone)]
        best_scratch, scratch_s, _ = max((run.metrics["test_accuracy"], spent, name) for run, spent, name in scratches)
        rows = []
        for seed, file in enumerate(weights):
            run, spent = timed(transfer, file, data, None, seed, args.backbone)
            probes = probe_accuracies(file, data, args.backbone)
            rows.append({"defaults": run.metrics["test_accuracy"], "s": spent, **probes,
                         "chosen": f"{run.config.model.features} d{run.config.train.unfreeze_blocks} "
                                   f"e{run.metrics.get('cv_fine_tune_epochs', 0):.0f}"})
            print(f"  {per_class} per class, pretraining {seed}: defaults {rows[-1]['defaults']:.3f} "
                  f"({rows[-1]['chosen']}), all-block probe {probes['all_fixed']:.3f}", flush=True)
        mean = {key: float(np.mean([r[key] for r in rows])) for key in ("defaults", "s", "all_fixed", "all",
                                                                          "best_block")}
        gaps = [100 * (r["defaults"] - r["all_fixed"]) for r in rows]
        table.append(f"| {per_class} | {mean['defaults']:.3f} | {mean['s']:.0f} | {mean['all_fixed']:.3f} | "
                     f"{mean['all']:.3f} | {mean['best_block']:.3f} | {best_scratch:.3f} | {scratch_s:.0f} | "
                     f"{np.mean(gaps):+.1f} | {min(gaps):+.1f} | {', '.join(r['chosen'] for r in rows)} |")
        print(table[-1], flush=True)
    print("targets (issue 24): defaults - all-block probe at C=0.1, mean >= -1 point and worst >= -3 points")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="simple_cnn")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--seeds", type=int, default=1, help="few-shot draws per size, averaged")
    parser.add_argument("--pretrain-seeds", type=int, default=0, help="pretrainings to compare across (0: one, "
                                                                      "and the single-pretraining table)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="0-4:5-9", help="with --pretrain-seeds")
    _docs.add_flag(parser)
    args = parser.parse_args()
    section = f"bench_transfer_{args.backbone}"
    if args.pretrain_seeds:
        section += "_pretrainings_" + args.split.replace(":", "_to_")
    if args.write_docs:
        _docs.check_section(section)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_transfer-"))
    os.environ.setdefault("KERASTL_CACHE", str(work / "cache"))
    if args.pretrain_seeds:
        table = across_pretrainings(args, work)
        if args.write_docs:
            _docs.write_section(section, f"`{args.backbone}`, {args.pretrain_seeds} pretrainings on digits "
                                         f"{args.split.split(':')[0]}, transferred to {args.split.split(':')[1]} "
                                         f"({_docs.measured_with('bench_transfer')}):\n\n" + "\n".join(table))
        return
    pretrained, seconds = timed(pretrain, work / "pretrain", 0, args.backbone)
    weights = str(pretrained.export_dir / BACKBONE_WEIGHTS)
    pretraining = (f"{args.backbone} pretrained on digits 0-4 in {seconds:.0f} s: validation accuracy "
                   f"{pretrained.metrics['val_accuracy']:.3f}")
    print(pretraining)
    baselines = scratch_backbones(args.backbone)
    header = ("per class", "defaults", "s", "last", "s", "last,d2", "s", "scratch best", "s", "phase 1",
              "probe last", "probe best", "chosen")
    table = [_docs.markdown_table(header, [])]
    print(table[0], flush=True)
    for per_class in args.shots:
        rows = []
        for seed in range(args.seeds):
            data, _, _ = few_shot(per_class, seed)
            row = {}
            run, row["defaults_s"] = timed(transfer, weights, data, None, seed, args.backbone)
            row["defaults"] = run.metrics["test_accuracy"]
            row["chosen"] = f"{run.config.model.features} d{run.config.train.unfreeze_blocks}"
            run, row["last_s"] = timed(transfer, weights, data, None, seed, args.backbone, features="last")
            row["last"] = run.metrics["test_accuracy"]
            run, row["plain_s"] = timed(transfer, weights, data, None, seed, args.backbone, features="last",
                                        unfreeze_blocks=2)
            row["plain"] = run.metrics["test_accuracy"]
            run = transfer(weights, data, None, seed, args.backbone, features="last", fine_tune=False)
            row["phase1"] = run.metrics["test_accuracy"]
            scores = []
            for name in baselines:
                run, spent = timed(scratch, data, seed, name)
                scores.append((run.metrics["test_accuracy"], spent, name))
            row["scratch"], row["scratch_s"], row["scratch_name"] = max(scores)
            probes = probe_accuracies(weights, data, args.backbone)
            row.update(probe_last=probes["last"], probe_best=probes["best"])
            rows.append(row)
        mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if not isinstance(rows[0][key], str)}
        table.append(f"| {per_class} | {mean['defaults']:.3f} | {mean['defaults_s']:.0f} | {mean['last']:.3f} | "
                     f"{mean['last_s']:.0f} | {mean['plain']:.3f} | {mean['plain_s']:.0f} | {mean['scratch']:.3f} "
                     f"({rows[0]['scratch_name']}) | {mean['scratch_s']:.0f} | {mean['phase1']:.3f} | "
                     f"{mean['probe_last']:.3f} | {mean['probe_best']:.3f} | {rows[0]['chosen']} |")
        print(table[-1], flush=True)
    print("targets: phase 1 >= probe last - 0.01; at 3 and 10 per class, defaults >= best scratch + 0.10 and "
          ">= best probe - 0.02")
    if args.write_docs:
        draws = "one draw per size" if args.seeds == 1 else f"{args.seeds} draws per size, averaged"
        _docs.write_section(section, f"`{args.backbone}` ({pretraining}; {draws}; "
                                     f"{_docs.measured_with('bench_transfer')}):\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
