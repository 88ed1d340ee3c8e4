"""The `kerastl` command, called through `main(argv)`."""

import argparse
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
from helpers import SMALL, noisy_pixels, write_class_folder
from PIL import Image

from kerastl.cli.arguments import build_parser, in_flags
from kerastl.cli.main import main
from kerastl.config import RunConfig


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_v2_s" in out and "nasnet_large" in out and "simple_cnn" in out
    assert main(["backbones", "vgg*"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["vgg16", "vgg19"]
    assert lines[1].split()[1:4] == ["224", "32", "yes"]
    assert main(["backbones", "simple_cnn", "--blocks"]) == 0  # the block numbers --features reads
    blocks = capsys.readouterr().out.split("the last is the backbone's output)")[1].split()
    assert blocks == ["1", "block1_pool", "32", "2", "block2_pool", "64", "3", "block3_pool", "128"]


def test_train_then_predict(image_folder, tmp_path, capsys):
    export = tmp_path / "out"
    config = tmp_path / "run.json"
    RunConfig.from_dict({"train": {"learning_rate": 0.01, "fine_tune_epochs": 0, "validation": "holdout"},
                         "data": {"augment": "none"}}).to_json(config)
    code = main(["train", "--data", str(image_folder), "--config", str(config), "--export", str(export), *SMALL,
                 "--epochs", "2", "--batch-size", "8", "--no-cache", "--cache-views", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"wrote {export}" in out and "val_accuracy" in out
    saved = RunConfig.from_json(export / "config.json")
    assert saved.train.learning_rate == 0.01  # from the config file
    assert saved.train.epochs == 2 and saved.data.batch_size == 8  # flags override it
    assert saved.model.weights is None
    assert saved.train.feature_cache is False and saved.train.cache_views == 3

    image = image_folder / "red" / "0.png"
    assert main(["predict", "--model", str(export), str(image), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and line.count(",") == 1
    assert main(["predict", "--model", str(export), "--json", str(image), str(image)]) == 0
    rows = [json.loads(row) for row in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["image"] == str(image)
    assert set(rows[0]["probabilities"]) == {"blue", "green", "red"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
    assert rows[0]["top"][0]["probability"] == max(rows[0]["probabilities"].values())


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, image_folder, fails_cleanly):
    export = tmp_path / "never"
    train = ["train", "--export", str(export)]
    empty = tmp_path / "empty_class"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "a" / "x.png").write_bytes((image_folder / "red" / "0.png").read_bytes())
    single = tmp_path / "single"
    (single / "a").mkdir(parents=True)
    cases = [
        ([*train, *SMALL], "no data source"),
        ([*train, "--data", str(tmp_path / "missing"), *SMALL], "does not exist"),
        ([*train, "--data", str(empty), *SMALL], "has no images"),
        ([*train, "--data", str(single), *SMALL], "only one class"),
        ([*train, "--data", str(image_folder), "--backbone", "resnet9000"], "unknown backbone"),
        ([*train, "--data", str(image_folder), "--backbone", "xception", "--image-size", "64"], "too small"),
        ([*train, "--data", str(image_folder), "--epochs", "0"], "below the minimum"),
        ([*train, "--data", str(image_folder), "--batch-size", "many"], "not a whole number"),
        ([*train, "--data", str(image_folder), "--validation-split", "1.5"], "not in [0, 1)"),
        ([*train, "--data", str(image_folder), "--augment", "spin"], "unknown augmentation"),
        ([*train, "--data", str(image_folder), "--weights", str(tmp_path / "no.weights.h5")], "does not exist"),
        ([*train, "--data", str(image_folder), "--config", str(tmp_path / "no.json")], "does not exist"),
        ([*train, "--data", str(image_folder), "--pooling", "median"], "invalid choice"),
        ([*train, "--data", str(image_folder), "--optimizer", "teleport"], "unknown optimizer 'teleport'"),
        ([*train, "--data", str(image_folder), "--loss", "vibes"], "invalid choice: 'vibes' (choose from 'auto', "),
        ([*train, "--data", str(image_folder), "--loss", "binary_focal"], "does not fit a softmax model"),
        ([*train, "--data", str(image_folder), "--binary", "--loss", "focal"], "does not fit a binary"),
        ([*train, "--data", str(image_folder), "--loss", "sparse_categorical_crossentropy", "--augment", "mixup"],
         "integer labels only"),
        ([*train, "--data", str(image_folder), "--augment", "mixup,cutmix"], "more than one of mixup, cutmix"),
        ([*train, "--data", str(image_folder), "--class-weight", "heavy"], "class_weight must be none, auto"),
        ([*train, "--data", str(image_folder), "--class-weight", "blue=2,purple=1"], "unknown classes ['purple']"),
        ([*train, "--data", str(image_folder), "--class-weight", "1,2"], "gives 2 weights but there are 3"),
        ([*train, "--data", str(image_folder), "--layer-decay", "1.5"], "not in (0, 1]"),
        ([*train, "--data", str(image_folder), "--schedule", "step"], "invalid choice"),
        ([*train, "--data", str(image_folder), "--features", "deep"], "last, auto, all or block numbers"),
        ([*train, "--data", str(image_folder), "--features", "0,2"], "last, auto, all or block numbers"),
        ([*train, "--data", str(image_folder), "--unfreeze-blocks", "deep"], "not a whole number"),
        ([*train, "--data", str(image_folder), "--validation", "vibes"], "invalid choice"),
        ([*train, "--data", str(image_folder), "--cv-folds", "1"], "below the minimum"),
        (["train", "--bogus-flag"], "unrecognized arguments"),
        (["predict", "--model", str(tmp_path), "x.png"], "not a kerastl export"),
        (["frobnicate"], "invalid choice"),
        (["backbones", "alexnet*"], "no backbone matches"),
        (["backbones", "--blocks"], "--blocks builds each backbone it lists: name at most 3"),
    ]
    for argv, match in cases:
        fails_cleanly(argv, match)
    assert not export.exists()


def test_errors_name_flags_and_a_refused_run_leaves_nothing(tmp_path, image_folder, fails_cleanly, offline, capsys):
    export = tmp_path / "runs" / "flowers"
    export.parent.mkdir()
    train = ["train", "--data", str(image_folder), "--export", str(export)]
    # ImageNet weights cannot be downloaded: refused before training (after the plan's notes), leaving no .partial
    # folder or lock
    assert main([*train, "-q", "--backbone", "mobilenet_v2", "--image-size", "96"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("kerastl: error: ") and "or pass --weights PATH to a local" in err[-1], err
    assert not any("kerastl: error" in line or "Traceback" in line for line in err[:-1]), err
    assert not export.exists() and not (tmp_path / "runs" / "flowers.partial").exists()
    fails_cleanly([*train, "--backbone", "simple_cnn"], "pass --weights none (train from scratch) or a weights file")
    (export / "old").mkdir(parents=True)
    fails_cleanly([*train, *SMALL], "choose another or pass --overwrite")
    (image_folder / "red" / "notes.jpg").write_text("not an image")
    fails_cleanly([*train, *SMALL, "--overwrite", "--strict"], "or pass --no-strict to skip them")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["flowers"]


def test_a_model_at_chance_and_a_flag_that_does_nothing_are_each_one_line(tmp_path, capsys):
    same = noisy_pixels((120, 120, 120))  # every image of every class the same: nothing to learn
    for name in ("cat", "dog", "fox"):
        (tmp_path / "same" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(same).save(tmp_path / "same" / name / f"{i}.png")
    export = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "same"), "--export", str(export), *SMALL[:-1],
                 "--validation", "holdout", "--fine-tune-epochs", "2", "--unfreeze-blocks", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "--fine-tune-epochs 2, --unfreeze-blocks 1 do nothing in this run: with --weights none every layer " \
           "trains from the start, in one phase" in err
    warning = [line for line in err if "no better than chance" in line]
    assert len(warning) == 1 and "validation accuracy is 0.333 on 6 images" in warning[0]
    assert 'id="trivial"' in (export / "report.html").read_text()
    wrong = json.loads((export / "evaluation.json").read_text())["most_wrong"]  # 4 of the 6: wrong by file
    assert len(wrong) == 4 and all(Path(row["path"]).parent.parent == tmp_path / "same" for row in wrong)
    assert wrong[0]["path"] in (export / "report.html").read_text()
    assert main(["evaluate", "--model", str(export), "--data", str(tmp_path / "same")]) == 0
    out = capsys.readouterr().out
    assert "most confidently wrong (image, true, predicted, confidence):" in out
    assert f"  {wrong[0]['path']}  {wrong[0]['true']} -> {wrong[0]['predicted']}" in out


def test_messages_name_flags_but_leave_quoted_text_and_examples_alone():
    flags = build_parser().all_flags()
    assert in_flags("pass weights=None, or weights=PATH; overwrite=True; strict=False", flags) == \
        "pass --weights none, or --weights PATH; --overwrite; --no-strict"
    assert in_flags("--search wants NAME=VALUES (`dropout=0.1,0.3`), got 'dropout=x'", flags) == \
        "--search wants NAME=VALUES (`dropout=0.1,0.3`), got 'dropout=x'"
    assert in_flags("class weights cat=2,dog=1 and unknown_name=3", flags) == "class weights cat=2,dog=1 and " \
        "unknown_name=3"


def test_an_unknown_flag_gets_the_closest_one_in_one_line(capsys):
    cases = {("train", "--data", "x", "--image_size", "32"): "--image_size (did you mean --image-size?)",
             ("train", "--data", "x", "--lr", "0.01"): "--lr (did you mean --learning-rate?)",
             ("predict", "--model", "m", "a.png", "--jsn"): "--jsn (did you mean --json?)",
             ("train", "--data", "x", "--zzzz", "extra"): "unrecognized arguments: --zzzz\n",
             ("train", "--data", "x", "-lr", "0.01"): "unrecognized arguments: -lr"}  # one dash: no traceback
    for argv, message in cases.items():
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # the flag's value is not named again
    assert main(["train", "--data", "x", "--epochs", "1", "stray"]) == 2
    assert "unrecognized arguments: 'stray'" in capsys.readouterr().err


def test_predict_takes_folders_and_skips_files_that_do_not_decode(tmp_path, capsys, fails_cleanly):
    from kerastl.config import ModelConfig
    from kerastl.models.classifier import build_classifier
    from kerastl.models.export import export_saved_model

    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=16), 2)
    export_saved_model(model, tmp_path / "m", ["a", "b"])
    photos = tmp_path / "photos"
    write_class_folder(photos, per_class=3, colours={"x": (200, 0, 0), "y/deeper": (0, 0, 200)})  # two levels
    (photos / "notes.jpg").write_text("a text file named .jpg")  # not an image by its first bytes
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
    (photos / "y" / "cut.png").write_bytes(buffer.getvalue()[:60])  # a PNG header, then nothing
    capsys.readouterr()  # drop the setup's own log lines
    model = str(tmp_path / "m")

    assert main(["predict", "--model", model, str(photos), "--batch-size", "4"]) == 1
    out, err = capsys.readouterr()
    predicted = [line.split(": ")[0] for line in out.splitlines()]
    images = sorted((photos / "x").iterdir()) + sorted((photos / "y" / "deeper").iterdir())
    assert predicted == [str(path) for path in images]  # recursively, in folder order
    assert f"skipped {photos / 'notes.jpg'} (not an image" in err and f"skipped {photos / 'y' / 'cut.png'}" in err
    assert "predicted 6 images, skipped 2 files" in err and "Traceback" not in err

    assert main(["predict", "--model", model, "--csv", str(photos / "x"), str(images[0])]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["image", "class", "probability", "a", "b"] and len(rows) == 5
    assert rows[1][0] == str(images[0]) and rows[-1][0] == str(images[0])
    probabilities = [float(rows[1][3]), float(rows[1][4])]
    assert abs(sum(probabilities) - 1) < 1e-5 and rows[1][1] == "ab"[int(np.argmax(probabilities))]

    fails_cleanly(["predict", "--model", model, "--strict", str(photos)], "notes.jpg (not an image")
    fails_cleanly(["predict", "--model", model, "--strict", str(photos / "y")], "cut.png (cannot be decoded")
    fails_cleanly(["predict", "--model", model, str(tmp_path / "nope.jpg")], "nope.jpg does not exist")
    fails_cleanly(["predict", "--model", model, str(photos / "notes.jpg")], "no JPEG, PNG, GIF or BMP images")
    fails_cleanly(["predict", "--model", model, "--json", "--csv", "a.png"], "not allowed with argument")


def test_help_documents_every_flag(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [action for action in commands.choices["train"]._actions if action.option_strings]
    named = {flag for action in flags for flag in action.option_strings}
    for flag in ("--data", "--backbone", "--weights", "--image-size", "--epochs", "--fine-tune-epochs",
                 "--unfreeze-blocks", "--batch-size", "--augment", "--export", "--config", "--features",
                 "--validation", "--min-steps", "--cv-folds"):
        assert flag in named and flag in text, flag
    key = text.split("the flags that matter")[1].split("advanced:")[0]  # first, the flags a first run needs
    assert re.findall(r"^  (--[\w-]+)", key, re.M) == ["--data", "--backbone", "--weights", "--image-size",
                                                       "--epochs", "--export"]
    assert text.startswith("usage: kerastl train --data SRC [--backbone NAME]") and text.count("advanced: ") >= 5
    assert all(len(action.help) <= 160 for action in flags), [a.option_strings for a in flags if len(a.help) > 160]
    for action in flags:  # every flag the parser takes is listed, with a line saying what it does
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), action.option_strings
        for flag in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


def test_train_prints_what_the_probes_chose_and_names_a_cross_validated_estimate(image_folder, tmp_path, capsys):
    from kerastl.models.backbones import build_backbone

    export, weights = tmp_path / "out", tmp_path / "random.weights.h5"
    build_backbone("simple_cnn", 16, weights=None).save_weights(weights)  # a frozen base to transfer from
    code = main(["train", "--data", str(image_folder), "--backbone", "simple_cnn", "--image-size", "16",
                 "--weights", str(weights), "--export", str(export), "-q", "--augment", "none",
                 "--fine-tune-epochs", "0"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "features: " in out and "probe accuracy" in out and "fine-tuning depth" in out
    assert "cv_accuracy: " in out and "cross-validated estimate, 5 folds" in out and "val_accuracy" not in out
    saved = RunConfig.from_json(export / "config.json")
    assert saved.model.features != "auto" and saved.train.unfreeze_blocks != "auto"
    assert (export / "probe.json").is_file() and (export / "probe.png").is_file()
