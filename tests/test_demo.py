"""`kerastl demo`: transfer with the defaults against the strongest from-scratch baseline, offline."""

import json

import pytest

from kerastl.cli.demo import SHOTS
from kerastl.cli.main import main


@pytest.mark.slow
def test_demo_compares_transfer_with_the_strongest_baselines_and_exports(tmp_path, capsys, offline):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    pretrain = json.loads((tmp_path / "pretrain_0-4" / "metrics.json").read_text())
    # the pretrained backbone evaluates correctly: its BatchNorm statistics match the data
    assert pretrain["val_accuracy"] > 0.9
    rows = {int(line.split("|")[0]): [float(v.split()[0].strip(",")) for v in line.split("|")[1:]]
            for line in report.splitlines() if line.strip()[:1].isdigit() and line.count("|") == 3}
    assert sorted(rows) == sorted(SHOTS)
    for per_class, (transfer, scratch, probe) in rows.items():
        # fine-tuning from the converged probe ends above the probe itself (LP-FT >= LP)
        assert transfer >= probe - 0.01, (per_class, transfer, probe)
        # the strongest from-scratch baseline is a real one: far above chance (0.2)
        assert scratch > 0.6, (per_class, scratch)
    # with 3 images per class, transfer is at least on a par with the small CNN trained from scratch
    assert rows[3][0] > rows[3][1] - 0.05, rows[3]
    for per_class in SHOTS:
        metrics = json.loads((tmp_path / f"transfer_5-9_{per_class}" / "metrics.json").read_text())
        assert metrics["test_accuracy"] == pytest.approx(rows[per_class][0], abs=5e-4)
        assert "cv_accuracy" in metrics and "val_accuracy" not in metrics  # small data: cross-validated
        config = json.loads((tmp_path / f"transfer_5-9_{per_class}" / "config.json").read_text())
        assert config["train"]["head"]["epochs"] == 10 and config["train"]["learning_rate"] == 1e-3  # the defaults
    assert (tmp_path / f"transfer_5-9_{SHOTS[-1]}" / "saved_model.pb").is_file()
    parity = float(report.split("max |export - Keras| = ")[1].split(")")[0])
    assert parity < 1e-5


@pytest.mark.parametrize("per_class", [1, 3])
def test_probe_references_on_another_split_include_the_untuned_all_block_probe(tmp_path, per_class):
    """bench_transfer's references across pretrainings: odd digits, one image per class too (no folds)."""
    from kerastl.cli.demo import few_shot, probe_accuracies
    from kerastl.config import ModelConfig
    from kerastl.models.classifier import build_classifier

    model = build_classifier(ModelConfig("simple_cnn", weights=None, image_size=32), 5, seed=0)
    weights = tmp_path / "backbone.weights.h5"
    model.backbone.save_weights(weights)
    data, _, _ = few_shot(per_class, 0, (1, 3, 5, 7, 9))
    labelled = data.train.count + (data.validation.count if data.validation is not None else 0)
    assert data.class_names == ["1", "3", "5", "7", "9"] and labelled == 5 * per_class
    probes = probe_accuracies(str(weights), data)
    assert {"last", "all", "all_fixed", "best_block", "best"} <= set(probes)
    assert all(0.0 <= probes[key] <= 1.0 for key in ("last", "all", "all_fixed", "best_block"))
    if per_class == 1:  # nothing to fold: the cross-validated probe falls back to the fixed C
        assert probes["all"] == probes["all_fixed"]
