"""Linear probes on cached features: the head's convex start, and where to read the backbone.

A linear head on frozen features is a convex problem: multinomial logistic
regression. scikit-learn's L-BFGS solves it to convergence in milliseconds on the
sizes where a handful of gradient epochs stop far short (Kumar et al. 2022's LP
of LP-FT). Phase 1 starts from that solution:

- the features are standardised with statistics of the training features, and the
  classifier's `FeatureNormalization` layer carries them into the export;
- the L2 strength C is chosen on the validation split ("holdout") or by k-fold
  cross-validation over the labelled images ("cv"), whose folds never split the
  augmented views of one image;
- the head's Dense layer takes the fitted weights, so the Keras model computes
  exactly the probe.

`probe_blocks` scores every block, and their concatenation, with the same
cross-validated probe (Head2Toe's reading of several depths, Evci et al. 2022,
without its feature selection); `choose_blocks` keeps the backbone's output
unless another candidate is clearly better, and `unfreeze_depth` reads the
fine-tuning depth off the same curve.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from kerastl.reports.evaluation import as_probabilities, cross_entropy

log = logging.getLogger(__name__)

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
PROBE_C = 0.3  # the fixed L2 strength of the probes that compare blocks
MAX_ROWS = 20000  # rows (images x views) a probe fits on; more are subsampled
MAX_PROBE_IMAGES = 1000  # images the block probes cross-validate on
DEFAULT_DEPTH = 2  # fine-tuning depth when the head reads the output, or when no probe curve chose
SWITCH_MARGIN = 0.01  # another reading must beat the backbone's output by this accuracy
START_TOL = 1e-5  # L-BFGS tolerance of the probe the head starts from: converged
# ... and of the probes that only rank blocks: a third faster, their accuracies within 0.005 of START_TOL's
# (MobileNetV2's 18 readings on digits; scripts/bench_defaults.py measures what the choices cost)
RANK_TOL = 1e-4


@dataclass
class Standardizer:
    """Per-feature mean and scale (1 / standard deviation, floored for near-constant features)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> Standardizer:
        rows = np.asarray(rows, np.float64)  # in float64, the row order does not show in the statistics
        std = rows.std(axis=0)
        floor = max(1e-6, 0.01 * float(np.median(std)))
        return cls(rows.mean(axis=0).astype(np.float32), (1.0 / np.maximum(std, floor)).astype(np.float32))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return (rows - self.mean) * self.scale


@dataclass
class ProbeFit:
    """A fitted linear head: standardisation, L2 strength, Dense weights, and its estimate.

    `kernel` is [dim, units] and `bias` [units] for a softmax of `num_classes` units,
    or one sigmoid unit when `binary`. `estimate` holds "val_*" scores (holdout) or
    "cv_*" scores (cross-validation) of the chosen C.
    """

    standardizer: Standardizer
    c: float
    kernel: np.ndarray
    bias: np.ndarray
    estimate: dict[str, float] = field(default_factory=dict)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = self.standardizer(features) @ self.kernel + self.bias
        if logits.shape[1] == 1:
            return 1.0 / (1.0 + np.exp(-logits))
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def rows_of(views: np.ndarray, labels: np.ndarray, images: np.ndarray | None = None,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every view of the chosen images as rows ([views, n, dim] -> [rows, dim]), at most MAX_ROWS."""
    images = np.arange(len(labels)) if images is None else images
    x = np.asarray(views[:, images]).reshape(-1, views.shape[-1])
    y = np.tile(labels[images], views.shape[0])
    if len(y) > MAX_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(y), MAX_ROWS, replace=False))
        x, y = x[keep], y[keep]
    return x.astype(np.float32), y


def _dense_weights(model: LogisticRegression, num_classes: int, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients as a Dense kernel and bias, for every class (absent ones never win)."""
    coef, intercept = model.coef_, model.intercept_
    if binary:
        return coef.T.astype(np.float32), intercept.astype(np.float32)
    if len(model.classes_) == 2:  # scikit-learn fits one logit; a softmax has two
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = np.zeros((coef.shape[1], num_classes), np.float32)
    bias = np.full((num_classes,), -30.0, np.float32)
    kernel[:, model.classes_] = coef.T
    bias[model.classes_] = intercept
    return kernel, bias


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, num_classes: int, binary: bool = False,
              standardizer: Standardizer | None = None, class_weight: np.ndarray | None = None,
              tol: float = START_TOL) -> ProbeFit:
    """Multinomial (or binary) logistic regression with L2 strength `c`, on standardised rows;
    `class_weight` weighs each class's rows (see `kerastl.data.pipelines.class_weights`)."""
    return next(probe_path(x, y, [c], num_classes, binary, standardizer, class_weight, tol))


