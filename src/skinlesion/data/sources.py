"""Several labelled sets in one table (``data.sources``): each source loaded and validated as a
set of its own, its lesion ids namespaced by its name, and the whole checked together.

The table is that of :mod:`skinlesion.data.datasets` plus a ``source`` column; ``lesion_id`` is
``<name>:<lesion>`` (an image without a lesion is its own, ``<name>:<image_id>``), so two
sources cannot share a lesion by accident. Image ids stay as they are (they key the image
cache and the predictions): an id found in two sources is an error. Every fault names its
source, ``data.sources[1] (isic2017): ...``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from skinlesion.core.errors import DataError, SkinlesionError
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import SourceConfig, source_label
from skinlesion.data.datasets import LabelledSet, canonical_metadata, load_labelled_set
from skinlesion.data.ham10000 import load_ham10000, subset_by_lesion

log = logging.getLogger(__name__)


def _load_one(src: SourceConfig, verify: bool) -> LabelledSet:
    """The source as a set of its own; its groups are counted with the others (n_folds=0)."""
    if src.format == "ham10000":
        assert src.root is not None  # the schema requires it
        df = load_ham10000(src.root, src.labels, verify)
        return LabelledSet(canonical_metadata(df), CLASSES, True, str(src.root))
    return load_labelled_set(src, 0, verify)


def _renamed(err: SkinlesionError, label: str) -> SkinlesionError:
    """The same error with its message (or title) prefixed by the source's label."""
    if isinstance(err, DataError):
        return DataError(f"{label}: {err.title}", err.problems)
    return type(err)(f"{label}: {err}")


def load_source(
    src: SourceConfig, index: int, seed: int, verify: bool = True
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One source's table (``source`` column, namespaced ``lesion_id``, ``max_images``
    applied) and its description for ``dataset.json``."""
    label = source_label(index, src.name)
    try:
        labelled = _load_one(src, verify)
    except SkinlesionError as err:
        raise _renamed(err, label) from err
    classes = tuple(src.classes) if src.classes is not None else labelled.classes
    outside = labelled.table[~labelled.table["dx"].isin(classes)]
    if len(outside):
        first = outside.groupby("dx")["image_id"].agg(["first", "size"])
        problems = [
            f"label '{dx}': {r['size']} image(s), e.g. {r['first']}" for dx, r in first.iterrows()
        ]
        raise DataError(f"{label}: labels outside its classes {list(classes)}", problems)
    table = subset_by_lesion(labelled.table, src.max_images, seed)
    table = table.assign(source=src.name, lesion_id=f"{src.name}:" + table["lesion_id"].astype(str))
    info = {
        "name": src.name,
        "format": src.format,
        "source": labelled.source,
        "classes": list(classes),
        "grouped": labelled.grouped,
        "n_images": len(table),
        "n_groups": int(table["lesion_id"].nunique()),
    }
    for note in labelled.notes:
        log.info("%s: %s", label, note)
    return table.reset_index(drop=True), info


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
    sources: Sequence[SourceConfig], n_folds: int, seed: int = 42, verify: bool = True
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
