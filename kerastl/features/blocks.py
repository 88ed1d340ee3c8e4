"""Where to read the backbone, and how deep to fine-tune: probes of every block, choices within noise.

`probe_blocks` scores every block, and their concatenation, with the same linear
probe (Head2Toe's reading of several depths, Evci et al. 2022, without its feature
selection) on the same repeated folds (`kerastl.features.noise`). `choose_blocks`
keeps the backbone's output unless all blocks, or then a single block, beat it by
more than the noise; `unfreeze_depth` reads the fine-tuning depth off the same curve
by the same rule.

Why the output is the reading kept: across 3 pretrainings, 2 splits and 1
to 20 images per class, all blocks read 2 to 15 points below the output on
`simple_cnn` (3 blocks) and 7 to 23 points above it on MobileNetV3Small (12 blocks).
Neither is safe to keep blindly, and with one image per class, where nothing can be
estimated, the output read as well or better on both. So the output is kept, and all
blocks replace it on the first comparison that beats the noise of one comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kerastl.features.noise import Decision, Estimate, Splits, decide, repeated_folds
from kerastl.features.probe import PROBE_C, RANK_TOL, fit_probe, probe_scores

MAX_PROBE_IMAGES = 1000  # images the block probes cross-validate on
DEFAULT_DEPTH = 2  # fine-tuning depth when the head reads the output, or when no probe curve chose
ALL = "all blocks"


def block_columns(widths: list[int], blocks: list[int]) -> np.ndarray:
    """The columns of `blocks` (numbers from 1) in features that concatenate blocks of `widths`."""
    edges = np.cumsum([0, *widths])
    return np.concatenate([np.arange(edges[b - 1], edges[b]) for b in sorted(blocks)])


@dataclass
class BlockCurve:
    """Cross-validated probe accuracy (and its corrected standard error) of each block and of all
    blocks concatenated, the blocks chosen and the fine-tuning depth, with the rules that decided."""

    names: list[str]
    accuracy: list[float]
    loss: list[float]
    all_accuracy: float
    all_loss: float
    chosen: list[int]
    unfreeze_blocks: int
    folds: int  # k of the k-fold splits (0: none)
    images: int
    accuracy_se: list[float] = field(default_factory=list)
    all_accuracy_se: float = float("nan")
    splits: str = ""  # how the splits were drawn, in words
    rule: str = ""  # which rule chose the blocks
    depth_rule: str = ""  # ... and the fine-tuning depth
    fine_tune_rule: str = ""  # small data: whether phase 2 ran, and for how long (`kerastl.training.crossval`)

    def to_dict(self) -> dict:
        se = self.accuracy_se or [float("nan")] * len(self.names)
        blocks = [{"block": b, "layer": n, "accuracy": a, "accuracy_se": s, "loss": lo}
                  for b, (n, a, s, lo) in enumerate(zip(self.names, self.accuracy, se, self.loss), start=1)]
        return {"blocks": blocks, "all": {"accuracy": self.all_accuracy, "accuracy_se": self.all_accuracy_se,
                                          "loss": self.all_loss},
                "chosen": self.chosen, "unfreeze_blocks": self.unfreeze_blocks, "folds": self.folds,
                "images": self.images, "splits": self.splits, "rule": self.rule, "depth_rule": self.depth_rule,
                "fine_tune_rule": self.fine_tune_rule}

    def reading(self) -> str:
        """The blocks read, in words."""
        last = len(self.names)
        return ("the backbone's output" if self.chosen == [last] else "all blocks" if len(self.chosen) == last
                else "block " + ",".join(map(str, self.chosen)))

    def summary(self) -> str:
        """One line for people: what the head reads, each estimate with its spread, and the rule that decided."""
        phase2 = f"; phase 2: {self.fine_tune_rule}" if self.fine_tune_rule else ""
        if not self.folds:
            return f"features: {self.reading()} ({self.rule}); fine-tuning depth {self.unfreeze_blocks} blocks{phase2}"
        se = self.accuracy_se or [float("nan")] * len(self.names)
        best = max(range(len(self.accuracy)), key=lambda b: (self.accuracy[b], -self.loss[b]))
        return (f"features: {self.reading()} (probe accuracy: output {self.accuracy[-1]:.3f} +- {se[-1]:.3f}, "
                f"best block {best + 1} {self.accuracy[best]:.3f} +- {se[best]:.3f}, all {self.all_accuracy:.3f} "
                f"+- {self.all_accuracy_se:.3f}; {self.splits}; {self.rule}); fine-tuning depth "
                f"{self.unfreeze_blocks} blocks ({self.depth_rule}){phase2}")


def probe_blocks(features: np.ndarray, labels: np.ndarray, widths: list[int], names: list[str],
                 folds: int = 5, seed: int = 0, fixed: list[int] | None = None) -> BlockCurve:
    """Probes (fixed C) of each block's features and of their concatenation, on the same repeated folds.

    Args:
        features: [n, sum(widths)] pooled features of every block, in block order.
        widths: each block's width.
        names: each block's last layer.
        fixed: the blocks the head reads when the user set them (the curve then only sets the depth).
    """
    if len(labels) > 300:  # three folds are enough to rank blocks when there are images to spare
        folds = min(folds, 3)
    if len(labels) > MAX_PROBE_IMAGES:  # a per-class share of every class
        keep = np.concatenate([
            np.random.default_rng(seed).permutation(np.flatnonzero(labels == c))[
                : max(1, round(MAX_PROBE_IMAGES * np.mean(labels == c)))] for c in np.unique(labels)])
        features, labels = features[np.sort(keep)], labels[np.sort(keep)]
    num_classes = int(labels.max()) + 1
    splits = repeated_folds(labels, folds, seed)
    last = len(widths)
    if not splits:  # nothing to cross-validate: the output, at the default depth
        nan = [float("nan")] * last
        rule = FIXED if fixed else "too few images per class to cross-validate: the backbone's output, which " \
                                   "read as well as all blocks or better at one image per class"
        return BlockCurve(names, nan, nan, float("nan"), float("nan"), list(fixed or [last]),
                          DEFAULT_DEPTH, 0, len(labels), nan, splits=splits.describe(len(labels)), rule=rule,
                          depth_rule="the default")
    edges = np.cumsum([0, *widths])
    candidates = {f"block {b}": (slice(edges[b - 1], edges[b]), None) for b in range(1, last + 1)}
    candidates[ALL] = (slice(0, edges[-1]), tuple(widths))  # each block weighed alike (`Standardizer`)
    scores: dict[str, list] = {name: [] for name in candidates}
    for train, held in splits:  # each split's rows taken once; a candidate's columns are a view of them
        x, x_held = features[train], features[held]
        for name, (cols, weigh) in candidates.items():
            fit = fit_probe(x[:, cols], labels[train], PROBE_C, num_classes, tol=RANK_TOL, widths=weigh)
            scores[name].append(probe_scores(fit, x_held[:, cols], labels[held]))
    estimates = {name: Estimate.of(values) for name, values in scores.items()}
    rule, chosen = FIXED, list(fixed or [])
    if not fixed:
        decision = choose_blocks(estimates, splits)
        rule, chosen = decision.rule, blocks_of(decision.chosen, last)
    depth, depth_rule = unfreeze_depth(estimates, chosen, splits)
    per_block = [estimates[f"block {b}"] for b in range(1, last + 1)]
    fraction = splits.held_fraction
    return BlockCurve(names, [e.mean for e in per_block], [e.mean_loss for e in per_block], estimates[ALL].mean,
                      estimates[ALL].mean_loss, chosen, depth, splits.k, len(labels),
                      [e.se(fraction) for e in per_block], estimates[ALL].se(fraction), splits.describe(len(labels)),
                      rule, depth_rule)


FIXED = "the blocks the features setting names"


def blocks_of(candidate: str, last: int) -> list[int]:
    """The blocks a candidate of `probe_blocks` reads ("block 3", "all blocks")."""
    return list(range(1, last + 1)) if candidate == ALL else [int(candidate.split()[1])]


def choose_blocks(estimates: dict[str, Estimate], splits: Splits) -> Decision:
    """The reading the head takes, in two steps of `kerastl.features.noise.decide`.

    1. The two readings fixed before any data, the backbone's output and all blocks, are peers: each
       reads 10-20 points better than the other on some backbone family (measured across
       pretrainings, docs/architecture.md), so neither is the robust one and the lower
       cross-validated log loss takes it (z 0; accuracy on 15-25 images is too coarse to tell them
       apart). The output is kept when there is nothing to estimate with.
    2. A single block found by the probes, the best of many and so flattered by chance, replaces that
       only when its accuracy beats it by more than the multiple-comparison noise.
    """
    last = sum(name.startswith("block ") for name in estimates)
    pair = {name: estimates[name] for name in (f"block {last}", ALL)}
    first = decide(pair, f"block {last}", splits.held_fraction, z=0.0, by="loss")
    second = decide(estimates, first.chosen, splits.held_fraction)
    if second.chosen != first.chosen or second.best not in pair:
        return Decision(second.chosen, second.best, second.margin, second.se, f"{first.rule}; {second.rule}")
    return first


def unfreeze_depth(estimates: dict[str, Estimate], chosen: list[int], splits: Splits) -> tuple[int, str]:
    """Fine-tuning depth from the probe curve, counted back from the deepest block read, and why.

    The robust depth is `DEFAULT_DEPTH`. When an earlier block (up to the deepest one read) reads
    better than the deepest one by more than the noise, the blocks between them are the most specific
    to the pretraining task: they are fine-tuned too, from that block on.
    """
    deepest = max(chosen)
    per_block = {f"block {b}": estimates[f"block {b}"] for b in range(1, deepest + 1)}
    decision = decide(per_block, f"block {deepest}", splits.held_fraction)
    best = int(decision.chosen.split()[1])
    depth = max(DEFAULT_DEPTH, deepest - best + 1)
    if best == deepest:
        return DEFAULT_DEPTH, f"the default: {decision.rule}"
    return depth, f"from block {best}: {decision.rule}"
