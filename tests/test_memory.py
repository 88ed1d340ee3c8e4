"""Bounded memory: chunked BatchNorm recalibration and streamed feature extraction."""

import dataclasses
import tracemalloc

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import frozen_cnn

from kerastl.config import ModelConfig
from kerastl.data.images import from_arrays
from kerastl.features.cache import FeatureCache, cache_key
from kerastl.models.classifier import build_classifier
from kerastl.training.batchnorm import BatchNormCalibration, Moments, recalibrate_batchnorm

SAMPLE = 40


@pytest.fixture(scope="module")
def scratch_model():
    """A from-scratch MobileNetV2 at 32 px: 52 BatchNorm layers, the first right after the stem conv."""
    keras.utils.set_random_seed(0)
    return build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32), 3)


@pytest.fixture(scope="module")
def sample():
    """uint8 images with per-channel offsets, so that the statistics are far from 0 and 1."""
    rng = np.random.default_rng(0)
    images = rng.normal((60, 120, 200), 40, (SAMPLE, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def _statistics(model) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
            for layer in model.batchnorm_layers()]


def _first_norm_inputs(model, images) -> np.ndarray:
    """The first BatchNorm's inputs, computed without any BatchNorm, in float64."""
    first = model.batchnorm_layers()[0]
    taps = keras.Model(model.backbone.inputs, first.input)
    inputs = taps(model.preprocess_images(tf.constant(images, tf.float32)), training=False)
    return np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])


def test_moments_pool_groups_into_the_exact_population_statistics():
    rng = np.random.default_rng(1)
    rows = rng.normal(50.0, 3.0, (103, 4))
    moments = Moments()
    for start in range(0, 103, 17):  # groups of 17 and a last of 1
        group = rows[start : start + 17]
        moments.add(len(group), group.mean(0), group.var(0))
    np.testing.assert_allclose(moments.mean, rows.mean(0), rtol=1e-13)
    np.testing.assert_allclose(moments.variance, rows.var(0), rtol=1e-11)
    assert moments.count == 103


@pytest.mark.parametrize("chunk_size", [8, 7, 16, SAMPLE, 64])  # divides, does not, one chunk, more than all
def test_first_batchnorm_gets_the_exact_sample_statistics_at_any_chunk_size(scratch_model, sample, chunk_size):
    inputs = _first_norm_inputs(scratch_model, sample)
    assert recalibrate_batchnorm(scratch_model, sample, chunk_size=chunk_size) == 52
    mean, variance = _statistics(scratch_model)[0]
    np.testing.assert_allclose(mean, inputs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance, inputs.var(0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(variance, 1.0, atol=0.5)  # real statistics, not a layer left at 0/1


@pytest.mark.parametrize("chunk_size", [16, SAMPLE])
def test_every_layer_pools_the_batch_statistics_of_its_chunks(scratch_model, sample, chunk_size):
    norms = scratch_model.batchnorm_layers()
    momenta = [layer.momentum for layer in norms]
    chunks = []  # by hand: one training-mode pass per chunk with momentum 0 sets the chunk's statistics
    try:
        for layer in norms:
            layer.momentum = 0.0
        for start in range(0, SAMPLE, chunk_size):
            chunk = tf.constant(sample[start : start + chunk_size], tf.float32)
            scratch_model.backbone(scratch_model.preprocess_images(chunk), training=True)
            chunks.append((len(chunk), _statistics(scratch_model)))
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    recalibrate_batchnorm(scratch_model, sample, chunk_size=chunk_size)
    for index, (mean, variance) in enumerate(_statistics(scratch_model)):
        weights = np.array([n for n, _ in chunks], np.float64)[:, None] / SAMPLE
        means = np.array([stats[index][0] for _, stats in chunks], np.float64)
        variances = np.array([stats[index][1] for _, stats in chunks], np.float64)
        expected_mean = (weights * means).sum(0)
        expected_variance = (weights * (variances + means**2)).sum(0) - expected_mean**2
        np.testing.assert_allclose(mean, expected_mean, rtol=2e-4, atol=1e-5, err_msg=norms[index].name)
        np.testing.assert_allclose(variance, expected_variance, rtol=2e-4, atol=1e-5, err_msg=norms[index].name)


def test_momentum_and_frozen_flags_are_restored_even_after_an_error(sample):
    model = build_classifier(ModelConfig("mobilenet_v2", weights=None, image_size=32, from_scratch=False), 3)
    norms = model.batchnorm_layers()
    norms[3].momentum = 0.9
    flags = [(layer.momentum, layer.trainable) for layer in norms]
    assert not any(trainable for _, trainable in flags)  # a frozen transfer backbone
    recalibrate_batchnorm(model, sample, chunk_size=16)
    assert [(layer.momentum, layer.trainable) for layer in norms] == flags
    assert not np.allclose(norms[0].moving_mean.numpy(), 0)  # frozen layers were calibrated all the same
    with pytest.raises(Exception):
        recalibrate_batchnorm(model, np.zeros((4, 32, 32, 5), np.uint8))  # five channels: the backbone refuses
    assert [(layer.momentum, layer.trainable) for layer in norms] == flags


def test_the_callback_keeps_its_sample_as_given_and_calibrates_before_each_validation(scratch_model, sample):
    callback = BatchNormCalibration(sample, chunk_size=16)
    callback.set_model(scratch_model)  # as `fit` does
    for layer in scratch_model.batchnorm_layers():  # statistics that calibration must replace
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape))
    callback.on_test_begin()
    callback.on_test_begin()  # the next validation
    assert callback.images is sample and callback.images.dtype == np.uint8
    assert callback._calibrator._forward.experimental_get_tracing_count() == 1  # traced once for every validation
    calibrated = _statistics(scratch_model)
    assert not np.allclose(calibrated[0][0], 0)
    recalibrate_batchnorm(scratch_model, sample, chunk_size=16)
    for (mean, variance), (again_mean, again_variance) in zip(calibrated, _statistics(scratch_model)):
        np.testing.assert_allclose(mean, again_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variance, again_variance, rtol=1e-5, atol=1e-6)


