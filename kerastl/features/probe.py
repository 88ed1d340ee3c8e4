"""Linear probes on cached features: the head's convex start, its L2 strength, and its views.

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

`kerastl.features.blocks` probes every block with them to choose where the head
reads the backbone.
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
START_TOL = 1e-5  # L-BFGS tolerance of the probe the head starts from: converged
# ... and of the probes that only rank blocks: a third faster, their accuracies within 0.005 of START_TOL's
# (MobileNetV2's 18 readings on digits; scripts/bench_defaults.py measures what the choices cost)
RANK_TOL = 1e-4


@dataclass
class Standardizer:
    """Per-feature mean and scale (1 / standard deviation, floored for near-constant features).

    Given the `widths` of the blocks concatenated, each block's features are also weighed by
    sqrt(mean width / its width), so that every block carries the same share of the L2 prior
    (and the whole the same as unweighted): a wide early block no longer outvotes the backbone's
    narrower output. On MobileNetV3Small's 12 blocks (pretrained on digits) this raised the
    all-block probe from 0.552 to 0.628 at 3 images per class, and from 0.637 to 0.715 at 5.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, widths: tuple[int, ...] | None = None) -> Standardizer:
        rows = np.asarray(rows, np.float64)  # in float64, the row order does not show in the statistics
        std = rows.std(axis=0)
        floor = max(1e-6, 0.01 * float(np.median(std)))
        scale = 1.0 / np.maximum(std, floor)
        if widths is not None and len(widths) > 1:
            scale = scale * np.repeat(np.sqrt(np.mean(widths) / np.asarray(widths, np.float64)), widths)
        return cls(rows.mean(axis=0).astype(np.float32), scale.astype(np.float32))

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
              tol: float = START_TOL, widths: tuple[int, ...] | None = None) -> ProbeFit:
    """Multinomial (or binary) logistic regression with L2 strength `c`, on standardised rows (each
    block of `widths` weighed, see `Standardizer`); `class_weight` weighs each class's rows (see
    `kerastl.data.pipelines.class_weights`)."""
    return next(probe_path(x, y, [c], num_classes, binary, standardizer, class_weight, tol, widths))


def probe_path(x: np.ndarray, y: np.ndarray, cs, num_classes: int, binary: bool = False,
               standardizer: Standardizer | None = None, class_weight: np.ndarray | None = None,
               tol: float = START_TOL, widths: tuple[int, ...] | None = None):
    """Yields the probe for each C of `cs` in turn, each warm-started from the one before."""
    standardizer = standardizer or Standardizer.fit(x, widths)
    rows = standardizer(x)
    weights = None if class_weight is None else {int(c): float(class_weight[c]) for c in np.unique(y)}
    model = LogisticRegression(max_iter=1000, tol=tol, warm_start=True, class_weight=weights)
    for c in cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=c).fit(rows, y)
        kernel, bias = _dense_weights(model, num_classes, binary)
        yield ProbeFit(standardizer, c, kernel, bias)


def probe_scores(fit: ProbeFit, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, cross-entropy) of a probe on rows, as `kerastl.runs.scoring.score` computes them."""
    p = as_probabilities(fit.probabilities(x))
    return float(np.mean(p.argmax(axis=1) == y)), cross_entropy(p, y)


def folds_of(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, validation) image indices; k is at most the smallest class's count."""
    present = np.bincount(labels)
    k = min(folds, int(present[present > 0].min()))  # a class with no image is absent, not a class of 0
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def choose_c_holdout(train: np.ndarray, train_labels: np.ndarray, validation: np.ndarray,
                     validation_labels: np.ndarray, num_classes: int, binary: bool = False,
                     seed: int = 0, class_weight: np.ndarray | None = None,
                     widths: tuple[int, ...] | None = None) -> ProbeFit:
    """The probe whose C gives the lowest validation loss; `train` is [views, n, dim], `validation` [n, dim]."""
    x, y = rows_of(train, train_labels, seed=seed)
    best = None
    for fit in probe_path(x, y, C_GRID, num_classes, binary, class_weight=class_weight, widths=widths):
        accuracy, loss = probe_scores(fit, validation, validation_labels)
        if best is None or loss < best.estimate["val_loss"]:
            fit.estimate = {"val_loss": loss, "val_accuracy": accuracy}
            best = fit
    log.info("probe: C=%g, validation loss %.4f, accuracy %.4f", best.c, best.estimate["val_loss"],
             best.estimate["val_accuracy"])
    return best


def choose_c_cv(views: np.ndarray, plain: np.ndarray, labels: np.ndarray, folds: list, num_classes: int,
                binary: bool = False, seed: int = 0, class_weight: np.ndarray | None = None,
                widths: tuple[int, ...] | None = None) -> ProbeFit:
    """C by k-fold cross-validation, then the probe refitted on every image.

    Args:
        views: training features [views, n, dim] (augmented views and the plain one).
        plain: un-augmented features [n, dim], which each fold is scored on.
        folds: from `folds_of`; none (too few images per class) fits C=1 without an estimate.
        class_weight: each class's weight in the fits (None: all 1).
        widths: the widths of the blocks the features concatenate (see `Standardizer`).
    """
    best_c, best = 1.0, None
    per_fold = [[probe_scores(fit, plain[held], labels[held])
                 for fit in probe_path(*rows_of(views, labels, train, seed), C_GRID, num_classes, binary,
                                       class_weight=class_weight, widths=widths)]
                for train, held in folds]  # [fold][c] -> (accuracy, loss)
    for index, c in enumerate(C_GRID if folds else ()):
        accuracy, loss = np.array([fold[index] for fold in per_fold]).T
        if best is None or loss.mean() < best["cv_loss"]:
            best_c = c
            best = {"cv_loss": float(loss.mean()), "cv_accuracy": float(accuracy.mean()),
                    "cv_accuracy_std": float(accuracy.std()), "cv_folds": float(len(folds))}
    x, y = rows_of(views, labels, seed=seed)
    fit = fit_probe(x, y, best_c, num_classes, binary, class_weight=class_weight, widths=widths)
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
