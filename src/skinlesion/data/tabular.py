"""Patient metadata (age, sex, anatomical site) as a fixed-length numeric vector.

The encoding is fitted on a training table and then frozen in a :class:`MetadataSpec` of plain
types that travels in the checkpoint, so new data is encoded exactly as the training data was:

- ``age``: standardised with the training mean and standard deviation (0 when missing), then a
  missing indicator: 2 values.
- a category (``sex``, ``localization``): one-hot over the training vocabulary (sorted), an
  ``unknown`` level (a value never seen in training, or none), then a missing indicator.

Values are normalised before use (stripped, lower-cased); empty text, ``nan`` and ``unknown``
(HAM10000's word for a missing sex or site) count as missing. A table without a field's column
encodes that field as missing for every row.

Anatomical sites differ between datasets: HAM10000 names 15 places (``back``, ``chest``,
``face``, ...), the ISIC archive (ISIC 2017-2020, BCN20000) uses its general sites
(``posterior torso``, ``anterior torso``, ``head/neck``, ...). With ``sites="general"`` (the
default of ``model.metadata_sites``) every ``localization`` is mapped to ISIC's general site
before fitting and encoding (:data:`SITE_GENERAL`), so a model trained on one set reads the
other's sites; HAM10000's unsided ``trunk`` becomes ``torso``, and a torso side the training data
never had falls back to ``torso`` when that is known (:data:`SITE_PARENT`). ``sites="as_is"``
keeps each set's own names.

>>> import pandas as pd
>>> table = pd.DataFrame({"age": [40.0, 60.0], "sex": ["male", "female"]})
>>> spec = fit_metadata_spec(table, ("age", "sex"))
>>> spec.columns()
['age', 'age_missing', 'sex=female', 'sex=male', 'sex=unknown', 'sex_missing']
>>> encode_metadata(pd.DataFrame({"age": [50.0], "sex": ["other"]}), spec).tolist()
[[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

METADATA_FIELDS: tuple[str, ...] = ("age", "sex", "localization")
"""The canonical metadata columns a data table may carry; ``age`` is numeric, the rest
categories."""
NUMERIC_FIELDS: frozenset[str] = frozenset({"age"})
MetadataInput = pd.DataFrame | Sequence[Mapping[str, Any] | None] | None
"""Metadata as callers give it: a table, or one record (or ``None``) per image."""
MISSING_WORDS: frozenset[str] = frozenset({"", "nan", "none", "null", "unknown", "na", "n/a"})
SITE_GENERAL: dict[str, str] = {
    # HAM10000's localization -> the ISIC archive's anatom_site_general
    "abdomen": "anterior torso",
    "chest": "anterior torso",
    "back": "posterior torso",
    "trunk": "torso",
    "face": "head/neck",
    "scalp": "head/neck",
    "ear": "head/neck",
    "neck": "head/neck",
    "hand": "upper extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    "genital": "oral/genital",
}
"""Site names mapped to the ISIC archive's general sites (``head/neck``, ``upper extremity``,
``lower extremity``, ``anterior torso``, ``posterior torso``, ``lateral torso``, ``torso``,
``palms/soles``, ``oral/genital``); a name not listed is kept."""
SITE_PARENT: dict[str, str] = {
    "anterior torso": "torso",
    "posterior torso": "torso",
    "lateral torso": "torso",
}
"""The coarser site a side of the torso is encoded as when the training data never had it."""
SITE_MODES: tuple[str, ...] = ("general", "as_is")
ACCEPTED_COLUMNS: tuple[str, ...] = ("image_id", "image", "lesion_id", "dx", "dx_type", "dataset")
"""Columns of a labels file that a metadata table or record may carry beside the metadata
(HAM10000's metadata file is a metadata table): accepted, not used. Any other column is an
error, so that a misspelt field is never read as "not given"."""
FIELD_ALIASES: dict[str, str] = {
    "site": "localization",
    "location": "localization",
    "anatom_site_general": "localization",
    "anatom_site_general_challenge": "localization",
    "age_approx": "age",
    "gender": "sex",
}
"""Other data sets' names of the metadata fields, suggested when a table uses them."""


def normalise_category(value: Any) -> str | None:
    """Stripped, lower-case text; ``None`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    return None if text in MISSING_WORDS else text


def canonical_value(field: str, value: Any, sites: str = "as_is") -> str | None:
    """A category's normalised value; a site mapped to its general site when ``sites`` is
    ``"general"``.

    >>> canonical_value("localization", " Back ", "general")
    'posterior torso'
    >>> canonical_value("localization", "Back") is None, canonical_value("sex", "unknown")
    (False, None)
    """
    text = normalise_category(value)
    if text is not None and field == "localization" and sites == "general":
        return SITE_GENERAL.get(text, text)
    return text


def parse_age(value: Any) -> float | None:
    """Age in years as a float; ``None`` for a missing or unreadable value."""
    if value is None:
        return None
    try:
        age = float(str(value).strip())
    except ValueError:
        return None
    return age if math.isfinite(age) and age >= 0 else None


AGE_MAX = 120.0
"""The oldest age in years that metadata may give; an older one is an input mistake."""


def age_problem(value: Any) -> str | None:
    """Why ``value`` is not an age in years (a number from 0 to :data:`AGE_MAX`), or ``None``
    when it is one or is missing (empty, ``nan``, ``unknown``, ...).

    >>> age_problem("61"), age_problem(""), age_problem("sixty"), age_problem(500)
    (None, None, "age 'sixty' is not a number", 'age 500 is over 120')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if text.lower() in MISSING_WORDS:
        return None
    try:
        age = float(text)
    except ValueError:
        return f"age {text!r} is not a number"
    if not math.isfinite(age):
        return f"age {text!r} is not a number"
    if age < 0:
        return f"age {text} is negative"
    if age > AGE_MAX:
        return f"age {text} is over {AGE_MAX:g}"
    return None


def metadata_lookalike(name: str) -> str | None:
    """The metadata field that a column ``name`` other than the field's own most likely means
    (another data set's name, another case or spelling), or ``None``.

    >>> metadata_lookalike("site"), metadata_lookalike("Age"), metadata_lookalike("split")
    ('localization', 'age', None)
    """
    text = name.strip().lower()
    if text in FIELD_ALIASES:
        return FIELD_ALIASES[text]
    close = difflib.get_close_matches(text, METADATA_FIELDS, n=1, cutoff=0.8)
    return close[0] if close and name != close[0] else None


def _known_hint(key: str) -> str:
    """``did you mean F? (known: ...)`` for a key that is not a metadata field."""
    known = [*METADATA_FIELDS, *ACCEPTED_COLUMNS]
    close = metadata_lookalike(key) or next(
        iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None
    )
    hint = f"did you mean {close}? " if close else ""
    fields, accepted = ", ".join(METADATA_FIELDS), ", ".join(ACCEPTED_COLUMNS)
    return f"{hint}(known: {fields}; accepted, not used: {accepted})"


def unknown_columns(columns: Sequence[Any]) -> list[str]:
    """``unknown column 'C'; did you mean F? (known: ...)`` for each column that is neither a
    metadata field nor in :data:`ACCEPTED_COLUMNS`.

    >>> unknown_columns(["image_id", "age", "site"])[0].split(" (known")[0]
    "unknown column 'site'; did you mean localization?"
    """
    known = {*METADATA_FIELDS, *ACCEPTED_COLUMNS}
    names = dict.fromkeys(str(c) for c in columns)
    return [f"unknown column {c!r}; {_known_hint(c)}" for c in names if c not in known]


def _unknown_record_keys(records: Sequence[Mapping[str, Any] | None]) -> list[str]:
    """As :func:`unknown_columns` for the keys of Python records, naming the records."""
    known = {*METADATA_FIELDS, *ACCEPTED_COLUMNS}
    where: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        for key in record or {}:
            if str(key) not in known:
                where.setdefault(str(key), []).append(i)
    problems = []
    for key, rows in where.items():
        listed = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        which = f"record{'s' if len(rows) > 1 else ''} {listed}"
        problems.append(f"unknown key {key!r} ({which}); {_known_hint(key)}")
    return problems


def age_problems(ages: Sequence[Any], lines: Sequence[int], ids: Sequence[Any]) -> list[str]:
    """``line N (image_id ID): why`` for each value of ``ages`` that is not an age
    (:func:`age_problem`): the one wording of a metadata file's faults, under a title that
    names the file.

    >>> age_problems(["61", "-5.0"], [2, 3], ["a1", "a2"])
    ['line 3 (image_id a2): age -5.0 is negative']
    """
    found = zip(lines, ids, map(age_problem, ages), strict=True)
    return [f"line {line} (image_id {i}): {why}" for line, i, why in found if why]


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """The fields, checked against :data:`METADATA_FIELDS` (each at most once)."""
    unknown = [f for f in fields if f not in METADATA_FIELDS]
    if unknown:
        raise ConfigError(
            f"model.metadata: unknown field(s) {unknown}; known: {list(METADATA_FIELDS)}"
        )
    if len(set(fields)) != len(fields):
        raise ConfigError(f"model.metadata: a field is listed twice in {list(fields)}")
    return tuple(fields)


@dataclass(frozen=True)
class MetadataSpec:
    """How a table's metadata becomes a vector: fields, age scaling, category vocabularies."""

    fields: tuple[str, ...]
    age_mean: float = 0.0
    age_std: float = 1.0
    vocab: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (field, sorted values) per category
    sites: str = "as_is"  # "general": sites mapped to ISIC's general sites (SITE_GENERAL)

    @cached_property
    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        # Cached: the encoder looks a field's vocabulary up once per value.
        return dict(self.vocab)

    def columns(self) -> list[str]:
        """The name of every position of the vector."""
        names: list[str] = []
        for f in self.fields:
            if f in NUMERIC_FIELDS:
                names += [f, f"{f}_missing"]
            else:
                names += [f"{f}={v}" for v in self.vocabulary[f]]
                names += [f"{f}=unknown", f"{f}_missing"]
        return names

    @property
    def dim(self) -> int:
        return len(self.columns())

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints load with ``weights_only=True``)."""
        return {
            "fields": list(self.fields),
            "age_mean": float(self.age_mean),
            "age_std": float(self.age_std),
            "vocab": {f: list(v) for f, v in self.vocab},
            "sites": self.sites,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetadataSpec:
        return cls(
            fields=tuple(d["fields"]),
            age_mean=float(d["age_mean"]),
            age_std=float(d["age_std"]),
            vocab=tuple((f, tuple(v)) for f, v in d["vocab"].items()),
            sites=str(d.get("sites", "as_is")),  # specs saved before site mapping kept names
        )

    def category(self, field: str, value: Any) -> str | None:
        """The vocabulary entry ``value`` encodes as: its canonical value, or for a torso side
        the training data never had, ``torso`` when known; ``None`` when missing; a value
        outside the vocabulary is returned as is (it encodes as ``unknown``)."""
        v = canonical_value(field, value, self.sites)
        known = self.vocabulary[field]
        if v is not None and v not in known and SITE_PARENT.get(v) in known:
            return SITE_PARENT[v]
        return v


def _column(table: pd.DataFrame, field: str) -> list[Any]:
    return table[field].tolist() if field in table.columns else [None] * len(table)


def fit_metadata_spec(
    table: pd.DataFrame, fields: Sequence[str], sites: str = "general"
) -> MetadataSpec:
    """The encoding of ``fields`` fitted on a training table (its values only, never labels);
    ``sites``: ``"general"`` maps sites to ISIC's general sites, ``"as_is"`` keeps them."""
    fields = check_fields(fields)
    if sites not in SITE_MODES:
        raise ConfigError(f"model.metadata_sites: {sites!r}; expected one of {list(SITE_MODES)}")
    absent = [f for f in fields if f not in table.columns]
    if absent:
        log.warning("metadata column(s) %s not in the data: missing for every image", absent)
    age_mean, age_std = 0.0, 1.0
    vocab = []
    for f in fields:
        if f in NUMERIC_FIELDS:
            ages = np.array([a for a in map(parse_age, _column(table, f)) if a is not None])
            if len(ages):
                age_mean = float(ages.mean())
                age_std = float(ages.std()) if len(ages) > 1 and ages.std() > 0 else 1.0
        else:
            values = {canonical_value(f, v, sites) for v in _column(table, f)}
            vocab.append((f, tuple(sorted(v for v in values if v is not None))))
    return MetadataSpec(fields, age_mean, age_std, tuple(vocab), sites)


