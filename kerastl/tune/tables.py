"""The trial tables: every trial's status, scores, cost and values, best first."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kerastl.tune.trial import read_result

SCORES = ("val_accuracy", "val_loss", "val_macro_f1", "val_auc")


def shown_values(values: dict) -> dict:
    """A trial's values as tables and logs show them: 4 significant digits, no `tuner/` bookkeeping."""
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in values.items()
            if not k.startswith("tuner/")}


def trial_table(tuner) -> list[dict]:
    """Every trial of a KerasTuner tuner: id, status, objective and all scores, values, cost; ranked."""
    objective = tuner.oracle.objective
    rows = []
    for trial in tuner.oracle.trials.values():
        score = None if trial.score is None else float(trial.score)
        row = {"trial": trial.trial_id, "status": trial.status, "score": score}
        for name in SCORES:
            row[name] = float(trial.metrics.get_last_value(name)) if trial.metrics.exists(name) else None
        info = (read_result(Path(tuner.get_trial_dir(trial.trial_id))) or {}).get("info", {})
        row.update(seconds=info.get("seconds"), reused_head=info.get("reused_head"), memory_mb=info.get("memory_mb"),
                   gpu_peak_mb=info.get("gpu_peak_mb"), population=info.get("population"))
        row["values"] = shown_values(trial.hyperparameters.values)
        if trial.message:
            row["error"] = [line for line in trial.message.splitlines() if line.strip()][-1]
        rows.append(row)
    return rank(rows, objective.name, objective.direction)


def rank(rows: list[dict], objective: str, direction: str) -> list[dict]:
    """Best first, failed last. Ties, common for accuracy on a few hundred images, go to the
    lower val_loss (to the higher val_accuracy when val_loss is the objective)."""
    sign = 1 if direction == "min" else -1
    tiebreak = "val_accuracy" if objective == "val_loss" else "val_loss"
    tie_sign = -1 if tiebreak == "val_accuracy" else 1

    def key(row: dict) -> tuple:
        score, other = row["score"], row.get(tiebreak)
        return (score is None, sign * (score or 0), other is None, tie_sign * (other or 0), row["trial"])

    return sorted(rows, key=key)


def format_table(rows: list[dict], objective: str) -> str:
    """The summary table people read: one line per trial, best first."""
    names = sorted({k for row in rows for k in row["values"]})
    header = ["trial", "status", objective, "seconds"] + names
    lines = [header]
    for row in rows:
        value = row.get(objective)
        lines.append([row["trial"], row["status"], "-" if value is None else f"{value:.4f}",
                      "-" if row["seconds"] is None else f"{row['seconds']:.1f}"]
                     + [str(row["values"].get(n, "-")) for n in names])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_tables(rows: list[dict], folder: Path) -> None:
    """`trials.json` and `trials.csv` (same rows, best first) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = sorted({k for row in rows for k in row["values"]})
    fields = ["trial", "status", "score", *SCORES, "seconds", "population", "reused_head", "memory_mb", "gpu_peak_mb",
              "error"]
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields + names)
        for row in rows:
            writer.writerow([row.get(f) for f in fields] + [row["values"].get(n) for n in names])
