"""A packaged model updated after packaging: the training images' detail
(:class:`~skinlesion.data.preprocess.Detail`), measured from the images of the recipe in its card
(or given) and written into ``model.json``'s preprocessing and the card, so that a larger input is
reduced to it before the model's resize; and the cross-site figures of its recipe's cross-site run
written into the card.

Example::

    set_packaged_detail(zoo_dir() / "ham10000-lite0-160-meta-ens3")  # measured: 200 px, q75
    attach_cross_site(zoo_dir() / "NAME", "runs/yardstick/NAME/cross_site")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from skinlesion.core.errors import CheckpointError
from skinlesion.core.run_folder import RunFolder
from skinlesion.data.preprocess import Detail, measure_detail
from skinlesion.data.sources import load_labelled
from skinlesion.inference.packaged import CARD_FILE
from skinlesion.inference.packaged_meta import MODEL_FILE
from skinlesion.training.card_text import render_card
from skinlesion.training.fit_familiarity import packaged_config

log = logging.getLogger(__name__)


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
    meta = json.loads((folder / MODEL_FILE).read_text())
    meta["preprocessing"]["detail"] = {"side": detail.side, "jpeg_quality": detail.jpeg_quality}
    (folder / MODEL_FILE).write_text(json.dumps(meta, indent=2))
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


def attach_cross_site(folder: str | Path, run_dir: str | Path) -> dict:
    """Write the cross-site figures of ``run_dir`` (a run of the model's recipe with
    ``cv.holdout_column``) into the packaged model's card; the figures."""
    folder, run = Path(folder), RunFolder(Path(run_dir))
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"{folder}: no {CARD_FILE}")
    if not run.oof_metrics.is_file():
        raise CheckpointError(f"{run.root}: no {run.oof_metrics.name} (has the run finished?)")
    result = json.loads(run.oof_metrics.read_text()).get("cross_site")
    if not result:
        raise CheckpointError(f"{run.root}: not a cross-site run (no cv.holdout_column)")
    card = json.loads(card_path.read_text())
    card["cross_site"] = {**result, "run": str(run_dir)}
    _rewrite_card(folder, card)
    return card["cross_site"]
