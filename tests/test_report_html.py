"""The HTML reports and the model card, from fake run and search folders; and the reports in a real browser."""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from kerastl.config import RunConfig
from kerastl.errors import KerastlError
from kerastl.features.blocks import BlockCurve
from kerastl.reports import plots
from kerastl.reports.card import model_card, write_model_card
from kerastl.reports.facts import usage_snippet
from kerastl.reports.html import RUN_SECTIONS, write_report, write_run_report, write_search_report
from kerastl.tune.config import TuneConfig

CLASSES = ["cat", "dog", "<b>&co"]
ESCAPED = "&lt;b&gt;&amp;co"
SOURCE = "/data/<pets>"
FAILED_ERROR = "ResourceExhaustedError: OOM when allocating <tensor 64x1280>"
ESCAPED_ERROR = "OOM when allocating &lt;tensor 64x1280&gt;"
EXTERNAL = re.compile(r"""src\s*=\s*["']?\s*https?:|href\s*=\s*["']?\s*https?:|<link\b|@import|url\(\s*["']?https?:""",
                      re.IGNORECASE)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# chromium prints every console message, whatever its level, as "[pid:tid:time:INFO:CONSOLE:LINE] "text", source:
# URL (LINE)" (older builds: "...:CONSOLE(LINE)]"); an uncaught exception reads "Uncaught Error: ...". A report
# never writes to the console, so any console line is an error: a throw, a console.error, a blocked request.
CONSOLE = re.compile(r":(?:INFO|WARNING|ERROR|FATAL|VERBOSE\d*):CONSOLE[:(]")


