"""The evaluation of predicted class probabilities: the numbers `kerastl report` shows and stores.

numpy and scikit-learn only (no TensorFlow), so a report of a finished run is fast.

`evaluate_predictions(probabilities, labels, class_names)` -> `Evaluation`, where:

- `probabilities` are softmax outputs [n, K], or one sigmoid unit [n, 1] = P(class 1),
  read as the two classes [1 - p, p]; `labels` are indices into `class_names` (the
  model's classes, in output order). The predicted class is the most probable one.
- `accuracy`: the share of predictions that equal the label; `top_k_accuracy`: the share
  whose label is among the `top_k` most probable classes (`top_k` at most K).
- `loss`: plain cross-entropy (natural log, no label smoothing), with probabilities
  clipped to [1e-7, 1] and renormalised, as `kerastl.runs.scoring.score` computes it.
- `per_class`: precision, recall, F1 and support of every class present in the labels
  (support > 0), in model order, equal to scikit-learn's `classification_report` with
  `labels=present`; `macro_avg` and `weighted_avg` average those classes.
  `confusion_matrix` counts (true row, predicted column) over all K model classes.
- `ece`: expected calibration error. The confidence of a prediction is its largest
  probability; predictions fall into `bins` equal-width bins of confidence on [0, 1]
  (bin b holds edges[b] <= confidence < edges[b + 1]; the last also holds 1.0), and
  ECE = sum over bins of |B| / n * |accuracy(B) - mean confidence(B)|.
  `reliability` keeps the bins' edges, counts, mean confidence and accuracy (None when empty).
- `most_wrong`: the wrong predictions with the highest confidence, most confident first.
- `weak_classes`: the present classes whose F1 is more than `WEAK_MARGIN` (0.1) below the
  macro F1, worst F1 first, at most `MAX_WEAK` (5).

`data_warnings(counts, class_names)` turns images per class per split into plain-English
warnings about too few training images and imbalanced classes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kerastl.choices import IMBALANCE_RATIO
from kerastl.errors import KerastlError
from kerastl.storage import replace_file

log = logging.getLogger(__name__)

CLIP = 1e-7  # probabilities are clipped to [CLIP, 1] for the loss
WEAK_MARGIN = 0.1  # a class is weak when its F1 is more than this below the macro F1
MAX_WEAK = 5
MAX_WRONG_LINES = 8  # of the most confidently wrong predictions, in `format`
NAME_WIDTH = 24  # class names longer than this are shortened in `Evaluation.format`
MATRIX_MAX_CLASSES = 20  # more classes than this: `format` lists the top confusions, not the matrix
SMALL_CLASS = 10  # `data_warnings`: fewer training images than this in a class is a warning
IMBALANCE = IMBALANCE_RATIO  # `data_warnings`: largest / smallest training count above this is a warning


@dataclass
class Evaluation:
    """The scores of one set of predictions (see the module docstring for what each means)."""

    split: str
    count: int
    class_names: list[str]
    accuracy: float
    loss: float
    top_k: int
    top_k_accuracy: float
    per_class: list[dict]
    macro_avg: dict
    weighted_avg: dict
    confusion_matrix: list[list[int]]
    ece: float
    reliability: dict
    most_wrong: list[dict]
    weak_classes: list[str]

    def to_dict(self) -> dict:
        """Every field as plain JSON values (str, int, float, None, lists and dicts)."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Writes `to_dict()` as indented JSON, whole or not at all (the one writer of `evaluation.json`)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        replace_file(path, lambda temporary: temporary.write_text(text), suffix=".json")
        return Path(path)

    @classmethod
    def from_dict(cls, values: dict) -> Evaluation:
        """The inverse of `to_dict`; unknown or missing keys are a `KerastlError`."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        missing = [name for name in known if name not in values]
        if unknown or missing:
            raise KerastlError(f"an evaluation needs exactly the keys {known}; unknown: {unknown}, missing: {missing}")
        return cls(**values)

    def format(self) -> str:
        """A text report for a terminal: scores, per-class table, confusion matrix, reliability, weak classes."""
        lines = [f"{self.split}: {self.count} images, accuracy {self.accuracy:.4f}, "
                 f"top-{self.top_k} accuracy {self.top_k_accuracy:.4f}, loss {self.loss:.4f}, ECE {self.ece:.4f}", ""]
        lines += _class_table(self)
        lines += [""] + _matrix_lines(self.confusion_matrix, self.class_names)
        lines += ["", "reliability (confidence bins with predictions):",
                  f"  {'bin':<11} {'count':>6} {'confidence':>10} {'accuracy':>8}"]
        r = self.reliability
        for b, count in enumerate(r["count"]):
            if count:
                lines.append(f"  {r['edges'][b]:.2f}-{r['edges'][b + 1]:.2f}  {count:>6} "
                             f"{r['confidence'][b]:>10.4f} {r['accuracy'][b]:>8.4f}")
        weak = ", ".join(self.weak_classes) if self.weak_classes else "none"
        lines += ["", f"weak classes (F1 more than {WEAK_MARGIN} below the macro F1): {weak}"]
        if self.most_wrong:
            lines += ["", "most confidently wrong (image, true, predicted, confidence):"]
            lines += [f"  {row.get('path', '#' + str(row['index']))}  {row['true']} -> {row['predicted']} "
                      f"{row['confidence']:.3f}" for row in self.most_wrong[:MAX_WRONG_LINES]]
        return "\n".join(lines)


def _short(name: str, width: int = NAME_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _class_table(evaluation: Evaluation) -> list[str]:
    width = max([len(_short(row["class"])) for row in evaluation.per_class] + [len("weighted avg")])
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    rows = [(_short(row["class"]), row) for row in evaluation.per_class]
    rows += [("macro avg", evaluation.macro_avg), ("weighted avg", evaluation.weighted_avg)]
    for number, (name, row) in enumerate(rows):
        if number == len(evaluation.per_class):
            lines.append("")
        lines.append(f"{name:<{width}} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} "
                     f"{row['support']:>8d}")
    return lines


def _matrix_lines(matrix: list[list[int]], class_names: list[str]) -> list[str]:
    """The matrix with numbered columns and `number name` rows; with many classes, the top confusions."""
    k = len(class_names)
    counts = np.asarray(matrix, dtype=np.int64).reshape(k, k)
    if k > MATRIX_MAX_CLASSES:
        off = counts.copy()
        np.fill_diagonal(off, 0)
        pairs = [divmod(int(i), k) for i in np.argsort(-off, axis=None, kind="stable")[:10] if off.flat[i] > 0]
        lines = [f"confusion matrix: {k} x {k}, too wide to print; the most frequent confusions (true -> predicted):"]
        lines += [f"  {off[t, p]:>5}  {_short(class_names[t])} -> {_short(class_names[p])}" for t, p in pairs]
        return lines if pairs else lines + ["  none"]
    names = [f"{i:>2} {_short(name, 16)}" for i, name in enumerate(class_names)]
    label = max(len(name) for name in names)
    cell = max(len(str(counts.max())), len(str(k - 1))) + 1
    header = " " * label + " " + "".join(f"{i:>{cell}}" for i in range(k))
    lines = ["confusion matrix (rows: true class, columns: predicted class number):", header]
    lines += [f"{name:<{label}} " + "".join(f"{c:>{cell}}" for c in row) for name, row in zip(names, counts)]
    return lines


def as_probabilities(probabilities, k: int | None = None) -> np.ndarray:
    """Float64 [n, K] probabilities; one sigmoid unit [n, 1] becomes the two classes [1 - p, p]."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise KerastlError(f"probabilities must be [n, classes] or [n, 1], got shape {p.shape}")
    if p.shape[1] == 1:  # one sigmoid unit: P(class 1)
        p = np.concatenate([1.0 - p, p], axis=1)
    if k is not None and p.shape[1] != k:
        raise KerastlError(f"probabilities have {p.shape[1]} columns but there are {k} class names")
    return p


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy (natural log) of [n, K] probabilities, clipped to [1e-7, 1] and renormalised."""
    clipped = np.clip(probabilities, CLIP, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(clipped[np.arange(len(labels)), labels])))


def _reliability(confidence: np.ndarray, correct: np.ndarray, bins: int) -> tuple[float, dict]:
    edges = [b / bins for b in range(bins + 1)]
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    table = {"edges": edges, "count": [], "confidence": [], "accuracy": []}
    ece = 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        table["count"].append(count)
        if count == 0:
            table["confidence"].append(None)
            table["accuracy"].append(None)
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        table["confidence"].append(conf)
        table["accuracy"].append(acc)
        ece += count / len(confidence) * abs(acc - conf)
    return float(ece), table


def _average(labels, predicted, present, average: str) -> dict:
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, labels=present, average=average,
                                                               zero_division=0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(len(labels))}


def evaluate_predictions(probabilities, labels, class_names: list[str], split: str = "validation", top_k: int = 3,
                         bins: int = 10, wrong: int = 16, paths: Sequence[str] | None = None) -> Evaluation:
    """The `Evaluation` of predicted probabilities against integer labels.

    Args:
        probabilities: [n, K] softmax outputs, or [n, 1] one sigmoid unit (P(class 1), two classes).
        labels: [n] indices into `class_names`.
        class_names: the model's classes, in output order.
        split: what the predictions were measured on ("test", "validation", ...).
        top_k: for `top_k_accuracy` (at most K).
        bins: equal-width confidence bins for the ECE and the reliability table.
        wrong: how many of the most confidently wrong predictions to keep.
        paths: each image's file, when the images came from files: `most_wrong` names them.

    Example:
    ```python
    evaluation = evaluate_predictions(model.predict(images), labels, ["cat", "dog"], split="test")
    print(evaluation.format())
    ```
    """
    class_names = [str(name) for name in class_names]
    k = len(class_names)
    p = as_probabilities(probabilities, k)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    n = len(labels)
    if n == 0:
        raise KerastlError(f"there is nothing to evaluate on the {split} split: it has no labelled images")
    if len(p) != n:
        raise KerastlError(f"there are {len(p)} rows of probabilities but {n} labels")
    if labels.min() < 0 or labels.max() >= k:
        raise KerastlError(f"labels must be class indices 0..{k - 1}, got {labels.min()}..{labels.max()}")
    rows = np.arange(n)
    predicted = p.argmax(axis=1)
    confidence = p[rows, predicted]
    correct = predicted == labels
    loss = cross_entropy(p, labels)
    top_k = max(1, min(int(top_k), k))
    ranked = np.argsort(p, axis=1, kind="mergesort")[:, ::-1][:, :top_k]
    top_k_accuracy = float(np.mean((ranked == labels[:, None]).any(axis=1)))
    present = [int(c) for c in np.unique(labels)]
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=present,
                                                                     zero_division=0)
    per_class = [{"class": class_names[c], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(present)]
    macro = _average(labels, predicted, present, "macro")
    ece, reliability = _reliability(confidence, correct, bins)
    wrong_rows = np.flatnonzero(~correct)
    wrong_rows = wrong_rows[np.argsort(-confidence[wrong_rows], kind="stable")][: max(0, wrong)]
    most_wrong = [{"index": int(i), **({"path": str(paths[i])} if paths is not None else {}),
                   "true": class_names[labels[i]], "predicted": class_names[predicted[i]],
                   "confidence": float(confidence[i])} for i in wrong_rows]
    weak = sorted((row for row in per_class if row["f1"] < macro["f1"] - WEAK_MARGIN), key=lambda row: row["f1"])
    evaluation = Evaluation(
        split=split, count=n, class_names=class_names, accuracy=float(correct.mean()), loss=loss, top_k=top_k,
        top_k_accuracy=top_k_accuracy, per_class=per_class, macro_avg=macro,
        weighted_avg=_average(labels, predicted, present, "weighted"),
        confusion_matrix=confusion_matrix(labels, predicted, labels=list(range(k))).astype(int).tolist(),
        ece=ece, reliability=reliability, most_wrong=most_wrong, weak_classes=[row["class"] for row in weak][:MAX_WEAK])
    log.debug("%s: accuracy %.4f, loss %.4f, ECE %.4f on %d images", split, evaluation.accuracy, loss, ece, n)
    return evaluation


def data_warnings(counts: dict[str, list[int]], class_names: list[str], small: int = SMALL_CLASS,
                  imbalance: float = IMBALANCE) -> list[str]:
    """Plain-English warnings about the images per class, one per problem; empty when there is none.

    Only the "train" split is judged: a class with fewer than `small` training images is one
    warning each, and a largest / smallest training count above `imbalance` is one warning
    naming both classes and the ratio.

    Args:
        counts: split name ("train", "validation", "test") -> images per class, in `class_names` order.
        class_names: the classes, in the order of the counts.
        small: a class with fewer training images than this is too small.
        imbalance: the largest / smallest training-count ratio above which classes are imbalanced.
    """
    train = counts.get("train")
    if not train:
        return []
    if len(train) != len(class_names):
        raise KerastlError(f"there are {len(train)} training counts but {len(class_names)} class names")
    warnings = []
    for name, count in zip(class_names, train):
        if count < small:
            noun = "image" if count == 1 else "images"
            warnings.append(f"class '{name}' has {count} training {noun} (fewer than {small}): "
                            "its scores will be unreliable; add images if you can")
    if len(train) > 1:
        largest, smallest = int(np.argmax(train)), int(np.argmin(train))
        most, fewest = train[largest], train[smallest]
        if fewest == 0 and most > 0:
            warnings.append(f"classes are imbalanced: '{class_names[largest]}' has {most} training images "
                            f"and '{class_names[smallest]}' has none")
        elif fewest > 0 and most / fewest > imbalance:
            warnings.append(f"classes are imbalanced {most / fewest:.1f}:1 (more than {imbalance:g}:1): "
                            f"'{class_names[largest]}' has {most} training images and "
                            f"'{class_names[smallest]}' has {fewest}")
    return warnings
