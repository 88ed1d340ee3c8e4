"""Feature extraction and the phase-1 feature cache."""

import json
import logging
import warnings

import keras
import numpy as np
import pytest
from helpers import digits, frozen_cnn

from kerastl.cli.main import main
from kerastl.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from kerastl.features.batches import feature_batches
from kerastl.features.cache import CachedFeatures, FeatureCache, cache_key
from kerastl.features.probe import ProbeFit, choose_c_holdout, views_or_plain
from kerastl.models.classifier import build_classifier
from kerastl.runs.run import run_training
from kerastl.training.phases import train_classifier


def test_cached_head_training_equals_the_plain_frozen_base_path(tmp_path):
    data = digits()
    model = frozen_cnn(dropout=0.3, hidden_units=16)
    start = model.get_weights()
    dropout_state = model.output_dropout.seed_generator.state.numpy().copy()
    config = TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                         epochs=4, fine_tune_epochs=0, learning_rate=0.01)
    runs = []
    for cached in (False, True):
        model.set_weights(start)
        model.output_dropout.seed_generator.state.assign(dropout_state)
        keras.utils.set_random_seed(7)
        cache = FeatureCache(tmp_path)
        features = (cache.features(model, data.train), cache.features(model, data.validation)) if cached else None
        result = train_classifier(
            model, data.train.batches(16, training=True, seed=5), data.validation.batches(16), config,
            features=features, batch_size=16, seed=5, verbose=0,
        )
        runs.append(([w.copy() for w in model.get_weights()], result.phase1.history))
    (plain_weights, plain_history), (cached_weights, cached_history) = runs
    for plain, cached in zip(plain_weights, cached_weights):
        np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(cached_history[metric], plain_history[metric], rtol=1e-5)
    assert plain_history["val_loss"][-1] < plain_history["val_loss"][0]  # it did learn something


def test_the_model_predicts_what_its_trained_head_predicts_on_features():
    data = digits()
    model = frozen_cnn(hidden_units=8)
    head = model.head_model()
    for weight in head.trainable_weights:  # a trained head, different from the one the model was built with
        weight.assign(np.random.default_rng(3).normal(0, 0.3, weight.shape).astype(np.float32))
    images, _ = data.validation.arrays()
    images = images.astype(np.float32)
    features = model.features_model().predict(images, verbose=0)
    np.testing.assert_allclose(model.predict(images, verbose=0), head.predict(features, verbose=0), atol=1e-5)


def test_cache_key_changes_with_backbone_size_weights_and_data(tmp_path):
    data, other_data = digits(), digits(count=150)
    model = frozen_cnn()
    key = cache_key(model, data.train)
    assert key == cache_key(model, data.train)
    assert key != cache_key(model, other_data.train)
    assert key != cache_key(frozen_cnn(size=48), digits(size=48).train)
    assert key != cache_key(build_classifier(ModelConfig("mobilenet_v2", None, 32, from_scratch=False), 3), data.train)
    retrained = frozen_cnn()
    retrained.set_weights(model.get_weights())
    assert cache_key(retrained, data.train) == key
    weights_file = tmp_path / "b.weights.h5"
    other = frozen_cnn()  # another random start, saved to a file and loaded back
    other.backbone.save_weights(weights_file)
    from_file = build_classifier(ModelConfig("simple_cnn", str(weights_file), 32, from_scratch=False), 3)
    assert cache_key(from_file, data.train) == cache_key(other, data.train) != key


def test_damaged_cache_entries_are_rebuilt_never_used(tmp_path, caplog):
    data = digits()
    model = frozen_cnn()
    cache = FeatureCache(tmp_path)
    first = cache.features(model, data.train)
    key = cache_key(model, data.train)
    entry = tmp_path / key / "features.npy"
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a partial write
    with caplog.at_level(logging.WARNING, logger="kerastl.features.cache"):
        assert cache.load(key) is None
    assert "damaged" in caplog.text
    rebuilt = cache.features(model, data.train)
    np.testing.assert_allclose(rebuilt.features, first.features)
    flipped = bytearray(entry.read_bytes())
    flipped[-5] ^= 0xFF  # same size, one corrupted byte
    entry.write_bytes(bytes(flipped))
    assert cache.load(key) is None
    assert cache.features(model, data.train).features.shape == first.features.shape


def test_augmented_views_differ_and_epochs_rotate_through_them(tmp_path):
    data = digits(count=60)
    model = frozen_cnn()
    cache = FeatureCache(tmp_path)
    cached = cache.features(model, data.train, views=3, augment="rotate:0.3,zoom:0.3", seed=1)
    assert cached.features.shape[0] == 3 and cached.features.shape[1] == data.train.count
    assert not np.allclose(cached.features[0], cached.features[1])
    ds = feature_batches(cached, batch_size=8, training=True, seed=0)
    rows = {tuple(np.round(r, 5)): view for view in range(3) for r in cached.features[view]}
    for epoch in range(4):  # Keras iterates the dataset afresh every epoch
        batches = list(ds.as_numpy_iterator())
        assert sum(len(y) for _, y in batches) == data.train.count
        assert {rows[tuple(np.round(r, 5))] for x, _ in batches for r in x} == {epoch % 3}


