"""Training recipes: losses, class weights, rebalanced sampling, schedules, layer-wise rates,
gradual unfreezing, MixUp/CutMix, head regularisation, and the search's imbalance objective."""

import functools
import logging

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf
from helpers import base_config, frozen_cnn

from kerastl.config import LOSSES, DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.data.images import from_arrays, load_digits, split_of_arrays
from kerastl.data.pipelines import class_weights, mixed, training_batches, weighted
from kerastl.errors import KerastlError
from kerastl.features.batches import balanced_order, feature_batches
from kerastl.features.cache import CachedFeatures
from kerastl.training.compile import compile_classifier, compile_fine_tuning
from kerastl.training.losses import OneHotCrossentropy, make_loss
from kerastl.training.phase import fine_tune_phase
from kerastl.training.schedules import scheduled_rate

Y = np.array([0, 2, 1, 2])
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]], np.float32)


tiny = functools.partial(frozen_cnn, size=16, seed=0, dropout=0.0)  # tiny(num_classes=3, binary=False, **model)


@pytest.mark.parametrize("name", [n for n in LOSSES if not n.startswith("binary")])
def test_each_softmax_loss_is_the_loss_compiled_and_equals_keras_on_one_hot_labels(name):
    model = tiny()
    compile_classifier(model, TrainConfig(loss=name))
    expected_type = keras.losses.SparseCategoricalCrossentropy if name in ("auto", "sparse_categorical_crossentropy") \
        else OneHotCrossentropy
    assert type(model.loss) is expected_type
    one_hot = np.eye(3, dtype=np.float32)[Y]
    reference = {"focal": keras.losses.CategoricalFocalCrossentropy()}.get(
        name, keras.losses.CategoricalCrossentropy())
    assert float(model.loss(Y, P)) == pytest.approx(float(reference(one_hot, P)), rel=1e-5)
    if type(model.loss) is OneHotCrossentropy:  # one-hot (or mixed) labels give the same value
        assert float(model.loss(one_hot, P)) == pytest.approx(float(model.loss(Y, P)), rel=1e-6)


@pytest.mark.parametrize("name", ["auto", "binary_crossentropy", "binary_focal"])
def test_each_binary_loss_is_the_loss_compiled(name):
    model = tiny(2, binary=True)
    compile_classifier(model, TrainConfig(loss=name))
    expected = keras.losses.BinaryFocalCrossentropy if name == "binary_focal" else keras.losses.BinaryCrossentropy
    assert type(model.loss) is expected


def test_focal_loss_equals_its_formula():
    p_true = P[np.arange(len(Y)), Y]
    formula = np.mean(-0.25 * (1 - p_true) ** 2 * np.log(p_true))  # alpha (1 - p_t)^gamma * -log(p_t)
    assert float(make_loss("focal", binary=False)(Y, P)) == pytest.approx(formula, rel=1e-5)
    yb, pb = np.array([[1.0], [0.0], [1.0]]), np.array([[0.9], [0.3], [0.4]], np.float32)
    p_t = np.where(yb == 1, pb, 1 - pb)
    binary = np.mean((1 - p_t) ** 2 * -np.log(p_t))  # no class balancing: alpha is not applied
    assert float(make_loss("binary_focal", binary=True)(yb, pb)) == pytest.approx(binary, rel=1e-4)


def test_a_loss_that_does_not_fit_the_model_is_refused():
    with pytest.raises(KerastlError, match="does not fit a binary"):
        make_loss("focal", binary=True)
    with pytest.raises(KerastlError, match="integer labels only"):
        make_loss("sparse_categorical_crossentropy", binary=False, mixed=True)
    assert isinstance(make_loss("auto", binary=False, mixed=True), OneHotCrossentropy)


def test_automatic_class_weights_are_n_over_k_times_count_and_weights_by_hand_follow_the_classes():
    counts = np.array([6, 2, 1, 0])
    # n = 9 images over k = 3 classes that have any: 9 / (3 * count)
    assert class_weights("auto", counts) == pytest.approx([0.5, 1.5, 3.0, 0.0])
    assert class_weights("none", counts) is None
    assert class_weights("b=3,a=0.5", [1, 1, 1], ["a", "b", "c"]) == pytest.approx([0.5, 3.0, 1.0])
    assert class_weights("1,2,3", [1, 1, 1]) == pytest.approx([1, 2, 3])
    with pytest.raises(KerastlError, match="unknown classes"):
        class_weights("z=2", [1, 1], ["a", "b"])


