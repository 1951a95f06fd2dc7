"""The ``data.sources`` section: several labelled sets in one run, each a :class:`SourceConfig`
with its own format, files and label space (and the csv column names every labelled set uses).

A source's images are trained with a loss over its own ``classes`` only, its lesion ids are
namespaced by its ``name`` (``isic2017:ISIC_0000001``), and folds are stratified by source x
diagnosis. The keys of ``data`` that describe one labelled set (:data:`SINGLE_SOURCE_KEYS`)
then live in the sources; the shared ones (``image_size``, ``cache_dir``, ``colour_constancy``,
``interpolation``) stay at the top of ``data``.

>>> s = SourceConfig(name="isic2017", format="csv", images="img", labels="labels.csv")
>>> s.classes is None  # the labels it contains
True
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ColumnsConfig(_Strict):
    """Column names of a ``data.format: csv`` labels file; the loader renames them to the
    canonical ``image_id``, ``dx``, ``lesion_id``, ``age``, ``sex`` and ``localization``."""

    image: str = "image_id"
    """An image id (``ID`` finds ``ID.jpg``/``.jpeg``/``.png``/``.bmp`` in ``data.images``) or a
    path relative to ``data.images``."""
    label: str = "dx"
    group: str | None = None
    """Lesion or patient id; default ``lesion_id`` when the file has it, else none: each image
    is then its own group and leakage across folds cannot be ruled out."""
    age: str | None = None
    """Default ``age`` when the file has it (as the other two)."""
    sex: str | None = None
    localization: str | None = None


log = logging.getLogger(__name__)


def where_lists(v: Any) -> Any:
    """A ``where`` filter with every value a list: ``{split: test}`` means the one value."""
    if isinstance(v, dict):
        return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
    return v


def renamed_metadata_key(values: Any, where: str) -> Any:
    """``metadata``, the old name of HAM10000's label table (its ``HAM10000_metadata.csv``), as
    ``labels``: "metadata" now means patient age, sex and site only. A saved config's
    ``metadata: null`` is dropped silently; a file is moved to ``labels`` with a warning."""
    if not isinstance(values, dict) or "metadata" not in values:
        return values
    values = dict(values)
    old = values.pop("metadata")
    if old is None:
        return values
    if values.get("labels") not in (None, old):
        raise ValueError(
            f"{where}.metadata (the old name of {where}.labels) and {where}.labels name "
            f"different files; keep {where}.labels only"
        )
    text = f"{where}.metadata is deprecated: HAM10000's label table is now {where}.labels"
    warnings.warn(text, DeprecationWarning, stacklevel=2)
    log.warning("%s", text)
    values["labels"] = old
    return values


SINGLE_SOURCE_KEYS: tuple[str, ...] = (
    "format",
    "root",
    "images",
    "labels",
    "columns",
    "classes",
    "where",
    "max_images",
)
"""The keys of ``data`` that describe one labelled set; with ``data.sources`` each source has
its own."""


class SourceConfig(_Strict):
    """One labelled set of a multi-source run: the keys of a single-source ``data`` section
    (``format`` with its ``root`` and, for ``ham10000``, ``labels``; or ``images`` + ``labels``
    + ``columns``; ``where``, ``max_images``) plus a ``name`` and its own label space
    ``classes``."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    """A short identifier (a letter, then letters, digits, ``_`` or ``-``; at most 32): the
    ``source`` column of folds and predictions, and the prefix of the source's lesion ids."""
    format: Literal["ham10000", "csv", "isic2019"]
    root: str | None = None
    """``ham10000`` or ``isic2019``: the release's folder."""
    images: str | None = None
    """``csv``: the image folder."""
    labels: str | None = None
    """``csv``: the labels CSV; ``ham10000``: its metadata (label) file, default: found in
    ``root``."""
    columns: ColumnsConfig = ColumnsConfig()
    classes: list[str] | None = None
    """The source's label space: its loss is a softmax over these classes only, so it teaches
    nothing about the others. A label outside it is an error; a class it lists without images
    is allowed. Default: the labels it contains (for ``ham10000`` its 7 classes, for
    ``isic2019`` its 8)."""
    where: dict[str, list[str]] | None = None
    """``csv`` or ``isic2019``: keep only rows whose column holds one of the values."""
    max_images: int | None = Field(None, ge=10)
    """Lesion-grouped stratified subset of this source; ``None`` = all its images."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        return renamed_metadata_key(values, "data.sources[i]")

    @field_validator("where", mode="before")
    @classmethod
    def _where_lists(cls, v: Any) -> Any:
        return where_lists(v)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"classes must list each class once, got {v}")
        return v

    @model_validator(mode="after")
    def _format_keys(self) -> SourceConfig:
        given = {k for k in ("root", "images", "labels") if getattr(self, k)}
        needs = {"csv": {"images", "labels"}, "ham10000": {"root"}, "isic2019": {"root"}}
        takes = {"csv": {"images", "labels"}, "ham10000": {"root", "labels"}}
        wanted = needs[self.format]
        if wanted - given:
            raise ValueError(f"format={self.format} needs {' and '.join(sorted(wanted - given))}")
        extra = given - takes.get(self.format, wanted)
        if extra:
            raise ValueError(f"{', '.join(sorted(extra))}: not a key of format={self.format}")
        if self.format == "ham10000" and self.where is not None:
            raise ValueError("where applies to format=csv or isic2019")
        if self.format != "csv" and self.columns != ColumnsConfig():
            raise ValueError(f"columns applies to format=csv, not {self.format}")
        return self


def check_sources(data: BaseModel) -> None:
    """With ``data.sources`` set: a non-empty list of uniquely named sources, and none of
    :data:`SINGLE_SOURCE_KEYS` changed at the top of ``data`` (``ValueError`` naming the key)."""
    sources: list[SourceConfig] | None = getattr(data, "sources", None)
    if sources is None:
        return
    if not sources:
        raise ValueError("data.sources is empty; list the sources, or null for one labelled set")
    fields = type(data).model_fields
    for key in SINGLE_SOURCE_KEYS:
        if getattr(data, key) != fields[key].default:
            raise ValueError(
                f"data.{key}: describes one labelled set; with data.sources each source "
                f"gives its own (data.sources[i].{key})"
            )
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        if s.name in seen:
            raise ValueError(
                f"data.sources[{i}] ({s.name}): name '{s.name}' is already the name of "
                f"data.sources[{seen[s.name]}]; names must be unique"
            )
        seen[s.name] = i


def source_label(i: int, name: str | None) -> str:
    """``data.sources[1] (isic2017)``: how every message names a source."""
    return f"data.sources[{i}]" + (f" ({name})" if name else "")


def error_key(loc: Sequence[int | str], tree: Mapping[str, Any] | None) -> tuple[str, bool]:
    """The dotted key of a validation error's location, a source named as
    :func:`source_label` does (``data.sources[1] (isic2017): where``); and whether the location
    lies in a source."""
    parts = [str(p) for p in loc]
    if len(loc) < 3 or tuple(loc[:2]) != ("data", "sources") or not isinstance(loc[2], int):
        return ".".join(parts), False
    entries = ((tree or {}).get("data") or {}).get("sources")
    entry = entries[loc[2]] if isinstance(entries, list) and loc[2] < len(entries) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    label = source_label(loc[2], name if isinstance(name, str) else None)
    rest = ".".join(parts[3:])
    return (f"{label}: {rest}" if rest else label), True
