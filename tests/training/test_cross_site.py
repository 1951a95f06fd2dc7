"""Cross-site validation through ``skinlesion train`` and the yardstick: each held-out site
predicted by the model trained on the other sites, figures per site, resumable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import FINETUNE, run_overrides, train_cli

from skinlesion.cli import main
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.prediction_files import read_holdout_unfamiliarity
from skinlesion.evaluation.yardstick import compare_yardsticks, yardstick_score

SITES = ("site_a", "site_b", "site_c")
HOLD = ["cv.holdout_column=dataset", "cv.holdout=[site_a,site_b]"]


@pytest.fixture(scope="module")
def sited(synthetic_ham: Callable[..., Path]) -> Path:
    return synthetic_ham(6, sites=SITES)


@pytest.fixture(scope="module")
def cross_run(sited: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xs")
    out = root / "yard" / "cross_site"
    args = [*run_overrides(FINETUNE, sited, out, root / "cache", **{"train.epochs": 2}), *HOLD]
    assert train_cli(args) == 0
    return out


def test_each_site_is_predicted_by_the_model_that_held_it_out(sited: Path, cross_run: Path) -> None:
    meta = pd.read_csv(sited / "HAM10000_metadata.csv")
    run = RunFolder(cross_run)
    for k, site in enumerate(("site_a", "site_b")):
        fold = run.fold(k)
        summary = fold.read_summary()
        assert summary["holdout_site"] == site
        test = pd.read_csv(fold.val_predictions, dtype={"image_id": str})
        assert set(test["site"]) == {site} and (test["fold"] == k).all()
        assert set(test["image_id"]) == set(meta.loc[meta["dataset"] == site, "image_id"])
        inner = pd.read_csv(fold.inner_val_predictions)
        assert site not in set(inner["site"]) and len(inner) == summary["n_val"]
        assert 0 < summary["mel_threshold"] < 1 and summary["refer"]["n"] == len(inner)
        scored = read_holdout_unfamiliarity(fold.holdout_unfamiliarity)
        assert set(scored["image_id"]) == set(test["image_id"])


def test_report_gives_each_held_out_site_with_intervals_and_rare_classes(cross_run: Path) -> None:
    run = RunFolder(cross_run)
    result = json.loads(run.oof_metrics.read_text())
    sites = result["cross_site"]["sites"]
    assert [s["site"] for s in sites] == ["site_a", "site_b"]
    oof = pd.read_csv(run.oof_predictions)
    for s in sites:
        assert s["n"] == int((oof["site"] == s["site"]).sum())
        assert s["mel_auroc_ci95"] is not None and len(s["balanced_accuracy_ci95"]) == 2
        assert s["classes_rare"]  # a handful of lesions per class: all rare, and said so
        assert "unlike the training images" in s["refer"]["by_reason"]
    mean = result["cross_site"]["mean"]
    assert mean["mel_auroc"] == pytest.approx((sites[0]["mel_auroc"] + sites[1]["mel_auroc"]) / 2)
    report = run.report.read_text()
    assert "## Cross-site validation" in report and "| site_a |" in report


def test_resume_skips_finished_sites(sited: Path, cross_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cross_site"
    shutil.copytree(cross_run, copy)
    before = RunFolder(copy).fold(0).best.stat().st_mtime_ns
    args = [*run_overrides(FINETUNE, sited, copy, tmp_path / "cache", **{"train.epochs": 2}), *HOLD]
    assert train_cli([*args, "--resume"]) == 0
    assert RunFolder(copy).fold(0).best.stat().st_mtime_ns == before


def test_an_unknown_site_fails_before_any_folder(
    sited: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    args = [*run_overrides(FINETUNE, sited, out, tmp_path / "cache"), "cv.holdout_column=dataset"]
    assert train_cli([*args, "cv.holdout=[site_x]"]) == 2
    err = capsys.readouterr().err
    assert "cv.holdout: unknown site of dataset 'site_x'" in err and "site_a" in err
    assert not out.exists()


def test_yardstick_scores_a_folder_and_pairs_it_with_itself(cross_run: Path) -> None:
    folder = cross_run.parent
    score = yardstick_score(folder)
    assert sorted(score["sets"]) == ["site_a", "site_b"]
    same = compare_yardsticks(folder, folder, n_boot=50)
    for figure in ("mel_auroc", "balanced_accuracy"):
        assert same["mean"][figure]["difference"] == 0
        assert same["mean"][figure]["ci95"] == [0.0, 0.0]
    assert same["verdict"].startswith("does not win")
    assert (
        main(["yardstick", "--output", str(folder), "--against", str(folder), "--n-boot", "20"])
        == 0
    )


def test_yardstick_seeds_run_the_recipe_once_each_in_its_folder(
    monkeypatch: pytest.MonkeyPatch, cross_run: Path, tmp_path: Path
) -> None:
    """``--seeds``: the config's own seed trains in the folder, every other seed N in ``seed_N/``
    with ``seed=N``; the score then reads every run."""
    import skinlesion.training.yardstick as ys

    calls: list[tuple[list[str], Path]] = []

    def fake_run(config, overrides, output, isic2017, resume, progress) -> None:  # noqa: ANN001
        calls.append((list(overrides), output))
        shutil.copytree(cross_run, output / "cross_site")

    monkeypatch.setattr(ys, "_one_run", fake_run)
    out = tmp_path / "recipe"
    recipe = str(Path(__file__).resolve().parents[2] / "configs" / "quick.yaml")
    args = ["yardstick", "--config", recipe, "--output", str(out), "--isic2017", "none"]
    assert main([*args, "--n-boot", "20", "--seeds", "42,7", "train.lr=0.01"]) == 0
    assert calls == [(["train.lr=0.01"], out), (["train.lr=0.01", "seed=7"], out / "seed_7")]
    assert yardstick_score(out)["runs"] == [str(out), str(out / "seed_7")]
    with pytest.raises(Exception, match="--seeds or seed=N, not both"):
        ys.run_yardstick(recipe, tmp_path / "other", ["seed=3"], None, seeds=[1, 2])
    with pytest.raises(SystemExit):
        main([*args, "--seeds", "7,7"])


def test_package_writes_the_recipes_cross_site_figures_into_the_card(
    cross_run: Path, sited: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``package --cross-site RUN``: the card gives each held-out site of the recipe's cross-site
    run and says that a package of several members is judged by one model per site; a folder
    that is not a cross-site run fails before the package is written."""
    run = tmp_path / "run"
    shutil.copytree(cross_run, run)  # package rewrites the run's report
    args = ["package", str(run), "--out-root", str(tmp_path / "zoo")]
    assert main([*args, "--name", "bad", "--cross-site", str(sited)]) == 2
    assert "has the run finished?" in capsys.readouterr().err
    assert not (tmp_path / "zoo" / "bad").exists()
    assert main([*args, "--name", "good", "--cross-site", str(cross_run)]) == 0
    card = json.loads((tmp_path / "zoo" / "good" / "card.json").read_text())
    assert [s["site"] for s in card["cross_site"]["sites"]] == ["site_a", "site_b"]
    assert card["cross_site"]["run"] == str(cross_run)
    text = (tmp_path / "zoo" / "good" / "MODEL_CARD.md").read_text()
    assert "## Cross-site validation" in text and "| site_b |" in text
    assert "this package averages 2 members" in text
