"""`kerastl demo`: transfer beats training from scratch on real data, offline."""

import json

import pytest

from kerastl.cli import main


@pytest.mark.slow
def test_demo_transfers_better_than_scratch_and_exports(tmp_path, capsys, offline):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    metrics = {
        run: json.loads((tmp_path / run / "metrics.json").read_text())
        for run in ("pretrain_0-4", "transfer_5-9", "scratch_5-9")
    }
    # the pretrained backbone evaluates correctly: its BatchNorm statistics match the data
    assert metrics["pretrain_0-4"]["val_accuracy"] > 0.9
    transfer = metrics["transfer_5-9"]["test_accuracy"]
    scratch = metrics["scratch_5-9"]["test_accuracy"]
    assert transfer > scratch + 0.15, (transfer, scratch)
    assert f"test accuracy {transfer:.3f}" in report and f"test accuracy {scratch:.3f}" in report
    assert (tmp_path / "transfer_5-9" / "saved_model.pb").is_file()
    parity = float(report.split("max |export - Keras| = ")[1].split(")")[0])
    assert parity < 1e-5
