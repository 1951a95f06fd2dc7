"""A packaged model's familiarity (:mod:`skinlesion.inference.familiarity`), fitted on the images
of the recipe in its card (:func:`skinlesion.training.fit_familiarity.fit_member` for each
member) and stored in the package.

Example::

    fit_packaged_familiarity(zoo_dir() / "NAME", ["data.cache_dir=/tmp/c"])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from skinlesion.core.config import Config, build_config, parse_overrides
from skinlesion.core.errors import CheckpointError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.packaged import CARD_FILE, load_packaged
from skinlesion.inference.packaged_meta import read_packaged_meta
from skinlesion.publishing.package import attach_familiarity
from skinlesion.training.fit_familiarity import fit_member, log_fitted
from skinlesion.training.run_data import load_run_data

log = logging.getLogger(__name__)


def _merged(tree: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in new.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def packaged_config(folder: Path, overrides: Sequence[str] = ()) -> Config:
    """The recipe a packaged model was trained with (its card's ``recipe``), with overrides
    (e.g. ``data.root=...`` where the data sits elsewhere, ``data.cache_dir=...``)."""
    card_path = folder / CARD_FILE
    recipe = json.loads(card_path.read_text()).get("recipe") if card_path.is_file() else None
    if not recipe:
        raise CheckpointError(f"{card_path}: no training recipe, so no images to fit on")
    tree = _merged(recipe, parse_overrides(list(overrides)))
    return build_config(tree, f"{card_path} recipe" + (" + overrides" if overrides else ""))


def fit_packaged_familiarity(
    folder: str | Path,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    refit: bool = False,
) -> Path | None:
    """Fit every member of a packaged model on the images of the recipe in its card (fold K:
    its own folds, made again as the run made them), and add ``familiarity.safetensors`` to the
    package (:func:`~skinlesion.publishing.package.attach_familiarity`); ``None`` when it already
    has one (``refit``: fit again)."""
    folder = Path(folder)
    meta = read_packaged_meta(folder)
    if meta.get("familiarity") and not refit:
        log.info("%s already has a familiarity; pass --refit to fit it again", folder)
        return None
    cfg = packaged_config(folder, overrides)
    runtime = resolve_runtime(device)
    model = load_packaged(folder, runtime)
    data = load_run_data(cfg, None, progress=progress)
    # The detail is measured from the data each time; a model packaged before it was has none.
    if replace(data.spec, detail=None) != replace(model.members[0].spec, detail=None):
        raise CheckpointError(
            f"{folder}: the recipe's preprocessing {data.spec} differs from the model's "
            f"{model.members[0].spec}"
        )
    batch = cfg.train.eval_batch_size or cfg.train.batch_size * 2
    fams = {}
    for entry, member in zip(meta["members"], model.members, strict=True):
        fam = fit_member(member.model, data, member.fold, runtime, cfg.seed, batch, progress)
        log_fitted(f"{folder.name} {entry['prefix']}", fam)
        fams[entry["prefix"]] = fam
    return attach_familiarity(folder, fams)
