"""PNG plots of run folders, evaluations and searches.

Every plot is drawn on a `matplotlib.figure.Figure` of its own (no pyplot state), so it
runs headless anywhere and never touches a user's figures; no TensorFlow is imported.
Each writes one PNG to `path` (a file path, or a binary file object such as `io.BytesIO`)
and returns it (a path as a `Path`, a file object as itself). Figures are 5-14 inches
wide at 100 dpi, growing with the number of classes up to that cap.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kerastl.choices import OBJECTIVES
from kerastl.errors import KerastlError
from kerastl.reports.facts import read_optional_json

log = logging.getLogger(__name__)

Target = str | Path | BinaryIO
# where a run folder keeps each plot (every reader and writer of them names them from here)
PLOT_FILES = {"curves": "plots/curves.png", "class_counts": "plots/class_counts.png",
              "confusion": "plots/confusion.png", "reliability": "plots/reliability.png", "wrong": "plots/wrong.png",
              "probe": "probe.png"}


def plot_path(folder: str | Path, name: str) -> Path:
    """Where the run folder `folder` keeps the plot `name` (a key of `PLOT_FILES`)."""
    return Path(folder) / PLOT_FILES[name]

DPI = 100
MIN_INCHES, MAX_INCHES = 5.0, 14.0
CELL_NUMBERS_MAX = 20  # the confusion matrix writes its numbers in the cells up to this many classes
HORIZONTAL_FROM = 13  # class counts switch to horizontal bars from this many classes
LOG_DECADES = 2.0  # a positive numeric setting spanning more than this many decades gets a log axis
CURVES = {  # history key -> (panel, label, style)
    "loss": ("loss", "train", "-"), "val_loss": ("loss", "validation", "-"),
    "accuracy": ("accuracy", "train", "-"), "val_accuracy": ("accuracy", "validation", "-"),
    "cv_loss": ("loss", "cross-validated", "--"), "cv_accuracy": ("accuracy", "cross-validated", "--"),
}
COLOURS = {"train": "tab:blue", "validation": "tab:orange", "cross-validated": "tab:green"}


def _inches(value: float, low: float = MIN_INCHES, high: float = MAX_INCHES) -> float:
    return float(min(high, max(low, value)))


def _short(name: str, width: int = 18) -> str:
    """A label shortened to `width`, with `$` escaped: matplotlib would read "a$b$" as mathtext."""
    name = str(name)
    name = name if len(name) <= width else name[: width - 3] + "..."
    return name.replace("$", r"\$")


def _save(figure: Figure, path: Target, tight: bool = True) -> Path | BinaryIO:
    if tight:  # (a grid of images places its axes itself: tight_layout would cost most of its time)
        figure.tight_layout()
    figure.savefig(path, format="png")
    log.debug("wrote a plot to %s", path)
    return path if hasattr(path, "write") else Path(path)


def _message(text: str, path: Target) -> Path | BinaryIO:
    """A figure that only says `text` (nothing to plot)."""
    figure = Figure(figsize=(6.0, 3.0), dpi=DPI)
    axes = figure.subplots()
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
    axes.set_axis_off()
    return _save(figure, path)


def plot_curves(history: dict, path: Target) -> Path | BinaryIO:
    """Loss and accuracy per epoch of a run folder's history.json, phase 2 running on after phase 1.

    Train and validation lines, and `cv_*` keys of cross-validated runs as "cross-validated";
    other keys are ignored. Epochs are numbered from 1 by their position in each phase, so a
    dashed line marks where fine-tuning starts.
    """
    phases = [history.get(name) or {} for name in ("phase1", "phase2")]
    series = [{key: values for key, values in phase.items() if key in CURVES and values} for phase in phases]
    if not any(series):
        return _message("no training curves", path)
    lengths = [max([len(phase.get("epoch") or [])] + [len(v) for v in found.values()])
               for phase, found in zip(phases, series)]
    figure = Figure(figsize=(_inches(4.0 + 0.1 * sum(lengths), 10.0, MAX_INCHES), 4.0), dpi=DPI)
    panels = dict(zip(("loss", "accuracy"), figure.subplots(1, 2)))
    offset = 0
    for number, (found, length) in enumerate(zip(series, lengths), start=1):
        for key, values in found.items():
            panel, label, style = CURVES[key]
            x = offset + np.arange(1, len(values) + 1)
            y = np.asarray(values, dtype=np.float64)
            axes = panels[panel]
            shown = label in [line.get_label() for line in axes.lines]
            marker = "o" if len(values) == 1 or label == "cross-validated" else None
            axes.plot(x, y, style, marker=marker, color=COLOURS[label], label="_nolegend_" if shown else label)
        if number == 2 and found and offset:
            for axes in panels.values():
                axes.axvline(offset + 0.5, color="grey", linestyle="--", linewidth=1)
                axes.text(offset + 0.5, 0.98, " fine-tuning starts", transform=axes.get_xaxis_transform(),
                          ha="left", va="top", fontsize="small", color="grey")
        offset += length
    for panel, axes in panels.items():
        axes.set_title(panel)
        axes.set_xlim(0.5, offset + 0.5)  # both panels over every epoch, even one without its metric
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_xlabel("epoch")
        axes.set_ylabel(panel)
        if any(not line.get_label().startswith("_") for line in axes.lines):  # the fine-tuning line has none
            axes.legend(fontsize="small")
    return _save(figure, path)


def plot_confusion(matrix, class_names: list[str], path: Target) -> Path | BinaryIO:
    """The row-normalised confusion matrix (rows true, columns predicted); a row with no samples is zeros."""
    counts = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise KerastlError(f"a confusion matrix of {k} classes must be {k} x {k}, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = _inches(0.45 * k + 3.5, MIN_INCHES, MAX_INCHES - 1.0)
    figure = Figure(figsize=(side + 1.0, side), dpi=DPI)
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    names = [_short(name) for name in class_names]
    fontsize = 9 if k <= 20 else max(5, 9 - (k - 20) // 10)
    axes.set_xticks(range(k), names, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center",
                    fontsize=fontsize)
    axes.set_yticks(range(k), names, fontsize=fontsize)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("confusion matrix (share of each true class)")
    if k <= CELL_NUMBERS_MAX:
        cell_font = 10 if k <= 6 else 8 if k <= 12 else 6
        for (i, j), value in np.ndenumerate(share):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=cell_font,
                      color="white" if value > 0.5 else "black")
    return _save(figure, path)


def plot_reliability(reliability: dict, ece: float, path: Target) -> Path | BinaryIO:
    """The reliability diagram: accuracy per confidence bin against the diagonal, with the bins' counts below."""
    edges = np.asarray(reliability["edges"], dtype=np.float64)
    counts = np.asarray(reliability["count"], dtype=np.float64)
    accuracy = np.array([np.nan if a is None else a for a in reliability["accuracy"]], dtype=np.float64)
    confidence = np.array([np.nan if c is None else c for c in reliability["confidence"]], dtype=np.float64)
    left, width = edges[:-1], np.diff(edges)
    figure = Figure(figsize=(6.0, 6.5), dpi=DPI)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = ~np.isnan(accuracy)
    top.bar(left[filled], accuracy[filled], width=width[filled], align="edge", color="tab:blue",
            edgecolor="black", label="accuracy")
    top.plot(confidence[filled], accuracy[filled], "o", color="tab:red", markersize=4,
             label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (ECE {ece:.3f})")
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(left, counts, width=width, align="edge", color="tab:grey", edgecolor="black")
    for x, w, count in zip(left, width, counts):
        if count:
            bottom.text(x + w / 2, count, f"{int(count)}", ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, max(1.0, counts.max()) * 1.25)
    bottom.set_xlabel("confidence (largest probability)")
    bottom.set_ylabel("predictions")
    return _save(figure, path)


def plot_wrong(images, rows: list[dict], path: Target, columns: int = 4) -> Path | BinaryIO:
    """A grid of the most confidently wrong images, each titled with its file name (when `rows` have a
    "path"), true and predicted class."""
    if len(images) != len(rows):
        raise KerastlError(f"there are {len(images)} images but {len(rows)} wrong predictions to title them")
    if len(rows) == 0:
        return _message("no wrong predictions", path)
    columns = max(1, min(columns, len(rows)))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(_inches(2.4 * columns), _inches(2.6 * lines, 3.0)), dpi=DPI)
    grid = np.atleast_1d(figure.subplots(lines, columns, squeeze=False, gridspec_kw=dict(
        left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / figure.get_figheight(), wspace=0.08,
        hspace=0.9 / 2.6))).reshape(-1)
    for axes, image, row in zip(grid, images, rows):
        axes.imshow(np.asarray(image, dtype=np.uint8))
        name = f"{_short(Path(row['path']).name)}\n" if row.get("path") else ""  # the file, to find and fix
        axes.set_title(f"{name}true: {_short(row['true'])}\npred: {_short(row['predicted'])} "
                       f"({row['confidence']:.2f})", fontsize=9)
    for axes in grid:
        axes.set_axis_off()
    return _save(figure, path, tight=False)