def test_class_weights_change_the_loss_on_cached_features_and_on_images():
    rng = np.random.default_rng(0)
    features = CachedFeatures(rng.normal(size=(1, 12, 8)).astype(np.float32), np.array([0] * 8 + [1] * 3 + [2]))
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    compile_classifier(head, TrainConfig())
    weights = class_weights("auto", np.bincount(features.labels))
    plain = head.evaluate(feature_batches(features, 4), verbose=0)[0]
    heavy = head.evaluate(feature_batches(features, 4, class_weights=weights), verbose=0)[0]
    p = head.predict(features.features[0], verbose=0)
    per_image = -np.log(p[np.arange(12), features.labels])
    assert plain == pytest.approx(per_image.mean(), rel=1e-4)
    assert heavy == pytest.approx(np.mean(weights[features.labels] * per_image), rel=1e-4)  # Keras's sample weights
    assert heavy != pytest.approx(plain, rel=1e-2)
    # the image pipeline carries the same weights as sample weights
    x, y, _ = load_digits((0, 1, 2))
    batch = next(iter(training_batches(split_of_arrays(x[:30], y[:30], 16), DataConfig(augment="none"),
                                       TrainConfig(), 3, False, weights)))
    assert len(batch) == 3 and np.allclose(batch[2].numpy(), weights[batch[1].numpy()])


def test_rebalanced_sampling_draws_the_classes_equally_often_on_features_and_images():
    labels = np.array([0] * 40 + [1] * 6 + [2] * 4)
    drawn = np.concatenate([labels[balanced_order(labels, np.random.default_rng(e))] for e in range(20)])
    assert len(drawn) == 20 * len(labels)
    assert all(np.bincount(labels[balanced_order(labels, np.random.default_rng(e))]).tolist() in
               ([17, 17, 16], [17, 16, 17], [16, 17, 17]) for e in range(5))  # equal draws to within one
    images = np.zeros((50, 16, 16, 3), np.uint8)
    batches = training_batches(split_of_arrays(images, labels, 16), DataConfig(augment="none", batch_size=10),
                               TrainConfig(sampling="balanced"), 3, False)
    epochs = [np.concatenate([y.numpy() for _, y in batches]) for _ in range(16)]
    assert all(len(epoch) == 50 for epoch in epochs)  # an epoch keeps its length
    assert int(batches.cardinality()) == 5  # and Keras knows it: fit runs every epoch to its end
    share = np.bincount(np.concatenate(epochs), minlength=3) / 800  # each draw's class equally likely
    assert np.allclose(share, 1 / 3, atol=0.06), share  # 3.5 standard deviations; without: 0.8, 0.12, 0.08
    assert not np.array_equal(epochs[0], epochs[1])  # redrawn every epoch


def test_schedules_give_the_expected_rate_at_each_step():
    assert scheduled_rate("constant", 0.1, 100, 0.1) == 0.1
    cosine = scheduled_rate("cosine", 0.1, 100, 0.1)  # 10 warmup steps from 0, then 90 of cosine decay to 0
    expected = {0: 0.0, 5: 0.05, 10: 0.1, 55: 0.05, 100: 0.0}
    for step, rate in expected.items():
        assert float(cosine(step)) == pytest.approx(rate, abs=1e-6), step
    assert float(scheduled_rate("cosine", 0.1, 100, 0.0)(50)) == pytest.approx(0.05, abs=1e-6)  # no warmup
    model = tiny()
    compile_classifier(model, TrainConfig(warmup=0.2), 0.01, schedule="cosine", steps=50)
    assert float(model.optimizer.learning_rate) == 0.0  # step 0 of the warmup
    model.optimizer.iterations.assign(10)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01, rel=1e-6)


