"""One loader for labelled tables: the steps every labels file goes through, whoever reads it
(HAM10000's labels file, a ``data.format: csv`` set, ISIC 2019, ``skinlesion evaluate``).

Read (CSV or Dataverse ``.tab``, as strings) -> check the columns -> number the file's lines
(header = line 1, fixed before any filter) -> keep the rows ``where`` asks for -> strip ->
map labels (optional) -> check empty cells, labels and duplicates -> attach each image's
path through an :class:`ImageLookup` (a folder of ``ID.<ext>`` files, or HAM10000's recursive
index). Every fault has one wording, names the file and line, and all of a file's faults are
raised together as one :class:`DataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from skinlesion.core.config import close_matches
from skinlesion.core.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
DROP = {"", "-", "drop", "ignore"}
"""Label-map targets that remove the image."""


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or a Dataverse ``.tab`` (tab-separated, quoted strings) as strings."""
    sep = "\t" if path.suffix == ".tab" else ","
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty (expected a header and rows)") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot parse {path}", [str(err)]) from err
    if df.empty:
        raise DataError(f"{path}: no rows under the header {list(df.columns)}")
    return df


def check_columns(df: pd.DataFrame, needed: Sequence[str], source: str, expected: str) -> None:
    """Raise, naming the missing, found and ``expected`` columns, unless ``df`` has ``needed``."""
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: wrong columns",
            [f"missing column(s) {missing}; found {list(df.columns)}; {expected}"],
        )


def number_lines(df: pd.DataFrame) -> pd.DataFrame:
    """A ``line`` column: each row's line in the file (header = line 1)."""
    return df.assign(line=np.arange(len(df)) + 2)


def keep_rows(
    df: pd.DataFrame,
    where: Mapping[str, str | Sequence[str]] | None,
    source: str,
    name: str = "where",
) -> pd.DataFrame:
    """The rows whose column (stripped) holds one of the values (a string is the one value). A
    column or value the file does not have is an error with its close matches, and so is no row
    left (``name``: how the user gave the filter)."""
    if not where:
        return df
    problems, original = [], df
    for col, values in where.items():
        wanted = [values] if isinstance(values, str) else [str(v) for v in values]
        if col not in df.columns:
            problems.append(f"{name}: no column '{col}'; " + close_matches(col, list(df.columns)))
            continue
        present = sorted(set(original[col].astype(str).str.strip()))
        column = df[col].astype(str).str.strip()
        problems += [
            f"{name}: no row has {col} '{v}'; " + close_matches(v, present)
            for v in wanted
            if v not in present
        ]
        df = df[column.isin(wanted)]
    if problems:
        raise DataError(f"{source}: {name} asks for what the file does not have", problems)
    if df.empty:
        raise DataError(f"{source}: no rows", [f"no row matches {name} {dict(where)}"])
    return df