def _encode_field(values: list[Any], field: str, spec: MetadataSpec) -> np.ndarray:
    if field in NUMERIC_FIELDS:
        ages = [parse_age(v) for v in values]
        out = np.zeros((len(values), 2), dtype=np.float32)
        for i, a in enumerate(ages):
            if a is None:
                out[i, 1] = 1.0
            else:
                out[i, 0] = (a - spec.age_mean) / spec.age_std
        return out
    known = spec.vocabulary[field]
    position = {v: i for i, v in enumerate(known)}
    out = np.zeros((len(values), len(known) + 2), dtype=np.float32)
    for i, v in enumerate(spec.category(field, value) for value in values):
        if v is None:
            out[i, len(known)] = out[i, len(known) + 1] = 1.0  # unknown, and missing
        else:
            out[i, position.get(v, len(known))] = 1.0
    return out


def encode_metadata(table: pd.DataFrame | None, spec: MetadataSpec, n: int = 0) -> np.ndarray:
    """Vectors (N, ``spec.dim``) for the rows of ``table``; ``None`` = ``n`` rows all missing."""
    if table is None:
        table = pd.DataFrame(index=range(n))
    parts = [_encode_field(_column(table, f), f, spec) for f in spec.fields]
    if not parts:
        return np.zeros((len(table), 0), dtype=np.float32)
    return np.concatenate(parts, axis=1)