def test_a_plateau_schedule_cuts_the_rate_when_validation_loss_stalls():
    from kerastl.training.phase import head_phase
    from kerastl.training.phases import train_head
    rng = np.random.default_rng(0)
    noise = CachedFeatures(rng.normal(size=(1, 64, 4)).astype(np.float32), rng.integers(0, 3, 64))
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    config = TrainConfig(schedule="plateau", epochs=12, min_steps=0, patience=6, learning_rate=0.5)
    history, _ = train_head(head, (noise, noise), config, head_phase(config, 1), batch_size=64, verbose=0)
    assert min(history.history["learning_rate"]) < 0.5  # ReduceLROnPlateau logged a cut rate


def _blocks_of(model):
    return [[v.numpy().copy() for v in block] for block in model.trainable_blocks()]


def test_discriminative_rates_give_earlier_blocks_smaller_updates():
    model = tiny()
    model.unfreeze(2)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)), tf.float32)
    y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    config = TrainConfig(optimizer="sgd", layer_decay=0.5, learning_rate=1.0, fine_tune_lr_ratio=0.1,
                         fine_tune_epochs=1, fine_tune_min_steps=0)
    compile_fine_tuning(model, config, tf.data.Dataset.from_tensors((x, y)), fine_tune_phase(config, 1, 2))
    blocks = model.trainable_blocks()
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    grads = tape.gradient(loss, [v for block in blocks for v in block])
    before = _blocks_of(model)
    model.train_on_batch(x, y)
    after = _blocks_of(model)
    flat_before = [v for block in before for v in block]
    flat_after = [v for block in after for v in block]
    ratios = [float(np.sum((b - a) * g.numpy()) / np.sum(g.numpy() ** 2))  # SGD: step = rate * gradient
              for b, a, g in zip(flat_before, flat_after, grads)]
    top = len(blocks[0])
    assert ratios[:top] == pytest.approx([0.1 * 0.5] * top, rel=1e-3)  # the top block: 0.5 x the head's rate
    assert ratios[top:] == pytest.approx([0.1 * 0.25] * (len(ratios) - top), rel=1e-3)  # the next: 0.25 x


def test_gradual_unfreezing_opens_the_top_block_first_then_the_next():
    x, y, _ = load_digits((0, 1, 2))
    batches = split_of_arrays(x[:64], y[:64], 16).batches(16, training=True)
    model = tiny()
    model.unfreeze(2)
    seen = [_blocks_of(model)]
    recorder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(_blocks_of(model)))
    # AdamW with decoupled weight decay: a closed block is not decayed either
    config = TrainConfig(gradual_unfreeze=True, optimizer="adamw", weight_decay=0.01, fine_tune_epochs=4,
                         fine_tune_min_steps=0)
    extra = compile_fine_tuning(model, config, batches, fine_tune_phase(config, 4, 2))
    model.fit(batches, epochs=4, callbacks=[*extra, recorder], verbose=0)

    def moved(block, epoch):  # did any weight of `block` change during `epoch`?
        return any(not np.array_equal(a, b) for a, b in zip(seen[epoch][block], seen[epoch + 1][block]))

    assert [moved(0, e) for e in range(4)] == [True] * 4  # the top block trains from the first epoch
    assert [moved(1, e) for e in range(4)] == [False, False, True, True]  # the next opens halfway


def _constant_images(values, size=8):
    return np.stack([np.full((size, size, 3), v, np.float32) for v in values])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_labels_as_the_images_and_weigh_them_by_their_classes(kind):
    from kerastl.data.augment import build_mixer
    values = np.array([0.0, 100.0, 200.0])
    labels = np.array([0, 1, 2] * 4)
    size = 64
    batches = tf.data.Dataset.from_tensors((_constant_images(values[labels], size), tf.constant(labels, tf.int32)))
    weights = np.array([1.0, 2.0, 4.0], np.float32)
    x, y, w = next(iter(weighted(mixed(batches, build_mixer(kind, seed=3), 3, False), weights)))
    x, y, w = x.numpy(), y.numpy(), w.numpy()
    assert y.shape == (12, 3) and np.allclose(y.sum(axis=1), 1) and (y >= 0).all()
    assert (y.max(axis=1) < 1).any()  # some labels are mixed
    for image, row in zip(x, y):
        if kind == "mixup":  # pixels are the label's mix of the two images' values
            assert image.mean() == pytest.approx(row @ values, abs=0.5)
        else:  # each class's share of the pixels is its share of the label, to within a row and a column:
            # Keras's CutMix weighs labels by the patch's exact area, its mask covers whole pixels
            shares = [np.isclose(image[..., 0], v).mean() for v in values]
            assert np.allclose(shares, row, atol=2 / size + 1e-6), (shares, row)
    assert np.allclose(w, y @ weights)  # a mixed example weighs its label's mix of the class weights


