"""What the benchmarks share for `--write-docs`: writing the table a run just measured into
docs/benchmarks.md, between its section's markers, and leaving the rest of the page alone.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` (NAME is the script's
name, such as `bench_recipes`, or the script's name and a variant, such as
`bench_transfer_mobilenet_v2`). The prose around a section is written by people and never touched.
A benchmark checks its section before it starts measuring (`check_section`), so an hour-long run
does not end in a missing marker.

Standard library only: no TensorFlow, so the replacement can be tried on its own:

    python -c "import sys; sys.path.insert(0, 'scripts'); import _docs; ..."
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def add_flag(parser: argparse.ArgumentParser) -> None:
    """The `--write-docs` flag."""
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace this benchmark's table in {BENCHMARKS.relative_to(BENCHMARKS.parents[1])} "
                             "with the one just measured (the rest of the page is left alone)")


def markers(section: str) -> tuple[str, str]:
    """The start and end markers of `section`."""
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def replace_section(text: str, section: str, body: str) -> str:
    """`text` with what lies between `section`'s markers replaced by `body` (markers kept, on lines
    of their own). Raises ValueError unless each marker occurs exactly once, start before end."""
    start, end = markers(section)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the page needs exactly one '{start}' followed by one '{end}'")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip(chr(10))}\n{end}{tail}"


def check_section(section: str, path: str | os.PathLike = BENCHMARKS) -> None:
    """Exits with one line (code 2) unless `path` holds `section`'s markers."""
    try:
        replace_section(Path(path).read_text(), section, "")
    except (OSError, ValueError) as error:
        sys.exit(f"--write-docs: {path}: no section {section!r} ({error}); "
                 f"add the two marker lines where its table belongs")


def write_section(section: str, body: str, path: str | os.PathLike = BENCHMARKS) -> Path:
    """Replaces `section` of the page at `path` with `body`, written aside and renamed into place."""
    path = Path(path)
    text = replace_section(path.read_text(), section, body)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text)
    os.replace(staged, path)
    print(f"wrote section {section} of {path}")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], right_from: int | None = None) -> str:
    """A markdown table; the columns from `right_from` on are right-aligned."""
    align = ["---:" if right_from is not None and i >= right_from else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def measured_with(script: str) -> str:
    """How and where a table was measured: the command (without `--write-docs`), CPU cores, date."""
    argv = [arg for arg in sys.argv[1:] if arg != "--write-docs"]
    command = " ".join(["python", f"scripts/{script}.py", *map(shlex.quote, argv)])
    return f"`{command}`, {os.cpu_count()} CPU cores, {datetime.date.today().isoformat()}"


def publish(section: str, what: str, table: str, verdict: str, write: bool) -> None:
    """Prints a benchmark's table and its one-sentence verdict; with `write` (`--write-docs`), also
    writes them as `section`, after how it was measured and `what` it measured."""
    print(table)
    print(verdict)
    if write:
        write_section(section, f"{measured_with(section)}; {what}:\n\n{table}\n\nHere {verdict}.")
