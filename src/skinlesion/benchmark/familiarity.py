"""How well a model's familiarity check (refer reason "unlike the training images") separates
what it was trained on from what it was not: the share of images it calls unfamiliar, the share
its refer rules refer altogether, and the AUROC of the unfamiliarity against held-out HAM10000,
on three sets:

- **HAM10000 held out**: the images the member's familiarity was thresholded on, re-predicted:
  fold K's validation images for a fold model (folds made as ``skinlesion split`` makes them, or
  ``--folds``); for the final model (fold -1), the 20% of lesions its threshold came from,
  which it was trained on; for a fold ensemble, the union of its members' validation folds (each
  image was trained on by the other members, so its figures are optimistic). At most
  ``max_heldout`` of them, a seeded draw.
- **ISIC 2017 test** (another site and time, still dermoscopy), when its folder is given.
- **not dermoscopy**: :mod:`skinlesion.data.nondermoscopy` (photos, screenshots, textures,
  cropped or blurred HAM10000 images from the held-out set, noise, flat colours).

Targets: at least 95% of the non-dermoscopy images referred; at most 10% of ISIC 2017 test and 5%
of held-out HAM10000 called unfamiliar.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

N_DERIVED = 20  # HAM10000 images cropped or blurred for the non-dermoscopy set


def _ham_table(root: Path, folds_file: Path | None, n_folds: int, seed: int) -> pd.DataFrame:
    """HAM10000's images with ``fold`` (read, or made as ``skinlesion split`` makes them) and
    ``row`` (the table's index)."""
    from skinlesion.core.sources import LabelledSetConfig
    from skinlesion.data.folds import align_folds, make_folds, read_folds
    from skinlesion.data.sources import load_labelled_set

    df = load_labelled_set(LabelledSetConfig(format="ham10000", root=str(root)), n_folds).table
    if folds_file is not None:
        df = align_folds(df, read_folds(folds_file), str(folds_file))
    else:
        folds = make_folds(df, n_folds, seed, grouped=True)
        df = df.merge(folds[["image_id", "fold"]], on="image_id", validate="one_to_one")
    df = df.sort_values("image_id").reset_index(drop=True)
    return df.assign(row=np.arange(len(df)))


def _recipe(loaded: Any) -> dict[str, Any]:
    """The training recipe: a packaged model's card, or a run folder's config."""
    from skinlesion.core.run_folder import RunFolder

    recipe = (loaded.card or {}).get("recipe")
    if recipe:
        return recipe
    for folder in (loaded.origin, loaded.origin.parent, loaded.origin.parent.parent):
        tree = RunFolder(Path(folder)).read_config_tree()
        if tree:
            return tree
    return {}


def heldout_images(loaded: Any, table: pd.DataFrame, limit: int) -> tuple[list[str], str]:
    """The held-out HAM10000 paths of the model's members (see the module's docstring); the
    table's ``seed`` column is the recipe's seed (the final model's 80/20 split)."""
    from skinlesion.training.fit_familiarity import member_rows

    rows, hows = [], []
    seed = int(table["seed"].iloc[0])
    for m in loaded.members:
        _, held, how = member_rows(table, m.fold, seed)
        rows.append(held)
        hows.append(how["heldout"])
    chosen = np.unique(np.concatenate(rows))
    if len(chosen) > limit:
        chosen = np.sort(np.random.default_rng(0).choice(chosen, limit, replace=False))
    what = "; ".join(dict.fromkeys(hows))
    if len(loaded.members) > 1:
        what += " (union over members: each image trained on by the others)"
    return table.loc[chosen, "path"].tolist(), what


def _figures(loaded: Any, sources: list, runtime: Any, batch_size: int) -> dict[str, Any]:
    from skinlesion.inference.predict import predict_images
    from skinlesion.inference.refer import refer_mask, refer_rules

    out = predict_images(sources, loaded.members, runtime, None, batch_size, progress=False)
    if out.errors:
        log.warning("%d image(s) failed: %s", len(out.errors), list(out.errors.values())[:3])
    ok = np.array([i not in out.errors for i in range(len(sources))])
    u, probs = out.unfamiliarity[ok], out.probs[ok]
    referred = refer_mask(probs, refer_rules(loaded.reference), u)
    return {
        "n": int(ok.sum()),
        "unfamiliar": float(np.mean(u > 1)),
        "referred": float(np.mean(referred)),
        "u": u,
        "referred_mask": referred,
    }


def bench_familiarity(
    model: str | None,
    data: str | Path,
    isic: str | Path | None = None,
    folds_file: str | Path | None = None,
    max_heldout: int = 2000,
    batch_size: int = 32,
    device: str = "auto",
    hardware: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refer figures of ``model`` (``None``/``"default"``: the default packaged model) on held-out
    HAM10000 (``data``: its folder), ISIC 2017 test (``isic``: a folder with ``labels.csv`` and
    ``images/``) and images that are not dermoscopy; see the module's docstring."""
    from sklearn.metrics import roc_auc_score

    from skinlesion.core.errors import CheckpointError
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.nondermoscopy import nondermoscopy_images
    from skinlesion.inference.resolve import resolve_torch_model

    runtime = resolve_runtime(device)
    loaded = resolve_torch_model(
        None if model in (None, "default") else model, runtime, "benchmark familiarity"
    )
    if not loaded.has_familiarity:
        raise CheckpointError(f"{loaded.origin}: no familiarity; run `skinlesion fit-familiarity`")
    held, what = heldout_images(loaded, _table_of(loaded, Path(data), folds_file), max_heldout)
    sets = {f"HAM10000 held out: {what}": held}
    if isic is not None:
        labels = pd.read_csv(Path(isic) / "labels.csv")
        ids = labels.loc[labels["split"] == "test", "image_id"]
        sets["ISIC 2017 test"] = [str(Path(isic) / "images" / f"{i}.jpg") for i in ids]
    derived = np.random.default_rng(1).choice(len(held), min(N_DERIVED, len(held)), replace=False)
    nonderm = nondermoscopy_images([held[i] for i in derived])
    sets["not dermoscopy"] = [img for _, img in nonderm]
    results = {name: _figures(loaded, src, runtime, batch_size) for name, src in sets.items()}
    base = next(iter(results.values()))["u"]
    rows = []
    for name, r in results.items():
        u = r["u"]
        y = np.r_[np.zeros(len(base)), np.ones(len(u))]
        auroc = None if u is base else float(roc_auc_score(y, np.r_[base, u]))
        figures = {k: v for k, v in r.items() if k not in ("u", "referred_mask")}
        rows.append({"set": name, **figures, "auroc_vs_heldout": auroc})
    u, referred = results["not dermoscopy"]["u"], results["not dermoscopy"]["referred_mask"]
    return {
        "benchmark": "familiarity",
        "model": f"{loaded.name} ({len(loaded.members)} member(s), folds "
        f"{[m.fold for m in loaded.members]}, TTA {loaded.tta})",
        "sets": rows,
        "not_referred": [n for (n, _), r in zip(nonderm, referred, strict=True) if not r],
        "not_unfamiliar": [n for (n, _), v in zip(nonderm, u, strict=True) if not v > 1],
        "hardware": hardware or {},
    }


def _table_of(loaded: Any, data: Path, folds_file: str | Path | None) -> pd.DataFrame:
    from skinlesion.core.config import DEFAULT_FOLD_SEED, DEFAULT_N_FOLDS, Config

    recipe = _recipe(loaded)
    cv = recipe.get("cv") or {}
    folds = Path(folds_file) if folds_file else None
    n_folds, seed = int(cv.get("n_folds", DEFAULT_N_FOLDS)), int(cv.get("seed", DEFAULT_FOLD_SEED))
    table = _ham_table(data, folds, n_folds, seed)
    return table.assign(seed=int(recipe.get("seed", Config.model_fields["seed"].default)))
