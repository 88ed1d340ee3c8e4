"""Label tables and data-source checks that need no TensorFlow.

A CSV label table is read here (`read_label_table`, pandas): every row is checked before
TensorFlow loads, and `kerastl.data.images` builds the splits from it. `check_data_source`
checks a class folder (and its validation and test folders) or a CSV table the same way.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from kerastl.config import DataConfig
from kerastl.data.imagefiles import Decoder, Finding, FolderListing, check_files, list_class_folder
from kerastl.errors import KerastlError

BUILT_IN_SOURCES = ("digits", "cifar10")
PATH_COLUMNS = ("path", "filename", "file", "image")  # a label table's default columns: the first present
LABEL_COLUMNS = ("label", "class")
SPLIT_COLUMN = "split"
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def check_data_source(config: DataConfig, min_classes: int = 2) -> None:
    """A class folder (and validation or test folder) that exists and has two classes (or
    `min_classes`), each with images; or a CSV label table whose every row is good.

    The built-in sources and CIFAR-10 folders are read, and checked, by `kerastl.data.images`.
    """
    if not config.source:
        raise KerastlError("no data source given: pass a class folder, a CSV file, cifar10 or digits")
    if config.source in BUILT_IN_SOURCES or is_cifar10_folder(config.source):
        return
    if is_csv(config.source):
        errors = label_table_of(config).errors(min_classes)
        if errors:
            raise KerastlError(errors[0])
        return
    for folder in (config.source, config.validation_dir, config.test_dir):
        if folder:
            list_class_folder(Path(folder), min_classes)


def is_cifar10_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an extracted `cifar-10-batches-py` folder."""
    return os.path.isfile(os.path.join(path, "batches.meta")) and os.path.isfile(os.path.join(path, "test_batch"))


def is_csv(source: str | os.PathLike) -> bool:
    """Whether a data source names a CSV label table (by its extension, in any case)."""
    return str(source).lower().endswith(".csv")


def label_table_of(config: DataConfig) -> LabelTable:
    """The label table `config.source` names (a CSV file), read and checked."""
    if config.validation_dir or config.test_dir:
        raise KerastlError(f"{config.source} is a CSV file: name each row's split in its split column instead "
                           "of a validation or test folder")
    return read_label_table(config.source)


@dataclass
class LabelTable:
    """A label table's rows, checked: each row's image file, label and split.

    Attributes:
        name: the table, for messages (the CSV file, or "the DataFrame").
        root: the folder relative paths were resolved against.
        class_names: the sorted unique labels (as strings), or the order given.
        paths: each row's image file.
        labels: each row's index into `class_names`.
        splits: each row's split ("train", "validation" or "test"); None without a split column.
    """

    name: str
    root: Path
    class_names: list[str]
    paths: list[str]
    labels: list[int]
    splits: list[str] | None = None

    def rows(self, keep: Sequence[int]) -> LabelTable:
        """The table of the rows at `keep` (indices), in that order."""
        splits = None if self.splits is None else [self.splits[i] for i in keep]
        return replace(self, paths=[self.paths[i] for i in keep], labels=[self.labels[i] for i in keep],
                       splits=splits)

    def files(self, split: str) -> tuple[list[str], list[int]] | None:
        """(paths, labels) of the rows of `split` (without a split column, every row is a training
        row); None when there are none."""
        rows = [i for i in range(len(self.paths)) if (self.splits[i] if self.splits else "train") == split]
        return ([self.paths[i] for i in rows], [self.labels[i] for i in rows]) if rows else None

    def usable(self, decode: Decoder | None = None) -> tuple[LabelTable, list[Finding]]:
        """The rows whose file can be used, and what was found about the files (see
        `kerastl.data.imagefiles.check_files`: each is decoded once, by `decode` or Pillow)."""
        folders = {os.path.dirname(os.path.abspath(path)) for path in self.paths}  # "." for a CSV named bare
        root = Path(os.path.commonpath([os.path.abspath(self.root), *folders]))
        listing = FolderListing(root, self.class_names, list(self.paths), list(range(len(self.paths))))
        checked = check_files(listing, decode)  # labelled by row index: the rows kept
        return self.rows(checked.labels), checked.findings

    def errors(self, min_classes: int = 2) -> list[str]:
        """Why these rows cannot train a classifier (one sentence each): too few classes, or a class
        without training rows. `min_classes=1` accepts one class (images to evaluate a model on)."""
        if len(self.class_names) < min_classes:
            return [f"{self.name} has {len(self.class_names)} class ({', '.join(self.class_names)}); "
                    "a classifier needs two or more"]
        if min_classes == 1:  # images to evaluate on: any split will do
            return []
        training = Counter(label for i, label in enumerate(self.labels)
                           if self.splits is None or self.splits[i] == "train")
        where = "rows" if self.splits is None else "training rows"
        return [f"class {name!r} has no {where} in {self.name}" for label, name in enumerate(self.class_names)
                if not training[label]]