def test_view_zero_is_the_plain_images_and_the_others_augmented(tmp_path):
    """Validation and serving see plain images: the views a head trains on start with them."""
    data = digits(count=60)
    model = frozen_cnn()
    cache = FeatureCache(tmp_path)
    views = cache.features(model, data.train, views=3, augment="rotate:0.3,zoom:0.3", seed=1).features
    plain = cache.features(model, data.train).features
    np.testing.assert_allclose(views[0], plain[0], atol=1e-5)
    assert not np.allclose(views[1], plain[0], atol=1e-3) and not np.allclose(views[2], views[1], atol=1e-3)


def test_augmented_views_that_hurt_the_probe_are_left_out_of_training():
    """Augmented views whose features no longer tell the classes apart (here: noise) validate worse
    than the plain view alone, which is then all that phase 1 reads."""
    rng = np.random.default_rng(0)
    labels, held = np.arange(120) % 3, np.arange(60) % 3
    centres = rng.normal(0, 1, (3, 8)) * 2
    plain = centres[labels] + rng.normal(0, 1, (120, 8))
    views = np.stack([plain, rng.normal(0, 3, (120, 8)), rng.normal(0, 3, (120, 8))]).astype(np.float32)
    validation = (centres[held] + rng.normal(0, 1, (60, 8))).astype(np.float32)
    probe, read = views_or_plain(lambda rows: choose_c_holdout(rows, labels, validation, held, 3), views)
    assert read == 1 and probe.estimate["val_accuracy"] > 0.8


@pytest.mark.parametrize("every, plain, expected", [(0.5, 0.6, 3), (0.6, 0.5, 1), (0.5, 0.5, 1), (None, 0.4, 3)])
def test_the_plain_view_alone_is_kept_unless_every_view_validates_better(every, plain, expected):
    def fit(rows):  # a probe whose validation loss depends only on the views it was fitted on
        loss = plain if len(rows) == 1 else every
        return ProbeFit(None, 1.0, np.zeros((2, 2)), np.zeros(2), {} if loss is None else {"val_loss": loss})

    assert views_or_plain(fit, np.zeros((3, 10, 2)))[1] == expected  # no estimate (None): nothing to compare


def test_fit_on_augmented_views_runs_every_epoch_on_its_view(tmp_path):
    data = digits(count=60)
    model = frozen_cnn()
    cache = FeatureCache(tmp_path)
    features = (cache.features(model, data.train, views=2, augment="rotate:0.3", seed=1),
                cache.features(model, data.validation))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_classifier(
            model, data.train.batches(16, training=True), data.validation.batches(16),
            TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                        epochs=5, fine_tune_epochs=0, patience=5), features=features, batch_size=16, verbose=0,
        )
    assert result.phase1.epoch == [0, 1, 2, 3, 4]
    assert not [w for w in caught if "ran out of data" in str(w.message)]  # no epoch cut short


@pytest.mark.slow  # 20-36 s on 2 cores: the default suite stays under 10 minutes
def test_runs_use_the_cache_by_default_and_reuse_it(tmp_path, caplog):
    data = digits()
    config = RunConfig(
        DataConfig(augment="none", batch_size=16),
        ModelConfig("simple_cnn", weights=None, image_size=32, from_scratch=False),
        TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                    epochs=2, fine_tune_epochs=1, cache_dir=str(tmp_path / "cache")),
        export_dir=str(tmp_path / "run1"),
    )
    with caplog.at_level(logging.INFO, logger="kerastl.features.cache"):
        first = run_training(config, data=data, verbose=0)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and validation
    assert "hit" not in caplog.text
    caplog.clear()
    config.export_dir = str(tmp_path / "run2")
    with caplog.at_level(logging.INFO, logger="kerastl.features.cache"):
        run_training(config, data=data, verbose=0)  # the same seed builds the same random base: a hit
    assert caplog.text.count("feature cache hit") == 2 and len(list((tmp_path / "cache").iterdir())) == 2
    caplog.clear()
    config.export_dir, config.data.seed = str(tmp_path / "run2b"), 1
    with caplog.at_level(logging.INFO, logger="kerastl.features.cache"):
        run_training(config, data=data, verbose=0)  # another seed, other random weights: a miss
    assert "hit" not in caplog.text and len(list((tmp_path / "cache").iterdir())) == 4
    config.export_dir, config.train.feature_cache = str(tmp_path / "run3"), False
    config.train.cache_dir = str(tmp_path / "unused")
    run_training(config, data=data, verbose=0)
    assert not (tmp_path / "unused").exists()
    assert json.loads((first.export_dir / "history.json").read_text())["phase2"]["epoch"] == [2]


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_a_pretrained_start_hits_the_cache_whatever_the_seed(tmp_path, caplog):
    data = digits()
    model = frozen_cnn()
    model.backbone.save_weights(tmp_path / "b.weights.h5")
    config = RunConfig(
        DataConfig(augment="none", batch_size=16),
        ModelConfig("simple_cnn", weights=str(tmp_path / "b.weights.h5"), image_size=32),
        TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                    epochs=1, fine_tune_epochs=0, cache_dir=str(tmp_path / "cache")),
    )
    for seed in (0, 1):
        config.export_dir, config.data.seed = str(tmp_path / f"run{seed}"), seed
        with caplog.at_level(logging.INFO, logger="kerastl.features.cache"):
            run_training(config, data=data, verbose=0)
    assert caplog.text.count("feature cache hit") == 2  # the second run reuses train and validation


