"""The familiarity threshold set from held-out sources (``skinlesion fit-familiarity MODEL
--threshold-from CROSS_SITE_RUN``): each member's in-source threshold times the largest of the
held-out sites' quantiles, written into the package and its card, not compounded when set again,
and seen by prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import attach_tiny_familiarity, make_tiny_packaged, spread_images

from skinlesion.cli import main
from skinlesion.core.errors import CheckpointError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.evaluation.prediction_files import write_holdout_unfamiliarity
from skinlesion.inference.packaged import load_packaged
from skinlesion.publishing.card_text import _familiarity_line as familiarity_line
from skinlesion.publishing.card_update import set_site_threshold, site_quantiles


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return spread_images(tmp_path_factory.mktemp("site_lesions"), n=24)


@pytest.fixture(scope="module")
def familiar(tmp_path_factory: pytest.TempPathFactory, lesions: list[Path]) -> Path:
    folder = make_tiny_packaged(tmp_path_factory.mktemp("site_familiar"), "familiar")
    return attach_tiny_familiarity(folder, lesions[::2], lesions[1::4])


def _cross_site_run(root: Path, sites: dict[str, np.ndarray], unfinished: str = "") -> Path:
    """A run folder with the files a finished cross-site fold leaves for the familiarity."""
    for k, (site, scores) in enumerate(sites.items()):
        fold = root / f"fold_{k}"
        fold.mkdir(parents=True)
        ids = [f"{site}_{i}" for i in range(len(scores))]
        write_holdout_unfamiliarity(ids, scores, fold / "holdout_unfamiliarity.csv")
        if site != unfinished:
            (fold / "summary.json").write_text(json.dumps({"fold": k, "holdout_site": site}))
    return root


SITES = {"alpha": np.linspace(0.0, 1.0, 101), "beta": np.linspace(0.0, 2.0, 101)}


def test_site_quantiles_are_each_held_out_sites_quantile(tmp_path: Path) -> None:
    run = _cross_site_run(tmp_path / "run", SITES)
    assert site_quantiles(run, 0.05) == pytest.approx({"alpha": 0.95, "beta": 1.9})
    assert site_quantiles(run, 0.5) == pytest.approx({"alpha": 0.5, "beta": 1.0})


def test_an_unfinished_site_is_left_out_and_none_is_an_error(tmp_path: Path) -> None:
    run = _cross_site_run(tmp_path / "run", SITES, unfinished="beta")
    assert list(site_quantiles(run, 0.05)) == ["alpha"]
    with pytest.raises(CheckpointError, match="no finished held-out site"):
        site_quantiles(_cross_site_run(tmp_path / "empty", {}), 0.05)
    with pytest.raises(CheckpointError, match="between 0 and 1"):
        site_quantiles(run, 1.5)


def test_the_threshold_scales_by_the_largest_site_and_prediction_sees_it(
    familiar: Path, lesions: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(familiar, folder)
    runtime = resolve_runtime("cpu")
    before = load_packaged(folder, runtime)
    old = [m.familiarity.threshold for m in before.members]
    u_before = before.predict(lesions[:6])["unfamiliarity"].to_numpy()

    run = _cross_site_run(tmp_path / "run", SITES)
    basis = set_site_threshold(folder, run, rate=0.05)
    assert basis["scale"] == pytest.approx(1.9)
    after = load_packaged(folder, runtime)
    assert [m.familiarity.threshold for m in after.members] == pytest.approx(
        [t * 1.9 for t in old], rel=1e-6
    )
    u_after = after.predict(lesions[:6])["unfamiliarity"].to_numpy()
    np.testing.assert_allclose(u_after, u_before / 1.9, rtol=1e-4)

    # Set again from another run: from the in-source threshold, not compounded.
    other = _cross_site_run(tmp_path / "other", {"alpha": np.linspace(0.0, 0.5, 101)})
    set_site_threshold(folder, other, rate=0.5)
    again = load_packaged(folder, runtime)
    assert [m.familiarity.threshold for m in again.members] == pytest.approx(
        [t * 0.25 for t in old], rel=1e-6
    )
    card = json.loads((folder / "card.json").read_text())
    member = card["familiarity"]["members"][0]
    assert member["threshold_in_source"] == pytest.approx(old[0], rel=1e-6)
    assert member["threshold_sites"]["sites"] == pytest.approx({"alpha": 0.25})
    assert "held-out sources' 50th percentiles under their cross-site models (alpha 0.250)" in (
        familiarity_line(card)
    )


def test_the_cli_sets_it_and_refuses_a_run_folder(
    familiar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(familiar, folder)
    run = _cross_site_run(tmp_path / "run", SITES)
    assert main(["fit-familiarity", str(folder), "--threshold-from", str(run)]) == 0
    assert "x1.960 (alpha 0.980, beta 1.960)" in capsys.readouterr().out  # 2% by default
    assert main(["fit-familiarity", str(run), "--threshold-from", str(run)]) == 2
    assert "not a packaged model" in capsys.readouterr().err
