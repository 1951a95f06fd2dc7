"""The one loader of labelled sets: each set of a config read by its format
(:func:`load_labelled_set`), and a ``data`` section's sets in one table (:func:`load_labelled`),
whether it describes one set or several (``data.sources``). Training, ``skinlesion split`` and
every other reader of a config's data call these; :func:`check_data_paths` checks the files they
read, before any work.

With several sources the table is that of :mod:`skinlesion.data.datasets` plus a ``source``
column; ``lesion_id`` is ``<name>:<lesion>`` (an image without a lesion is its own,
``<name>:<image_id>``), so two sources cannot share a lesion by accident. Image ids stay as they
are (they key the image cache and the predictions): an id found in two sources is an error.
Every fault names its source, ``data.sources[1] (isic2017): ...``; one set's table is the set's
own, without a ``source`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion.core.config import DEFAULT_FOLD_SEED, DEFAULT_N_FOLDS, Config, DataConfig
from skinlesion.core.errors import ConfigError, DataError, SkinlesionError
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import LabelledSetConfig, SourceConfig, source_label
from skinlesion.data.datasets import (
    LabelledSet,
    canonical_metadata,
    load_csv_set,
    load_isic2019,
)
from skinlesion.data.ham10000 import load_ham10000, subset_by_lesion

log = logging.getLogger(__name__)

_RELEASE = {"ham10000": "a HAM10000 folder", "isic2019": "the ISIC 2019 training release"}
_DOWNLOAD = "`skinlesion download --dest {}` fetches HAM10000"


def check_set_paths(s: LabelledSetConfig, place: str = "data.") -> None:
    """The set's folders and files exist; ``place`` goes before each key in a message
    (``data.``, or a source's ``data.sources[1] (isic2017): ``)."""
    if s.format in _RELEASE and s.root is None:  # only the top of data leaves it to here
        hint = f" ({_DOWNLOAD.format('DIR')})" if s.format == "ham10000" else ""
        raise ConfigError(f"{place}root is not set: point it at {_RELEASE[s.format]}{hint}")
    for key, folder in (("root", True), ("images", True), ("labels", False)):
        value = getattr(s, key)
        if value is None:
            continue
        if folder and not Path(value).is_dir():
            fetch = key == "root" and s.format == "ham10000"
            hint = f" ({_DOWNLOAD.format(value)})" if fetch else ""
            raise DataError(f"{place}{key}: {value} is not a folder{hint}")
        if not folder and not Path(value).is_file():
            raise DataError(f"{place}{key}: file {value} not found")


def check_data_paths(data: DataConfig) -> None:
    """:func:`check_set_paths` of each labelled set of the section, named by its place."""
    for i, s in enumerate(data.labelled_sets()):
        check_set_paths(s, s.place(i))


def _read_set(s: LabelledSetConfig, n_folds: int, verify: bool) -> LabelledSet:
    """The set as its format reads it (checked against ``n_folds`` where the format does)."""
    if s.format == "csv":
        assert s.images is not None and s.labels is not None  # the schema requires them
        return load_csv_set(s.images, s.labels, s.columns, s.classes, s.where, n_folds, verify)
    assert s.root is not None  # check_set_paths refuses an unset root
    if s.format == "isic2019":
        return load_isic2019(s.root, s.where, n_folds, verify)
    table = canonical_metadata(load_ham10000(s.root, s.labels, verify))
    return LabelledSet(table, CLASSES, True, str(s.root))


def load_labelled_set(
    s: LabelledSetConfig,
    n_folds: int = DEFAULT_N_FOLDS,
    seed: int = DEFAULT_FOLD_SEED,
    verify: bool = True,
    place: str = "data.",
) -> LabelledSet:
    """One labelled set, whatever its format: its paths checked (keys named after ``place``),
    read and validated, held to its ``classes`` (a label outside them is an error) and cut to
    its ``max_images`` (lesion-grouped, stratified, by ``seed``)."""
    check_set_paths(s, place)
    labelled = _read_set(s, n_folds, verify)
    classes = tuple(s.classes) if s.classes is not None else labelled.classes
    outside = labelled.table[~labelled.table["dx"].isin(classes)]
    if len(outside):
        first = outside.groupby("dx")["image_id"].agg(["first", "size"])
        problems = [
            f"label '{dx}': {r['size']} image(s), e.g. {r['first']}" for dx, r in first.iterrows()
        ]
        raise DataError(f"labels outside {place}classes {list(classes)}", problems)
    table = subset_by_lesion(labelled.table, s.max_images, seed)
    return replace(labelled, table=table.reset_index(drop=True), classes=classes)


def _renamed(err: SkinlesionError, label: str) -> SkinlesionError:
    """The same error with its message (or title) prefixed by the source's label."""
    if isinstance(err, DataError):
        return DataError(f"{label}: {err.title}", err.problems)
    return type(err)(f"{label}: {err}")


def load_source(
    src: SourceConfig, index: int, seed: int, verify: bool = True
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One source's table (:func:`load_labelled_set`, then a ``source`` column and namespaced
    ``lesion_id``) and its description for ``dataset.json``; its groups are counted with the
    other sources' (:func:`load_sources`)."""
    label = source_label(index, src.name)
    try:
        labelled = load_labelled_set(src, 0, seed, verify, place="")
    except SkinlesionError as err:
        raise _renamed(err, label) from err
    table = labelled.table
    table = table.assign(source=src.name, lesion_id=f"{src.name}:" + table["lesion_id"].astype(str))
    info = {
        "name": src.name,
        "format": src.format,
        "source": labelled.source,
        "classes": list(labelled.classes),
        "grouped": labelled.grouped,
        "n_images": len(table),
        "n_groups": int(table["lesion_id"].nunique()),
    }
    for note in labelled.notes:
        log.info("%s: %s", label, note)
    return table, info


def _collisions(tables: Sequence[pd.DataFrame], names: Sequence[str]) -> list[str]:
    """An image id found in two sources: ``image X is in data.sources[0] (a) and [1] (b)``."""
    seen: dict[str, int] = {}
    problems = []
    for i, table in enumerate(tables):
        for image_id in table["image_id"]:
            j = seen.setdefault(image_id, i)
            if j != i:
                problems.append(
                    f"image {image_id} is in {source_label(j, names[j])} and "
                    f"{source_label(i, names[i])}; drop it from one (where) or rename it"
                )
    return problems


def _thin_classes(table: pd.DataFrame, classes: Sequence[str], n_folds: int) -> list[str]:
    """Classes of the union with fewer lesion groups than folds, over all sources."""
    groups = table.groupby("dx")["lesion_id"].nunique()
    return [
        f"class '{c}' has {int(groups.get(c, 0))} image group(s) over all sources, fewer than "
        f"the {n_folds} folds (cv.n_folds); add images or drop the class from the sources"
        for c in classes
        if int(groups.get(c, 0)) < n_folds
    ]


def load_sources(
    sources: Sequence[SourceConfig],
    n_folds: int = DEFAULT_N_FOLDS,
    seed: int = DEFAULT_FOLD_SEED,
    verify: bool = True,
) -> LabelledSet:
    """Every source of ``data.sources`` in one validated set; its classes are the sorted union
    of the sources' ``classes``, and it is grouped only if every source is."""
    tables, infos = [], []
    for i, src in enumerate(sources):
        table, info = load_source(src, i, seed, verify)
        tables.append(table)
        infos.append(info)
    names = [s.name for s in sources]
    problems = _collisions(tables, names)
    if problems:
        raise DataError("data.sources: an image in two sources", problems)
    table = pd.concat(tables, ignore_index=True)
    classes = tuple(sorted({c for info in infos for c in info["classes"]}))
    problems = _thin_classes(table, classes, n_folds)
    if problems:
        raise DataError("data.sources: too few groups", problems)
    notes = tuple(
        f"{source_label(i, s['name'])}: {s['n_images']} images, {s['n_groups']} groups, "
        f"classes {', '.join(s['classes'])}"
        for i, s in enumerate(infos)
    )
    return LabelledSet(
        table,
        classes,
        all(i["grouped"] for i in infos),
        " + ".join(names),
        notes,
        tuple(infos),
    )


def load_labelled(cfg: Config, verify: bool = True) -> LabelledSet:
    """The ``data`` section's images and labels, validated, with the class list and grouping:
    its one set (:func:`load_labelled_set`), or its sources in one table (:func:`load_sources`);
    folds are counted by ``cv.n_folds`` and subsets drawn by ``cv.seed``."""
    if cfg.data.sources is None:
        return load_labelled_set(cfg.data, cfg.cv.n_folds, cfg.cv.seed, verify)
    return load_sources(cfg.data.sources, cfg.cv.n_folds, cfg.cv.seed, verify)


def warn_ungrouped_sources(labelled: LabelledSet) -> None:
    """:func:`warn_ungrouped` for the set, or for each of its sources that names no groups."""
    if not labelled.sources:
        if not labelled.grouped:
            warn_ungrouped(labelled.source)
        return
    for i, s in enumerate(labelled.sources):
        if not s["grouped"]:
            label = source_label(i, s["name"])
            warn_ungrouped(f"{label} ({s['source']})", f"data.sources[{i}].columns.group")


def warn_ungrouped(source: str, key: str = "data.columns.group") -> None:
    """The loud warning for a set without a group column (each image is its own group)."""
    log.warning(
        "%s names no lesion or patient (group) for its images: each image is its own group, "
        "so lesion-level folds are not possible and LEAKAGE CANNOT BE RULED OUT (images of "
        "one lesion may sit in several folds); set %s if the file has one",
        source,
        key,
    )
