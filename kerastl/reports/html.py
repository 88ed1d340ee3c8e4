"""Self-contained HTML reports of a run folder or a search project, built only from their files.

- `write_run_report(folder, location=None)`: `report.html` in a run folder (`config.json` and
  `metrics.json` required; every other file optional, see `kerastl.reports.facts`), in sections
  `data`, `model`, `training`, `metrics`, `mistakes` and `usage`, each a `<section id=...>`.
  `location` is the folder's final path when it is written in a staging folder first.
- `write_search_report(project_dir)`: `report.html` in a search project folder
  (`search.json` and/or `trials.json`): the settings, every trial best first (by score, unscored
  last, trials.json's order among ties) in a table sortable by any column, failed ones with
  their error, and the objective against each setting (`kerastl.reports.plots.plot_objective`).
- `write_run_files(folder, location=None)`: a run folder's plots, `MODEL_CARD.md` and `report.html`.
- `write_report(folder)`: whichever of the two the folder is; anything else is a `KerastlError`.

A report is one file that opens anywhere, offline, and can be mailed: every image is
embedded as a `data:image/png;base64` URL, style and script are inline, nothing is
fetched (a Content-Security-Policy forbids it) and fonts are the system's. Every string
from the folder (class names, paths, errors) is HTML-escaped. The inline script sorts
tables on a header click (numbers as numbers, toggling the direction), sorts on load by
`report.html#sort=COLUMN` (`#sort=-COLUMN` descending) and sets
`document.body.dataset.ready = "1"` at its end, so a browser test knows it ran.
No TensorFlow: json, matplotlib (`kerastl.reports.plots`) and the model card's readers only.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from html import escape
from pathlib import Path
from typing import Any

from kerastl.choices import OBJECTIVES
from kerastl.config import read_json
from kerastl.errors import KerastlError
from kerastl.reports import plots
from kerastl.reports.baselines import trivial_model_warning
from kerastl.reports.card import write_model_card
from kerastl.reports.facts import (
    NOT_RECORDED,
    RunFiles,
    Table,
    counts_table,
    data_sources,
    limitations,
    metric_rows,
    model_facts,
    number,
    per_class_table,
    phases,
    read_run,
    recorded_validation_mode,
    recorded_warnings,
    usage_snippet,
    weak_classes_text,
)
from kerastl.version import __version__

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_SECTIONS = ("data", "model", "training", "metrics", "mistakes", "usage")
SCORES = tuple(OBJECTIVES)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0 auto; max-width: 1100px; padding: 0 1.2rem 3rem; color: #1f2328; line-height: 1.45; }
header { border-bottom: 1px solid #d0d7de; margin-bottom: 1rem; }
nav a { margin-right: 1rem; color: #0969da; text-decoration: none; }
section { margin: 2rem 0; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
table.sortable th { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
tr.failed td { background: #fff1f0; } tfoot td { font-weight: 600; }
div.table { overflow-x: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figure { margin: .8rem 0; } figcaption { color: #57606a; font-size: .9rem; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.note { color: #57606a; } .warning { color: #9a6700; }
.box { border: 2px solid #9a6700; background: #fff8c5; padding: .6rem .9rem; border-radius: 6px; }
"""

SCRIPT = """
(function () {
  "use strict";
  function value(row, index) {
    var cell = row.cells[index];
    if (!cell) { return ""; }
    return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
  }
  function compare(a, b) {
    if (a === "" || b === "") { return a === b ? 0 : (a === "" ? 1 : -1); }
    var x = Number(a), y = Number(b);
    if (!isNaN(x) && !isNaN(y)) { return x - y; }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(header, descending) {
    var table = header.closest("table"), body = table.tBodies[0], index = header.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) {
      var a = value(r, index), b = value(s, index), c = compare(a, b);
      return (a === "" || b === "" || !descending) ? c : -c;  /* empty cells stay last */
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  var headers = document.querySelectorAll("table.sortable thead th");
  Array.prototype.forEach.call(headers, function (th) {
    th.tabIndex = 0;
    th.title = "click to sort";
    var toggle = function () { sortBy(th, th.getAttribute("aria-sort") === "ascending"); };
    th.addEventListener("click", toggle);
    th.addEventListener("keydown", function (event) { if (event.key === "Enter") { toggle(); } });
  });
  var hash = window.location.hash;
  try { hash = decodeURIComponent(hash); } catch (error) { /* a malformed escape: read it as it is */ }
  var wanted = /^#sort=(-?)(.+)$/.exec(hash);
  if (wanted) {
    var match = Array.prototype.filter.call(headers, function (th) { return th.dataset.key === wanted[2]; })[0];
    if (match) { sortBy(match, wanted[1] === "-"); }
  }
  document.body.dataset.ready = "1";
})();
"""