def _texts(column: Any) -> list[str]:
    """A table column's cells as stripped text; an empty or missing (NaN, None) cell is ""."""
    return [str(value).strip() for value in column.astype(object).where(column.notna(), "")]


def read_label_table(
    table: str | os.PathLike | Any,
    root: str | os.PathLike | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    class_names: Sequence[str] | None = None,
) -> LabelTable:
    """Reads and checks a label table: a CSV file or a pandas DataFrame, one image per row.

    Columns: the image file (the first of `PATH_COLUMNS` present, in any case), its label
    (the first of `LABEL_COLUMNS`) and, optionally, its split (`split`: train, validation
    or val, test). Relative paths are resolved against `root`: by default the CSV file's
    folder, or the current folder for a DataFrame. Rows are named as a spreadsheet numbers
    a CSV file's (its header is row 1), or by a DataFrame's index.

    Raises:
        KerastlError: one line naming the problem: a missing table or column (listing the
            columns present), an empty cell, an unknown label (with `class_names`), a split
            that is not train, validation or test, or missing image files (the first and
            how many).
    """
    import pandas as pd  # pandas only loads for a label table

    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        if not path.is_file():
            raise KerastlError(f"label table {path} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise KerastlError(f"cannot read {path} as a CSV file: {str(error).strip().splitlines()[0]}") from None
        name, base, row_of = str(path), Path(root) if root is not None else path.parent, lambda i: i + 2
    elif isinstance(table, pd.DataFrame):
        frame, name, base = table, "the DataFrame", Path(root if root is not None else ".")
        row_of = lambda i: frame.index[i]  # noqa: E731
    else:
        raise KerastlError(f"a label table is a CSV file or a pandas DataFrame, not a {type(table).__name__}")
    columns = [str(c) for c in frame.columns]

    def column(given: str | None, candidates: tuple[str, ...], what: str) -> str | None:
        if given is not None:
            if given not in columns:
                raise KerastlError(f"{name} has no {what} column {given!r}; its columns: {', '.join(columns)}")
            return given
        lower = {c.strip().lower(): c for c in reversed(columns)}  # the first column of a name wins
        return next((lower[c] for c in candidates if c in lower), None)

    path_col = column(path_column, PATH_COLUMNS, "path")
    label_col = column(label_column, LABEL_COLUMNS, "label")
    for col, candidates in ((path_col, PATH_COLUMNS), (label_col, LABEL_COLUMNS)):
        if col is None:
            raise KerastlError(f"{name} has no column named {', '.join(candidates[:-1])} or {candidates[-1]}; "
                               f"its columns: {', '.join(columns) or 'none'}")
    split_col = column(split_column, (SPLIT_COLUMN,), "split")
    if not len(frame):
        raise KerastlError(f"{name} has no rows")
    cells = {col: _texts(frame.iloc[:, columns.index(col)]) for col in (path_col, label_col)}
    for col in (path_col, label_col):
        empty = next((i for i, text in enumerate(cells[col]) if not text), None)
        if empty is not None:
            raise KerastlError(f"row {row_of(empty)} of {name} has no {col}")
    texts = cells[label_col]
    names = [str(c) for c in class_names] if class_names is not None else sorted(set(texts))
    if len(set(names)) < len(names):
        raise KerastlError(f"class_names names a class twice: {', '.join(names)}")
    index = {c: i for i, c in enumerate(names)}
    unknown = next((i for i, text in enumerate(texts) if text not in index), None)
    if unknown is not None:
        raise KerastlError(f"unknown label {texts[unknown]!r} in row {row_of(unknown)} of {name}; known: "
                           f"{', '.join(names)}")
    splits = None
    if split_col is not None:
        values = [text.lower() for text in _texts(frame.iloc[:, columns.index(split_col)])]
        bad = next((i for i, value in enumerate(values) if value not in SPLIT_NAMES), None)
        if bad is not None:
            raise KerastlError(f"split {values[bad]!r} in row {row_of(bad)} of {name} is not train, validation "
                               "(or val) or test")
        splits = [SPLIT_NAMES[value] for value in values]
    paths = [os.path.abspath(os.path.join(base, text)) for text in cells[path_col]]
    missing = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
    if missing:
        first = missing[0]
        raise KerastlError(f"image file {cells[path_col][first]} in row {row_of(first)} of {name} does not exist "
                           f"(as {paths[first]}); {len(missing)} of its {len(paths)} files are missing")
    return LabelTable(name, base, names, paths, [index[text] for text in texts], splits)
