"""Small data: k-fold cross-validation where a held-out split would be noise.

With 10 images per class, a 20% validation split is 2 images per class: too few
to stop on, choose on, or report. Below `TrainConfig.cv_below` labelled images per
class (`validation="auto"`), a run instead uses every labelled image for training
and k-fold cross-validation (stratified, k = `cv_folds` or fewer) for every choice:

- Phase 1: the linear probe's L2 strength is chosen by cross-validated loss and
  the probe refitted on every image (`kerastl.features.probe.choose_c_cv`).
- Phase 2: in each fold, the fold's own probe starts a fine-tuning run on the
  fold's training images, scored every epoch on its held-out images. The mean
  held-out loss over folds gives a curve over epochs 0 (phase 1 alone) to E. Phase
  2 then runs on every image for the epochs at the curve's minimum, and only when
  that minimum is below epoch 0: fine-tuning keeps its changes only when the
  cross-validated estimate improves.

The metrics are named `cv_*` (accuracy, its standard deviation over folds, loss,
folds): an estimate from cross-validation, not a held-out score. With a single
image in some class there is nothing to cross-validate: the probe uses C=1 and
phase 2 is skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kerastl.config import DataConfig, TrainConfig
from kerastl.data.images import ImageData, split_of_arrays
from kerastl.data.pipelines import budget_steps, is_mixed, skip_epochs, training_batches, weighted
from kerastl.errors import KerastlError
from kerastl.features.batches import feature_batches
from kerastl.features.cache import CachedFeatures
from kerastl.features.noise import corrected_se, held_fraction, z_for
from kerastl.features.probe import ProbeFit, fit_probe, rows_of
from kerastl.models.classifier import TransferClassifier
from kerastl.storage import replace_file
from kerastl.training.batchnorm import recalibrate_batchnorm
from kerastl.training.compile import compile_classifier, compile_fine_tuning
from kerastl.training.phase import PhasePlan, fit_phase, history_of
from kerastl.training.phases import HEAD_STEPS_PER_EXECUTION, TrainResult, start_head, tensorboard_logs, unfreeze_top

log = logging.getLogger(__name__)


def _kept_fold(backup_dir: Path | None, number: int) -> tuple[list, list] | None:
    path = backup_dir / "cv-folds" / f"{number}.json" if backup_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        return values["loss"], values["accuracy"]
    except (OSError, ValueError, KeyError):
        return None


def _keep_fold(backup_dir: Path | None, number: int, curve: tuple[list, list]) -> None:
    if backup_dir is not None:
        (backup_dir / "cv-folds").mkdir(parents=True, exist_ok=True)
        text = json.dumps({"loss": [float(v) for v in curve[0]], "accuracy": [float(v) for v in curve[1]]})
        replace_file(backup_dir / "cv-folds" / f"{number}.json", lambda path: path.write_text(text))


def train_cross_validated(
    model: TransferClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    views: np.ndarray,
    probe: ProbeFit,
    folds: list[tuple[np.ndarray, np.ndarray]],
    phases: tuple[PhasePlan, ...],
    config: TrainConfig,
    data_config: DataConfig,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    backup_dir: Path | None = None,
    class_weights: np.ndarray | None = None,
) -> tuple[TrainResult, dict[str, float]]:
    """Both phases on every labelled image, each choice made by cross-validation.

    Args:
        model: a transfer classifier (frozen base, head reading cached features).
        images, labels: every labelled image (uint8, the model's size) and its label.
        views: cached training features [views, n, dim] of the blocks the head reads.
        probe: the probe fitted on every image, with its `cv_*` estimate.
        folds: (train, held-out) image indices; empty when there are too few images.
        phases: the planned phases: a hidden head's phase 1, then fine-tuning (each fold's,
            and the final fit's timetable) when there is any.
        backup_dir: where each finished fold's curve and the final fit's epoch
            snapshots are kept, so a killed run resumes at the next fold or epoch.
        class_weights: each class's weight (see `kerastl.data.pipelines`), in every fit and fold score.

    Returns:
        The phases' histories and the cross-validated estimate (`cv_*` metrics).
    """
    num_classes = model.num_classes
    start_head(model, probe)
    estimate = dict(probe.estimate)
    phase1 = history_of({key: [value] for key, value in estimate.items()} or {"cv_loss": [float("nan")]})
    head = phases[0]
    if model.hidden is not None:  # no closed form: a fixed budget of steps from the standardised start
        head_model = model.head_model()  # the one compiled is the one fitted
        compile_classifier(head_model, config, head.learning_rate, steps_per_execution=HEAD_STEPS_PER_EXECUTION,
                           schedule=head.schedule, steps=head.steps, jit_compile=head.jit_compile)
        cached = CachedFeatures(views, labels)
        balanced = config.sampling == "balanced"
        phase1 = fit_phase(head_model, head, lambda first: feature_batches(
            cached, data_config.batch_size, True, data_config.seed, first, class_weights, balanced), None, None, [],
            verbose)
        log.info("a hidden layer has no cross-validated estimate and is not fine-tuned on small data")
        return TrainResult(phase1), {}
    result = TrainResult(phase1)
    fine = phases[1] if len(phases) > 1 else None
    if not folds or not unfreeze_top(model, fine, config.unfreeze_from):
        if not folds:
            result.fine_tune_rule = "too few images per class to cross-validate fine-tuning: none"
            log.info("no fine-tuning: %s", result.fine_tune_rule)
        model.freeze_backbone()
        return result, estimate
    start = model.get_weights()

    def pipeline(rows: np.ndarray) -> tf.data.Dataset:
        return training_batches(split_of_arrays(images[rows], labels[rows], model.image_size), data_config, config,
                                num_classes, model.binary, class_weights)

    curves = []
    for number, (train, held) in enumerate(folds, start=1):
        kept = _kept_fold(backup_dir, number)
        if kept is not None:
            curves.append(kept)
            continue
        model.set_weights(start)
        x, y = rows_of(views, labels, train, data_config.seed)  # the fold's own probe: its held-out images stay unseen
        start_head(model, fit_probe(x, y, probe.c, num_classes, model.binary, class_weight=class_weights,
                                     widths=model.read_widths()))
        batches = pipeline(train)
        extra = compile_fine_tuning(model, config, batches, fine)  # a fresh optimizer for every fold
        held_split = split_of_arrays(images[held], labels[held], model.image_size)
        held_out = weighted(held_split.batches(data_config.batch_size), class_weights)
        before = model.evaluate(held_out, verbose=0, return_dict=True)
        history = fit_phase(model, fine, lambda first: batches, held_out, None, extra, 0)
        curves.append(([before["loss"], *history.history["val_loss"]],
                       [before["accuracy"], *history.history["val_accuracy"]]))
        _keep_fold(backup_dir, number, curves[-1])
        log.info("fine-tuning fold %d/%d: held-out loss %.4f -> best %.4f", number, len(folds),
                 curves[-1][0][0], min(curves[-1][0]))
    per_fold = np.array([c[0] for c in curves])  # [fold, epoch] held-out losses
    losses = per_fold.mean(axis=0)
    accuracies = np.array([c[1] for c in curves])
    best, rule = choose_fine_tune_epochs(per_fold, held_fraction(folds))
    result.fine_tune_rule = rule
    result.phase2 = history_of({"cv_loss": list(losses), "cv_accuracy": list(accuracies.mean(axis=0))})
    model.set_weights(start)
    if best == 0:
        log.info("no fine-tuning: %s", rule)
        model.freeze_backbone()
        result.phase2 = None
        return result, estimate
    log.info("fine-tuning for %d epochs: %s", best, rule)
    everything = pipeline(np.arange(len(labels)))
    # the folds' timetable (schedule, openings), stopped at the best epoch they found
    extra = compile_fine_tuning(model, config, everything, fine, validated=False)
    fit_phase(model, fine, lambda first: skip_epochs(everything, first), None, None, [*(callbacks or []), *extra],
              verbose, backup_dir / "phase2" if backup_dir is not None else None, epochs=best)
    model.freeze_backbone()
    estimate.update(cv_loss=float(losses[best]), cv_accuracy=float(accuracies[:, best].mean()),
                    cv_accuracy_std=float(accuracies[:, best].std()), cv_fine_tune_epochs=float(best))
    return result, estimate


def choose_fine_tune_epochs(per_fold: np.ndarray, fraction: float, z: float = z_for(2)) -> tuple[int, str]:
    """Phase 2's length from the folds' held-out losses [fold, epoch] (epoch 0: phase 1 alone), and why.

    No phase 2 (the robust choice) unless the epoch of lowest mean loss beats epoch 0 by more than
    `z` corrected standard errors of their paired difference over folds; then the fewest epochs whose
    loss is within one standard error of that minimum (Breiman's one-standard-error rule) and that
    themselves beat epoch 0 by more than the noise, so never an epoch that scores worse than phase 1.

    `z` is one comparison's (1.28), not Bonferroni's over the epochs: the epochs are one smooth,
    ordered curve whose neighbours differ by a few optimizer steps, not independent candidates, and
    a correction for 100 of them (z 3.1) would forbid fine-tuning on every small dataset.
    """
    losses = per_fold.mean(axis=0)
    best = int(np.argmin(losses))
    if best == 0:
        return 0, f"fine-tuning did not lower the cross-validated loss ({losses[0]:.4f})"
    gain, se = float(losses[0] - losses[best]), corrected_se(per_fold[:, 0] - per_fold[:, best], fraction)
    if not gain > z * se:
        return 0, f"its best, {losses[best]:.4f} after {best} epochs, is within noise of phase 1's " \
                  f"{losses[0]:.4f} (gain {gain:.4f}, SE {se:.4f})"

    def se_of(a: int, b: int) -> float:
        return float(np.nan_to_num(corrected_se(per_fold[:, a] - per_fold[:, b], fraction)))

    # within noise of the best and beyond noise of phase 1: a noisy early epoch is never taken over epoch 0
    shortest = next(e for e in range(1, best + 1)
                    if losses[e] - losses[best] <= se_of(e, best) and losses[0] - losses[e] > z * se_of(0, e))
    return shortest, f"cross-validated loss {losses[0]:.4f} -> {losses[shortest]:.4f} (the fewest epochs beyond " \
                     f"noise of phase 1 and within one SE of the best, {losses[best]:.4f} after {best}; " \
                     f"gain {gain:.4f} > {z:.2f} SE {se:.4f})"


def cross_validate(model: TransferClassifier, data: ImageData, phases: tuple[PhasePlan, ...],
                   plain: CachedFeatures | None, views: np.ndarray | None, probe: ProbeFit | None,
                   folds: list[tuple[np.ndarray, np.ndarray]], config: TrainConfig, data_config: DataConfig,
                   callbacks: list[keras.callbacks.Callback] | None = None, verbose: int | str = "auto",
                   backup_dir: Path | None = None, log_dir: Path | None = None,
                   class_weights: np.ndarray | None = None) -> tuple[TrainResult, dict[str, float]]:
    """A run on small data: both phases on every labelled image, choices by cross-validation.

    `plain` holds the plain cached features of every image (None without a cache),
    `views` every cached view, `probe` the probe fitted on them, `folds` the folds and
    `phases` the planned phases. `log_dir`: TensorBoard logs of the training that runs on
    every image. `class_weights`: each class's weight (see `kerastl.data.pipelines`).

    Without cached features (from scratch, or the cache off) there is nothing cheap to
    cross-validate: the model trains on every image for the step budget, with no estimate.
    """
    if plain is None:
        log.warning("%d labelled images and no cached features: training on all of them for at least %d steps, "
                    "with no validation estimate", data.train.count, config.head.min_steps)
        if model.from_scratch:
            model.backbone.trainable = True
        head = phases[0]
        batches = training_batches(data.train, data_config, config, len(data.class_names), model.binary,
                                   class_weights)
        compile_classifier(model, config, head.learning_rate, schedule=head.schedule,
                           steps=budget_steps(head.epochs, batches), mixed=is_mixed(batches),
                           jit_compile=head.jit_compile)
        history = fit_phase(model, head, lambda first: skip_epochs(batches, first), None, None,
                            [*(callbacks or []), *tensorboard_logs(log_dir, "phase1")], verbose,
                            backup_dir / "phase1" if backup_dir else None)
        if model.from_scratch:
            recalibrate_batchnorm(model, data.train.sample(), chunk_size=data_config.batch_size)
        return TrainResult(history), {}
    images, labels = data.train.arrays()
    if not np.array_equal(labels, plain.labels):
        raise KerastlError("the cached features are not in the images' order; clear the feature cache")
    result, estimate = train_cross_validated(model, images, labels, views, probe, folds, phases, config, data_config,
                                             [*(callbacks or []), *tensorboard_logs(log_dir, "phase2")], verbose,
                                             backup_dir, class_weights)
    if log_dir is not None:
        log_curves(Path(log_dir), result)
    return result, estimate


def log_curves(log_dir: Path, result: TrainResult) -> None:
    """Writes the cross-validated curves (and a hidden head's fit on every image) for TensorBoard,
    as `log_dir/phaseN/cross-validated` (or `/train`): no Keras fit logs them, since they are
    averaged over folds or fitted in closed form. Tags are Keras's (`epoch_loss`, `epoch_accuracy`)."""
    for phase, history in (("phase1", result.phase1), ("phase2", result.phase2)):
        runs: dict[str, dict[str, list[float]]] = {}
        for key, values in (history.history.items() if history is not None else ()):
            run, name = ("cross-validated", key[3:]) if key.startswith("cv_") else ("train", key)
            if name in ("loss", "accuracy"):
                runs.setdefault(run, {})[f"epoch_{name}"] = values
        for run, curves in runs.items():  # one writer (one event file) per run folder
            writer = tf.summary.create_file_writer(str(log_dir / phase / run))
            with writer.as_default():
                for tag, values in curves.items():
                    for step, value in enumerate(values):
                        tf.summary.scalar(tag, value, step=step)
            writer.close()