def unseen_values(table: pd.DataFrame | None, spec: MetadataSpec) -> dict[str, dict[str, int]]:
    """Per category field, the values of ``table`` outside the training vocabulary (they encode
    as ``unknown``, which training saw only for missing values), with their counts.

    >>> spec = fit_metadata_spec(pd.DataFrame({"localization": ["back", "face"]}), ["localization"])
    >>> new = pd.DataFrame({"localization": ["chest", "lateral torso", "Face", None]})
    >>> unseen_values(new, spec)
    {'localization': {'anterior torso': 1, 'lateral torso': 1}}
    """
    out: dict[str, dict[str, int]] = {}
    if table is None:
        return out
    for f in spec.fields:
        if f in NUMERIC_FIELDS:
            continue
        known = spec.vocabulary[f]
        counts: dict[str, int] = {}
        for value in _column(table, f):
            v = spec.category(f, value)
            if v is not None and v not in known:
                counts[v] = counts.get(v, 0) + 1
        if counts:
            out[f] = dict(sorted(counts.items()))
    return out


def describe_unseen(unseen: dict[str, dict[str, int]]) -> str:
    """One line for :func:`unseen_values`' result.

    >>> describe_unseen({"localization": {"lateral torso": 19}, "sex": {"other": 1}})
    "localization 'lateral torso' x19; sex 'other' x1"
    """
    return "; ".join(
        f"{field} " + ", ".join(f"{v!r} x{n}" for v, n in counts.items())
        for field, counts in unseen.items()
    )


