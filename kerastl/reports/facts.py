"""What a run folder says, in words: the readers and phrases the model card and the HTML report share.

`read_run(folder)` reads only the run folder's files: `config.json` (with the plan), `metrics.json` and, if present,
`history.json`, `metadata.json`, `labels.txt`, `data.json`, `evaluation.json` and `probe.json`, which the functions
below turn into (label, text) pairs, tables and sentences. A missing optional file reads "not recorded", never an
error.

Every metric says what it was measured on, because the numbers mean different things: `test_*` on the held-out
test split; `val_*` on the validation split, which also chose the epochs and settings and so is optimistic; `cv_*`
a cross-validated estimate over k folds. No TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerastl.config import flat_train
from kerastl.errors import KerastlError

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded"
SPLITS = ("train", "validation", "test")
METRIC_NAMES = {"loss": "loss (cross-entropy)", "accuracy": "accuracy", "macro_f1": "macro F1",
                "auc": "AUC (one-vs-rest mean)"}
FEATURE_WORDS = {"last": "the backbone's output (its last block)", "all": "every block's pooled output, concatenated",
                 "auto": "chosen by linear probes (which blocks: not recorded)", NOT_RECORDED: NOT_RECORDED}
Table = tuple[list[str], list[list[str]]]  # header, rows of cell texts (not escaped)


@dataclass
class RunFiles:
    """The JSON and text files of one run folder; None for an optional file that is missing."""

    folder: Path
    config: dict
    metrics: dict
    history: dict | None = None
    metadata: dict | None = None
    labels: list[str] | None = None
    data: dict | None = None
    evaluation: dict | None = None
    probe: dict | None = None
    location: Path | None = None  # where the folder is read from, when it is written elsewhere first

    @property
    def where(self) -> Path:
        return Path(self.location or self.folder).resolve()

    @property
    def model(self) -> dict:
        return self.config.get("model") or {}

    @property
    def train(self) -> dict:
        """The `train` section in the 0.2 layout (`fine_tune_epochs`, `validation`, ...), whoever wrote it."""
        return flat_train(self.config.get("train") or {})

    @property
    def plan(self) -> dict:
        """The choices the run made (`config.json`'s "plan", since 0.3); empty when not recorded."""
        return self.config.get("plan") or {}

    def planned(self, name: str) -> dict:
        """Phase `name` ("phase1", "phase2") as planned (epochs, patience, rate); empty when it was not."""
        phases = [*(self.plan.get("phases") or []), {}]
        return phases[0] if name == "phase1" else next(p for p in phases if p.get("name", "fine_tune") == "fine_tune")

    @property
    def class_names(self) -> list[str] | None:
        return self.labels or (self.data or {}).get("class_names") or (self.evaluation or {}).get("class_names")


def read_optional_json(path: Path) -> dict | None:
    """A JSON object file's value; None when it is missing, unreadable or not an object (with a warning)."""
    try:
        value = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        value = str(error)
    if value is not None and not isinstance(value, dict):
        log.warning("ignoring %s: not a JSON object (%s)", path, str(value)[:200])
        return None
    return value


def read_run(folder: str | Path, location: str | Path | None = None) -> RunFiles:
    """The files of a run folder; a missing or malformed config.json or metrics.json is a `KerastlError`.

    `location` is where the folder will be read from when it differs (a staging folder that is
    renamed into place when complete); the usage snippet and the card name it.
    """
    folder = Path(folder)
    required = {name: read_optional_json(folder / name) for name in ("config.json", "metrics.json")}
    for name, value in required.items():
        if value is None:
            missing = not (folder / name).is_file()
            raise KerastlError(f"{folder} has no {name}: it is not a kerastl run folder" if missing
                               else f"{folder / name} is not a JSON object; was the run folder damaged?")
    labels = (folder / "labels.txt").read_text().splitlines() if (folder / "labels.txt").is_file() else None
    optional = {name: read_optional_json(folder / f"{name}.json") for name in
                ("history", "metadata", "data", "evaluation", "probe")}
    return RunFiles(folder, required["config.json"], required["metrics.json"], labels=labels,
                    location=None if location is None else Path(location), **optional)


def number(value: Any, digits: int = 4) -> str:
    """A score for people: `digits` decimals; "n/a" for NaN; "not recorded" for None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return NOT_RECORDED if value is None else str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def split_counts(run: RunFiles) -> dict[str, int]:
    """Images per split from data.json's counts (splits that are not recorded are left out)."""
    counts = (run.data or {}).get("counts") or {}
    return {split: int(sum(counts[split])) for split in SPLITS if counts.get(split) is not None}


def recorded_validation_mode(run: RunFiles) -> str:
    """ "holdout" or "cv" as data.json or the plan records it, else as the metrics show, else the config's setting."""
    prefixes = {key.split("_")[0] for key in run.metrics}
    recorded = (run.data or {}).get("validation_mode") or run.plan.get("validation_mode")
    return recorded or ("cv" if "cv" in prefixes else "holdout" if "val" in prefixes
                        else run.train.get("validation", "auto"))


def data_sources(run: RunFiles) -> list[tuple[str, str]]:
    """(split, where its images came from), from data.json or else config.json."""
    sources = (run.data or {}).get("sources")
    if sources:
        return [(split, str(sources.get(split) or "none")) for split in SPLITS if split in sources]
    data = run.config.get("data") or {}
    test_split = data.get("test_split") or 0
    return [("train", str(data.get("source") or NOT_RECORDED)),
            ("validation", (data.get("validation_dir") or f"{data.get('validation_split', '?')} of each class")
             if recorded_validation_mode(run) != "cv" else "cross-validation folds of the training images"),
            ("test", data.get("test_dir") or (f"{test_split} of each class" if test_split else "none"))]


def counts_table(run: RunFiles) -> Table | None:
    """Images per class and split, with a total row; None when data.json records no counts."""
    counts = (run.data or {}).get("counts") or {}
    splits = [split for split in SPLITS if counts.get(split) is not None]
    names = run.class_names
    if not splits or not names:
        return None
    rows = [[name, *(str(counts[split][i]) if i < len(counts[split]) else "?" for split in splits)]
            for i, name in enumerate(names)]
    rows.append(["total", *(str(sum(counts[split])) for split in splits)])
    return ["class", *splits], rows


def recorded_warnings(run: RunFiles) -> list[str]:
    """data.json's warnings, and the files that could not be read."""
    skipped = (run.data or {}).get("skipped_files")
    return [str(w) for w in (run.data or {}).get("warnings") or []] + (
        [f"{skipped} files could not be read as images and were skipped"] if skipped else [])


def weights_text(model: dict) -> str:
    """Where the backbone's weights came from: ImageNet, a file, or nowhere (trained from scratch)."""
    weights = model.get("weights", NOT_RECORDED) if model else NOT_RECORDED
    if weights is None:
        return "none (trained from scratch)"
    text = "ImageNet" if str(weights).lower() == "imagenet" else (
        NOT_RECORDED if weights == NOT_RECORDED else f"file {weights}")
    return text + (" (every layer trained from the start)" if model.get("from_scratch") else "")


def features_text(run: RunFiles) -> str:
    """Which blocks of the backbone the head reads."""
    features = str(run.model.get("features", NOT_RECORDED))
    chosen = (run.probe or {}).get("chosen")
    if features == "auto" and not chosen and (run.model.get("from_scratch") or run.model.get("weights", "") is None):
        return "the backbone's output (trained from scratch: no probes)"
    if features == "auto" and chosen:
        features = ",".join(map(str, chosen))
    if features in FEATURE_WORDS:
        return FEATURE_WORDS[features]
    text = f"block{'s' if ',' in features else ''} {features.replace(',', ', ')}"
    return text + (" (chosen by linear probes)" if chosen else "")


def unfreeze_text(run: RunFiles) -> str:
    """How much of the backbone phase 2 trained."""
    train = run.train
    if run.model.get("from_scratch") or run.model.get("weights", "") is None:
        return "all (trained from scratch)"
    if not train.get("fine_tune_epochs") and "fine_tune_epochs" in train:
        return "none (no fine-tuning)"
    if train.get("unfreeze_from"):
        return f"every layer from {train['unfreeze_from']} on"
    blocks = train.get("unfreeze_blocks", NOT_RECORDED)
    if blocks == "auto":
        depth = (run.probe or {}).get("unfreeze_blocks")
        return f"the last {depth} blocks (chosen from the probe curve)" if depth else "chosen from the probe curve"
    return f"the last {blocks} blocks" if isinstance(blocks, int) else str(blocks)


def model_facts(run: RunFiles) -> list[tuple[str, str]]:
    """(label, text) pairs: backbone, weights, input, head, features read, blocks unfrozen, classes."""
    model = run.model
    size = model.get("image_size")
    head = (f"{model.get('pooling', '?')} pooling, dropout {model.get('dropout', '?')}, "
            + (f"{model['hidden_units']} hidden units, " if model.get("hidden_units") else "no hidden layer, ")
            + ("one sigmoid unit" if model.get("binary") else "softmax")) if model else NOT_RECORDED
    names = run.class_names
    version = (run.metadata or {}).get("kerastl_version")
    return [("backbone", str(model.get("backbone", NOT_RECORDED))), ("weights", weights_text(model)),
            ("image size", f"{size} x {size} (resized inside the model)" if size else "the backbone's default"),
            ("head", head), ("features read", features_text(run)), ("blocks unfrozen", unfreeze_text(run)),
            ("classes", f"{len(names)}: {', '.join(names)}" if names else NOT_RECORDED),
            ("written by", f"kerastl {version}" if version else NOT_RECORDED)]


def _ran(run: RunFiles, name: str) -> str | None:
    """How long phase `name` ("phase1", "phase2") ran, from history.json; None when it did not run."""
    phase = None if run.history is None else run.history.get(name)
    if run.history is None or (phase is None and name == "phase1"):
        return NOT_RECORDED
    if not phase:
        return None
    if name == "phase2" and "cv_fine_tune_epochs" in run.metrics:
        return f"{int(run.metrics['cv_fine_tune_epochs'])} epoch(s) on every image, chosen by cross-validation"
    if "loss" not in phase and any(key.startswith("cv_") for key in phase):
        return "a linear probe fitted on every image, its strength chosen by cross-validation"
    epochs = len(phase.get("epoch") or next(iter(phase.values()), []))
    return f"{epochs} epoch{'' if epochs == 1 else 's'}"


def phases(run: RunFiles) -> list[tuple[str, str]]:
    """(label, text) pairs: each phase's epochs and learning rate, the validation mode, the optimizer."""
    train, mode = run.train, recorded_validation_mode(run)
    head, fine = run.planned("phase1"), run.planned("phase2")
    rate, ratio = head.get("learning_rate", train.get("learning_rate")), train.get("fine_tune_lr_ratio")
    fine_rate = fine.get("learning_rate", rate * ratio if rate is not None and ratio is not None else None)
    scratch = run.model.get("from_scratch") or run.model.get("weights", "") is None
    first, second = _ran(run, "phase1"), _ran(run, "phase2")
    closed_form = first is not None and first.startswith("a linear probe")  # no optimizer steps: no learning rate
    out = [("phase 1", f"{'every layer, from scratch' if scratch else 'the head on the frozen backbone'}: {first}"
                       + ("" if closed_form else f", learning rate {NOT_RECORDED if rate is None else f'{rate:g}'}")),
           ("phase 2", "did not run (no fine-tuning)" if second is None else f"fine-tuning {unfreeze_text(run)}: "
                       f"{second}, learning rate {NOT_RECORDED if fine_rate is None else f'{fine_rate:g}'}")]
    folds = run.metrics.get("cv_folds") or run.plan.get("folds", train.get("cv_folds"))
    patience, epochs, planned = head.get("patience", train.get("patience")), train.get("epochs"), head.get("epochs")
    per_epoch = f" ({head['steps_per_epoch']} per epoch)" if head.get("steps_per_epoch") else ""
    raised = "" if not (epochs and planned and planned > epochs) else (  # the step floor set the length: say so
        f"; the step floor of {train.get('min_steps')} optimizer steps{per_epoch} raised phase 1 from {epochs} to "
        f"{planned} epochs, and the patience with them from {train.get('patience')}")
    cv = (f"{int(folds) if folds else 'k'}-fold cross-validation on every labelled image, then trained on them all"
          if folds != 0 else "none: every labelled image trained, with no validation estimate")
    out.append(("validation", cv if mode == "cv" else
                f"{mode}: early stopping on the validation split's loss (patience {patience}{raised})"))
    out.append(("optimizer", f"{train.get('optimizer', NOT_RECORDED)}, loss {train.get('loss', NOT_RECORDED)}, "
                f"label smoothing {train.get('label_smoothing', 0)}, weight decay {train.get('weight_decay', 0)}"))
    d = run.plan.get("devices")  # since 0.3
    out.append(("devices", NOT_RECORDED if not d else f"{d['strategy']} ({d['replicas']} replica(s): "
                f"{', '.join(d['devices'])}), batch {d['batch_size']}, precision {d['precision']}, XLA "
                f"{'on' if d['xla'] else 'off'}, learning rates x{d['lr_scale']:g}"))
    model = run.model
    out.append(("recipe", f"class weights {train.get('class_weight', 'none')}, sampling "
                f"{train.get('sampling', 'shuffle')}, schedules {train.get('schedule', 'constant')} / "
                f"{train.get('fine_tune_schedule', 'constant')}, layer decay {train.get('layer_decay', 1.0):g}, "
                f"gradual unfreezing {'on' if train.get('gradual_unfreeze') else 'off'}, head L2 "
                f"{model.get('l2', 0.0):g}, max-norm {model.get('max_norm', 0.0):g}"))
    data = run.config.get("data") or {}
    out.append(("batches", f"batch size {data.get('batch_size', NOT_RECORDED)}, augmentation "
                f"{data.get('augment', NOT_RECORDED)}, seed {data.get('seed', NOT_RECORDED)}"))
    return out


def measured_on(run: RunFiles, prefix: str, images: int | None = None) -> str:
    """What a metric with this prefix ("test_", "val_", "cv_") was measured on, in words."""
    counts = split_counts(run)
    if prefix == "test_":
        images = images or counts.get("test")
        return "held-out test split" + (f" ({images} images)" if images else "")
    if prefix == "val_":
        images = images or counts.get("validation")
        return f"validation split ({f'{images} images; ' if images else ''}used for early stopping and choices, " \
               "so optimistic)"
    if prefix == "cv_":
        folds = run.metrics.get("cv_folds")
        images = sum(counts.get(s, 0) for s in ("train", "validation"))
        return (f"cross-validated estimate ({int(folds) if folds else 'k'} folds"
                + (f" over {images} labelled images)" if images else " over every labelled image)"))
    return "as recorded" if images is None else f"{prefix.rstrip('_')} split ({images} images)"


def metric_rows(run: RunFiles) -> list[tuple[str, str, str]]:
    """(metric, value, what it was measured on), test first, then cross-validation, then validation."""
    metrics, rows = run.metrics, []
    for prefix in ("test_", "cv_", "val_"):
        for key, label in METRIC_NAMES.items():
            if prefix + key not in metrics:
                continue
            value = number(metrics[prefix + key])
            if prefix == "cv_" and key == "accuracy" and "cv_accuracy_std" in metrics:
                value += f" ± {number(metrics['cv_accuracy_std'])} (std over folds)"
            rows.append((label, value, measured_on(run, prefix)))
    shown = {f"{p}{k}" for p in ("test_", "cv_", "val_") for k in METRIC_NAMES}
    shown |= {"cv_accuracy_std", "cv_folds", "cv_fine_tune_epochs"}
    rows += [(key, number(value), measured_on(run, key.split("_")[0] + "_")) for key, value in metrics.items()
             if key not in shown and isinstance(value, (int, float))]
    evaluation = run.evaluation
    if evaluation:
        split = str(evaluation.get("split", "?"))
        prefix = {"test": "test_", "validation": "val_"}.get(split, split + "_")
        where = measured_on(run, prefix, evaluation.get("count") or 0) + ", by evaluation.json"
        if prefix + "accuracy" not in metrics:  # each metric once: the run's own score is listed above
            rows.append(("accuracy", number(evaluation.get("accuracy")), where))
        if evaluation.get("top_k_accuracy") is not None:
            rows.append((f"top-{evaluation.get('top_k', 'k')} accuracy", number(evaluation["top_k_accuracy"]), where))
        if evaluation.get("ece") is not None:
            rows.append(("expected calibration error", number(evaluation["ece"]), where))
    return rows


def per_class_table(run: RunFiles) -> Table | None:
    """evaluation.json's precision, recall, F1 and support per class, then the averages; None if not evaluated."""
    evaluation = run.evaluation or {}
    if not evaluation.get("per_class"):
        return None
    rows = [[str(row.get("class")), *(number(row.get(k), 3) for k in ("precision", "recall", "f1")),
             str(row.get("support", ""))] for row in evaluation["per_class"]]
    for name, avg in ((name, evaluation[name]) for name in ("macro_avg", "weighted_avg") if evaluation.get(name)):
        rows.append([name.replace("_", " "), *(number(avg.get(k), 3) for k in ("precision", "recall", "f1")),
                     str(avg.get("support", ""))])
    return ["class", "precision", "recall", "F1", "support"], rows


def weak_classes_text(run: RunFiles) -> str:
    """The classes evaluation.json found weak, or why there are none to name."""
    if run.evaluation is None and recorded_validation_mode(run).startswith("cv"):
        return ("not evaluated: the run cross-validated on every labelled image, so none were held out; "
                "`kerastl evaluate --model FOLDER --data NEW_IMAGES` finds them")
    if run.evaluation is None:
        return "not evaluated (no evaluation.json)"
    weak = run.evaluation.get("weak_classes") or []
    where = f"on the {run.evaluation.get('split', '?')} split"
    return f"{', '.join(map(str, weak))} ({where})" if weak else f"none found {where}"


def limitations(run: RunFiles) -> list[str]:
    """What the model and its numbers cannot tell, in sentences."""
    counts, names, out = split_counts(run), run.class_names, []
    train_counts = ((run.data or {}).get("counts") or {}).get("train")
    out.append(f"Trained on {counts['train']} images" + (f" of {len(names)} classes (the smallest class has "
               f"{min(train_counts)})." if train_counts and names else ".") if "train" in counts else
               "The number of training images is not recorded.")
    if evaluation := run.evaluation:
        out.append(f"Evaluated on {evaluation.get('count', '?')} images of the {evaluation.get('split')} split.")
    elif "test" in counts:
        out.append(f"The test metrics are measured on {counts['test']} images.")
    if not any(key.startswith("test_") for key in run.metrics) and recorded_validation_mode(run) != "cv":
        out.append("There is no held-out test split: the validation numbers also chose the epochs, so they are "
                   "optimistic.")
    if names:
        out.append(f"It knows only its {len(names)} classes: every image gets one of them, however unlike them it is.")
    out.append("The model files (the SavedModel, model.keras) are programs: load them only from sources you trust.")
    return out


def usage_snippet(folder: str | Path, location: str | Path | None = None) -> str:
    """How to load and call the run folder's model: Python with TensorFlow alone, then the kerastl commands.
    The snippet names `location` (default: `folder`), where the folder will be read from."""
    run_exported = (Path(folder) / "saved_model.pb").is_file() or bool(
        (read_optional_json(Path(folder) / "metadata.json") or {}).get("export"))
    folder = Path(location or folder).resolve()
    shell = shlex.quote(str(folder))
    if not run_exported:  # a search trial's folder: weights only, rebuilt by kerastl
        return (f"import kerastl\n\nmodel = kerastl.load_model({str(folder)!r})  # weights only, no SavedModel\n"
                "probabilities = model.predict(images)  # images: float32 [batch, height, width, 3], 0-255\n")
    return (
        "import tensorflow as tf\n\n"
        f"folder = {str(folder)!r}\n"
        "model = tf.saved_model.load(folder)\n"
        'labels = open(folder + "/labels.txt").read().splitlines()\n\n'
        "# encoded files (JPEG, PNG, GIF or BMP): a tf.string batch\n"
        'data = tf.io.read_file("image.jpg")\n'
        'probs = model.signatures["serve_bytes"](image_bytes=tf.stack([data]))["probabilities"]\n\n'
        "# raw pixels: float32 [batch, height, width, 3], 0-255, any size (resized inside)\n"
        "pixels = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32)\n"
        'probs = model.signatures["serving_default"](images=pixels[None])["probabilities"]\n'
        "print(labels[int(tf.argmax(probs[0]))], float(tf.reduce_max(probs[0])))\n\n"
        "# the Keras model, in safe mode (import kerastl first, for its layers):\n"
        '# import keras, kerastl; model = keras.saving.load_model(folder + "/model.keras", safe_mode=True)\n\n'
        "# from a shell:\n"
        f"#   kerastl predict --model {shell} image.jpg\n"
        f"#   kerastl evaluate --model {shell} --data FOLDER_OF_CLASS_FOLDERS\n"
    )