def test_extract_cli_writes_pooled_layers_with_labels(tmp_path, image_folder, capsys):
    out = tmp_path / "f.npz"
    argv = ["extract", "--data", str(image_folder), "--backbone", "mobilenet_v2", "--weights", "none",
            "--image-size", "32", "--layers", "block_3_project_BN,out_relu", "--out", str(out)]
    assert main(argv) == 0
    saved = np.load(out)
    assert saved["block_3_project_BN"].shape == (24, 32) and saved["out_relu"].shape == (24, 1280)
    assert list(saved["class_names"]) == ["blue", "green", "red"] and sorted(saved["labels"]) == [0] * 8 + [1] * 8 + [2] * 8
    capsys.readouterr()
    assert main([*argv[:-4], "--layers", "nope", "--out", str(out)]) == 2
    assert "not in backbone" in capsys.readouterr().err
    assert main([*argv[:-2], "--out", str(tmp_path / "f.txt")]) == 2


@pytest.mark.parametrize("views", [1, 2])
def test_views_fall_back_to_one_without_augmentation(tmp_path, views):
    data = digits(count=60)
    config = RunConfig(
        DataConfig(augment="none" if views == 1 else "rotate:0.1", batch_size=16),
        ModelConfig("simple_cnn", weights=None, image_size=32, from_scratch=False),
        TrainConfig(validation="holdout", min_steps=0, fine_tune_min_steps=0,
                    epochs=2, fine_tune_epochs=0, cache_views=2, cache_dir=str(tmp_path / "cache")),
        export_dir=str(tmp_path / "run"),
    )
    run_training(config, data=data, verbose=0)
    shapes = sorted(json.loads((p / "meta.json").read_text())["shape"][0] for p in (tmp_path / "cache").iterdir())
    assert shapes == sorted([1, views])  # validation is always one plain view


def test_cross_validation_reads_its_plain_view_from_the_training_views(tmp_path, caplog):
    data = digits(count=30)
    config = RunConfig(
        DataConfig(augment="rotate:0.1", batch_size=16),
        ModelConfig("simple_cnn", weights=None, image_size=32, from_scratch=False),
        TrainConfig(validation="cv", min_steps=0, fine_tune_min_steps=0, epochs=2, fine_tune_epochs=0,
                    cache_views=2, cache_dir=str(tmp_path / "cache")),
        export_dir=str(tmp_path / "run"),
    )
    with caplog.at_level(logging.INFO, logger="kerastl"):
        run_training(config, data=data, verbose=0)
    entries = [json.loads((p / "meta.json").read_text())["shape"] for p in (tmp_path / "cache").iterdir()]
    assert [shape[0] for shape in entries] == [2]  # the plain view 0 and one augmented: extracted once
    plan = json.loads((tmp_path / "run" / "config.json").read_text())["plan"]
    decided = [r.getMessage() for r in caplog.records if "training reads" in r.getMessage()]
    assert len(decided) == 1  # the choice is logged once, and the record says what it decided
    assert plan["cached_views"] == (1 if decided[0].endswith("the plain view") else 2)


def test_entries_over_the_memory_limit_are_memory_mapped_and_streamed(tmp_path):
    data = digits(count=60)
    model = frozen_cnn()
    FeatureCache(tmp_path).features(model, data.train)
    entry = FeatureCache(tmp_path, memory_limit_mb=0).load(cache_key(model, data.train))
    assert isinstance(entry.features, np.memmap)
    ds = feature_batches(entry, batch_size=8, training=True, seed=0)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 6
    epoch1 = np.concatenate([x for x, _ in batches])
    np.testing.assert_allclose(np.sort(epoch1, axis=0), np.sort(np.asarray(entry.features[0]), axis=0))
    plain = feature_batches(entry, batch_size=8)
    assert sum(len(y) for _, y in plain.as_numpy_iterator()) == 42


def test_an_entry_another_process_already_stored_is_kept(tmp_path):
    cache = FeatureCache(tmp_path)
    labels = np.arange(4, dtype=np.int32)
    cache.save("k", CachedFeatures(np.ones((1, 4, 3), np.float32), labels))
    cache.save("k", CachedFeatures(np.zeros((1, 4, 3), np.float32), labels))  # a second worker, same key
    assert np.array_equal(cache.load("k").features, np.ones((1, 4, 3), np.float32))
    assert [path.name for path in tmp_path.iterdir()] == ["k"]  # no staging folder left behind