def probe_path(x: np.ndarray, y: np.ndarray, cs, num_classes: int, binary: bool = False,
               standardizer: Standardizer | None = None, class_weight: np.ndarray | None = None,
               tol: float = START_TOL):
    """Yields the probe for each C of `cs` in turn, each warm-started from the one before."""
    standardizer = standardizer or Standardizer.fit(x)
    rows = standardizer(x)
    weights = None if class_weight is None else {int(c): float(class_weight[c]) for c in np.unique(y)}
    model = LogisticRegression(max_iter=1000, tol=tol, warm_start=True, class_weight=weights)
    for c in cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=c).fit(rows, y)
        kernel, bias = _dense_weights(model, num_classes, binary)
        yield ProbeFit(standardizer, c, kernel, bias)


def _scores(fit: ProbeFit, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, cross-entropy) of a probe on rows, as `kerastl.runs.scoring.score` computes them."""
    p = as_probabilities(fit.probabilities(x))
    return float(np.mean(p.argmax(axis=1) == y)), cross_entropy(p, y)


def folds_of(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, validation) image indices; k is at most the smallest class's count."""
    k = min(folds, int(np.bincount(labels).min()))
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def choose_c_holdout(train: np.ndarray, train_labels: np.ndarray, validation: np.ndarray,
                     validation_labels: np.ndarray, num_classes: int, binary: bool = False,
                     seed: int = 0, class_weight: np.ndarray | None = None) -> ProbeFit:
    """The probe whose C gives the lowest validation loss; `train` is [views, n, dim], `validation` [n, dim]."""
    x, y = rows_of(train, train_labels, seed=seed)
    best = None
    for fit in probe_path(x, y, C_GRID, num_classes, binary, class_weight=class_weight):
        accuracy, loss = _scores(fit, validation, validation_labels)
        if best is None or loss < best.estimate["val_loss"]:
            fit.estimate = {"val_loss": loss, "val_accuracy": accuracy}
            best = fit
    log.info("probe: C=%g, validation loss %.4f, accuracy %.4f", best.c, best.estimate["val_loss"],
             best.estimate["val_accuracy"])
    return best


def choose_c_cv(views: np.ndarray, plain: np.ndarray, labels: np.ndarray, folds: list, num_classes: int,
                binary: bool = False, seed: int = 0, class_weight: np.ndarray | None = None) -> ProbeFit:
    """C by k-fold cross-validation, then the probe refitted on every image.

    Args:
        views: training features [views, n, dim] (augmented views and the plain one).
        plain: un-augmented features [n, dim], which each fold is scored on.
        folds: from `folds_of`; none (too few images per class) fits C=1 without an estimate.
        class_weight: each class's weight in the fits (None: all 1).
    """
    best_c, best = 1.0, None
    per_fold = [[_scores(fit, plain[held], labels[held])
                 for fit in probe_path(*rows_of(views, labels, train, seed), C_GRID, num_classes, binary,
                                       class_weight=class_weight)]
                for train, held in folds]  # [fold][c] -> (accuracy, loss)
    for index, c in enumerate(C_GRID if folds else ()):
        accuracy, loss = np.array([fold[index] for fold in per_fold]).T
        if best is None or loss.mean() < best["cv_loss"]:
            best_c = c
            best = {"cv_loss": float(loss.mean()), "cv_accuracy": float(accuracy.mean()),
                    "cv_accuracy_std": float(accuracy.std()), "cv_folds": float(len(folds))}
    x, y = rows_of(views, labels, seed=seed)
    fit = fit_probe(x, y, best_c, num_classes, binary, class_weight=class_weight)
    fit.estimate = best or {}
    if best:
        log.info("probe: C=%g by %d-fold cross-validation, accuracy %.4f +- %.4f", best_c, len(folds),
                 best["cv_accuracy"], best["cv_accuracy_std"])
    return fit


def views_or_plain(fit: Callable[[np.ndarray], ProbeFit], views: np.ndarray) -> tuple[ProbeFit, int]:
    """The probe `fit` gives on every cached view ([views, n, dim], view 0 plain), or on the plain view
    alone when that scores a validation (or cross-validated) loss at least as low. Returns the probe and
    the views training should read (all, or 1).

    Augmented views help a head when the augmentation keeps the features near the plain images'. When
    it moves them away (interpolation smoothing textures a backbone reads, for instance), a head trained
    on them is scored on plain images it has not learned: on noisy digits at 96 px with a randomly
    initialised MobileNetV2, block 2's probe fell from 0.56 (plain) to 0.19 (augmented views only) and
    0.515 (both). Nothing is compared without an estimate (too few images to fold): all views are kept.
    """
    every = fit(views)
    if len(views) == 1 or not every.estimate:
        return every, len(views)
    plain = fit(views[:1])
    name = "val_loss" if "val_loss" in every.estimate else "cv_loss"
    keep = plain.estimate[name] > every.estimate[name]
    log.info("probe: %d views (augmented) %s %.4f, the plain view alone %.4f: training reads %s", len(views),
             name.replace("_", " "), every.estimate[name], plain.estimate[name],
             "every view" if keep else "the plain view")
    return (every, len(views)) if keep else (plain, 1)