def test_mixed_labels_train_a_binary_model_with_one_unit():
    from kerastl.data.augment import build_mixer
    labels = np.array([0, 1] * 4)
    batches = tf.data.Dataset.from_tensors((_constant_images(labels * 100.0), tf.constant(labels, tf.int32)))
    x, y = next(iter(mixed(batches, build_mixer("mixup"), 2, True)))
    assert y.shape == (8, 1) and np.allclose(x.numpy()[:, 0, 0, 0], 100 * y.numpy()[:, 0], atol=0.5)


def test_l2_and_max_norm_reach_the_head_and_survive_saving(tmp_path):
    model = tiny(l2=0.01, max_norm=0.5, hidden_units=4)
    assert len(model.losses) == 2  # one L2 penalty per Dense kernel of the head
    compile_classifier(model, TrainConfig(learning_rate=0.5))
    x, y, _ = load_digits((0, 1, 2))
    model.fit(split_of_arrays(x[:32], y[:32], 16).batches(16, training=True), epochs=2, verbose=0)
    for dense in (model.hidden, model.output_dense):
        assert np.linalg.norm(dense.kernel.numpy(), axis=0).max() <= 0.5 + 1e-5
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert again.l2 == 0.01 and again.max_norm == 0.5 and len(again.losses) == 2


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
@pytest.mark.filterwarnings("error:Your input ran out of data")  # every epoch runs to its end
def test_a_run_with_every_recipe_trains_in_both_validation_modes(image_folder, tmp_path):
    from kerastl.runs.run import run_training
    for validation in ("cv", "holdout"):
        config = RunConfig(DataConfig(str(image_folder), augment="flip,mixup:0.4", validation_split=0.25),
                           ModelConfig("simple_cnn", weights=None, image_size=16, from_scratch=False, l2=1e-4),
                           TrainConfig(epochs=2, min_steps=0, fine_tune_epochs=2, fine_tune_min_steps=0,
                                       unfreeze_blocks=2, class_weight="blue=2", sampling="balanced",
                                       schedule="cosine", fine_tune_schedule="plateau", layer_decay=0.5,
                                       gradual_unfreeze=True, loss="focal", validation=validation,
                                       cache_dir=str(tmp_path / "cache"), cv_folds=2),
                           export_dir=str(tmp_path / validation))
        result = run_training(config, verbose=0)
        assert result.class_names == ["blue", "green", "red"]
        scored, other = ("cv_", "val_") if validation == "cv" else ("val_", "cv_")  # the mode it was asked for
        assert 0.0 <= result.metrics[f"{scored}accuracy"] <= 1.0 and np.isfinite(result.metrics[f"{scored}loss"])
        assert not any(key.startswith(other) for key in result.metrics), result.metrics
        card = (tmp_path / validation / "MODEL_CARD.md").read_text()  # the card says how it was trained
        assert "loss focal" in card and "class weights blue=2, sampling balanced, schedules cosine / plateau, " \
            "layer decay 0.5, gradual unfreezing on, head L2 0.0001" in card


def test_layer_rates_and_gradual_unfreezing_are_searchable(tmp_path):
    from kerastl.tune.space import apply_values, check_space, declare
    base = base_config(tmp_path, fine_tune_epochs=2)
    space = check_space({"unfreeze_blocks": [0, 2], "layer_decay": [1.0, 0.5], "gradual_unfreeze": [False, True]},
                        base)
    hp = keras_tuner.HyperParameters()
    hp.values["unfreeze_blocks"] = 2
    values = declare(hp, space)
    hp.values.update(layer_decay=0.5, gradual_unfreeze=True)
    values = declare(hp, space)
    config = apply_values(values, base)
    assert (config.train.layer_decay, config.train.gradual_unfreeze, config.train.unfreeze_blocks) == (0.5, True, 2)


