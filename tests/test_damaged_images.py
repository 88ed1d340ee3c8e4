"""Damaged and odd image files: they never crash training, and `check_data` reports every one."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import numpy as np
import pytest
from helpers import COLOURS, noisy_pixels
from PIL import Image, ImageFile

from kerastl.config import DataConfig
from kerastl.data.checks import check_data
from kerastl.data.imagefiles import IGNORED, SKIPPED, USED, list_class_folder
from kerastl.data.images import _decode_in_tensorflow, from_folder, load_data
from kerastl.errors import KerastlError

RED, BLUE = COLOURS["red"], COLOURS["blue"]  # class "cat" is red, class "dog" blue


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_faulty_folder(root) -> dict[str, tuple[str, str]]:
    """Two classes with every kind of problem file; returns {name: (action, finding)} for each one."""
    cat, dog = root / "cat", root / "dog"
    (cat / ".thumbnails").mkdir(parents=True)
    dog.mkdir()
    red, blue = Image.fromarray(noisy_pixels(RED)), Image.fromarray(noisy_pixels(BLUE, seed=1))
    for i, name in enumerate(("0.jpg", "1.png", "2.JPG", "3.PNG")):  # ordinary images, upper-case extensions
        Image.fromarray(noisy_pixels(RED, seed=10 + i)).save(cat / name, "JPEG" if "j" in name.lower() else "PNG")
    for i, name in enumerate(("0.jpg", "1.png", "2.jpeg")):
        Image.fromarray(noisy_pixels(BLUE, seed=20 + i)).save(dog / name, "JPEG" if "j" in name else "PNG")
    (cat / "truncated.jpg").write_bytes(_encoded(red, "JPEG")[:300])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "png_named.jpg").write_bytes(_encoded(red, "PNG"))
    red.convert("L").save(cat / "gray.png")
    red.convert("RGBA").save(cat / "rgba.png")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / ".thumbnails" / "0.jpg").write_bytes(_encoded(red, "JPEG"))
    (cat / "notes.txt").write_text("photographed in 2021")
    blue.save(dog / "plain.bmp")
    blue.convert("P").save(dog / "palette.png")
    blue.convert("CMYK").save(dog / "cmyk.jpg")
    blue.save(dog / "animated.gif", save_all=True, append_images=[red], duration=100, loop=0)
    blue.save(dog / "photo.webp")
    (dog / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "README.md").write_text("cats and dogs")
    return {
        "cat/truncated.jpg": (SKIPPED, "damaged JPEG"),
        "cat/empty.jpg": (SKIPPED, "zero-byte file"),
        "cat/notes.txt": (SKIPPED, "not an image"),
        "dog/photo.webp": (SKIPPED, "WebP image"),
        "cat/png_named.jpg": (USED, "PNG file named .jpg"),
        "cat/gray.png": (USED, "grayscale"),
        "cat/rgba.png": (USED, "transparency"),
        "dog/palette.png": (USED, "palette PNG"),
        "dog/cmyk.jpg": (USED, "CMYK JPEG"),
        "dog/animated.gif": (USED, "animated GIF"),
        "cat/.DS_Store": (IGNORED, "hidden file"),
        "cat/.thumbnails": (IGNORED, "hidden folder"),
        "dog/._photo.jpg": (IGNORED, "hidden file"),
        "README.md": (IGNORED, "not in a class folder"),
    }


@pytest.fixture
def faulty_folder(tmp_path):
    """(root, expected findings): 7 usable images per class and 14 problem files."""
    root = tmp_path / "pets"
    return root, write_faulty_folder(root)


def test_check_data_reports_every_problem_file_and_what_happens_to_it(faulty_folder):
    root, expected = faulty_folder
    report = check_data(root)
    found = {f.name: f for f in report.findings}
    assert sorted(found) == sorted(expected)  # every problem file, and nothing about ordinary images
    for name, (action, finding) in expected.items():
        assert found[name].action == action and finding in found[name].finding, found[name]
    assert report.class_names == ["cat", "dog"] and report.counts == [7, 7]
    assert report.can_train and report.exit_code == 1
    assert "convert it to PNG or JPEG" in found["dog/photo.webp"].detail
    assert found["cat/gray.png"].what_happens == "used: copied to 3 channels"
    assert found["dog/animated.gif"].what_happens == "used: first frame only"
    text = report.format()
    assert text.splitlines()[2].split() == ["file", "finding", "what", "happens"]
    assert all(name in text for name in expected)
    assert text.splitlines()[-1] == report.summary()
    assert report.summary().startswith("14 usable images in 2 classes; 4 skipped, 4 ignored, 6 used with a note")


def test_check_data_predicts_exactly_the_files_training_skips(faulty_folder, caplog):
    root, _ = faulty_folder
    pillow, tensorflow = check_data(root), check_data(root, decode=_decode_in_tensorflow)
    assert [f.name for f in pillow.skipped] == [f.name for f in tensorflow.skipped]
    assert pillow.counts == tensorflow.counts
    with caplog.at_level(logging.WARNING, logger="kerastl.data.images"):
        data = from_folder(root, 16, validation_split=0.0)  # what training reads
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.startswith(f"skipped {len(pillow.skipped)} files") and data.skipped == len(pillow.skipped)
    assert all(f"pets/{f.name}" in message for f in pillow.skipped), message
    assert np.bincount(data.train.labels).tolist() == pillow.counts


def test_training_skips_undecodable_files_with_one_warning(faulty_folder, caplog):
    root, expected = faulty_folder
    with caplog.at_level(logging.WARNING, logger="kerastl.data.images"):
        data = from_folder(root, 16, validation_split=0.0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    skipped = [name for name, (action, _) in expected.items() if action == SKIPPED]
    assert all(f"pets/{name}" in warnings[0].getMessage() for name in skipped)
    assert "kerastl check-data" in warnings[0].getMessage()
    split = data.train
    assert split.count == 14 and np.bincount(split.labels).tolist() == [7, 7]
    for _ in range(2):  # two epochs: nothing dropped mid-epoch, labels still match the images
        images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in split.batches(4, training=True, seed=0)])
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert len(images) == split.count and sorted(labels.tolist()) == sorted(split.labels.tolist())
        red, blue = images[..., 0].mean(axis=(1, 2)), images[..., 2].mean(axis=(1, 2))
        assert np.all(red[labels == 0] >= blue[labels == 0]) and np.all(blue[labels == 1] > red[labels == 1] + 100)


def test_every_image_reaches_the_model_with_three_channels(faulty_folder):
    root, _ = faulty_folder
    data = from_folder(root, 16, validation_split=0.25, seed=0)
    for split in (data.train, data.validation):
        for x, _ in split.batches(3):
            assert x.shape[1:] == (16, 16, 3)
    x, y = data.train.arrays()
    gray = x[(y == 0) & (np.ptp(x, axis=-1).max(axis=(1, 2)) == 0)]
    assert len(gray) <= 1  # at most the grayscale cat, its channel copied three times


def test_strict_fails_before_training_on_a_bad_file(faulty_folder, tmp_path):
    root, _ = faulty_folder
    # the listing finds three without decoding anything, so strict stops there
    with pytest.raises(KerastlError, match=r"^3 files cannot be used as images: pets/cat/empty.jpg") as caught:
        from_folder(root, 16, strict=True)
    assert "kerastl check-data" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(KerastlError, match="cannot be used as images"):
        load_data(DataConfig(source=str(root), strict=True), 16)
    # a file that only decoding reveals (a truncated JPEG) fails too, naming the file
    clean = tmp_path / "clean"
    for name, rgb in (("cat", RED), ("dog", BLUE)):
        (clean / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(noisy_pixels(rgb, seed=i)).save(clean / name / f"{i}.jpg")
    assert from_folder(clean, 16, strict=True, validation_split=0.0).train.count == 4
    (clean / "dog" / "cut.jpg").write_bytes((clean / "dog" / "0.jpg").read_bytes()[:200])
    with pytest.raises(KerastlError, match=r"1 files cannot be used as images: clean/dog/cut.jpg \(damaged JPEG\)"):
        from_folder(clean, 16, strict=True)


def test_listing_decodes_nothing_and_needs_no_tensorflow(faulty_folder, monkeypatch):
    root, _ = faulty_folder
    code = f"import sys; import kerastl.data.imagefiles as f; f.list_class_folder({str(root)!r}); " \
           "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the listing decoded an image"))
    listing = list_class_folder(root)
    assert listing.counts() == [8, 7]  # the truncated JPEG is only found by decoding
    assert {f.name for f in listing.skipped} == {"cat/empty.jpg", "cat/notes.txt", "dog/photo.webp"}


def test_a_class_left_without_readable_images_is_one_sentence(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.fromarray(noisy_pixels(BLUE)).save(root / "dog" / "0.png")
    (root / "cat" / "0.jpg").write_bytes(_encoded(Image.fromarray(noisy_pixels(RED)), "JPEG")[:200])
    with pytest.raises(KerastlError, match=r"class folder .*cat has no images kerastl can read") as caught:
        from_folder(root, 16)
    assert "\n" not in str(caught.value)
    report = check_data(root)  # the report explains instead of raising
    assert not report.can_train and report.exit_code == 2 and "cannot train" in report.summary()
    assert [f.name for f in report.skipped] == ["cat/0.jpg"]


def test_bmps_tensorflow_would_misread_are_skipped(tmp_path):
    root = tmp_path / "bmp"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(noisy_pixels(BLUE)).save(root / name / "rgb.bmp")
    blue = Image.fromarray(noisy_pixels(BLUE))
    blue.convert("P").save(root / "a" / "palette.bmp")  # TensorFlow reads palette indices as grey levels
    blue.convert("1").save(root / "a" / "onebit.bmp")
    blue.convert("L").save(root / "b" / "gray.bmp")  # a grey palette: read correctly
    (root / "b" / "padded.bmp").write_bytes((root / "b" / "rgb.bmp").read_bytes() + b"\x00\x00")
    found = {f.name: f for f in check_data(root).findings}
    assert {name for name, f in found.items() if f.action == SKIPPED} == {"a/palette.bmp", "a/onebit.bmp",
                                                                         "b/padded.bmp"}
    assert found["b/gray.bmp"].finding == "grayscale"
    assert "convert it to PNG" in found["a/palette.bmp"].detail


def test_cmyk_jpeg_reaches_the_model_in_its_true_colours():
    import tensorflow as tf

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8], rgb[8:] = RED, BLUE
    cmyk = _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)  # Pillow writes Adobe CMYK
    decoded = tf.io.decode_image(cmyk, channels=3, expand_animations=False).numpy().astype(int)
    assert np.abs(decoded - rgb).max() < 20  # converted to RGB, not read inverted or as three of four channels
    assert np.abs(decoded - np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))).max() <= 3


def test_the_skip_warning_names_at_most_twenty_files(image_folder, caplog):
    for i in range(25):
        (image_folder / "red" / f"note{i:02d}.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="kerastl.data.images"):
        data = from_folder(image_folder, 16, validation_split=0.0)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.startswith("skipped 25 files") and "note19.txt" in message and "note20.txt" not in message
    assert "and 5 more" in message and data.train.count == 24


def test_a_separate_validation_folder_is_checked_the_same_way(faulty_folder, tmp_path, caplog):
    root, _ = faulty_folder
    write_faulty_folder(tmp_path / "val")
    with caplog.at_level(logging.WARNING, logger="kerastl.data.images"):
        data = from_folder(root, 16, validation_dir=str(tmp_path / "val"))
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.startswith("skipped 8 files") and "pets/cat/truncated.jpg" in message
    assert "val/cat/truncated.jpg" in message
    assert data.train.count == data.validation.count == 14
    assert len(data.validation.arrays()[0]) == 14