def _images(count: int, size: int = 16):
    rng = np.random.default_rng(2)
    return from_arrays(rng.integers(0, 256, (count, size, size, 3), np.uint8), np.arange(count) % 3, size,
                       validation_split=0.0)


def _extracted(cache: FeatureCache, model, split, **kwargs):
    """The cache's features of `split`, and the peak of numpy and Python allocations meanwhile."""
    tracemalloc.start()
    try:
        entry = cache.features(model, split, **kwargs)
        return entry, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_extraction_streams_into_one_array_or_over_the_limit_into_the_entry_file(tmp_path):
    data, model = _images(4000), frozen_cnn(size=16)
    views = dict(views=4, augment="flip", seed=1)
    in_memory, memory_peak = _extracted(FeatureCache(tmp_path / "a"), model, data.train, **views)
    on_disk_cache = FeatureCache(tmp_path / "b", memory_limit_mb=0)
    on_disk, disk_peak = _extracted(on_disk_cache, model, data.train, **views)
    assert isinstance(on_disk.features, np.memmap) and not isinstance(in_memory.features, np.memmap)
    assert on_disk.features.shape == in_memory.features.shape == (4, 4000, 128)
    np.testing.assert_allclose(on_disk.features, in_memory.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(on_disk.labels, in_memory.labels)
    size = in_memory.features.nbytes  # 7.8 MB; extracting holds ~2.6 MB of other allocations
    assert memory_peak < 1.5 * size  # one array, not batches collected then stacked (2x)
    assert disk_peak < size / 2  # never collected in memory
    key = cache_key(model, data.train, 4, "flip", 1)
    assert [path.name for path in (tmp_path / "b").iterdir()] == [key]  # no staging folder left
    np.testing.assert_array_equal(on_disk_cache.load(key).features, on_disk.features)  # its checksums hold
    np.testing.assert_array_equal(FeatureCache(tmp_path / "b").load(key).features, in_memory.features)


@pytest.mark.parametrize("limit_mb", [0, 2048])
def test_a_split_with_fewer_images_than_it_counts_leaves_no_hole(tmp_path, limit_mb):
    data, model = _images(50), frozen_cnn(size=16)
    short = dataclasses.replace(data.train, count=data.train.count + 7)  # e.g. a dataset that skips bad files
    entry = FeatureCache(tmp_path, memory_limit_mb=limit_mb).features(model, short, views=2, augment="flip", seed=3)
    assert entry.features.shape == (2, 50, 128) and len(entry.labels) == 50
    plain = FeatureCache(tmp_path / "plain").features(model, data.train, views=2, augment="flip", seed=3)
    np.testing.assert_allclose(entry.features, plain.features, rtol=1e-6, atol=1e-6)
    reloaded = FeatureCache(tmp_path, memory_limit_mb=limit_mb).load(cache_key(model, short, 2, "flip", 3))
    np.testing.assert_array_equal(reloaded.features, entry.features)
