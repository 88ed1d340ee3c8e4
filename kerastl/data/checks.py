"""`kerastl check-data`: a report of every file a class folder or CSV label table holds that
training would skip or convert, and whether the source can train. Decodes each file once
(Pillow, in threads); no TensorFlow.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kerastl.data.imagefiles import IGNORED, SKIPPED, USED, Decoder, Finding, check_files, scan_class_folder
from kerastl.data.tables import read_label_table


@dataclass
class DataReport:
    """What `check_data` found in a class folder: every problem file and the usable images per class."""

    root: Path
    class_names: list[str]
    counts: list[int]
    findings: list[Finding]
    errors: list[str]

    @property
    def skipped(self) -> list[Finding]:
        return [f for f in self.findings if f.action == SKIPPED]

    @property
    def can_train(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """For the command line: 0 all files usable, 1 some will be skipped, 2 the folder cannot train."""
        return 2 if self.errors else 1 if self.skipped else 0

    def summary(self) -> str:
        """One line: usable images, skipped/ignored/noted files and whether the folder can train."""
        noted = sum(f.action == USED for f in self.findings)
        ignored = sum(f.action == IGNORED for f in self.findings)
        files = f"{len(self.skipped)} skipped, {ignored} ignored, {noted} used with a note"
        verdict = "ready to train" if self.can_train else "cannot train: " + "; ".join(self.errors)
        return f"{sum(self.counts)} usable images in {len(self.class_names)} classes; {files}; {verdict}"

    def format(self) -> str:
        """Plain text: a table of findings (file, finding, what happens), usable images per class, the summary."""
        lines = [f"check-data {self.root}", ""]
        order = {SKIPPED: 0, USED: 1, IGNORED: 2}
        findings = sorted(self.findings, key=lambda f: (order[f.action], f.name))
        rows = [(f.name, f.finding, f.what_happens) for f in findings]
        if rows:
            lines += _table(("file", "finding", "what happens"), rows) + [""]
        else:
            lines += ["no problem files", ""]
        if self.class_names:
            lines += _table(("class", "usable images"), list(zip(self.class_names, map(str, self.counts)))) + [""]
        return "\n".join(lines + [self.summary()])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]


def check_data(root: str | os.PathLike, decode: Decoder | None = None, workers: int | None = None) -> DataReport:
    """Checks every file of a class folder (decoding each once) and reports what training would do.

    Args:
        root: a folder with one subfolder per class.
        decode: see `inspect_file`; Pillow decodes when None (no TensorFlow needed).
        workers: decoding threads.

    Raises:
        KerastlError: when `root` is not a folder. Every other problem is in the report.

    Example:
    ```python
    report = check_data("flowers")
    print(report.format())
    raise SystemExit(report.exit_code)
    ```
    """
    listing = check_files(scan_class_folder(root), decode, workers)
    return DataReport(listing.root, listing.class_names, listing.counts(), listing.findings, listing.errors())


def check_table(path: str | os.PathLike) -> DataReport:
    """`kerastl check-data` for a CSV label table: every file decoded once (Pillow), as
    `check_data` does a class folder's."""
    usable, findings = read_label_table(path).usable()
    counts = Counter(usable.labels)
    return DataReport(Path(path), usable.class_names, [counts[i] for i in range(len(usable.class_names))],
                      findings, usable.errors())