def json_file(path, value):
    path.write_text(json.dumps(value, indent=2))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder holding every file a run, its evaluation and its probe curve write."""
    folder = tmp_path_factory.mktemp("run")
    config = RunConfig().to_dict()
    config["name"] = "pets"
    config["data"].update(source=SOURCE, test_dir="/data/pets-test")
    config["model"].update(backbone="mobilenet_v2", weights="imagenet", image_size=96, features="3,7", dropout=0.3)
    config["train"].update(unfreeze_blocks=2, learning_rate=0.002, fine_tune_lr_ratio=0.1, validation="holdout")
    json_file(folder / "config.json", config)
    json_file(folder / "metrics.json", {"val_loss": 0.41, "val_accuracy": 0.875, "val_macro_f1": 0.861, "val_auc": 0.95,
                                        "test_loss": 0.52, "test_accuracy": 0.8125, "test_macro_f1": 0.79,
                                        "test_auc": 0.93})
    history = {"phase1": {"loss": [1.0, 0.7, 0.5, 0.45], "accuracy": [0.5, 0.7, 0.8, 0.82],
                          "val_loss": [0.9, 0.6, 0.5, 0.52], "val_accuracy": [0.6, 0.75, 0.8, 0.8],
                          "epoch": [0, 1, 2, 3]},
               "phase2": {"loss": [0.4, 0.35, 0.3], "accuracy": [0.85, 0.87, 0.9], "val_loss": [0.45, 0.41, 0.43],
                          "val_accuracy": [0.84, 0.875, 0.86], "epoch": [0, 1, 2]}}
    json_file(folder / "history.json", history)
    json_file(folder / "metadata.json", {"kerastl_version": "0.2.0", "format": 3, "export": True})
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    counts = {"train": [40, 38, 4], "validation": [10, 9, 2], "test": [8, 6, 2]}
    json_file(folder / "data.json", {
        "sources": {"train": SOURCE, "validation": "0.2 of each class", "test": "/data/pets-test"},
        "class_names": CLASSES, "counts": counts, "validation_mode": "holdout",
        "warnings": ["class '<b>&co' has 4 training images"], "skipped_files": 2})
    matrix = [[7, 1, 0], [1, 5, 0], [0, 1, 1]]
    reliability = {"edges": [0.0, 0.5, 1.0], "count": [4, 12], "confidence": [0.4, 0.85], "accuracy": [0.5, 0.9]}
    wrong = [{"index": 3, "true": "cat", "predicted": "dog", "confidence": 0.91},
             {"index": 11, "true": "<b>&co", "predicted": "dog", "confidence": 0.77}]
    per_class = [{"class": name, "precision": p, "recall": r, "f1": f, "support": s} for name, p, r, f, s in
                 zip(CLASSES, (0.875, 0.714, 1.0), (0.875, 0.833, 0.5), (0.875, 0.769, 0.667), (8, 6, 2))]
    json_file(folder / "evaluation.json", {
        "split": "test", "count": 16, "class_names": CLASSES, "accuracy": 0.8125, "loss": 0.52, "top_k": 2,
        "top_k_accuracy": 0.9375, "per_class": per_class,
        "macro_avg": {"precision": 0.863, "recall": 0.736, "f1": 0.770, "support": 16},
        "weighted_avg": {"precision": 0.829, "recall": 0.8125, "f1": 0.809, "support": 16},
        "confusion_matrix": matrix, "ece": 0.071, "reliability": reliability, "most_wrong": wrong,
        "weak_classes": ["<b>&co"]})
    curve = BlockCurve([f"block_{i}" for i in range(1, 8)], [0.5, 0.6, 0.82, 0.7, 0.72, 0.75, 0.78],
                       [1.0] * 7, 0.8, 0.9, [3, 7], 2, 5, 82)
    json_file(folder / "probe.json", curve.to_dict())
    (folder / "plots").mkdir()
    plots.plot_curves(history, folder / "plots" / "curves.png")
    plots.plot_confusion(matrix, CLASSES, folder / "plots" / "confusion.png")
    plots.plot_reliability(reliability, 0.071, folder / "plots" / "reliability.png")
    plots.plot_wrong(np.full((2, 16, 16, 3), 128, np.uint8), wrong, folder / "plots" / "wrong.png")
    plots.plot_class_counts(counts, CLASSES, folder / "plots" / "class_counts.png")
    plots.plot_probe_curve(curve.accuracy, curve.all_accuracy, curve.chosen, curve.folds, folder / "probe.png")
    return folder


def trial(number, score, seconds, **values):
    return {"trial": f"{number:02d}", "status": "COMPLETED", "score": score, "val_accuracy": score,
            "val_loss": None if score is None else 1.2 - score, "val_macro_f1": score, "val_auc": score,
            "seconds": seconds, "reused_head": False, "memory_mb": 900.0, "gpu_peak_mb": None, "values": values}


@pytest.fixture(scope="module")
def search_folder(tmp_path_factory):
    """A search project with six trials, one failed, in trials.json out of rank order."""
    folder = tmp_path_factory.mktemp("search")
    tune = TuneConfig(objective="val_accuracy", max_trials=8, project_dir=str(folder),
                      space={"dropout": [0.1, 0.3], "learning_rate": {"min": 1e-4, "max": 1e-2}}).to_dict()
    json_file(folder / "search.json", {"run": RunConfig().to_dict(), "tune": tune, "format": 2})
    failed = {**trial(4, None, None, dropout=0.3, learning_rate=0.01, optimizer="sgd"), "status": "FAILED",
              "error": FAILED_ERROR}
    rows = [trial(1, 0.70, 31.5, dropout=0.1, learning_rate=0.001, optimizer="adam"), failed,
            trial(2, 0.90, 12.0, dropout=0.3, learning_rate=0.0003, optimizer="adam"),
            trial(3, 0.80, 103.25, dropout=0.2, learning_rate=0.003, optimizer="<sgd>"),
            trial(5, 0.85, 9.0, dropout=0.1, learning_rate=0.0001, optimizer="adam"),
            trial(6, 0.60, 48.0, dropout=0.2, learning_rate=0.01, optimizer="sgd")]
    json_file(folder / "trials.json", rows)
    return folder


def trial_order(page: str) -> list[str]:
    return re.findall(r'<tr data-trial="([^"]+)"', page)


def test_run_report_has_every_section_and_escapes_class_names(run_folder):
    page = write_run_report(run_folder).read_text()
    for key in RUN_SECTIONS:
        assert f'<section id="{key}">' in page and f'href="#{key}"' in page
    assert ESCAPED in page and "<b>&co" not in page
    assert "&lt;pets&gt;" in page and "<pets>" not in page
    assert "mobilenet_v2" in page and "ImageNet" in page and "blocks 3, 7" in page and "the last 2 blocks" in page
    assert "4 epochs, learning rate 0.002" in page and "3 epochs, learning rate 0.0002" in page


def test_run_report_labels_each_metric_with_what_it_was_measured_on(run_folder):
    page = write_run_report(run_folder).read_text()
    metrics = page[page.index('<section id="metrics">'):page.index('<section id="mistakes">')]
    assert "<td>0.8125</td><td>held-out test split (16 images)</td>" in metrics
    assert "<td>0.8750</td><td>validation split (21 images; used for early stopping and choices, so optimistic)" \
        in metrics
    assert "<td>0.0710</td><td>held-out test split (16 images), by evaluation.json</td>" in metrics
    assert f"<td>{ESCAPED}</td><td>1.000</td><td>0.500</td><td>0.667</td><td>2</td>" in metrics


def test_run_report_embeds_every_png_and_references_nothing_outside(run_folder):
    page = write_run_report(run_folder).read_text()
    pngs = sorted(run_folder.rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in page, png.name
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<style>" in page and "<script>" in page and "<script src" not in page


def test_external_reference_pattern_catches_each_kind():
    for text in ('<img src="https://x/y.png">', "<a href='http://x'>", '<link rel="stylesheet">',
                 "@import 'a.css';", "background: url(http://x/y)"):
        assert EXTERNAL.search(text), text


def test_minimal_run_folder_still_gives_a_report_and_a_card(tmp_path):
    json_file(tmp_path / "config.json", RunConfig().to_dict())
    json_file(tmp_path / "metrics.json", {"cv_accuracy": 0.9, "cv_accuracy_std": 0.05, "cv_loss": 0.3,
                                          "cv_folds": 5.0})
    page = write_report(tmp_path).read_text()
    for key in RUN_SECTIONS:
        assert f'<section id="{key}">' in page
    assert "0.9000 ± 0.0500 (std over folds)</td><td>cross-validated estimate (5 folds" in page
    assert "not evaluated" in page and "not recorded" in page
    card = model_card(tmp_path)
    assert "not evaluated" in card and "Images per class: not recorded." in card
    assert "kerastl.load_model(" in card  # no SavedModel: the weights-only way to load it


def test_folder_that_is_neither_run_nor_search_is_a_one_line_error(tmp_path):
    json_file(tmp_path / "config.json", RunConfig().to_dict())
    with pytest.raises(KerastlError, match="lacks metrics.json") as caught:
        write_report(tmp_path)
    assert "\n" not in str(caught.value)
    with pytest.raises(KerastlError, match="not a folder"):
        write_report(tmp_path / "missing")


def test_search_report_ranks_trials_best_first_with_failed_last(search_folder):
    page = write_report(search_folder).read_text()
    assert page == (search_folder / "report.html").read_text()
    assert trial_order(page) == ["02", "05", "03", "01", "06", "04"]
    assert '<tr data-trial="04" class="failed">' in page
    assert page.count(ESCAPED_ERROR) == 2  # in its row and in the list of failed trials
    assert "val_accuracy, maximised" in page and "6 done (5 completed, 1 failed, 0 other) of max_trials 8" in page
    assert "&lt;sgd&gt;" in page and not EXTERNAL.search(page)



def test_search_report_has_the_sort_script_and_the_objective_plot(search_folder):
    page = write_search_report(search_folder).read_text()
    assert '<table class="sortable">' in page and 'data-key="seconds"' in page and 'data-key="dropout"' in page
    assert "addEventListener(\"click\"" in page and "#sort=" in page and 'document.body.dataset.ready = "1"' in page
    assert page.count("data:image/png;base64,") == 1
    assert '<td data-sort="103.25">103.2</td>' in page  # sorted on the number, not its text


def test_model_card_names_data_model_metrics_weak_classes_and_usage(run_folder):
    path = write_model_card(run_folder)
    card = path.read_text()
    assert path.name == "MODEL_CARD.md" and card == model_card(run_folder)
    for heading in ("Data", "Model", "Training", "Metrics", "Known weak classes", "How to load and call it",
                    "Limitations"):
        assert f"\n## {heading}\n" in card
    assert "- train: /data/\\<pets\\>" in card and "| \\<b\\>&co | 4 | 2 | 2 |" in card and "<b>" not in card
    assert "- backbone: mobilenet_v2" in card and "- weights: ImageNet" in card
    assert "- blocks unfrozen: the last 2 blocks" in card and "- features read: blocks 3, 7" in card
    assert "| accuracy | 0.8125 | held-out test split (16 images) |" in card
    assert "| accuracy | 0.8750 | validation split (21 images; used for early stopping and choices, so optimistic) |" \
        in card
    assert "\\<b\\>&co (on the test split)" in card
    assert "Trained on 82 images of 3 classes (the smallest class has 4)." in card
    assert "load them only from sources you trust" in card


def test_usage_snippet_is_python_calling_both_signatures(run_folder):
    snippet = usage_snippet(run_folder)
    assert "tf.saved_model.load" in snippet and "labels.txt" in snippet
    assert 'signatures["serving_default"](images=' in snippet and 'signatures["serve_bytes"](image_bytes=' in snippet
    assert f"kerastl predict --model {run_folder.resolve()} image.jpg" in snippet
    assert f"kerastl evaluate --model {run_folder.resolve()} --data" in snippet
    ast.parse(snippet)


def test_a_staged_folder_names_the_folder_it_will_become(run_folder, tmp_path):
    staging, final = tmp_path / ".pets-x1y2", tmp_path / "pets"
    shutil.copytree(run_folder, staging)
    page = write_run_report(staging, location=final).read_text()
    card = write_model_card(staging, location=final).read_text()
    for text in (page, card, usage_snippet(staging, final)):
        assert f"kerastl predict --model {final} image.jpg" in text and ".pets-x1y2" not in text


def test_usage_snippet_runs_against_a_real_export(tmp_path, monkeypatch, capsys):
    from kerastl.cli.main import main
    from kerastl.config import ModelConfig
    from kerastl.models.classifier import build_classifier
    from kerastl.models.export import export_saved_model

    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=32, features="last"), len(CLASSES))
    export_saved_model(model, tmp_path / "run", CLASSES)
    model.save(tmp_path / "run" / "model.keras")
    json_file(tmp_path / "run" / "metadata.json", {"kerastl_version": "0.2.0", "format": 3, "export": True})
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    snippet = usage_snippet(tmp_path / "run").replace("# import keras, kerastl;", "import keras, kerastl;")
    namespace = {}
    exec(compile(snippet, "usage_snippet", "exec"), namespace)
    assert namespace["probs"].shape == (1, len(CLASSES)) and namespace["labels"] == CLASSES
    assert namespace["model"].output_shape == (None, len(CLASSES))  # model.keras, loaded in safe mode
    capsys.readouterr()
    command = next(line for line in snippet.splitlines() if "kerastl predict" in line).split("kerastl ", 1)[1]
    assert main(command.split()) == 0 and "image.jpg" in capsys.readouterr().out


OPTIONAL = ["history.json", "metadata.json", "labels.txt", "data.json", "evaluation.json", "probe.json", "probe.png"]


@pytest.mark.parametrize("name,damage", [*((name, "missing") for name in [*OPTIONAL, "plots"]),
                                         *((name, "damaged") for name in OPTIONAL)])
def test_each_optional_file_may_be_missing_or_damaged(run_folder, tmp_path, name, damage):
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    target = folder / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    if damage == "damaged":
        target.write_text("[not json" if name.endswith(".json") else "\x00 not what it should be")
    page = write_run_report(folder).read_text()
    for key in RUN_SECTIONS:
        assert f'<section id="{key}">' in page
    pngs = {"plots": 1, "probe.png": 5}.get(name, 6)
    assert page.count("data:image/png;base64,") == pngs
    if name in ("history.json", "evaluation.json"):
        assert {"history.json": "Training history: not recorded", "evaluation.json": "not evaluated"}[name] in page
    assert "## Known weak classes" in model_card(folder)


# ---- in a browser ----

def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        pytest.skip("no Chromium or Chrome on PATH")
    try:  # a stub that only points elsewhere (Ubuntu's snap "chromium") is no browser
        works = subprocess.run([found, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    if not works:
        pytest.skip(f"{found} does not run")
    return found


def render(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def test_console_error_detector_catches_a_deliberate_throw(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><script>throw new Error("deliberate");'
                    'document.body.dataset.ready = "1";</script></body></html>')
    result = render(tmp_path, page.as_uri(), "--dump-dom")
    errors = console_errors(result.stderr)
    assert len(errors) == 1 and "Uncaught Error: deliberate" in errors[0], result.stderr[-2000:]
    assert "<body>" in result.stdout and 'data-ready="1"' not in result.stdout


@pytest.mark.parametrize("kind", ["run", "search"])
def test_report_renders_in_a_browser_without_errors(kind, run_folder, search_folder, tmp_path):
    path = write_report(run_folder if kind == "run" else search_folder)
    dom = render(tmp_path, path.as_uri(), "--dump-dom")
    assert console_errors(dom.stderr) == []
    assert 'data-ready="1"' in dom.stdout
    for key in (RUN_SECTIONS if kind == "run" else ("settings", "trials", "failed", "objective")):
        assert f'id="{key}"' in dom.stdout
    shot = tmp_path / "shot.png"
    render(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as image:
        image.verify()
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # text and plots, not a blank page


def test_search_report_sorts_by_the_column_its_url_names(search_folder, tmp_path):
    uri = write_search_report(search_folder).as_uri()
    ascending = render(tmp_path, uri + "#sort=seconds", "--dump-dom")
    descending = render(tmp_path, uri + "#sort=-seconds", "--dump-dom")
    assert console_errors(ascending.stderr + descending.stderr) == []
    assert trial_order(ascending.stdout) == ["05", "02", "01", "06", "03", "04"]  # 9, 12, 31.5, 48, 103.25, none
    assert trial_order(descending.stdout) == ["03", "06", "01", "02", "05", "04"]  # the failed trial stays last
    assert re.findall(r'<th [^>]*aria-sort="(\w+)"', descending.stdout) == ["descending"]
    assert re.search(r'<th [^>]*data-key="seconds"[^>]*aria-sort="descending"', descending.stdout)