def _page(title: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    links = " ".join(f'<a href="#{key}">{escape(label)}</a>' for key, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<header><h1>{escape(title)}</h1><nav>{links}</nav></header>\n<main>\n" + "\n".join(sections)
            + f'\n</main>\n<footer class="note">kerastl {escape(__version__)}</footer>\n'
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _section(key: str, heading: str, body: list[str]) -> str:
    return f'<section id="{key}">\n<h2>{escape(heading)}</h2>\n' + "\n".join(part for part in body if part) \
        + "\n</section>"


def _facts(pairs: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs) + "</dl>"


def _list(items: list[str], css: str = "") -> str:
    return (f'<ul class="{css}">' if css else "<ul>") + "".join(f"<li>{escape(str(i))}</li>" for i in items) + "</ul>"


def _table(table: Table, sortable: bool = False, keys: list[str] | None = None, footer: int = 0,
           row_attrs: list[str] | None = None, sort_values: list[list[Any]] | None = None) -> str:
    """A table, every cell escaped; its last `footer` rows stay put when sorting. `sort_values[r][c]`,
    when not None, is what the script sorts on instead of the cell's text."""
    header, rows = table
    keys = keys or header
    head = "".join(f'<th scope="col" data-key="{escape(str(k))}">{escape(str(h))}</th>' for h, k in zip(header, keys))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, text in enumerate(row):
            sort = sort_values[r][c] if sort_values else None
            attr = "" if sort is None else f' data-sort="{escape(str(sort))}"'
            cells.append(f"<td{attr}>{escape(str(text))}</td>")
        attrs = row_attrs[r] if row_attrs else ""
        body.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    css = ' class="sortable"' if sortable else ""
    split = len(body) - footer
    foot = "<tfoot>" + "".join(body[split:]) + "</tfoot>" if footer else ""
    return (f'<div class="table"><table{css}><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body[:split])
            + f"\n</tbody>{foot}</table></div>")


def png_data_url(data: bytes) -> str:
    """PNG bytes as a `data:image/png;base64,...` URL."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(data: bytes | None, alt: str, caption: str = "") -> str:
    if not data:
        return ""
    text = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_url(data)}" alt="{escape(alt)}">{text}</figure>'


def _png(path: Path) -> bytes | None:
    """A PNG file's bytes; None when it is missing or not a PNG (with a warning)."""
    data = path.read_bytes() if path.is_file() else None
    if data is not None and not data.startswith(PNG_SIGNATURE):
        log.warning("leaving %s out of the report: it is not a PNG image", path)
        return None
    return data


def _data_section(run: RunFiles) -> str:
    counts, warnings = counts_table(run), recorded_warnings(run)
    return _section("data", "Data", [
        _facts([*data_sources(run), ("validation mode", recorded_validation_mode(run))]),
        _table(counts, footer=1) if counts else f'<p class="note">Images per class: {NOT_RECORDED}.</p>',
        _figure(_png(plots.plot_path(run.folder, "class_counts")), "images per class"),
        ("<h3>Warnings</h3>" + _list(warnings, "warning")) if warnings else '<p class="note">No data warnings.</p>'])


def _training_section(run: RunFiles) -> str:
    probe = run.probe or {}
    chosen = ", ".join(map(str, probe.get("chosen") or [])) or NOT_RECORDED
    return _section("training", "Training", [
        _facts(phases(run)),
        _figure(_png(plots.plot_path(run.folder, "curves")), "training curves", "loss and accuracy per epoch, by phase"),
        _figure(_png(plots.plot_path(run.folder, "probe")), "probe curve",
                f"linear-probe accuracy per block ({probe.get('splits') or str(probe.get('folds', '?')) + '-fold'}, "
                f"bars: one standard error); the head reads block(s) {chosen}"
                + (f" ({probe['rule']})" if probe.get("rule") else "")),
        "" if run.history else f'<p class="note">Training history: {NOT_RECORDED}.</p>'])


def _metrics_section(run: RunFiles) -> str:
    rows, classes, evaluation = metric_rows(run), per_class_table(run), run.evaluation or {}
    if classes:
        averages = len(classes[1]) - len(evaluation["per_class"])
        split = escape(str(evaluation.get("split", "?")))
        per_class = f"<h3>Per class ({split} split)</h3>" + _table(classes, sortable=True, footer=averages)
    else:
        per_class = '<p class="note">Per-class scores: not evaluated (no evaluation.json).</p>'
    data = run.data or {}
    trivial = trivial_model_warning(run.metrics, data.get("counts") or {}, run.labels or data.get("class_names") or [])
    return _section("metrics", "Metrics", [
        f'<p class="box warning" id="trivial">Warning: {escape(trivial)}.</p>' if trivial else "",
        _table((["metric", "value", "measured on"], [list(r) for r in rows])) if rows
        else '<p class="note">No metrics recorded.</p>',
        per_class,
        f"<p>Known weak classes: {escape(weak_classes_text(run))}</p>",
        _figure(_png(plots.plot_path(run.folder, "confusion")), "confusion matrix",
                "rows: true class; columns: predicted"),
        _figure(_png(plots.plot_path(run.folder, "reliability")), "reliability diagram",
                f"confidence against accuracy; expected calibration error {number(evaluation.get('ece'))}")])


def _mistakes_section(run: RunFiles) -> str:
    wrong = (run.evaluation or {}).get("most_wrong") or []
    picture = _png(plots.plot_path(run.folder, "wrong"))
    if picture:
        why = ""
    elif run.evaluation is None:
        why = "The run was not evaluated (no evaluation.json), so there are no mistakes to show."
    elif not wrong:
        why = "The evaluation found no wrong predictions."
    else:
        why = "The images of the mistakes were not saved (no plots/wrong.png); they are listed below."
    return _section("mistakes", "Mistakes", [
        _figure(picture, "the most confidently wrong predictions", "the most confident wrong predictions"),
        f'<p class="note">{escape(why)}</p>' if why else "",
        _table((["image", "true", "predicted", "confidence"],
                [[str(w.get("path", w.get("index"))), str(w.get("true")), str(w.get("predicted")),
                  number(w.get("confidence"), 3)]
                 for w in wrong])) if wrong else ""])


def _run_sections(run: RunFiles) -> list[str]:
    return [_data_section(run), _section("model", "Model", [_facts(model_facts(run))]), _training_section(run),
            _metrics_section(run), _mistakes_section(run),
            _section("usage", "How to load and call it", [
                f"<pre><code>{escape(usage_snippet(run.folder, run.where))}</code></pre>", "<h3>Limitations</h3>",
                _list(limitations(run))])]


def write_run_report(folder: str | Path, location: str | Path | None = None) -> Path:
    """Writes `report.html` in a run folder, from its files alone; returns its path.

    Writing into a staging folder that is renamed into place later, pass the final folder as
    `location`: the usage snippet names it.
    """
    run = read_run(folder, location)
    title = f"kerastl run: {run.config.get('name') or run.where.name}"
    nav = [(key, key) for key in RUN_SECTIONS]
    path = run.folder / REPORT_FILE
    path.write_text(_page(title, nav, _run_sections(run)), encoding="utf-8")
    log.debug("wrote %s", path)
    return path


def _ranked(rows: list[dict], direction: str) -> list[dict]:
    """Best first and unscored last; a stable sort, so trials.json's own tie order stays."""
    sign = 1 if direction == "min" else -1
    return sorted(rows, key=lambda row: (row.get("score") is None, sign * (row.get("score") or 0.0)))


def _cell(value: Any, key: str) -> str:
    """A trial table's cell: scores to 4 decimals, seconds to 1, megabytes whole, setting values as they are."""
    if value is None:
        return "–"
    if not isinstance(value, float) or key not in (*SCORES, "seconds", "memory_mb", "gpu_peak_mb"):
        return str(value)
    return number(value, 4 if key in SCORES else 1 if key == "seconds" else 0)


def _trial_table(rows: list[dict], objective: str) -> str:
    names = list(dict.fromkeys(name for row in rows for name in (row.get("values") or {})))
    fixed = ["rank", "trial", "status", objective, *(s for s in SCORES if s != objective), "seconds", "population",
             "memory_mb", "gpu_peak_mb", "reused_head"]
    keys = fixed + [name if name not in fixed else f"value_{name}" for name in names] + ["error"]
    table_rows, sort_values, attrs = [], [], []
    for rank, row in enumerate(rows, start=1):
        raw = [rank, row.get("trial"), row.get("status"), *(row.get(k) for k in fixed[3:]),
               *((row.get("values") or {}).get(n) for n in names), row.get("error")]
        table_rows.append([_cell(v, key) for v, key in zip(raw, keys)])
        sort_values.append(["" if v is None else repr(v) if isinstance(v, float) else None for v in raw])
        failed = str(row.get("status", "")).upper() == "FAILED" or row.get("error")
        attrs.append(f' data-trial="{escape(str(row.get("trial")))}"' + (' class="failed"' if failed else ""))
    header = [*fixed[:3], f"{objective} (objective)", *fixed[4:], *names, "error"]
    return _table((header, table_rows), sortable=True, keys=keys, row_attrs=attrs, sort_values=sort_values)


def write_search_report(project_dir: str | Path) -> Path:
    """Writes `report.html` in a search project folder, from search.json and trials.json; returns its path."""
    project = Path(project_dir)
    search = read_json(project / "search.json", "the search file") if (project / "search.json").is_file() else {}
    rows = read_json(project / "trials.json", "the trial table") if (project / "trials.json").is_file() else []
    if not isinstance(rows, list):
        raise KerastlError(f"{project / 'trials.json'} is not a list of trials; was it damaged?")
    tune, run = search.get("tune") or {}, search.get("run") or {}
    objective = tune.get("objective") or "val_accuracy"
    direction = OBJECTIVES.get(objective, "max")
    rows = _ranked(rows, direction)
    status = [str(row.get("status", "")).upper() for row in rows]
    failed = [row for row, s in zip(rows, status) if s == "FAILED" or row.get("error")]
    done = sum(s in ("COMPLETED", "FAILED", "INVALID") for s in status)
    settings = [("tuner", tune.get("tuner", NOT_RECORDED)),
                ("objective", f"{objective}, {'minimised' if direction == 'min' else 'maximised'}"
                 + ("" if tune.get("objective") else " (not recorded; assumed)")),
                ("trials", f"{done} done ({status.count('COMPLETED')} completed, {status.count('FAILED')} failed, "
                 f"{len(rows) - done} other) of max_trials {tune.get('max_trials', NOT_RECORDED)}"),
                ("backbone", (run.get("model") or {}).get("backbone") or NOT_RECORDED),
                ("data", (run.get("data") or {}).get("source") or NOT_RECORDED),
                ("project folder", str(project.resolve()))]
    space = tune.get("space")
    space_table = _table((["setting", "searched over"], [[k, json.dumps(v)] for k, v in space.items()])) \
        if isinstance(space, dict) and space else '<p class="note">Search space: the default (not recorded).</p>'
    buffer = io.BytesIO()
    plots.plot_objective(rows, objective, buffer)
    sections = [
        _section("settings", "Search", [_facts(settings), "<h3>Space</h3>", space_table]),
        _section("trials", "Trials", [
            '<p class="note">Best first; click a column header to sort by it (again to reverse).</p>',
            _trial_table(rows, objective) if rows else '<p class="note">No trials recorded yet.</p>']),
        _section("failed", "Failed trials", [
            _list([f"trial {row.get('trial')}: {row.get('error') or 'no error recorded'}" for row in failed])
            if failed else '<p class="note">No trial failed.</p>']),
        _section("objective", "Objective against each setting", [
            _figure(buffer.getvalue(), f"{objective} against each setting", "the best trial is ringed")]),
    ]
    nav = [("settings", "search"), ("trials", "trials"), ("failed", "failed"), ("objective", "objective")]
    path = project / REPORT_FILE
    path.write_text(_page(f"kerastl search: {project.resolve().name}", nav, sections), encoding="utf-8")
    log.debug("wrote %s", path)
    return path


def write_run_files(folder: str | Path, location: str | Path | None = None) -> Path:
    """A run folder's plots (`kerastl.reports.plots.draw_run_plots`), `MODEL_CARD.md` and `report.html`, from its files."""
    plots.draw_run_plots(folder)
    write_model_card(folder, location)
    return write_run_report(folder, location)


def write_report(folder: str | Path) -> Path:
    """The report of a search project (search.json, or trials.json without a run's files) or of a
    run folder (config.json and metrics.json; a search's export, which holds trials.json too, is one):
    a run folder's plots and model card are redrawn with it.

    Example:
    ```python
    write_report("saved_models/flowers")  # -> saved_models/flowers/report.html
    write_report("tuning")                # the search's trial table
    ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KerastlError(f"{folder} is not a folder")
    missing = [name for name in ("config.json", "metrics.json") if not (folder / name).is_file()]
    if (folder / "search.json").is_file() or ((folder / "trials.json").is_file() and missing):
        return write_search_report(folder)
    if missing:
        raise KerastlError(f"{folder} is neither a run folder nor a search project: it lacks {' and '.join(missing)} "
                           "(a run folder) and search.json or trials.json (a search project)")
    return write_run_files(folder)