def missing_vector(spec: MetadataSpec) -> np.ndarray:
    """The encoding of a row with no metadata at all (what metadata dropout feeds)."""
    return encode_metadata(None, spec, n=1)[0]


def metadata_table(metadata: MetadataInput, n: int) -> pd.DataFrame | None:
    """``metadata`` as a table of ``n`` rows (index 0..n-1); ``None`` stays ``None``. A key
    other than the metadata fields and :data:`ACCEPTED_COLUMNS`, or an age that is not one, is
    a :class:`DataError` listing every such fault.

    >>> metadata_table([{"age": 60}, None], 2).to_dict("records")
    [{'age': 60.0}, {'age': nan}]
    """
    if metadata is None:
        return None
    if isinstance(metadata, pd.DataFrame):
        table = metadata.reset_index(drop=True)
        problems = unknown_columns(list(table.columns))
    else:
        table = pd.DataFrame([dict(r) if r else {} for r in metadata], index=range(len(metadata)))
        problems = _unknown_record_keys(metadata)
    if len(table) != n:
        raise ValueError(f"metadata has {len(table)} rows for {n} images")
    if "age" in table.columns:
        ages = [(i, age_problem(v)) for i, v in enumerate(table["age"])]
        problems += [f"image {i}: {why}" for i, why in ages if why]
    if problems:
        raise DataError("metadata", problems)
    return table
