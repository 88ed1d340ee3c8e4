"""Image files: which ones kerastl reads, and what happens to every other file.

Importable without TensorFlow (Pillow and the standard library only), so the
command line can check a data folder before TensorFlow loads.

Supported formats: JPEG, PNG, GIF and BMP, judged by content, never only by the
extension (`tf.io.decode_image` picks its decoder from a file's first bytes, and
so does `sniff_format`). Every TensorFlow kerastl supports decodes these, so an
exported model accepts them too. What happens to each kind of file:

- used as is: JPEG, PNG, GIF, BMP with any extension case (.JPG, .Png);
- used, noted: content and name disagree (a PNG named .jpg: read as PNG);
  grayscale (copied to 3 channels); RGBA or transparent palette (alpha dropped);
  palette PNG and CMYK JPEG (converted to RGB: TensorFlow reads Adobe CMYK
  correctly, a test checks it); animated GIF/PNG (first frame); EXIF-rotated
  JPEG (used unrotated);
- skipped, with the reason: truncated or damaged images, zero-byte or unreadable
  files, BMPs TensorFlow would misread (colour palette, 1/4/16-bit, compressed,
  padded: convert them), WebP, TIFF and other formats (convert them to PNG or
  JPEG), anything else (not an image);
- ignored, but listed: hidden files and folders (.DS_Store, ._x.jpg), Thumbs.db,
  desktop.ini, __MACOSX, files beside the class folders.

Nothing is dropped silently: every such file is a `Finding`. `list_class_folder`
is cheap (it reads each file's first bytes, never decodes); `check_files`
decodes every file once, in a thread pool; `check_data` does both and returns a
`DataReport` for people (`kerastl check-data DIR`).

Example:
```python
report = check_data("flowers")
print(report.format())
```
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from kerastl.errors import KerastlError

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP"}
# the first bytes `tf.io.decode_image` dispatches on (decode_image_op.cc)
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
_SYSTEM_NAMES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", "__MACOSX"})
_HEADER_BYTES = 70  # enough for a BMP's header and colour masks
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L"})

USED, SKIPPED, IGNORED = "used", "skipped", "ignored"
Decoder = Callable[[str], object]  # decodes the file at a path, or raises with the reason


@dataclass(frozen=True)
class Finding:
    """One file worth telling about: what is special about it and what happens to it.

    Attributes:
        path: the file's path.
        name: the path relative to the data folder, for people.
        finding: what is special ("truncated JPEG", "grayscale").
        action: `USED`, `SKIPPED` or `IGNORED`.
        detail: how, or why ("copied to 3 channels", "convert it to PNG or JPEG").
    """

    path: str
    name: str
    finding: str
    action: str
    detail: str = ""

    @property
    def what_happens(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else self.action


@dataclass
class FolderListing:
    """A class folder: its classes, the image files in class order and the findings so far."""

    root: Path
    class_names: list[str]
    paths: list[str]
    labels: list[int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def skipped(self) -> list[Finding]:
        return [f for f in self.findings if f.action == SKIPPED]

    def counts(self) -> list[int]:
        """Image files per class."""
        per_label = Counter(self.labels)
        return [per_label[label] for label in range(len(self.class_names))]

    def errors(self, min_classes: int = 2) -> list[str]:
        """Why this folder cannot train a classifier (one sentence each); empty when it can.
        `min_classes=1` accepts one class (images to evaluate a model on)."""
        if not self.class_names:
            return [f"{self.root} has no class subfolders (expected one folder per class)"]
        if len(self.class_names) < min_classes:
            return [f"{self.root} has only one class folder ({self.class_names[0]}); a classifier needs two or more"]
        return [
            f"class folder {self.root / name} has no images kerastl can read ({', '.join(SUPPORTED_FORMATS)}); "
            f"run `kerastl check-data {self.root}` to see why"
            for name, count in zip(self.class_names, self.counts())
            if count == 0
        ]


def sniff_format(head: bytes) -> str | None:
    """The supported format a file's first bytes announce ("JPEG", "PNG", "GIF", "BMP"), or None."""
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _SYSTEM_NAMES


def _other_format(path: str) -> Finding | None:
    """What a file that is not a supported image is, named by Pillow when it knows the format."""
    try:
        with Image.open(path) as image:
            kind = image.format or "unknown"
    except Exception:  # Pillow raises many types for non-images; any of them means "not an image"
        return None
    advice = "kerastl reads JPEG, PNG, GIF and BMP: convert it to PNG or JPEG"
    if kind == "WEBP":
        kind, advice = "WebP", "convert it to PNG or JPEG (not every TensorFlow reads WebP)"
    return Finding(path, "", f"{kind} image", SKIPPED, advice)


