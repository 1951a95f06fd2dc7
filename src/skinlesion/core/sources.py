"""The schema of one labelled set (:class:`LabelledSetConfig`), which the top of the ``data``
section and each of its ``sources`` share, so that a set is accepted or refused the same way in
both places, with the same message.

``data`` describes one labelled set with these keys, or several in ``data.sources``: each a
:class:`SourceConfig`, the same keys plus a ``name``. A source's images are trained with a loss
over its own ``classes`` only, its lesion ids are namespaced by its ``name``
(``isic2017:ISIC_0000001``), and folds are stratified by source x diagnosis. The keys of the set
(:data:`SINGLE_SOURCE_KEYS`) then live in the sources; the shared ones (``image_size``,
``cache_dir``, ``colour_constancy``, ``interpolation``) stay at the top of ``data``.

>>> s = SourceConfig(name="isic2017", format="csv", images="img", labels="labels.csv")
>>> s.classes is None  # the labels it contains
True
>>> SourceConfig(name="ham", format="ham10000", root="h", images="i")  # doctest: +ELLIPSIS
Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: ...images: not a key of format=ham10000, which...
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

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


def renamed_metadata_key(values: Any, prefix: str) -> Any:
    """``metadata``, the old name of HAM10000's label table (its ``HAM10000_metadata.csv``), as
    ``labels``: "metadata" now means patient age, sex and site only. A saved config's
    ``metadata: null`` is dropped silently; a file is moved to ``labels`` with a warning.
    ``prefix`` names the keys' place (``data.``)."""
    if not isinstance(values, dict) or "metadata" not in values:
        return values
    values = dict(values)
    old = values.pop("metadata")
    if old is None:
        return values
    if values.get("labels") not in (None, old):
        raise ValueError(
            f"{prefix}metadata (the old name of {prefix}labels) and {prefix}labels name "
            f"different files; keep {prefix}labels only"
        )
    text = f"{prefix}metadata is deprecated: HAM10000's label table is now {prefix}labels"
    warnings.warn(text, DeprecationWarning, stacklevel=2)
    log.warning("%s", text)
    values["labels"] = old
    return values


SetFormat = Literal["ham10000", "csv", "isic2019"]
# The file keys each format needs and takes, and what it reads ({root}: how the key is named).
_NEEDS: dict[str, tuple[str, ...]] = {
    "csv": ("images", "labels"),
    "ham10000": ("root",),
    "isic2019": ("root",),
}
_TAKES: dict[str, tuple[str, ...]] = {
    "csv": ("images", "labels"),
    "ham10000": ("root", "labels"),
    "isic2019": ("root",),
}
_READS: dict[str, str] = {
    "csv": "a labels CSV over an images folder, not a release's folder",
    "ham10000": "the release's own layout under {root} (its labels file, images in any sub-folder)",
    "isic2019": "the release's own layout under {root}",
}


class LabelledSetConfig(_Strict):
    """One labelled set: a ``format`` with its files (``root``; or ``images`` + ``labels`` +
    ``columns``), its ``classes``, a ``where`` filter and a ``max_images`` subset. The top of
    ``data`` is one (:class:`~skinlesion.core.config.DataConfig`), and so is each source
    (:class:`SourceConfig`); :func:`check_set_keys` holds them to the same rules."""

    KEY_PREFIX: ClassVar[str] = ""
    """How the set's messages name its keys: ``data.images`` at the top of ``data``; bare in a
    source, whose label the message gets in front (``data.sources[1] (isic2017): images``)."""
    ROOT_LATER: ClassVar[bool] = False
    """Whether an unset ``root`` is refused only when the data is read (the top of ``data``,
    whose defaults describe HAM10000 at a root not yet given) rather than by the schema."""

    format: SetFormat = "ham10000"
    """``ham10000``: the HAM10000 release in ``root``; ``csv``: any labelled set (``images``,
    ``labels``, ``columns``); ``isic2019``: the ISIC 2019 training release in ``root``."""
    root: str | None = None
    """``ham10000`` or ``isic2019``: the release's folder."""
    images: str | None = None
    """``csv``: the image folder."""
    labels: str | None = None
    """``csv``: the labels CSV (one row per image); ``ham10000``: its metadata (label) file,
    ``HAM10000_metadata.csv``; default: found in ``root``. (``metadata``, its old name, is still
    read, with a warning.)"""
    columns: ColumnsConfig = ColumnsConfig()
    """``csv``: the labels file's column names."""
    classes: list[str] | None = None
    """The set's classes; a label outside them is an error. For one set, the model's classes in
    output order; for a source, its label space: its loss is a softmax over these classes only,
    so it teaches nothing about the others. A class listed without images needs them elsewhere
    (each class needs a group for every fold). Default: the labels it contains, sorted (for
    ``ham10000`` its 7 classes, for ``isic2019`` its 8)."""
    where: dict[str, list[str]] | None = None
    """``csv`` or ``isic2019``: keep only rows whose column holds one of the values, e.g.
    ``{split: [train, val]}``."""
    max_images: int | None = Field(None, ge=10)
    """Lesion-grouped stratified subset of the set, for quick runs; ``None`` = all its images."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        return renamed_metadata_key(values, cls.KEY_PREFIX or "data.sources[i].")

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
    def _format_keys(self) -> LabelledSetConfig:
        check_set_keys(self)
        return self

    def place(self, index: int) -> str:
        """What messages about this set put before a key (``data.``; a source:
        ``data.sources[1] (isic2017): ``); ``index``: its position in ``data.sources``."""
        return self.KEY_PREFIX


def check_set_keys(s: LabelledSetConfig) -> None:
    """The keys given fit the set's ``format`` (``ValueError`` naming the key): the files it
    needs are given and no key it does not read is set, so nothing is silently ignored."""
    k, fmt = s.KEY_PREFIX, s.format
    given = {key for key in ("root", "images", "labels") if getattr(s, key) is not None}
    missing = [key for key in _NEEDS[fmt] if key not in given]
    if s.ROOT_LATER:
        missing = [key for key in missing if key != "root"]
    if missing:
        raise ValueError(f"{k}format={fmt} needs {' and '.join(k + m for m in missing)}")
    extra = sorted(given - set(_TAKES[fmt]))
    if extra:
        reads = _READS[fmt].format(root=f"{k}root")
        named = ", ".join(k + e for e in extra)
        raise ValueError(f"{named}: not a key of {k}format={fmt}, which reads {reads}")
    if fmt == "ham10000" and s.where is not None:
        raise ValueError(f"{k}where applies to {k}format=csv or isic2019")
    if fmt != "csv" and s.columns != ColumnsConfig():
        raise ValueError(f"{k}columns applies to {k}format=csv, not {fmt}")


SINGLE_SOURCE_KEYS: tuple[str, ...] = tuple(LabelledSetConfig.model_fields)
"""The keys of ``data`` that describe one labelled set; with ``data.sources`` each source has
its own."""


class _Named(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    """A short identifier (a letter, then letters, digits, ``_`` or ``-``; at most 32): the
    ``source`` column of folds and predictions, and the prefix of the source's lesion ids."""


class SourceConfig(LabelledSetConfig, _Named):
    """One labelled set of a multi-source run: the keys of a :class:`LabelledSetConfig` (its
    ``format`` without a default) after a ``name`` (the second base, so that ``name`` comes
    first in a saved config)."""

    format: SetFormat

    def place(self, index: int) -> str:
        return f"{source_label(index, self.name)}: "


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
