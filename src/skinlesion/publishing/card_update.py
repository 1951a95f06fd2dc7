"""A packaged model updated after packaging: the training images' detail
(:class:`~skinlesion.data.preprocess.Detail`), measured from the images of the recipe in its card
(or given) and written into ``model.json``'s preprocessing and the card, so that a larger input is
reduced to it before the model's resize; the cross-site figures of its recipe's cross-site run
written into the card; and the familiarity threshold set from held-out sources (another site's
dermoscopy) instead of held-out images of the training sources.

Example::

    set_packaged_detail(zoo_dir() / "ham10000-lite0-160-meta-ens3")  # measured: 200 px, q75
    attach_cross_site(zoo_dir() / "NAME", "runs/yardstick/NAME/cross_site")
    set_site_threshold(zoo_dir() / "NAME", "runs/yardstick/NAME/cross_site", rate=0.02)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import CheckpointError
from skinlesion.core.run_folder import RunFolder
from skinlesion.data.preprocess import Detail, measure_detail
from skinlesion.data.sources import load_labelled
from skinlesion.evaluation.prediction_files import read_holdout_unfamiliarity
from skinlesion.inference.packaged import CARD_FILE, read_familiarity
from skinlesion.inference.packaged_meta import MODEL_FILE, read_packaged_meta, write_packaged_meta
from skinlesion.publishing.card_text import render_card
from skinlesion.publishing.familiarity import packaged_config
from skinlesion.publishing.package import attach_familiarity

log = logging.getLogger(__name__)

SITE_RATE = 0.02
"""Share of each held-out source's dermoscopy that the site threshold calls unfamiliar."""


def measure_packaged_detail(folder: Path, overrides: Sequence[str] = ()) -> Detail:
    """The detail of the training images of the recipe in the model's card."""
    cfg = packaged_config(folder, overrides)
    return measure_detail(load_labelled(cfg).table["path"].tolist(), seed=cfg.cv.seed)


def set_packaged_detail(
    folder: str | Path, detail: Detail | None = None, overrides: Sequence[str] = ()
) -> Detail:
    """Write ``detail`` (default: measured) into the packaged model in ``folder``; the detail."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"{folder}: not a packaged model (no {MODEL_FILE})")
    detail = detail or measure_packaged_detail(folder, overrides)
    meta = read_packaged_meta(folder)
    meta["preprocessing"]["detail"] = {"side": detail.side, "jpeg_quality": detail.jpeg_quality}
    write_packaged_meta(folder, meta)
    if (folder / CARD_FILE).is_file():
        card = json.loads((folder / CARD_FILE).read_text())
        card["input"] = meta["preprocessing"]
        _rewrite_card(folder, card)
    log.info("%s: larger inputs reduced to %s", folder.name, detail.label())
    return detail


def _rewrite_card(folder: Path, card: dict) -> None:
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2, allow_nan=False))
    if (folder / "MODEL_CARD.md").is_file():
        (folder / "MODEL_CARD.md").write_text(render_card(card))


def read_cross_site(run_dir: str | Path) -> dict[str, Any]:
    """The cross-site figures of ``run_dir``, a finished run with ``cv.holdout_column``."""
    run = RunFolder(Path(run_dir))
    if not run.oof_metrics.is_file():
        raise CheckpointError(f"{run.root}: no {run.oof_metrics.name} (has the run finished?)")
    result = json.loads(run.oof_metrics.read_text()).get("cross_site")
    if not result:
        raise CheckpointError(f"{run.root}: not a cross-site run (no cv.holdout_column)")
    return result


def attach_cross_site(folder: str | Path, run_dir: str | Path) -> dict:
    """Write the cross-site figures of ``run_dir`` (a run of the model's recipe with
    ``cv.holdout_column``) into the packaged model's card; the figures."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"{folder}: no {CARD_FILE}")
    result = read_cross_site(run_dir)
    card = json.loads(card_path.read_text())
    card["cross_site"] = {**result, "run": str(run_dir)}
    _rewrite_card(folder, card)
    return card["cross_site"]


def site_quantiles(run_dir: str | Path, rate: float = SITE_RATE) -> dict[str, float]:
    """Per held-out site of a cross-site run, the ``1 - rate`` quantile of its images'
    unfamiliarity (each fold model's score over its own in-source threshold)."""
    if not 0 < rate < 1:
        raise CheckpointError(f"site rate {rate}: expected a share between 0 and 1")
    run = RunFolder(Path(run_dir))
    out: dict[str, float] = {}
    for fold in run.fold_folders():
        path = fold.holdout_unfamiliarity
        if not (fold.finished and path.is_file()):
            continue
        site = fold.read_summary().get("holdout_site")
        if site is None:
            raise CheckpointError(f"{fold.summary}: no holdout_site beside {path.name}")
        scores = read_holdout_unfamiliarity(path)["unfamiliarity"].to_numpy()
        out[str(site)] = float(np.quantile(scores, 1 - rate))
    if not out:
        raise CheckpointError(
            f"{run.root}: no finished held-out site with fold_K/holdout_unfamiliarity.csv "
            "(a cross-site run with familiarity: cv.holdout_column, eval.familiarity)"
        )
    return out


def set_site_threshold(
    folder: str | Path, run_dir: str | Path, rate: float = SITE_RATE
) -> dict[str, Any]:
    """Set the packaged model's familiarity thresholds from held-out sources: each member's
    in-source threshold times the largest of the sites' ``1 - rate`` quantiles
    (:func:`site_quantiles`) of its recipe's cross-site run, so that at most ``rate`` of each
    held-out source's dermoscopy is called unlike the training images. Setting it again starts
    from the in-source threshold (kept in the member's info). The basis, as in the card."""
    folder = Path(folder)
    fams = read_familiarity(folder, read_packaged_meta(folder))
    if not fams:
        raise CheckpointError(f"{folder}: no familiarity; `skinlesion fit-familiarity` first")
    sites = site_quantiles(run_dir, rate)
    scale = max(sites.values())
    basis = {"sites": sites, "rate": rate, "scale": scale, "run": str(run_dir)}
    for fam in fams.values():
        base = float(fam.info.get("threshold_in_source", fam.threshold))
        fam.threshold = base * scale
        fam.info = {**fam.info, "threshold_in_source": base, "threshold_sites": basis}
    attach_familiarity(folder, fams)
    log.info(
        "%s: familiarity threshold x%.3f (%s at %.0f%% unfamiliar)",
        folder.name,
        scale,
        ", ".join(f"{s} {q:.3f}" for s, q in sites.items()),
        100 * rate,
    )
    return basis