def _sniff(path: str, name: str) -> Finding | None:
    """A cheap first look (no decoding): None for a supported image, else why it is skipped."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
    except OSError as error:
        return Finding(path, name, "cannot be read", SKIPPED, error.strerror or type(error).__name__)
    if not head:
        return Finding(path, name, "zero-byte file", SKIPPED)
    if sniff_format(head):
        return None
    other = _other_format(path)
    if other:
        return replace(other, name=name)
    return Finding(path, name, "not an image", SKIPPED, "not JPEG, PNG, GIF or BMP")


def _walk_class(root: Path, folder: Path, label: int, listing: FolderListing) -> None:
    for directory, subdirs, files in os.walk(folder):
        here = Path(directory)
        for sub in sorted(subdirs):
            if _hidden(sub):
                listing.findings.append(
                    Finding(str(here / sub), (here / sub).relative_to(root).as_posix(), "hidden folder", IGNORED))
        subdirs[:] = sorted(s for s in subdirs if not _hidden(s))
        for file in sorted(files):
            path, name = str(here / file), (here / file).relative_to(root).as_posix()
            if _hidden(file):
                listing.findings.append(Finding(path, name, "hidden file", IGNORED))
            elif problem := _sniff(path, name):
                listing.findings.append(problem)
            else:
                listing.paths.append(path)
                listing.labels.append(label)


def scan_class_folder(root: str | os.PathLike) -> FolderListing:
    """Lists a folder of class subfolders without judging whether it can train (see `list_class_folder`).

    Raises:
        KerastlError: when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise KerastlError(f"data folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    listing = FolderListing(root, [], [], [])
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if _hidden(entry.name):
            kind = "hidden folder" if entry.is_dir() else "hidden file"
            listing.findings.append(Finding(str(entry), entry.name, kind, IGNORED))
        elif entry.is_dir():
            listing.class_names.append(entry.name)
        else:
            listing.findings.append(Finding(str(entry), entry.name, "not in a class folder", IGNORED))
    for label, name in enumerate(listing.class_names):
        _walk_class(root, root / name, label, listing)
    return listing


def list_class_folder(root: str | os.PathLike, min_classes: int = 2) -> FolderListing:
    """The classes (sorted folder names) and candidate images of a class folder, cheaply.

    Reads each file's first bytes, never decodes, so the command line can call it
    before TensorFlow loads. Files that are not JPEG, PNG, GIF or BMP by content are
    in `findings`; `check_files` then decodes the rest.

    Raises:
        KerastlError: a missing folder, no class subfolders, fewer than `min_classes`
            classes, or a class folder without a single candidate image.
    """
    listing = scan_class_folder(root)
    errors = listing.errors(min_classes)
    if errors:
        raise KerastlError(errors[0])
    return listing


def list_image_files(inputs: Sequence[str | os.PathLike]) -> FolderListing:
    """The image files to predict: each file as given, and every file under each folder
    (recursively, sorted), judged by their first bytes as `list_class_folder` judges them.

    Files that are not JPEG, PNG, GIF or BMP by content are `SKIPPED` findings; hidden
    files and folders are `IGNORED`. `class_names` is empty and every label is -1.

    Raises:
        KerastlError: a path that does not exist.
    """
    listing = FolderListing(Path("."), [], [], [])
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            _walk_class(path, path, -1, listing)
        elif path.is_file():
            if problem := _sniff(str(path), str(path)):
                listing.findings.append(problem)
            else:
                listing.paths.append(str(path))
                listing.labels.append(-1)
        else:
            raise KerastlError(f"{item} does not exist (pass image files or folders of them)")
    return listing


def _bmp_problem(head: bytes, size: int) -> str | None:
    """Why TensorFlow's BMP decoder would fail on or misread this BMP, or None when it reads it right."""
    if len(head) < 34:
        return "truncated BMP header"
    offset, header = struct.unpack_from("<II", head, 10)
    if header < 40:
        return "OS/2 BMP"
    width, height, _, bits, compression = struct.unpack_from("<iiHHI", head, 18)
    if bits not in (8, 24, 32):
        return f"{bits}-bit BMP"
    bgra = len(head) >= 66 and struct.unpack_from("<III", head, 54) == (0xFF0000, 0xFF00, 0xFF)
    if compression != 0 and not (compression == 3 and bits == 32 and bgra):
        return "compressed BMP"
    if size != offset + (bits // 8 * width + 3) // 4 * 4 * abs(height):
        return "BMP whose size does not match its header"
    return None


def _mode_finding(image: Image.Image, fmt: str) -> tuple[str, str] | None:
    mode, transparent = image.mode, "transparency" in image.info
    if mode in _GRAY_MODES:
        depth = "16-bit " if mode.startswith("I") else ""
        return f"{depth}grayscale", "copied to 3 channels" if not depth else "reduced to 8 bits, copied to 3 channels"
    if mode in ("LA", "La"):
        return "grayscale with alpha", "copied to 3 channels, alpha dropped"
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and transparent):
        return "transparency (alpha)", "alpha dropped; transparent areas show their hidden colour (often black)"
    if mode == "P" and fmt == "PNG":
        return "palette PNG", "converted to RGB"
    if mode == "CMYK":
        return "CMYK JPEG", "converted to RGB"
    return None


def inspect_file(path: str, name: str = "", decode: Decoder | None = None) -> list[Finding]:
    """Fully checks one candidate image: decodes it and notes what the pipeline will change.

    Args:
        path: the file.
        name: how to show it (defaults to `path`).
        decode: decodes the file or raises with the reason; Pillow decodes when None.
            Pass TensorFlow's decoder to judge a file exactly as training will.

    Returns:
        No findings for an ordinary image; one `SKIPPED` finding for a file that
        cannot be used; otherwise notes on what happens to it (all `USED`).
    """
    name = name or path
    skip = lambda finding, detail: [Finding(path, name, finding, SKIPPED, detail)]  # noqa: E731
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
            size = os.fstat(handle.fileno()).st_size
    except OSError as error:
        return skip("cannot be read", error.strerror or type(error).__name__)
    fmt = sniff_format(head)
    if fmt is None:
        return [_sniff(path, name) or Finding(path, name, "not an image", SKIPPED)]
    if fmt == "BMP" and (problem := _bmp_problem(head, size)):
        return skip(problem, "TensorFlow cannot read it correctly: convert it to PNG")
    notes: list[tuple[str, str]] = []
    try:
        with Image.open(path) as image:
            notes.append(_mode_finding(image, fmt))
            if fmt == "BMP" and image.mode == "P":
                return skip("8-bit colour-palette BMP", "TensorFlow reads its colours as greys: convert it to PNG")
            if fmt == "JPEG" and image.getexif().get(0x0112, 1) not in (0, 1):
                notes.append(("EXIF rotation tag", "as stored, unrotated (the tag is ignored)"))
            if decode is None:
                image.draft(None, (1, 1))  # JPEG only: decode at 1/8 scale, still reading every byte
                image.load()
            if getattr(image, "is_animated", False):
                notes.append((f"animated {fmt}", "first frame only"))
    except Image.DecompressionBombError:
        notes.append(("very large image", "not decoded by this check"))
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, ValueError...
        if decode is None:
            return skip(f"damaged {fmt}", f"cannot be decoded ({_first_line(error)})")
    if decode is not None:
        try:
            decode(path)
        except Exception as error:  # the decoder's own error type: any failure means "skip it"
            return skip(f"damaged {fmt}", f"cannot be decoded ({_first_line(error)})")
    suffix = Path(path).suffix
    if _EXTENSION_FORMATS.get(suffix.lower()) != fmt:
        named = f"named {suffix}" if suffix else "without an extension"
        notes.insert(0, (f"{fmt} file {named}", "read by its content"))
    return [Finding(path, name, text, USED, detail) for text, detail in filter(None, notes)]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_files(listing: FolderListing, decode: Decoder | None = None, workers: int | None = None) -> FolderListing:
    """Decodes every candidate image once (in a thread pool) and drops the ones that fail.

    Returns:
        A new listing holding only usable files, with every finding added. It may
        now have `errors()`: a class whose every image failed to decode.
    """
    names = [Path(p).relative_to(listing.root).as_posix() for p in listing.paths]
    workers = workers or min(16, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoders release the GIL
        results = list(pool.map(lambda pn: inspect_file(pn[0], pn[1], decode), zip(listing.paths, names)))
    keep = [i for i, found in enumerate(results) if not any(f.action == SKIPPED for f in found)]
    findings = listing.findings + [f for found in results for f in found]
    return FolderListing(listing.root, listing.class_names, [listing.paths[i] for i in keep],
                         [listing.labels[i] for i in keep], findings)


def skipped_line(finding: Finding) -> str:
    """`notes.jpg (not an image: not JPEG, PNG, GIF or BMP)`: one skipped file, for people."""
    detail = f": {finding.detail}" if finding.detail else ""
    return f"{finding.path} ({finding.finding}{detail})"


def describe(findings: list[Finding], limit: int = 20) -> str:
    """`a.jpg (damaged JPEG), b.txt (not an image) and 3 more`: findings for a one-line message."""
    shown = [f"{f.name} ({f.finding})" for f in findings[:limit]]
    more = f" and {len(findings) - limit} more" if len(findings) > limit else ""
    return ", ".join(shown) + more
