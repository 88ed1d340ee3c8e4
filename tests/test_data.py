"""Data sources and pipelines."""

import logging
import pickle

import numpy as np
import pytest
from helpers import CIFAR_NAMES, write_class_folder, write_fake_cifar

from kerastl.config import DataConfig
from kerastl.data.augment import build_augmenter, parse_augment
from kerastl.data.images import from_arrays, from_folder, load_cifar10, load_data, load_digits
from kerastl.errors import KerastlError


def test_folder_reads_every_format_in_class_order_with_stratified_splits(image_folder):
    data = from_folder(image_folder, 16, validation_split=0.25, test_split=0.25, seed=0)
    assert data.class_names == ["blue", "green", "red"]
    assert (data.train.count, data.validation.count, data.test.count) == (12, 6, 6)
    for split in (data.train, data.validation, data.test):
        x, y = split.arrays()
        assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8
        assert sorted(np.bincount(y)) == [split.count // 3] * 3
    x, y = data.train.arrays()
    # class k's images are dominated by its colour: order is kept from folder to label
    dominant = {"blue": 2, "green": 1, "red": 0}
    for label, name in enumerate(data.class_names):
        assert np.all(x[y == label].mean(axis=(1, 2)).argmax(axis=1) == dominant[name])


def test_unreadable_files_are_skipped_up_front_with_one_warning(image_folder, caplog):
    (image_folder / "red" / "notes.txt").write_text("not an image")
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING, logger="kerastl.data.images"):
        data = from_folder(image_folder, 16, validation_split=0.0)
    assert "skipped 2 files" in caplog.text and "notes.txt" in caplog.text and "broken.png" in caplog.text
    assert data.train.count == 24  # both left out before the pipeline is built...
    x, y = data.train.arrays()
    assert len(x) == len(y) == 24  # ...so the count matches the images (tests/test_damaged_images.py has the rest)


def test_bad_folders_fail_with_one_clear_sentence(tmp_path, image_folder):
    with pytest.raises(KerastlError, match="does not exist"):
        from_folder(tmp_path / "missing", 16)
    (image_folder / "empty").mkdir()
    with pytest.raises(KerastlError, match="empty has no images"):
        from_folder(image_folder, 16)
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    with pytest.raises(KerastlError, match="only one class folder"):
        from_folder(single, 16)


def test_separate_validation_folder_must_have_the_same_classes(tmp_path, image_folder):
    write_class_folder(tmp_path / "val", per_class=2)
    data = from_folder(image_folder, 16, validation_dir=str(tmp_path / "val"))
    assert (data.train.count, data.validation.count) == (24, 6)
    write_class_folder(tmp_path / "other", per_class=2, colours={"cat": (1, 2, 3), "dog": (4, 5, 6)})
    with pytest.raises(KerastlError, match="expected"):
        from_folder(image_folder, 16, validation_dir=str(tmp_path / "other"))


def test_augmentation_is_never_cached_and_differs_between_epochs():
    x, y, names = load_digits((0, 1))
    data = from_arrays(x[:64], y[:64], 32, names, validation_split=0.0)
    augmenter = build_augmenter("rotate:0.2,zoom:0.2", seed=3)
    plain = data.train.batches(64, training=True, seed=1)
    augmented = data.train.batches(64, training=True, augmenter=augmenter, seed=1)
    epoch1, epoch2 = [next(iter(augmented))[0].numpy() for _ in range(2)]
    clean1, clean2 = [next(iter(plain))[0].numpy() for _ in range(2)]
    # the same shuffle seed yields the same order; sort by content to compare sets of images
    assert np.array_equal(np.sort(clean1.reshape(64, -1), 0), np.sort(clean2.reshape(64, -1), 0))
    assert not np.array_equal(np.sort(epoch1.reshape(64, -1), 0), np.sort(epoch2.reshape(64, -1), 0))
    validation = data.train.batches(64, training=False)
    assert np.array_equal(next(iter(validation))[0].numpy(), next(iter(validation))[0].numpy())


def test_augment_presets_and_layer_lists():
    assert parse_augment("none") == []
    assert [name for name, _ in parse_augment("standard")] == ["flip", "rotate", "zoom", "translate", "contrast"]
    assert parse_augment("flip,rotate:0.3") == [("flip", 0.0), ("rotate", 0.3)]
    with pytest.raises(KerastlError, match="unknown augmentation 'spin'"):
        parse_augment("spin")
    with pytest.raises(KerastlError, match="not a number"):
        parse_augment("rotate:lots")
    images = np.full((2, 16, 16, 3), 128.0, np.float32)
    for preset in ("light", "standard", "strong"):
        out = build_augmenter(preset, seed=0)(images, training=True)
        assert out.shape == images.shape


def test_grayscale_arrays_become_rgb_and_digits_are_renumbered():
    x, y, names = load_digits((5, 7))
    assert names == ["5", "7"] and set(y) == {0, 1} and x.shape[1:] == (8, 8, 1) and x.max() == 255
    data = from_arrays(x, y, 24, names, validation_split=0.1)
    images, _ = data.train.arrays()
    assert images.shape[1:] == (24, 24, 3)
    assert np.array_equal(images[..., 0], images[..., 2])


def test_cifar10_from_an_extracted_folder(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(root, per_class=2, test_per_class=2, train_batches=2)
    (x, y), (x_test, y_test), names = load_cifar10(str(root))
    assert x.shape == (40, 32, 32, 3) and y.shape == (40,) and x_test.shape == (20, 32, 32, 3)
    assert names == CIFAR_NAMES
    with open(root / "data_batch_1", "rb") as handle:
        first = pickle.load(handle)[b"data"][0]
    np.testing.assert_array_equal(x[0, :, :, 0].reshape(-1), first[:1024])  # channel-major rows -> HWC
    data = load_data(DataConfig(source=str(root), validation_split=0.5), 32)
    assert data.class_names == names and data.test.count == 20 and data.validation.count == 20


def test_cifar10_download_failure_is_one_sentence(offline):
    with pytest.raises(KerastlError, match="cannot download CIFAR-10 .*cifar-10-batches-py folder"):
        load_cifar10()
