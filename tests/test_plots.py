"""kerastl.reports.plots: every plot writes a readable PNG, headless, to a path or a file object, without TensorFlow."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from kerastl.reports import plots
from kerastl.reports.evaluation import evaluate_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = {
    "phase1": {"loss": [1.2, 0.9, 0.7], "val_loss": [1.1, 0.95, 0.8], "accuracy": [0.5, 0.6, 0.7],
               "val_accuracy": [0.45, 0.55, 0.65], "epoch": [0, 1, 2], "start_val_loss": [1.3]},
    "phase2": {"loss": [0.6, 0.5], "val_loss": [0.75, 0.7], "accuracy": [0.75, 0.8], "val_accuracy": [0.7, 0.72],
               "learning_rate": [1e-5, 1e-5], "epoch": [3, 4]},
}
CV_HISTORY = {
    "phase1": {"cv_loss": [0.8], "cv_accuracy": [0.7], "cv_accuracy_std": [0.05], "epoch": [0]},
    "phase2": {"cv_loss": [0.8, 0.7, 0.72], "cv_accuracy": [0.7, 0.74, 0.73], "epoch": [0, 1, 2]},
}
TRIALS = [
    {"trial": "00", "status": "COMPLETED", "score": 0.8, "val_accuracy": 0.8, "val_loss": 0.6,
     "values": {"dropout": 0.2, "learning_rate": 1e-2, "optimizer": "adam", "augment": True, "backbone": "tiny"}},
    {"trial": "01", "status": "COMPLETED", "score": 0.7, "val_accuracy": 0.7, "val_loss": 0.7,
     "values": {"dropout": 0.5, "learning_rate": 1e-5, "optimizer": "sgd", "augment": False, "backbone": "tiny"}},
    {"trial": "02", "status": "COMPLETED", "score": 0.75, "val_accuracy": 0.75, "val_loss": 0.5,
     "values": {"dropout": 0.3, "learning_rate": 1e-3, "optimizer": "adam", "augment": False, "backbone": "tiny"}},
    {"trial": "03", "status": "FAILED", "score": None, "val_accuracy": None, "val_loss": None,
     "values": {"dropout": 0.1, "learning_rate": 1e-4, "optimizer": "rmsprop", "augment": True, "backbone": "tiny"}},
]


def png_size(data: bytes) -> tuple[int, int]:
    """The width and height of a PNG, checking its signature, IHDR chunk and a plausible size."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 2000 and 300 <= height <= 2000, (width, height)
    assert len(data) > 2048
    return width, height


@pytest.fixture
def evaluation():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 10)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=30)
    probabilities[np.arange(30), labels] += 0.6
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return evaluate_predictions(probabilities, labels, ["cat", "dog", "bird"])


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plots save, in order, to look inside them."""
    figures = []
    save = plots._save

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def wrong_images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


PLOTS = {
    "curves": lambda e, path: plots.plot_curves(HISTORY, path),
    "curves without phase 2": lambda e, path: plots.plot_curves({"phase1": HISTORY["phase1"]}, path),
    "cross-validated curves": lambda e, path: plots.plot_curves(CV_HISTORY, path),
    "no curves": lambda e, path: plots.plot_curves({}, path),
    "confusion": lambda e, path: plots.plot_confusion(e.confusion_matrix, e.class_names, path),
    "confusion of 30 classes": lambda e, path: plots.plot_confusion(
        np.random.default_rng(0).integers(0, 5, (30, 30)), [f"class number {i}" for i in range(30)], path),
    "reliability": lambda e, path: plots.plot_reliability(e.reliability, e.ece, path),
    "wrong": lambda e, path: plots.plot_wrong(wrong_images(len(e.most_wrong)), e.most_wrong, path),
    "no wrong": lambda e, path: plots.plot_wrong(wrong_images(0), [], path),
    "class counts": lambda e, path: plots.plot_class_counts(
        {"train": [40, 12, 30], "validation": [5, 2, 4], "test": [5, 3, 4]}, e.class_names, path),
    "class counts of 30 classes": lambda e, path: plots.plot_class_counts(
        {"train": list(range(10, 40)), "validation": list(range(30))}, [f"c{i}" for i in range(30)], path),
    "probe curve": lambda e, path: plots.plot_probe_curve([0.5, 0.6, 0.8, 0.75], 0.82, [3, 4], 5, path),
    "objective": lambda e, path: plots.plot_objective(TRIALS, "val_accuracy", path),
    "no completed trials": lambda e, path: plots.plot_objective(TRIALS[3:], "val_accuracy", path),
}


@pytest.mark.parametrize("name", PLOTS)
def test_every_plot_writes_a_png_file_and_returns_its_path(name, evaluation, tmp_path):
    path = tmp_path / "plot.png"
    assert PLOTS[name](evaluation, str(path)) == path
    png_size(path.read_bytes())


@pytest.mark.parametrize("name", ["curves", "confusion", "reliability", "wrong", "objective"])
def test_plots_write_into_a_file_object(name, evaluation):
    buffer = io.BytesIO()
    assert PLOTS[name](evaluation, buffer) is buffer
    png_size(buffer.getvalue())


def test_fine_tuning_epochs_run_on_after_phase_one_behind_a_marker(drawn, tmp_path):
    plots.plot_curves(HISTORY, tmp_path / "curves.png")
    loss = drawn[0].axes[0]
    xs = [list(line.get_xdata()) for line in loss.lines if line.get_linestyle() == "-"]
    assert [1, 2, 3] in xs and [4, 5] in xs
    assert any(text.get_text().strip() == "fine-tuning starts" for text in loss.texts)


def test_curves_without_phase_two_have_no_fine_tuning_marker(drawn, tmp_path):
    plots.plot_curves({"phase1": HISTORY["phase1"]}, tmp_path / "curves.png")
    assert not any("fine-tuning" in text.get_text() for axes in drawn[0].axes for text in axes.texts)


def test_cross_validated_curves_are_labelled_so(drawn, tmp_path):
    plots.plot_curves(CV_HISTORY, tmp_path / "curves.png")
    labels = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert labels == ["cross-validated"]


def test_confusion_rows_are_shares_and_an_empty_row_is_zeros(drawn, tmp_path):
    plots.plot_confusion([[3, 1, 0], [0, 0, 0], [1, 1, 2]], ["a", "b", "c"], tmp_path / "confusion.png")
    shares = np.asarray(drawn[0].axes[0].images[0].get_array())
    assert shares == pytest.approx(np.array([[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]]))
    assert len(drawn[0].axes[0].texts) == 9


def test_confusion_of_many_classes_has_no_cell_numbers(drawn, tmp_path):
    plots.plot_confusion(np.eye(30, dtype=int), [str(i) for i in range(30)], tmp_path / "confusion.png")
    assert len(drawn[0].axes[0].texts) == 0
    assert drawn[0].get_figwidth() <= 14


def test_objective_has_a_panel_per_varying_setting_and_a_log_axis_for_wide_rates(drawn, tmp_path):
    plots.plot_objective(TRIALS, "val_loss", tmp_path / "objective.png")
    shown = {axes.get_xlabel(): axes for axes in drawn[0].axes if axes.get_visible() and axes.axison}
    assert set(shown) == {"dropout", "learning_rate", "optimizer", "augment"}  # "backbone" never varies
    assert shown["learning_rate"].get_xscale() == "log" and shown["dropout"].get_xscale() == "linear"
    best = shown["dropout"].collections[1].get_offsets()
    assert best.tolist() == [[0.3, 0.5]]  # the lowest val_loss, trial 02