def test_the_search_objective_becomes_macro_f1_when_classes_are_imbalanced(tmp_path, caplog):
    from kerastl.tune.config import TuneConfig
    from kerastl.tune.search import choose_objective
    x, y, names = load_digits((0, 1))
    balanced = from_arrays(x[:100], y[:100], 16, names)
    keep = np.concatenate([np.flatnonzero(y == 0)[:80], np.flatnonzero(y == 1)[:20]])  # 4:1, beyond 3:1
    imbalanced = from_arrays(x[keep], y[keep], 16, names)
    base = base_config(tmp_path)
    assert choose_objective(base.data, TuneConfig(), balanced).objective == "val_accuracy"
    with caplog.at_level(logging.WARNING, "kerastl"):
        assert choose_objective(base.data, TuneConfig(), imbalanced).objective == "val_macro_f1"
    assert "imbalanced 4.0:1 (more than 3:1): the search maximises val_macro_f1" in caplog.text
    assert choose_objective(base.data, TuneConfig(objective="val_loss"), imbalanced).objective == "val_loss"


def test_gradual_openings_spread_over_the_phase_and_the_last_opens_by_its_last_epoch():
    from kerastl.training.schedules import opening_epochs
    assert opening_epochs(2, 4) == [0, 2]
    assert opening_epochs(3, 10) == [0, 3, 6]
    assert opening_epochs(4, 2) == [0, 0, 1, 1]  # more blocks than epochs: several open at once


def test_sample_weights_read_class_indices_given_as_floats_and_binary_shares():
    from kerastl.data.pipelines import sample_weights
    weights = tf.constant([1.0, 2.0, 4.0])
    assert sample_weights(tf.constant([2.0, 0.0]), weights).numpy().tolist() == [4.0, 1.0]
    binary = tf.constant([1.0, 3.0])
    assert sample_weights(tf.constant([[1.0], [0.25]]), binary).numpy().tolist() == [3.0, 1.5]


def test_a_search_refuses_a_loss_that_cannot_take_the_labels_another_setting_gives(tmp_path):
    from kerastl.tune.space import check_space
    with pytest.raises(KerastlError, match="cannot go together: sparse_categorical_crossentropy takes integer"):
        check_space({"loss": ["sparse_categorical_crossentropy", "focal"], "label_smoothing": [0.0, 0.1]},
                    base_config(tmp_path))
    check_space({"loss": ["auto", "focal"], "label_smoothing": [0.0, 0.1], "augment": ["none", "mixup"]},
                base_config(tmp_path))


def test_a_resumed_search_keeps_the_objective_it_started_with(tmp_path):
    import json

    from kerastl.tune.config import TuneConfig
    from kerastl.tune.search import SEARCH_FILE, choose_objective
    x, y, names = load_digits((0, 1))
    keep = np.concatenate([np.flatnonzero(y == 0)[:80], np.flatnonzero(y == 1)[:20]])
    imbalanced = from_arrays(x[keep], y[keep], 16, names)
    tune = TuneConfig(project_dir=str(tmp_path / "project"))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / SEARCH_FILE).write_text(json.dumps({"tune": {"objective": "val_accuracy"}}))
    assert choose_objective(base_config(tmp_path).data, tune, imbalanced).objective == "val_accuracy"
    assert choose_objective(base_config(tmp_path).data, tune, imbalanced, restart=True).objective == "val_macro_f1"


def test_labelled_counts_read_a_folder_or_a_table_without_decoding_images(image_folder, tmp_path, monkeypatch):
    import pandas as pd

    from kerastl.data import sources
    monkeypatch.setattr(sources, "load_data", None)  # nothing is loaded, let alone decoded
    assert sources.labelled_counts(DataConfig(str(image_folder))).tolist() == [8, 8, 8]
    blue, red = sorted((image_folder / "blue").iterdir()), sorted((image_folder / "red").iterdir())
    rows = [(path.relative_to(tmp_path).as_posix(), "blue", "train") for path in blue[:4]] + [
        (red[0].relative_to(tmp_path).as_posix(), "red", "test")]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "t.csv", index=False)
    assert sources.labelled_counts(DataConfig(str(tmp_path / "t.csv"))).tolist() == [4, 0]  # test rows left out
