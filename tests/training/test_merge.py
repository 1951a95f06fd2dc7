"""``skinlesion merge``: folds trained apart become one run folder, as if trained together."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import PROBE, run_overrides, train_cli

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES


@pytest.fixture(scope="module")
def parts(
    tmp_path_factory: pytest.TempPathFactory, synthetic_ham: Callable[..., Path]
) -> tuple[Path, Path, Path]:
    """The same recipe run twice, fold 0 into A and fold 1 into B; the merged run C."""
    tmp = tmp_path_factory.mktemp("merge")
    root = synthetic_ham(4)
    runs = []
    for name, fold in (("A", 0), ("B", 1)):
        extra = {"cv.folds_to_run": f"[{fold}]", "eval.n_boot": 50}
        assert train_cli(run_overrides(PROBE, root, tmp / name, tmp / "cache", **extra)) == 0
        runs.append(tmp / name)
    merged = tmp / "C"
    assert main(["merge", str(runs[0]), str(runs[1]), "--out", str(merged), "--n-boot", "50"]) == 0
    return runs[0], runs[1], merged


def test_merged_run_folder(parts: tuple[Path, Path, Path]) -> None:
    a, b, c = parts
    assert not (a / "fold_1").exists() and not (b / "fold_0").exists()
    for fold in (0, 1):
        for name in ("best.pt", "summary.json", "val_predictions.csv", "metrics.csv"):
            assert (c / f"fold_{fold}" / name).is_file(), (fold, name)
    src = {0: a, 1: b}
    for fold, part in src.items():
        name = f"fold_{fold}/best.pt"
        assert (c / name).read_bytes() == (part / name).read_bytes()
    cfg_a, cfg_c = (yaml.safe_load((p / "config.yaml").read_text()) for p in (a, c))
    assert cfg_c["cv"]["folds_to_run"] == [0, 1]
    assert cfg_c["output_dir"] == str(c)
    for section in ("data", "model", "train", "loss", "sampler", "augment", "eval"):
        assert cfg_c[section] == cfg_a[section], section
    assert (c / "folds.csv").read_bytes() == (a / "folds.csv").read_bytes()
    env = json.loads((c / "environment.json").read_text())
    assert set(env["merged_from"]) == {str(a), str(b)}
    for name in ("report.md", "oof_metrics.json", "plots/confusion_matrix.png"):
        assert (c / name).is_file(), name


def test_merged_oof_covers_every_image_once(parts: tuple[Path, Path, Path]) -> None:
    a, b, c = parts
    folds = pd.read_csv(c / "folds.csv", dtype={"image_id": str})
    oof = pd.read_csv(c / "oof_predictions.csv", dtype={"image_id": str})
    assert not oof["image_id"].duplicated().any()
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])
    lookup = folds.set_index("image_id")["fold"]
    assert (oof["fold"].to_numpy() == lookup.loc[oof["image_id"]].to_numpy()).all()
    # The merged figures are those of the two parts' predictions together.
    own = pd.concat(
        [pd.read_csv(p / f"fold_{f}/val_predictions.csv") for p, f in ((a, 0), (b, 1))]
    ).sort_values(["fold", "image_id"])
    np.testing.assert_allclose(oof[list(CLASSES)].to_numpy(), own[list(CLASSES)].to_numpy())
    metrics = json.loads((c / "oof_metrics.json").read_text())
    assert metrics["folds"] == [0, 1] and metrics["n"] == len(folds)
    # Each part's own report only covers its fold.
    assert json.loads((a / "oof_metrics.json").read_text())["n"] == int((lookup == 0).sum())


def test_predict_with_merged_run_is_the_fold_ensemble(
    parts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    a, b, c = parts
    root = Path(yaml.safe_load((a / "config.yaml").read_text())["data"]["root"])
    images = [str(p) for p in sorted(root.glob("HAM10000_images_part_1/*.jpg"))[:4]]

    def predict(model: Path, name: str) -> np.ndarray:
        out = tmp_path / f"{name}.csv"
        args = ["predict", "--model", str(model), *images, "--output", str(out)]
        assert main([*args, "--no-progress"]) == 0
        return pd.read_csv(out)[list(CLASSES)].to_numpy()

    merged = predict(c, "c")
    members = (predict(a / "fold_0/best.pt", "a") + predict(b / "fold_1/best.pt", "b")) / 2
    np.testing.assert_allclose(merged, members, atol=2e-6)


def _copy_with_config(src: Path, dst: Path, section: str, key: str, value: object) -> Path:
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg[section][key] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def test_refuses_different_recipes(
    parts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = parts
    other = _copy_with_config(b, tmp_path / "B_gamma", "loss", "gamma", 0.5)
    out = tmp_path / "out"
    assert main(["merge", str(a), str(other), "--out", str(out)]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def test_allows_machine_specific_settings_to_differ(
    parts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Parts from other machines: another device, thread count or image cache folder."""
    a, b, _ = parts
    other = _copy_with_config(b, tmp_path / "B_cache", "data", "cache_dir", "/elsewhere/cache")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"].update(device="cuda", num_threads=16)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    assert main(["merge", str(a), str(other), "--out", str(out), "--n-boot", "0"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["cv"]["folds_to_run"] == [0, 1]


def test_refuses_the_same_fold_twice(
    parts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _, _ = parts
    again = tmp_path / "A_again"
    shutil.copytree(a, again)
    out = tmp_path / "out"
    assert main(["merge", str(a), str(again), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fold_0" in err and "both" in err
    assert not out.exists()


def test_refuses_other_folds_and_unfinished_folds(
    parts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = parts
    shifted = tmp_path / "B_folds"
    shutil.copytree(b, shifted)
    folds = pd.read_csv(shifted / "folds.csv", dtype=str)
    folds.loc[0, "fold"] = "1" if folds.loc[0, "fold"] == "0" else "0"
    folds.to_csv(shifted / "folds.csv", index=False)
    assert main(["merge", str(a), str(shifted), "--out", str(tmp_path / "o1")]) == 2
    assert "folds.csv differs" in capsys.readouterr().err
    unfinished = tmp_path / "B_unfinished"
    shutil.copytree(b, unfinished)
    (unfinished / "fold_1" / "summary.json").unlink()
    assert main(["merge", str(a), str(unfinished), "--out", str(tmp_path / "o2")]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_refuses_a_non_empty_output_folder(
    parts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = parts
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(a), str(b), "--out", str(empty), "--n-boot", "0"]) == 0
