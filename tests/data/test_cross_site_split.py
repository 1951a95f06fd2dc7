"""Cross-site splits: the held-out site is the test set, no lesion crosses, the validation images
come from the other sites' own folds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skinlesion.data.folds import INNER_FOLD, SITE_COLUMN, fold_split, make_folds

SITES = ("north", "south", "east")


def _table(seed: int = 0) -> pd.DataFrame:
    """About 400 images of 3 sites; lesion 0 was photographed at two sites."""
    rng = np.random.default_rng(seed)
    rows = []
    for lesion in range(160):
        dx = ("mel", "nv", "bkl")[lesion % 3]
        site = SITES[lesion % 3 if lesion % 7 else (lesion // 7) % 3]
        for k in range(int(rng.integers(1, 4))):
            rows.append((f"L{lesion:03d}", f"I{lesion:03d}_{k}", dx, site))
    rows.append(("L000", "I000_x", "mel", "south"))  # the same lesion at another site
    df = pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", SITE_COLUMN])
    folds = make_folds(df, n_folds=5, seed=0)
    return df.merge(folds[["image_id", "fold"]], on="image_id")


def test_the_test_set_is_the_held_out_site_and_takes_the_models_fold() -> None:
    table = _table()
    for k, site in enumerate(SITES):
        split = fold_split(table, k, SITES)
        assert split.site == site
        assert set(split.test[SITE_COLUMN]) == {site}
        assert len(split.test) == (table[SITE_COLUMN] == site).sum()
        assert (split.test["fold"] == k).all()
        assert site not in set(split.train[SITE_COLUMN]) | set(split.val[SITE_COLUMN])


def test_no_lesion_crosses_from_the_held_out_site_into_training() -> None:
    table = _table()
    split = fold_split(table, 0, SITES)  # holds out "north", where lesion L000 also is
    held = set(split.test["lesion_id"])
    assert "L000" in held
    assert not held & set(split.train["lesion_id"])
    assert not held & set(split.val["lesion_id"])
    assert split.dropped == 1  # I000_x, taken at "south"
    assert "I000_x" not in set(split.train["image_id"]) | set(split.val["image_id"])


def test_validation_is_the_inner_fold_of_the_other_sites_and_lesion_grouped() -> None:
    table = _table()
    split = fold_split(table, 1, SITES)
    assert (split.val["fold"] == INNER_FOLD).all()
    assert (split.train["fold"] != INNER_FOLD).all()
    assert not set(split.train["lesion_id"]) & set(split.val["lesion_id"])
    others = table[
        (table[SITE_COLUMN] != SITES[1]) & ~table["lesion_id"].isin(split.test["lesion_id"])
    ]
    assert len(split.train) + len(split.val) == len(others)


def test_k_fold_split_is_unchanged() -> None:
    table = _table()
    split = fold_split(table, 2)
    assert split.site is None and split.dropped == 0
    assert (split.val["fold"] == 2).all() and (split.train["fold"] != 2).all()
    assert split.test is split.val


def test_folds_are_stratified_by_site_and_diagnosis() -> None:
    table = _table()
    per_fold = table.groupby(["fold", SITE_COLUMN]).size().unstack()
    # each site spread over all 5 folds, no fold missing a site
    assert per_fold.notna().all().all() and per_fold.shape == (5, 3)