def plot_class_counts(counts: dict[str, list[int]], class_names: list[str], path: Target) -> Path | BinaryIO:
    """Grouped bars of the images per class in each split; horizontal when there are many classes."""
    splits = [name for name, values in counts.items() if values is not None]
    k = len(class_names)
    for name in splits:
        if len(counts[name]) != k:
            raise KerastlError(f"split {name!r} has {len(counts[name])} counts but there are {k} class names")
    if not splits or k == 0:
        return _message("no images counted", path)
    positions = np.arange(k)
    width = 0.8 / len(splits)
    names = [_short(name) for name in class_names]
    horizontal = k >= HORIZONTAL_FROM
    size = _inches(0.3 * k * (1 + 0.3 * len(splits)) + 2.0)
    figure = Figure(figsize=(8.0, _inches(size, 4.0)) if horizontal else (size, 4.5), dpi=DPI)
    axes = figure.subplots()
    for number, name in enumerate(splits):
        shift = positions - 0.4 + width * (number + 0.5)
        (axes.barh if horizontal else axes.bar)(shift, counts[name], width, label=name)
    if horizontal:
        axes.set_yticks(positions, names, fontsize=8 if k <= 40 else 6)
        axes.invert_yaxis()
        axes.set_xlabel("images")
    else:
        axes.set_xticks(positions, names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        axes.set_ylabel("images")
    axes.set_title("images per class")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_probe_curve(accuracy: list[float], all_accuracy: float, chosen: list[int], folds: int,
                     path: Target, se: list[float] | None = None, all_se: float | None = None) -> Path | BinaryIO:
    """A PNG of the probe accuracy per block (with its standard error `se`, as bars), all blocks as a
    line (its band: `all_se`), and the blocks the head reads."""
    blocks = np.arange(1, len(accuracy) + 1)
    figure = Figure(figsize=(max(5.0, 0.35 * len(blocks) + 2), 3.2), dpi=DPI)
    axes = figure.subplots()
    axes.errorbar(blocks, accuracy, yerr=None if se is None else np.nan_to_num(se), marker="o", capsize=3,
                  label="one block")
    axes.axhline(all_accuracy, color="tab:green", linestyle="--", label="all blocks")
    if all_se is not None and np.isfinite(all_se):
        axes.axhspan(all_accuracy - all_se, all_accuracy + all_se, color="tab:green", alpha=0.12)
    axes.scatter(chosen, [accuracy[b - 1] for b in chosen], s=120, facecolors="none", edgecolors="tab:red",
                 label="read by the head", zorder=3)
    axes.set_xlabel("block (the last is the backbone's output)")
    axes.set_ylabel(f"{folds}-fold probe accuracy")
    axes.set_xticks(blocks)
    axes.legend(fontsize="small")
    return _save(figure, path)


def _best(rows: list[dict], objective: str) -> dict:
    """The best row: lowest for a loss, first for "score" (trials.json is ranked best first), else highest."""
    if objective == "score":
        return rows[0]
    pick = min if OBJECTIVES.get(objective) == "min" else max
    return pick(rows, key=lambda row: row[objective])


def _varying(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(name for row in rows for name in (row.get("values") or {})))
    return [name for name in names if len({repr((row.get("values") or {}).get(name)) for row in rows}) > 1]


def plot_objective(rows: list[dict], objective: str, path: Target) -> Path | BinaryIO:
    """The objective of each trial against each searched setting, one panel per setting, the best ringed.

    Only rows with a value for `objective` are drawn; settings that never vary are left out
    (with none varying, the objective per trial is drawn instead). Text and booleans are
    categories; positive numbers spanning more than `LOG_DECADES` decades get a log axis.
    """
    scored = [row for row in rows if row.get(objective) is not None and np.isfinite(row[objective])]
    if not scored:
        return _message(f"no completed trials with a {objective}", path)
    best = _best(scored, objective)
    names = _varying(scored) or ["trial"]
    columns = min(3, len(names))
    lines = math.ceil(len(names) / columns)
    figure = Figure(figsize=(_inches(4.0 * columns), _inches(3.2 * lines, 3.2)), dpi=DPI)
    grid = figure.subplots(lines, columns, squeeze=False).reshape(-1)
    for axes, name in zip(grid, names):
        values = [row["trial"] if name == "trial" else (row.get("values") or {}).get(name) for row in scored]
        y = [row[objective] for row in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            x = np.asarray(values, dtype=np.float64)
            positive = x[x > 0]
            if len(positive) == len(x) and np.log10(positive.max() / positive.min()) > LOG_DECADES:
                axes.set_xscale("log")
        else:
            categories = list(dict.fromkeys(str(v) for v in values))
            x = np.array([categories.index(str(v)) for v in values], dtype=np.float64)
            axes.set_xticks(range(len(categories)), [_short(c, 12) for c in categories],
                            rotation=45 if len(categories) > 4 else 0)
        axes.scatter(x, y, color="tab:blue", alpha=0.7)
        i = next(i for i, row in enumerate(scored) if row is best)
        axes.scatter([x[i]], [y[i]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, label="best",
                     zorder=3)
        axes.set_xlabel(name)
        axes.set_ylabel(objective)
    grid[0].legend(fontsize="small")
    for axes in grid[len(names):]:
        axes.set_axis_off()
    figure.suptitle(f"{objective} of {len(scored)} trials (best: trial {best.get('trial')})")
    return _save(figure, path)


def draw_run_plots(folder: str | Path) -> list[Path]:
    """(Re)draws a run folder's plots from its JSON files into `plots/`: the curves
    (`history.json`), class counts (`data.json`), the confusion matrix and reliability diagram
    (`evaluation.json`), and `probe.png` (`probe.json`). A file that is missing is skipped;
    `plots/wrong.png` needs the images, so only a run draws it. Returns the files drawn."""
    folder = Path(folder)
    plot_path(folder, "curves").parent.mkdir(exist_ok=True)
    drawn = []

    history, data, evaluation, probe = (read_optional_json(folder / name) for name in (
        "history.json", "data.json", "evaluation.json", "probe.json"))  # missing or damaged: that plot is left out
    if history is not None:
        drawn.append(plot_curves(history, plot_path(folder, "curves")))
    if data is not None and data.get("counts"):
        drawn.append(plot_class_counts(data["counts"], data["class_names"], plot_path(folder, "class_counts")))
    if evaluation is not None:
        drawn.append(plot_confusion(evaluation["confusion_matrix"], evaluation["class_names"],
                                    plot_path(folder, "confusion")))
        drawn.append(plot_reliability(evaluation["reliability"], evaluation["ece"], plot_path(folder, "reliability")))
    if probe is not None:
        accuracy = [block["accuracy"] for block in probe["blocks"]]
        se = [block.get("accuracy_se", float("nan")) for block in probe["blocks"]]  # 0.2's probe.json: none
        drawn.append(plot_probe_curve(accuracy, probe["all"]["accuracy"], probe["chosen"], probe["folds"],
                                      plot_path(folder, "probe"), se, probe["all"].get("accuracy_se")))
    return drawn
