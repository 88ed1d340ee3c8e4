"""Model cards: what a run folder's model is, what it learned from, how well it did and on what.

`model_card(folder)` turns the run folder's files (read by `kerastl.reports.facts`) into Markdown
with the sections Data, Model, Training, Metrics (each with what it was measured on), Known
weak classes, How to load and call it, and Limitations; `write_model_card` writes it as
`MODEL_CARD.md`. A missing optional file reads "not recorded", never an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kerastl.reports.facts import (
    Table,
    counts_table,
    data_sources,
    limitations,
    metric_rows,
    model_facts,
    phases,
    read_run,
    recorded_validation_mode,
    recorded_warnings,
    usage_snippet,
    weak_classes_text,
)
from kerastl.version import __version__

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"


def md_escape(text: Any) -> str:
    """Text for Markdown: characters that would be read as markup (HTML tags, table pipes) escaped."""
    out = str(text).replace("\\", "\\\\")
    for char in "<>|`*[]":
        out = out.replace(char, "\\" + char)
    return out.replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(map(md_escape, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(md_escape, row)) + " |" for row in rows)]


def model_card(folder: str | Path, location: str | Path | None = None) -> str:
    """The Markdown model card of a run folder (see the module docstring; `location` as for `read_run`)."""
    run = read_run(folder, location)
    lines = [f"# Model card: {md_escape(run.config.get('name') or run.where.name)}", "",
             f"Written by kerastl {__version__} from the files of {md_escape(run.where)}.", "",
             "## Data", ""]
    lines += [f"- {split}: {md_escape(source)}" for split, source in data_sources(run)]
    lines.append(f"- validation mode: {recorded_validation_mode(run)}")
    table = counts_table(run)
    lines += ["", *(_md_table(table) if table else ["Images per class: not recorded."]), ""]
    warnings = recorded_warnings(run)
    lines += ["Warnings:", *(f"- {md_escape(w)}" for w in warnings)] if warnings else ["Warnings: none recorded."]
    lines += ["", "## Model", "", *(f"- {label}: {md_escape(text)}" for label, text in model_facts(run))]
    lines += ["", "## Training", "", *(f"- {label}: {md_escape(text)}" for label, text in phases(run))]
    rows = metric_rows(run)
    lines += ["", "## Metrics", "",
              *(_md_table((["metric", "value", "measured on"], [list(r) for r in rows])) if rows
                else ["No metrics recorded."])]
    lines += ["", "## Known weak classes", "", md_escape(weak_classes_text(run))]
    snippet = usage_snippet(run.folder, run.where).rstrip("\n")
    lines += ["", "## How to load and call it", "", "```python", snippet, "```"]
    lines += ["", "## Limitations", "", *(f"- {md_escape(text)}" for text in limitations(run)), ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, location: str | Path | None = None) -> Path:
    """Writes the model card as `MODEL_CARD.md` in the run folder and returns its path.

    Writing into a staging folder that is renamed into place later, pass the final folder as `location`.
    """
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(folder, location))
    log.debug("wrote %s", path)
    return path
