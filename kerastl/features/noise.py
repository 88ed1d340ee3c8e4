"""Choices that know their own noise: repeated folds, paired standard errors, a robust default.

A choice made by cross-validation on 15 to 50 images is noisy: on three folds of
15 images one block out of twelve beats the others by chance more often than not.
Every automatic choice of a run (the blocks the head reads, the fine-tuning depth,
whether phase 2 runs and for how long) therefore follows one rule:

- every candidate is scored on the same splits (`repeated_folds`): repeated
  stratified k-fold, or leave-one-out where k-fold would leave fewer than 2 images
  of some class in training;
- the best candidate is the one with the highest mean accuracy, ties broken by the
  lower cross-validated loss (never by position), or, where the choice is made by
  loss, the one with the lowest mean log loss;
- it replaces the choice's robust candidate only when it beats it by more than
  z standard errors of their paired difference. The standard error is Nadeau and
  Bengio's (2003) corrected one, since the training sets of the splits overlap:
  var(d) * (1 / J + n_held / n_train) over J splits, not var(d) / J. And since the
  best of m candidates is the one most flattered by chance, z is Bonferroni's for
  m - 1 one-sided comparisons at `ALPHA` (1.28 for one alternative, 2.13 for 6,
  2.39 for 12): when no candidate is better, the robust one is replaced in at most
  about `ALPHA` of the decisions (a choice made in two steps, as the blocks are, in at
  most about twice that).

`Estimate` holds a candidate's per-split scores, `decide` applies the rule and
says in words which part of it decided.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from sklearn.model_selection import RepeatedStratifiedKFold

ALPHA = 0.1  # how often a choice may leave the robust candidate when none is better
MAX_REPEATS = 5  # repeats of k-fold at most ...
TARGET_PREDICTIONS = 150  # ... and at least enough for this many held-out predictions per candidate
MAX_LEAVE_ONE_OUT = 100  # images leave-one-out splits at most (one fit per image and candidate)


@dataclass(frozen=True)
class Splits:
    """(train, held-out) image indices of every split, and how they were drawn."""

    splits: list[tuple[np.ndarray, np.ndarray]]
    kind: str  # "k-fold", "repeated k-fold" or "leave-one-out" ("" when there are none)
    k: int = 0
    repeats: int = 0

    def __len__(self) -> int:
        return len(self.splits)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(self.splits)

    @property
    def held_fraction(self) -> float:
        return held_fraction(self.splits)

    def describe(self, images: int) -> str:
        """The splits in words, as the summary line and `probe.json` show them."""
        if not self.splits:
            return f"no splits ({images} images)"
        if self.kind == "leave-one-out":
            return f"leave-one-out on {images} images"
        times = f"{self.repeats}x " if self.repeats > 1 else ""
        return f"{times}{self.k}-fold on {images} images"


def held_fraction(splits: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """n_held / n_train of (train, held-out) splits, on average: Nadeau and Bengio's correction."""
    return float(np.mean([len(held) / max(len(train), 1) for train, held in splits]))


def repeated_folds(labels: np.ndarray, folds: int = 5, seed: int = 0, repeats: int | None = None) -> Splits:
    """The splits every candidate of a choice is scored on.

    k is `folds`, or the smallest class's count when lower. When k-fold would leave fewer than 2 images
    of the smallest class in training, leave-one-out instead (it leaves every other class whole), up to
    `MAX_LEAVE_ONE_OUT` images; above that, repeated 2-fold. With a single image in some class, none.
    `repeats` (default: enough for `TARGET_PREDICTIONS` held-out predictions, at most `MAX_REPEATS`).
    """
    labels = np.asarray(labels)
    present = np.bincount(labels)
    smallest = int(present[present > 0].min()) if len(labels) else 0
    if smallest < 2:
        return Splits([], "")
    k = min(folds, smallest)
    if smallest - math.ceil(smallest / k) < 2 and len(labels) <= MAX_LEAVE_ONE_OUT:
        every = np.arange(len(labels))
        return Splits([(np.delete(every, i), np.array([i])) for i in every], "leave-one-out", len(labels), 1)
    if repeats is None:
        repeats = min(MAX_REPEATS, max(1, math.ceil(TARGET_PREDICTIONS / len(labels))))
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    splits = [(train, held) for train, held in splitter.split(np.zeros(len(labels)), labels)]
    return Splits(splits, "repeated k-fold" if repeats > 1 else "k-fold", k, repeats)


@dataclass
class Estimate:
    """A candidate's held-out accuracy and loss on every split of one `Splits`."""

    accuracy: np.ndarray
    loss: np.ndarray

    @classmethod
    def of(cls, scores) -> Estimate:
        """From (accuracy, loss) per split."""
        scores = np.asarray(scores, np.float64).reshape(-1, 2)
        return cls(scores[:, 0], scores[:, 1])

    @property
    def mean(self) -> float:
        return float(self.accuracy.mean())

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean())

    def se(self, held_fraction: float) -> float:
        """The corrected standard error of the mean accuracy."""
        return corrected_se(self.accuracy, held_fraction)


def corrected_se(values: np.ndarray, held_fraction: float) -> float:
    """Nadeau and Bengio's corrected standard error of the mean of per-split `values`."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan")
    return float(math.sqrt(values.var(ddof=1) * (1.0 / len(values) + held_fraction)))


@dataclass(frozen=True)
class Decision:
    """What a choice took, the best-scoring candidate, their paired difference and the rule that decided."""

    chosen: str
    best: str
    margin: float  # best's mean accuracy minus the robust candidate's (by loss: the robust's loss minus best's)
    se: float  # corrected standard error of that paired difference
    rule: str


def z_for(candidates: int, alpha: float = ALPHA) -> float:
    """Standard errors the best of `candidates` must beat the robust one by (Bonferroni, one-sided)."""
    return float(norm.ppf(1.0 - alpha / max(candidates - 1, 1)))


def decide(estimates: dict[str, Estimate], robust: str, held_fraction: float, z: float | None = None,
           by: str = "accuracy") -> Decision:
    """The robust candidate unless the best one beats it by more than `z` (default
    `z_for(len(estimates))`) corrected standard errors of their paired difference on the same splits.

    `by="accuracy"`: the best has the highest mean accuracy, then the lowest loss. `by="loss"`: the
    lowest mean cross-validated log loss, a proper score that resolves more than 0/1 accuracy on a
    few held-out images (the margin is then the loss saved).
    """
    z = z_for(len(estimates)) if z is None else z
    if by == "loss":
        best = min(estimates, key=lambda name: (round(estimates[name].mean_loss, 9), -estimates[name].mean))
        difference = estimates[robust].loss - estimates[best].loss
    else:
        best = max(estimates, key=lambda name: (round(estimates[name].mean, 9), -estimates[name].mean_loss))
        difference = estimates[best].accuracy - estimates[robust].accuracy
    margin, se = float(difference.mean()), corrected_se(difference, held_fraction)
    if best == robust:
        return Decision(robust, best, 0.0, 0.0, f"{robust} scores best")
    what = "in loss " if by == "loss" else ""
    if margin > z * se:  # a nan se (a single split) never passes
        if z == 0:  # peers: the better estimate takes it
            return Decision(best, best, margin, se, f"{best} scores better than {robust} {what}by {margin:.3f} "
                                                    f"(SE {se:.3f})")
        return Decision(best, best, margin, se, f"{best} beats {robust} {what}by {margin:.3f} > {z:.2f} SE ({se:.3f})")
    return Decision(robust, best, margin, se, f"{best} within noise of {robust} {what}({margin:+.3f}, SE {se:.3f}): "
                                              f"{robust} kept")