def strip(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    return df.assign(**{c: df[c].astype(str).str.strip() for c in columns})


def apply_label_map(
    df: pd.DataFrame, label_map: Mapping[str, str], classes: Sequence[str]
) -> pd.DataFrame:
    """``dx`` through ``label_map`` (labels it does not name are kept); a target in
    :data:`DROP` removes the row."""
    unmapped = sorted(set(df["dx"]) - set(label_map) - set(classes))
    df = df.assign(dx=df["dx"].map(lambda d: label_map.get(d, d)))
    if unmapped:
        log.info("labels not in the map kept as they are: %s", unmapped)
    dropped = df["dx"].isin(DROP)
    if dropped.any():
        log.info("dropping %d image(s) whose label maps to 'drop'", int(dropped.sum()))
    return df[~dropped]


def empty_cells(df: pd.DataFrame, columns: Mapping[str, str], source: str) -> list[str]:
    """``SOURCE line N: empty NAME`` for each empty cell of ``columns`` (column -> the name the
    user knows it by)."""
    return [
        f"{source} line {line}: empty {name}"
        for line, *values in df[["line", *columns]].itertuples(index=False)
        for name, value in zip(columns.values(), values, strict=True)
        if value == ""
    ]


def unknown_labels(
    df: pd.DataFrame, classes: Sequence[str], source: str, hint: str = ""
) -> list[str]:
    """``SOURCE line N (image ID): unknown label 'X', expected one of [...]`` per row whose
    (non-empty) ``dx`` is not in ``classes``."""
    known = set(classes)
    return [
        f"{source} line {r.line} (image {r.image_id}): unknown label '{r.dx}', expected one of "
        f"{list(classes)}{hint}"
        for r in df.itertuples()
        if r.dx and r.dx not in known
    ]


def duplicate_images(df: pd.DataFrame, source: str) -> list[str]:
    """``SOURCE: image_id ID on lines 2, 9`` for each (non-empty) ``image_id`` listed twice."""
    named = df[df["image_id"] != ""]
    return [
        f"{source}: image_id {image_id} on lines {', '.join(map(str, lines))}"
        for image_id, lines in named.groupby("image_id", sort=True)["line"]
        if len(lines) > 1
    ]


def check_image(path: Path) -> str | None:
    """``None`` if the file decodes as an image, else what is wrong with it.

    The whole image is decoded: a header check (``verify()``) passes a truncated JPEG that then
    fails after hours of work. A file over PIL's pixel limit (a decompression bomb) is refused.
    """
    try:
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError as err:
        return f"{path}: not a readable image, too many pixels ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{path}: not a readable image ({type(err).__name__}: {err})"
    return None


def image_id_of(value: str) -> str:
    """The id of an image named by id or relative path: the path without its extension."""
    path = PurePosixPath(value)
    return str(path.with_suffix("")) if path.suffix.lower() in IMAGE_EXTENSIONS else value


class ImageLookup(Protocol):
    """Where a table's image column finds its files."""

    def find(self, value: str) -> Path | None:
        """The file ``value`` (an image id, or a path) names; ``None`` if there is none."""

    def absent(self, value: str) -> str:
        """Why ``value`` found no file, for the user."""


@dataclass(frozen=True)
class FolderImages:
    """An image id finds ``folder/ID.<jpg|jpeg|png|bmp>``; a value with an image extension is
    a path relative to ``folder``."""

    folder: Path

    def find(self, value: str) -> Path | None:
        if PurePosixPath(value).suffix.lower() in IMAGE_EXTENSIONS:
            path = self.folder / value
            return path if path.is_file() else None
        for ext in IMAGE_EXTENSIONS:
            for variant in (ext, ext.upper()):
                path = self.folder / f"{value}{variant}"
                if path.is_file():
                    return path
        return None

    def absent(self, value: str) -> str:
        return f"no image '{value}' (.jpg/.png/...) in {self.folder}"


@dataclass
class IndexedImages:
    """An image id finds the file of that stem anywhere under ``root`` (HAM10000's two image
    folders, or any tree); two files of one stem are an error."""

    root: Path
    _index: dict[str, Path] | None = field(default=None, repr=False)

    def find(self, value: str) -> Path | None:
        if self._index is None:
            self._index = index_images(self.root)
        return self._index.get(value)

    def absent(self, value: str) -> str:
        return f"no image '{value}' (.jpg/.png/...) under {self.root}"


def index_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map image id (file stem) to path for every image under ``root``."""
    exts = {e.lower() for e in extensions}
    index: dict[str, Path] = {}
    dups: list[str] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in exts and path.is_file() and not path.name.startswith("."):
            if path.stem in index:
                dups.append(f"{path.stem}: {index[path.stem]} and {path}")
            else:
                index[path.stem] = path
    if dups:
        raise DataError(f"{root}: the same image id in several files", dups)
    return index


def attach_images(
    df: pd.DataFrame, lookup: ImageLookup, source: str, verify: bool = True, column: str = "image"
) -> tuple[pd.DataFrame, list[str]]:
    """Add ``path`` (found from ``column``) and the problems: missing or unreadable images."""
    folder = getattr(lookup, "folder", None)
    if folder is not None and not Path(folder).is_dir():
        return df.assign(path=""), [f"image folder {folder} does not exist"]
    problems: list[str] = []
    paths = []
    for line, value in zip(df["line"], df[column], strict=True):
        path = lookup.find(value) if value else None
        if path is None and value:
            problems.append(f"{source} line {line}: {lookup.absent(value)}")
        elif path is not None and verify:
            bad = check_image(path)
            if bad:
                problems.append(f"{source} line {line}: {bad}")
        paths.append(str(path) if path else "")
    return df.assign(path=paths), problems
