"""The familiarity of a tiny trained run: fitted at the end of training for each fold, by
``fit-final`` on its own images, by ``skinlesion fit-familiarity`` for a run without it (resumable,
the same file again); packaged with the weights; and the same ``unfamiliarity`` and refer reason
from every entry point, and in ``evaluate``'s figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, run_overrides, train_cli
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

import skinlesion
from skinlesion.cli import main
from skinlesion.data.nondermoscopy import write_nondermoscopy
from skinlesion.inference.familiarity import FAMILIARITY_FILE, load_familiarity
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.serving.app import create_app

REASON = "unlike the training images"


@pytest.fixture(scope="module")
def run(synthetic_ham: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("familiar_run")
    out = base / "run"
    extra = {"train.epochs": 1, "eval.tta": 2}
    assert train_cli(run_overrides(FINETUNE, synthetic_ham(5), out, base / "cache", **extra)) == 0
    return out


@pytest.fixture(scope="module")
def mixed(run: Path, synthetic_ham: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory):
    """One folder: synthetic lesions like the training ones, and images that are not dermoscopy
    (some derived from those lesions)."""
    folder = tmp_path_factory.mktemp("mixed")
    lesions = sorted(synthetic_ham(5).rglob("*.jpg"))[::6]
    for p in lesions:
        shutil.copy(p, folder / p.name)
    write_nondermoscopy(folder, lesions[:2], photos=False, screenshots=2, noise=2, flat=2)
    return sorted(folder.iterdir())


def test_training_fits_each_folds_familiarity(run: Path) -> None:
    folds = pd.read_csv(run / "folds.csv")
    for k in (0, 1):
        fam = load_familiarity(run / f"fold_{k}" / FAMILIARITY_FILE)
        n_val = int((folds["fold"] == k).sum())
        assert fam.info["fold"] == k and fam.info["n_heldout"] == n_val
        assert fam.info["n_fit"] + fam.info["n_calibration"] == len(folds) - n_val
        assert fam.info["trained_on"] is False and fam.threshold > 0


def test_familiarity_off_skips_the_fit(
    synthetic_ham: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    extra = {"train.epochs": 1, "cv.folds_to_run": "[0]", "eval.familiarity": "false"}
    assert (
        train_cli(run_overrides(FINETUNE, synthetic_ham(5), out, tmp_path / "cache", **extra)) == 0
    )
    assert (out / "fold_0" / "best.pt").is_file()
    assert not (out / "fold_0" / FAMILIARITY_FILE).exists()
    # Fitted later on demand, as for a run trained before the check existed.
    assert main(["fit-familiarity", str(out), "--no-progress"]) == 0
    assert "fitted 1 member(s)" in capsys.readouterr().out
    assert (out / "fold_0" / FAMILIARITY_FILE).is_file()


def test_fit_familiarity_skips_members_that_have_one_and_fits_the_same_again(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert _graph_key(copy) == _graph_key(run)  # a copied run reuses its ONNX graph
    kept, dropped = copy / "fold_0" / FAMILIARITY_FILE, copy / "fold_1" / FAMILIARITY_FILE
    dropped.unlink()
    without = _graph_key(copy)
    before = kept.stat().st_mtime_ns
    assert main(["fit-familiarity", str(copy), "--no-progress"]) == 0
    assert "fitted 1 member(s)" in capsys.readouterr().out
    # The graph computes the unfamiliarity: a fitted member's file moves its key (a run folder
    # has no model.json that would move with it).
    assert _graph_key(copy) != without
    assert kept.stat().st_mtime_ns == before
    # Seeded draws of the same cached images: the file of training again.
    _assert_same_file(dropped, run / "fold_1" / FAMILIARITY_FILE)
    assert main(["fit-familiarity", str(copy), "--no-progress"]) == 0
    assert "fitted 0 member(s): none left" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == before
    assert main(["fit-familiarity", str(copy), "--refit", "--no-progress"]) == 0
    assert kept.stat().st_mtime_ns != before
    _assert_same_file(kept, run / "fold_0" / FAMILIARITY_FILE)
    assert main(["fit-familiarity", str(tmp_path / "nothing"), "--no-progress"]) == 2


def _graph_key(folder: Path) -> str | None:
    """The key of the cached ONNX graph of the run in ``folder`` (TTA 2, fp32)."""
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.backend import graph_key
    from skinlesion.inference.resolve import resolve_model

    members = resolve_model(folder, resolve_runtime("cpu"), backend="torch").members
    return graph_key(members, 2, False)


def _assert_same_file(a: Path, b: Path) -> None:
    """Equal tensors and metadata (safetensors writes its metadata in no fixed order)."""
    from safetensors import safe_open

    with safe_open(str(a), "numpy") as fa, safe_open(str(b), "numpy") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():  # noqa: SIM118 - not a dict
            np.testing.assert_array_equal(fa.get_tensor(k), fb.get_tensor(k), err_msg=k)


def _cli(argv: list[str], out: Path) -> pd.DataFrame:
    assert main(["predict", "--no-progress", *argv, "--output", str(out)]) == 0
    return pd.read_csv(out, keep_default_na=False, dtype={"refer_reasons": str})


def test_every_entry_point_gives_the_same_unfamiliarity_and_reason(
    run: Path, mixed: list[Path], tmp_path: Path
) -> None:
    paths = [str(p) for p in mixed]
    model = skinlesion.load_model(run, device="cpu")
    api = model.predict(paths)
    u = api["unfamiliarity"].to_numpy()
    # Informative: some images are familiar, some not, and the non-dermoscopy ones are not.
    assert (u < 1).sum() >= 3 and (u > 1).sum() >= 3
    assert all(u[i] > 1 for i, p in enumerate(mixed) if p.stem.startswith(("noise", "flat")))
    has_reason = [REASON in r for r in api["refer_reasons"]]
    assert has_reason == (u > 1).tolist()
    cli = _cli(["--model", str(run), "--device", "cpu", *paths], tmp_path / "t.csv")
    export_onnx(model, tmp_path / "onnx")
    onnx = _cli(
        ["--backend", "onnx", "--model", str(tmp_path / "onnx"), *paths], tmp_path / "o.csv"
    )
    with TestClient(create_app(model)) as client:
        answers = [
            client.post("/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
            for p in mixed
        ]
    # The CLI writes 6 decimals (5e-7) of scores computed in other batches: float32 sums in
    # another order, which differ by more than the rounding on some CPUs.
    np.testing.assert_allclose(cli["unfamiliarity"].astype(float), u, atol=1e-5)
    np.testing.assert_allclose(onnx["unfamiliarity"].astype(float), u, rtol=1e-4, atol=1e-4)
    # The service batches the uploads its own way: float32 sums in another order.
    np.testing.assert_allclose([a["unfamiliarity"] for a in answers], u, atol=1e-5)
    reasons = api["refer_reasons"].tolist()
    assert cli["refer_reasons"].tolist() == onnx["refer_reasons"].tolist() == reasons
    assert ["; ".join(a["refer_reasons"]) for a in answers] == reasons


def test_evaluate_reports_refer_rates_and_the_auroc_against_training(
    run: Path, mixed: list[Path], tmp_path: Path
) -> None:
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": [p.name for p in mixed], "dx": "nv"}).to_csv(labels, index=False)
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(run), "--labels", str(labels), "--images"]
    assert main([*argv, str(mixed[0].parent), "--output", str(out), "--n-boot", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    u = preds["unfamiliarity"].to_numpy()
    by_reason = metrics["referred"]["by_reason"]
    assert by_reason[REASON] == pytest.approx(np.mean(u > 1)) and 0 < by_reason[REASON] < 1
    assert set(by_reason) == {"low confidence", "out of distribution", REASON}
    heldout = skinlesion.load_model(run, device="cpu").heldout_unfamiliarity()
    expected = roc_auc_score(np.r_[np.zeros(len(heldout)), np.ones(len(u))], np.r_[heldout, u])
    fam = metrics["familiarity"]
    assert fam["auroc_vs_training"] == pytest.approx(expected, abs=1e-6)
    assert fam["n_reference"] == len(heldout) == 80  # the two folds' validation images
    assert f"AUROC {fam['auroc_vs_training']:.3f}" in (out / "report.md").read_text()


def test_final_model_and_package_carry_their_familiarity(run: Path, tmp_path: Path) -> None:
    from skinlesion.publishing.package import package_run
    from skinlesion.training.final import fit_final

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    fit_final(copy, progress=False)
    fam = load_familiarity(copy / "final" / FAMILIARITY_FILE)
    n = len(pd.read_csv(copy / "folds.csv"))
    assert fam.info["trained_on"] is True and fam.info["fold"] == -1
    assert 0.1 * n < fam.info["n_heldout"] < 0.3 * n  # a 20% split of its lesions
    final = package_run(copy, "final", out_root=tmp_path / "zoo", final=True)
    assert (
        "trained on, so its in-distribution refer rate is optimistic"
        in (final / "MODEL_CARD.md").read_text()
    )
    folds = package_run(copy, "folds", out_root=tmp_path / "zoo")
    meta = json.loads((folds / "model.json").read_text())
    assert meta["familiarity"]["file"] == FAMILIARITY_FILE
    packaged = skinlesion.load_model(folds, device="cpu")
    assert [m.familiarity.info["fold"] for m in packaged.members] == [0, 1]
    from_run = skinlesion.load_model(copy, device="cpu")
    np.testing.assert_allclose(
        packaged.heldout_unfamiliarity(), from_run.heldout_unfamiliarity(), rtol=1e-6
    )
