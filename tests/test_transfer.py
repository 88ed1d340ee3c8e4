"""Converged heads, reading the right depth, and honest small-data validation (`kerastl.features.probe`, `kerastl.training.crossval`)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import frozen_random
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import from_arrays, load_digits
from kerastl.errors import KerastlError
from kerastl.features.blocks import DEFAULT_DEPTH, probe_blocks, unfreeze_depth
from kerastl.features.noise import Estimate, decide, repeated_folds
from kerastl.models.backbones import build_backbone
from kerastl.training.compile import compile_classifier
from kerastl.training.crossval import choose_fine_tune_epochs
from kerastl.training.phases import START_LOSS
from kerastl.models.classifier import build_classifier
from kerastl.models.export import export_saved_model
from kerastl.runs.folder import load_model
from kerastl.runs.run import run_training

SIZE = 16


def digits(per_class: int, test: bool = True, seed: int = 0):
    """Digits 0-4 with `per_class` labelled images each, and (optionally) 100 test images."""
    x, y, names = load_digits((0, 1, 2, 3, 4))
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(5)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), train))[:100]
    return (x, y, names), from_arrays(x[train], y[train], SIZE, names, validation_split=0.3, seed=seed,
                                      test=(x[rest], y[rest]) if test else None)


def test_phase_one_head_reaches_the_scikit_learn_probe(tmp_path):
    _, data = digits(40)
    model, train = frozen_random(SIZE), TrainConfig(fine_tune_epochs=0, validation="holdout")
    result = run_training(RunConfig(DataConfig(augment="none"), model, train), data=data, verbose=0, save="none")
    assert result.history.phase2 is None
    extractor = result.model.features_model()
    (x, y), (xv, yv) = data.train.arrays(), data.validation.arrays()
    (xt, yt) = data.test.arrays()
    features = [np.asarray(extractor.predict(a.astype(np.float32), verbose=0)) for a in (x, xv, xt)]
    scaler = StandardScaler().fit(features[0])
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(features[0]), y)
    for split, (f, labels) in {"val": (features[1], yv), "test": (features[2], yt)}.items():
        ours = result.metrics[f"{split}_accuracy"]
        theirs = reference.score(scaler.transform(f), labels)
        assert ours >= theirs - 0.01, (split, ours, theirs)


def test_the_head_budget_is_steps_not_epochs():
    """A head from a random start (a hidden layer) gets the step floor; a linear one from the probe
    does not need it (tests/test_plan.py)."""
    _, data = digits(40)
    model = frozen_random(SIZE, hidden_units=16)
    train = TrainConfig(fine_tune_epochs=0, validation="holdout", epochs=2, min_steps=60, patience=100)
    result = run_training(RunConfig(DataConfig(augment="none", batch_size=32), model, train), data=data,
                          verbose=0, save="none")
    steps_per_epoch = -(-data.train.count // 32)
    assert len(result.history.phase1.epoch) * steps_per_epoch >= 60


def _zero_last_block(path):
    """A simple_cnn weights file whose last block outputs zeros: it destroys the signal."""
    backbone = build_backbone("simple_cnn", SIZE, weights=None)
    for weight in backbone.get_layer("block3_conv").weights:
        weight.assign(np.zeros(weight.shape, np.float32))
    backbone.save_weights(path)
    return str(path)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_auto_reads_an_earlier_block_when_the_last_destroys_the_signal(tmp_path):
    _, data = digits(40)
    weights = _zero_last_block(tmp_path / "broken.weights.h5")
    config = RunConfig(DataConfig(augment="none"), ModelConfig("simple_cnn", weights=weights, image_size=SIZE),
                       TrainConfig(fine_tune_epochs=0, validation="holdout"), export_dir=str(tmp_path / "run"))
    result = run_training(config, data=data, verbose=0)
    assert result.model.feature_blocks != [3]  # not the output alone: an earlier block, or all of them
    assert result.config.model.features == ",".join(map(str, result.model.feature_blocks))
    assert result.curve.accuracy[-1] < 0.4 < max(result.curve.accuracy)
    assert result.probe is result.curve  # its 0.2 name
    assert result.metrics["val_accuracy"] > 0.6
    curve = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert [b["block"] for b in curve["blocks"]] == [1, 2, 3] and curve["chosen"] == result.model.feature_blocks
    assert (tmp_path / "run" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "probe.png").stat().st_size > 5000
    # the export reads the same blocks, standardised by its own layer
    reloaded = load_model(tmp_path / "run")
    assert reloaded.feature_blocks == result.model.feature_blocks
    images = data.validation.arrays()[0].astype(np.float32)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), result.model.predict(images, verbose=0),
                               atol=1e-5)


def test_auto_keeps_the_output_when_it_reads_best():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(120, 24))  # blocks 1 and 2: no signal
    signal = np.eye(4)[labels] * 3 + rng.normal(size=(120, 4))  # block 3, the output: all of it
    curve = probe_blocks(np.concatenate([noise, signal], axis=1), labels, [12, 12, 4], ["a", "b", "c"])
    assert curve.chosen == [3] and curve.accuracy[2] > 0.9 > max(curve.accuracy[:2])
    assert curve.unfreeze_blocks == DEFAULT_DEPTH and "scores best" in curve.rule


def _weak_blocks(seed: int, per_class: int, strong: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Six blocks of 8 features, each with the same weak class signal in 4 of them (or, with `strong`,
    that block alone with a strong signal and the others none), 5 classes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(5), per_class)
    blocks = []
    for b in range(1, 7):
        signal = 0.0 if strong not in (None, b) else 4.0 if strong == b else 0.8
        blocks.append(np.concatenate([np.eye(5)[labels][:, :4] * signal + rng.normal(size=(len(labels), 4)),
                                      rng.normal(size=(len(labels), 4))], axis=1))
    return np.concatenate(blocks, axis=1), labels


@pytest.mark.parametrize("seed", [4, 9])
def test_a_block_that_wins_the_folds_by_chance_keeps_the_robust_reading(seed):
    features, labels = _weak_blocks(seed, per_class=3)  # every block alike: any winner wins by chance
    curve = probe_blocks(features, labels, [8] * 6, list("abcdef"))
    best = int(np.argmax(curve.accuracy))
    assert best != 5 and curve.accuracy[best] > curve.accuracy[-1] + 0.1  # the old margin (0.01) would switch
    assert curve.chosen in ([6], [1, 2, 3, 4, 5, 6])  # the output, or all blocks: never the lucky block
    assert f"block {best + 1} within noise" in curve.rule and "kept" in curve.rule
    assert curve.unfreeze_blocks == DEFAULT_DEPTH
    assert all(se > 0 for se in curve.accuracy_se) and curve.splits.startswith("5x 3-fold on 15 images")
    recorded = curve.to_dict()
    assert recorded["rule"] == curve.rule and recorded["blocks"][best]["accuracy_se"] == curve.accuracy_se[best]
    assert "+-" in curve.summary() and curve.rule in curve.summary()


@pytest.mark.parametrize("seed", [0, 5])
def test_a_signal_spread_over_every_block_is_read_from_all_of_them_by_the_lower_loss(seed):
    features, labels = _weak_blocks(seed, per_class=3)  # each block a weak share of it: together it is strong
    curve = probe_blocks(features, labels, [8] * 6, list("abcdef"))
    assert curve.chosen == [1, 2, 3, 4, 5, 6] and curve.all_loss < curve.loss[-1]
    assert curve.rule.startswith("all blocks scores better than block 6 in loss")  # peers: no margin asked


def test_a_truly_dominant_block_is_chosen_and_deepens_fine_tuning():
    features, labels = _weak_blocks(0, per_class=5, strong=2)  # block 2 carries the signal, the others noise
    curve = probe_blocks(features, labels, [8] * 6, list("abcdef"))
    assert curve.chosen == [2] and "block 2 beats all blocks" in curve.rule  # all beat the output, block 2 all
    assert curve.unfreeze_blocks == DEFAULT_DEPTH  # block 2 read and best: it and the one before
    # read with the output's noise, block 2 beating block 6 by far: fine-tuning reaches back to block 2
    estimates = {f"block {b}": Estimate.of([(a, 1.0 - a)] * 3) for b, a in enumerate([0.4, 0.9, 0.5, 0.4, 0.4, 0.3],
                                                                                      start=1)}
    splits = repeated_folds(np.repeat(np.arange(3), 3), 3, repeats=1)
    estimates = {name: Estimate(e.accuracy + np.array([0.0, 0.05, -0.05]), e.loss) for name, e in estimates.items()}
    assert unfreeze_depth(estimates, [6], splits)[0] == 5


def test_choices_break_ties_by_loss_and_need_more_than_the_noise():
    flat = np.array([0.5, 0.7, 0.6])
    estimates = {"robust": Estimate(flat, np.full(3, 0.9)), "a": Estimate(flat, np.full(3, 0.8)),
                 "b": Estimate(flat + 0.05, np.full(3, 1.0))}
    assert decide({"robust": estimates["robust"], "a": estimates["a"]}, "robust", 0.5).best == "a"  # a tie: loss
    decision = decide(estimates, "robust", 0.5)
    assert decision.best == "b" and decision.chosen == "b"  # the same gain on every split: no noise
    noisy = {**estimates, "b": Estimate(flat + np.array([0.3, -0.2, 0.1]), np.full(3, 1.0))}
    assert decide(noisy, "robust", 0.5).chosen == "robust"
    finer = {"robust": estimates["robust"], "a": Estimate(flat, np.array([0.78, 0.81, 0.80]))}  # same hits, surer
    assert decide(finer, "robust", 0.5).chosen == "robust"  # accuracy cannot tell them apart
    by_loss = decide(finer, "robust", 0.5, by="loss")
    assert by_loss.chosen == "a" and by_loss.margin == pytest.approx(0.103, abs=1e-3) and "in loss" in by_loss.rule
    assert not repeated_folds(np.array([0, 1, 2, 2])).splits  # one image in some class: nothing to estimate
    loo = repeated_folds(np.repeat(np.arange(3), 2))  # k-fold would leave one image per class to train on
    assert loo.kind == "leave-one-out" and len(loo) == 6
    assert repeated_folds(np.repeat(np.arange(5), 10)).describe(50) == "3x 5-fold on 50 images"


def test_one_image_per_class_reads_the_robust_reading():
    features, labels = _weak_blocks(0, per_class=1, strong=2)
    curve = probe_blocks(features, labels, [8] * 6, list("abcdef"))
    assert curve.chosen == [6] and curve.folds == 0 and "too few images" in curve.rule
    fixed = probe_blocks(features, labels, [8] * 6, list("abcdef"), fixed=[2, 4])  # features set by the user
    assert fixed.chosen == [2, 4] and "features setting" in fixed.rule and fixed.unfreeze_blocks == DEFAULT_DEPTH


def test_blocks_set_by_the_user_are_read_and_the_depth_counts_back_from_them():
    features, labels = _weak_blocks(0, per_class=5, strong=2)
    curve = probe_blocks(features, labels, [8] * 6, list("abcdef"), fixed=[5])
    assert curve.chosen == [5] and "features setting" in curve.rule
    assert curve.unfreeze_blocks == 4 and "from block 2" in curve.depth_rule  # block 2 beats block 5: 2..5


def test_fine_tuning_depth_counts_back_from_the_deepest_block_read():
    config = ModelConfig("mobilenet_v2", weights=None, image_size=32, from_scratch=False, features="7")
    model = build_classifier(config, 3)
    names = model.block_names()
    assert model.unfreeze(blocks=2) > 0
    trainable = [layer.name for layer in model.backbone.layers if layer.trainable and layer.weights]
    index = {layer.name: i for i, layer in enumerate(model.backbone.layers)}
    assert index[names[4]] < min(index[n] for n in trainable) <= index[names[5]]  # blocks 6 and 7 train
    assert max(index[n] for n in trainable) <= index[names[6]]  # nothing after block 7 does


def test_multi_block_classifier_exports_and_plain_tensorflow_matches(tmp_path):
    config = ModelConfig("simple_cnn", weights=None, image_size=SIZE, from_scratch=False, features="1,3")
    model = build_classifier(config, 4, seed=0)
    assert model.feature_blocks == [1, 3] and model.feature_dim == 32 + 128
    rng = np.random.default_rng(0)
    model.feature_norm.set_statistics(rng.normal(size=160), rng.uniform(0.5, 2.0, size=160))
    export_saved_model(model, tmp_path, ["a", "b", "c", "d"])
    images = rng.uniform(0, 255, (3, 20, 24, 3)).astype(np.float32)
    served = tf.saved_model.load(str(tmp_path)).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(next(iter(served.values())).numpy(), model.predict(images, verbose=0), atol=1e-5)
    copy = keras.saving.load_model(_save(model, tmp_path / "m.keras"), safe_mode=True)
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    with pytest.raises(KerastlError, match="has blocks 1 to 3"):
        build_classifier(ModelConfig("simple_cnn", None, SIZE, from_scratch=False, features="2,4"), 4)


def _save(model, path):
    model.save(path)
    return path


def test_small_data_cross_validates_and_large_data_holds_out():
    small_model, small_train = frozen_random(SIZE), TrainConfig(fine_tune_epochs=0)
    _, small = digits(6)
    result = run_training(RunConfig(DataConfig(augment="none"), small_model, small_train), data=small, verbose=0,
                          save="none")
    assert {"cv_accuracy", "cv_accuracy_std", "cv_loss", "cv_folds"} <= set(result.metrics)
    assert not any(key.startswith("val_") for key in result.metrics) and "test_accuracy" in result.metrics
    assert result.metrics["cv_folds"] == 5
    _, large = digits(45)
    result = run_training(RunConfig(DataConfig(augment="none"), frozen_random(SIZE), TrainConfig(fine_tune_epochs=0)),
                          data=large, verbose=0, save="none")
    assert "val_accuracy" in result.metrics and not any(key.startswith("cv_") for key in result.metrics)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
@pytest.mark.parametrize("ratio", [0.01, 1000.0])
def test_cross_validated_fine_tuning_keeps_its_changes_only_when_the_estimate_improves(ratio):
    _, data = digits(8)  # at 4 per class a gentle rate's gain is within the noise of 4 folds, as it should be
    config = RunConfig(DataConfig(augment="none", batch_size=8),
                       frozen_random(SIZE),
                       TrainConfig(fine_tune_epochs=30, fine_tune_min_steps=0, unfreeze_blocks=1,
                                   learning_rate=0.01, fine_tune_lr_ratio=ratio))
    frozen = build_classifier(config.model, 5, DataConfig().seed).backbone.get_weights()  # as the run builds it
    result = run_training(config, data=data, verbose=0, save="none")
    assert result.metrics["cv_folds"] == 5
    phase2 = result.history.phase2
    if ratio > 1:  # a learning rate of 10 wrecks the backbone in every fold: phase 1 is kept, untouched
        assert phase2 is None and "cv_fine_tune_epochs" not in result.metrics
        for kept, before in zip(result.model.backbone.get_weights(), frozen):
            np.testing.assert_array_equal(kept, before)
    else:  # a gentle one lowers the held-out loss beyond the noise: fine-tuning runs, for the fewest epochs
        losses = phase2.history["cv_loss"]  # within one SE of the curve's minimum, so never past it
        chosen = int(result.metrics["cv_fine_tune_epochs"])
        assert 0 < chosen <= int(np.argmin(losses)) and losses[chosen] < losses[0]
        assert result.metrics["cv_loss"] == pytest.approx(losses[chosen])


def test_one_image_per_class_trains_without_an_estimate():
    _, data = digits(1)
    result = run_training(RunConfig(DataConfig(augment="none"), frozen_random(SIZE), TrainConfig(fine_tune_epochs=0)),
                          data=data, verbose=0, save="none")
    assert result.history.phase2 is None and "test_accuracy" in result.metrics
    assert not any(key.startswith(("cv_", "val_")) for key in result.metrics)


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_folds_of_different_sizes_fine_tune_for_the_same_epochs(monkeypatch):
    from kerastl.training import crossval

    (x, y, names), _ = digits(1)
    index = np.concatenate([np.flatnonzero(y == c)[: 7 + (c == 4)] for c in range(5)])  # 7, 7, 7, 7 and 8 images
    data = from_arrays(x[index], y[index], SIZE, names, validation_split=0.0)
    config = RunConfig(DataConfig(augment="none", batch_size=28),  # folds of 28 and 29 images: 1 or 2 steps
                       frozen_random(SIZE),
                       TrainConfig(fine_tune_epochs=1, fine_tune_min_steps=4, unfreeze_blocks=1))
    seen, curves = {}, []  # the folds and phases each fold is handed, and each fold's held-out curve
    hand_over = crossval.train_cross_validated

    def recorded(model, images, labels, views, probe, folds, phases, *args, **kwargs):
        seen.update(train_sizes=sorted(len(train) for train, _ in folds), epochs=phases[1].epochs)
        return hand_over(model, images, labels, views, probe, folds, phases, *args, **kwargs)

    monkeypatch.setattr(crossval, "train_cross_validated", recorded)
    monkeypatch.setattr(crossval, "_keep_fold", lambda backup_dir, number, curve: curves.append(curve))
    result = run_training(config, data=data, verbose=0, save="none")
    assert result.metrics["cv_folds"] == 5
    steps = {-(-size // 28) for size in seen["train_sizes"]}
    assert len(seen["train_sizes"]) == 5 and steps == {1, 2}  # epochs of 1 step in some folds, 2 in others
    assert seen["epochs"] > 1  # the step floor raised the 1 epoch asked for, once for every fold
    assert len(curves) == 5
    assert [len(loss) for loss, _ in curves] == [seen["epochs"] + 1] * 5  # epoch 0 (phase 1), then each epoch
    assert [len(accuracy) for _, accuracy in curves] == [seen["epochs"] + 1] * 5
    if result.history.phase2 is not None:  # the mean curve over folds, when fine-tuning kept its changes
        assert len(result.history.phase2.history["cv_loss"]) == seen["epochs"] + 1


def test_fine_tuning_runs_only_when_the_folds_agree_it_helps_and_for_the_fewest_epochs_within_noise():
    steady = np.array([[1.00, 0.80, 0.70, 0.67], [1.10, 0.85, 0.74, 0.76], [0.90, 0.70, 0.61, 0.57]])
    epochs, rule = choose_fine_tune_epochs(steady, 0.5)
    assert epochs == 2 and "after 3" in rule  # epoch 3 is lowest on average, epoch 2 within its noise
    noisy = np.array([[1.0, 0.5], [1.0, 1.3], [1.0, 0.9]])  # lower on average, higher in one fold of three
    epochs, rule = choose_fine_tune_epochs(noisy, 0.5)
    assert epochs == 0 and "within noise" in rule
    assert choose_fine_tune_epochs(np.array([[0.5, 0.6], [0.5, 0.7]]), 1.0)[0] == 0
    wild = np.array([[1.0, 0.3, 0.9, 0.60], [1.0, 1.9, 0.9, 0.62], [1.0, 1.1, 0.9, 0.58]])  # epoch 1: worse, noisy
    assert choose_fine_tune_epochs(wild, 0.5)[0] == 3  # never an epoch that scores worse than phase 1


@pytest.mark.parametrize("settings", [
    {},  # the defaults
    {"label_smoothing": 0.1, "learning_rate": 0.1},  # epochs that can only make it worse: they are undone
])
def test_a_probe_start_never_ends_phase_one_with_a_higher_validation_loss_than_the_probe(settings):
    _, data = digits(40, test=False)
    model = frozen_random(SIZE, dropout=0.5)  # training-mode noise on the features
    train = TrainConfig(fine_tune_epochs=0, validation="holdout", epochs=8, patience=3, **settings)
    result = run_training(RunConfig(DataConfig(augment="light"), model, train), data=data, verbose=0, save="none")
    history = result.history.phase1.history
    probe_loss = history[START_LOSS][0]
    head = result.model.head_model()
    compile_classifier(head, result.config.train)  # the validation loss as phase 1 compiled it
    plain = result.plan.inputs.cached[1]
    ended = head.evaluate(plain.features[0], plain.labels, verbose=0, return_dict=True)["loss"]
    assert ended <= probe_loss + 1e-5
    assert ended == pytest.approx(min([probe_loss, *history["val_loss"]]), abs=1e-5)  # the best of them kept
    if settings:
        assert len(result.history.phase1.epoch) == 3 and min(history["val_loss"]) > probe_loss  # patience: worse