@dataclass
class BlockCurve:
    """Cross-validated probe accuracy of each block and of all blocks concatenated, and the choice."""

    names: list[str]
    accuracy: list[float]
    loss: list[float]
    all_accuracy: float
    all_loss: float
    chosen: list[int]
    unfreeze_blocks: int
    folds: int
    images: int

    def to_dict(self) -> dict:
        blocks = [{"block": b, "layer": n, "accuracy": a, "loss": lo}
                  for b, (n, a, lo) in enumerate(zip(self.names, self.accuracy, self.loss), start=1)]
        return {"blocks": blocks, "all": {"accuracy": self.all_accuracy, "loss": self.all_loss},
                "chosen": self.chosen, "unfreeze_blocks": self.unfreeze_blocks, "folds": self.folds,
                "images": self.images}

    def summary(self) -> str:
        """One line for people: what the head reads and why."""
        last = len(self.names)
        if not self.folds:
            return f"features: the backbone's output (too few images per class to compare blocks by " \
                   f"cross-validation); fine-tuning depth {self.unfreeze_blocks} blocks"
        read = ("the backbone's output" if self.chosen == [last] else "all blocks"
                if len(self.chosen) == last else "block " + ",".join(map(str, self.chosen)))
        best = int(np.argmax(self.accuracy)) + 1
        return (f"features: {read} (probe accuracy: output {self.accuracy[-1]:.3f}, best block {best} "
                f"{self.accuracy[best - 1]:.3f}, all {self.all_accuracy:.3f}; {self.folds}-fold on "
                f"{self.images} images); fine-tuning depth {self.unfreeze_blocks} blocks")


def probe_blocks(features: np.ndarray, labels: np.ndarray, widths: list[int], names: list[str],
                 folds: int = 5, seed: int = 0) -> BlockCurve:
    """Cross-validated probes (fixed C) of each block's features and of their concatenation.

    Args:
        features: [n, sum(widths)] pooled features of every block, in block order.
        widths: each block's width.
        names: each block's last layer.
    """
    if len(labels) > 300:  # three folds are enough to rank blocks when there are images to spare
        folds = min(folds, 3)
    if len(labels) > MAX_PROBE_IMAGES:  # a per-class share of every class
        keep = np.concatenate([
            np.random.default_rng(seed).permutation(np.flatnonzero(labels == c))[
                : max(1, round(MAX_PROBE_IMAGES * np.mean(labels == c)))] for c in np.unique(labels)])
        features, labels = features[np.sort(keep)], labels[np.sort(keep)]
    num_classes = int(labels.max()) + 1
    splits = folds_of(labels, folds, seed)
    last = len(widths)
    if not splits:  # nothing to cross-validate: read the output, at the default depth
        return BlockCurve(names, [float("nan")] * last, [float("nan")] * last, float("nan"), float("nan"),
                          [last], DEFAULT_DEPTH, 0, len(labels))
    edges = np.cumsum([0, *widths])
    columns = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])] + [slice(0, edges[-1])]
    scores = []
    for cols in columns:
        per_fold = []
        for train, held in splits:
            x = features[train, cols]
            fit = fit_probe(x, labels[train], PROBE_C, num_classes, tol=RANK_TOL)
            per_fold.append(_scores(fit, features[held, cols], labels[held]))
        scores.append(np.mean(per_fold, axis=0))
    accuracy, loss = [float(s[0]) for s in scores], [float(s[1]) for s in scores]
    chosen = choose_blocks(accuracy[:-1], loss[:-1], accuracy[-1], loss[-1])
    return BlockCurve(names, accuracy[:-1], loss[:-1], accuracy[-1], loss[-1], chosen,
                      unfreeze_depth(accuracy[:-1], chosen), len(splits), len(labels))


def block_columns(widths: list[int], blocks: list[int]) -> np.ndarray:
    """The columns of `blocks` (numbers from 1) in features that concatenate blocks of `widths`."""
    edges = np.cumsum([0, *widths])
    return np.concatenate([np.arange(edges[b - 1], edges[b]) for b in sorted(blocks)])


def choose_blocks(accuracy: list[float], loss: list[float], all_accuracy: float, all_loss: float) -> list[int]:
    """The backbone's output (the last block) unless a single block or all of them probe
    better by more than SWITCH_MARGIN accuracy; ties go to the lower loss."""
    last = len(accuracy)
    candidates = [([b], a, lo) for b, (a, lo) in enumerate(zip(accuracy, loss), start=1)]
    candidates.append((list(range(1, last + 1)), all_accuracy, all_loss))
    blocks, best_accuracy, _ = max(candidates, key=lambda c: (c[1], -c[2]))
    return blocks if best_accuracy > accuracy[-1] + SWITCH_MARGIN else [last]


def unfreeze_depth(accuracy: list[float], chosen: list[int]) -> int:
    """Fine-tuning depth from the probe curve, counted back from the deepest block read.

    Reading the output (no other reading was clearly better): 2. Otherwise the
    best-reading block up to the deepest one read, at least 2: the blocks between them
    are the most specific to the pretraining task.
    """
    last = len(accuracy)
    if chosen == [last]:
        return DEFAULT_DEPTH
    deepest = max(chosen)
    best = int(np.argmax(accuracy[:deepest])) + 1  # ties: the earlier block
    return max(DEFAULT_DEPTH, deepest - best + 1)
