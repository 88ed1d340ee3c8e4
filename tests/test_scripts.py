"""The worked examples in scripts/ run offline in their quick mode and print (and write) what they say.

Each script is loaded by path (scripts/ is not a package) and run through its `main([...])`
with `--weights none`, a few images per class and one epoch; the tests read the tables
they print and the files they write.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fake_cifar
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
QUICK = ["--weights", "none", "--limit", "5", "--epochs", "1", "--min-steps", "0"]


def load_script(name: str):
    """A script of scripts/ as a module (its helper `_examples` importable beside it)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    if name.startswith("_"):  # the scripts' helper, as they import it
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"example_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table(out: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the printed table whose header starts with `first_header`: first cell -> other cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" | ")[0].strip() == first_header)
    rows = {}
    for index in range(start + 2, len(lines)):
        line, after = lines[index], lines[index + 1] if index + 1 < len(lines) else ""
        if " | " not in line or "-+-" in after:  # the table ends, or another one starts
            break
        cells = [cell.strip() for cell in line.split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_examples_keep_at_most_limit_images_per_class_and_relabel_chosen_classes():
    examples = load_script("_examples")
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    arrays = examples.Arrays(np.arange(len(y))[:, None], y, np.arange(4)[:, None], np.array([0, 1, 2, 2]),
                             ["a", "b", "c"])
    limited = arrays.limited(4, seed=0)
    assert np.bincount(limited.y).tolist() == [4, 3, 4] and len(limited.x_test) == 4
    two = arrays.classes(["c", "a"])
    assert two.class_names == ["c", "a"] and sorted(set(two.y)) == [0, 1]
    assert (two.y == 0).sum() == 5 and two.y_test.tolist() == [1, 0, 0]


def test_compare_backbones_raises_a_size_to_the_registry_minimum():
    compare = load_script("compare_backbones")
    assert compare.size_for("inception_v3", 32) == (75, " (min, not 32)")
    assert compare.size_for("vgg16", None) == (224, "")
    assert compare.size_for("vgg16", 48) == (48, "")


def test_binary_script_refuses_other_than_two_classes_in_one_line(capsys):
    code = load_script("binary_vs_multiclass").main(["--classes", "3,5,8", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "two class names" in err


def test_cifar10_script_without_network_says_so_in_one_line(tmp_path, offline, capsys):
    folder = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    code = load_script("train_cifar10_vgg19").main(["--data", str(folder), "--limit", "2", "--output",
                                                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]  # log lines (if shown) are no errors
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("train_cifar10_vgg19: error: cannot download ImageNet weights for vgg19"), err


@pytest.mark.slow
def test_cifar10_script_trains_vgg19_from_a_cifar_folder_and_exports(tmp_path, capsys):
    folder = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    output = tmp_path / "out"
    assert load_script("train_cifar10_vgg19").main(["--data", str(folder), *QUICK, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "vgg19 at 32x32" in out and "20 test images" in out
    assert set(table(out, "phase")) == {"1: every layer, from scratch", "2: fine-tuning"}
    accuracy = float(out.split("test accuracy: ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
    assert (output / "saved_model.pb").is_file() and f"exported to {output}" in out


@pytest.mark.slow
def test_compare_backbones_tables_each_backbone_at_a_size_it_takes(tmp_path, capsys):
    argv = ["--backbones", "simple_cnn,inception_v3", "--image-size", "32", *QUICK, "--output", str(tmp_path)]
    assert load_script("compare_backbones").main(argv) == 0
    rows = table(capsys.readouterr().out, "backbone")
    assert list(rows) == ["simple_cnn", "inception_v3"]
    assert rows["simple_cnn"][0] == "32" and rows["inception_v3"][0] == "75 (min, not 32)"
    for size, acc, params, per_epoch, seconds, megabytes in rows.values():
        assert 0.0 <= float(acc) <= 1.0 and params.endswith("M")
        assert float(per_epoch) > 0 and float(megabytes) > 0  # from scratch: every epoch runs the whole network
    assert (tmp_path / "inception_v3" / "saved_model.pb").is_file()
    assert len(list(csv.reader(open(tmp_path / "compare_backbones.csv")))) == 3


@pytest.mark.slow
def test_layer_features_probes_every_block_and_kerastls_head(tmp_path, capsys):
    argv = ["--backbone", "simple_cnn", "--image-size", "16", *QUICK, "--output", str(tmp_path)]
    assert load_script("layer_features").main(argv) == 0
    rows = table(capsys.readouterr().out, "features")
    assert list(rows)[:4] == ["probe: block 1 (block1_pool)", "probe: block 2 (block2_pool)",
                              "probe: block 3 (block3_pool)", "probe: all of the above"]
    assert [int(rows[name][0]) for name in list(rows)[:4]] == [32, 64, 128, 224]
    assert [name for name in rows if name.startswith("kerastl: features")] == [list(rows)[4]]
    assert all(0.0 <= float(dims_acc_c[1]) <= 1.0 for dims_acc_c in rows.values())
    assert (tmp_path / "random_backbone.weights.h5").is_file() and (tmp_path / "layer_features.csv").is_file()


@pytest.mark.slow
def test_layer_features_reads_named_layers(tmp_path, capsys):
    argv = ["--backbone", "simple_cnn", "--image-size", "16", "--layers", "block2_conv,block3_pool", *QUICK,
            "--output", str(tmp_path)]
    assert load_script("layer_features").main(argv) == 0
    rows = table(capsys.readouterr().out, "features")
    assert rows["probe: block2_conv"][0] == "64" and rows["probe: block3_pool"][0] == "128"
    assert rows["probe: all of the above"][0] == "192"


@pytest.mark.slow
def test_forgetting_tables_both_methods_and_plots_them(tmp_path, capsys):
    argv = [*QUICK, "--fine-tune-epochs", "1", "--depths", "1", "--lrs", "1e-2", "--output", str(tmp_path)]
    assert load_script("forgetting").main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.split(" | ") for line in out.splitlines() if line.startswith(("LP ", "LP-FT ", "FT "))]
    assert [cells[0].strip() for cells in lines] == ["LP", "LP-FT", "FT"]
    for cells in lines:
        assert all(0.0 <= float(cell) <= 1.0 for cell in cells[-2:])
    png = tmp_path / "forgetting.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 400
    assert (tmp_path / "forgetting.csv").is_file()


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it with -m slow
def test_binary_and_multiclass_heads_are_scored_alike(tmp_path, capsys):
    argv = ["--backbone", "simple_cnn", "--image-size", "16", *QUICK, "--output", str(tmp_path)]
    assert load_script("binary_vs_multiclass").main(argv) == 0
    rows = table(capsys.readouterr().out, "head")
    assert list(rows) == ["binary: 1 sigmoid unit", "multiclass: 2-way softmax"]
    for (acc, loss, auc, seconds, outputs), units in zip(rows.values(), ("1", "2")):
        assert 0.0 <= float(acc) <= 1.0 and 0.0 <= float(auc) <= 1.0 and float(loss) >= 0.0
        assert float(seconds) > 0 and outputs == units
    assert (tmp_path / "binary_vs_multiclass.csv").is_file()
