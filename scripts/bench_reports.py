"""What the reports cost: a run with and without its evaluation, plots, report and model card.

Trains one run on digits with the default settings (simple_cnn from scratch at 16 px, since
no pretrained weights can be had offline; a held-out test split, as `--test-split 0.2`),
then times, in this process, redrawing its plots, `report.html` and `MODEL_CARD.md` (what
a run adds after its evaluation; `kerastl report`'s work), and `kerastl evaluate` on every
digit through the SavedModel. It prints each time and its share of the training run's
own time (which includes writing them once).

    python scripts/bench_reports.py [--size 16] [--write-docs]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _docs  # scripts/, beside this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="image size (16)")
    _docs.add_flag(parser)
    args = parser.parse_args()
    if args.write_docs:
        _docs.check_section("bench_reports")

    from kerastl.quiet import import_tensorflow

    import_tensorflow()
    from kerastl.config import DataConfig, ModelConfig, RunConfig
    from kerastl.reports.html import write_report
    from kerastl.runs.run import run_training
    from kerastl.runs.scoring import evaluate_folder

    folder = Path(tempfile.mkdtemp(prefix="kerastl-bench-reports-")) / "run"
    config = RunConfig(DataConfig("digits", test_split=0.2), ModelConfig("simple_cnn", weights=None, image_size=args.size),
                       export_dir=str(folder))
    start = time.perf_counter()
    run_training(config, verbose=0)
    run_seconds = time.perf_counter() - start

    rows = []
    start = time.perf_counter()
    write_report(folder)
    rows.append(("plots, report.html and MODEL_CARD.md (kerastl report)", time.perf_counter() - start))
    start = time.perf_counter()
    evaluation, _ = evaluate_folder(folder, "digits")
    rows.append((f"kerastl evaluate on {evaluation.count} digits (SavedModel)", time.perf_counter() - start))

    print(f"training run (both phases, export, evaluation and reports included): {run_seconds:.2f} s")
    for name, seconds in rows:
        print(f"{name}: {seconds:.2f} s ({seconds / run_seconds:.1%} of the run)")
    if args.write_docs:
        table = _docs.markdown_table(("what", "seconds", "share of the run"), [
            ("training run (both phases, export, evaluation and reports included)", f"{run_seconds:.2f}", "100%"),
            *((name, f"{seconds:.2f}", f"{seconds / run_seconds:.1%}") for name, seconds in rows)], right_from=1)
        _docs.write_section("bench_reports", f"simple_cnn from scratch at {args.size} px on digits "
                                             f"({_docs.measured_with('bench_reports')}):\n\n{table}")


if __name__ == "__main__":
    main()
