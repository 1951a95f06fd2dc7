"""External validation through ``skinlesion evaluate`` on a labelled set the run never saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import (
    ABSENT_CLASS,
    ISIC_DIR,
    PROBE,
    check_point_against_sklearn,
    make_tiny_packaged,
    requires_isic,
    run_overrides,
    train_cli,
)
from PIL import Image

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.data.synthetic import make_synthetic_ham10000
from skinlesion.evaluation.external import reference_domain

TOL = 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> Path:
    """A two-fold linear probe on a pretrained lite0 at 32 px (seconds on a CPU)."""
    tmp = tmp_path_factory.mktemp("evaluate_run")
    args = run_overrides(PROBE, syn_root, tmp / "run", tmp / "cache", **{"eval.n_boot": 50})
    assert train_cli(args) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Images of another draw of the synthetic generator, flat in one folder, some as PNG."""
    tmp = tmp_path_factory.mktemp("external")
    meta = make_synthetic_ham10000(tmp / "raw", lesions_per_class=2, seed=1)
    images = tmp / "images"
    images.mkdir()
    for i, image_id in enumerate(meta["image_id"]):
        src = next((tmp / "raw").glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        if i % 4 == 1:
            Image.open(src).save(images / f"{image_id}.png")
        else:
            shutil.copy(src, images / f"{image_id}.jpg")
    return images, meta


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packaged model of random weights fused with age, sex and site."""
    return make_tiny_packaged(tmp_path_factory.mktemp("zoo"), "fused", metadata=True)


def evaluate(run: Path, labels: Path, images: Path, out: Path, *extra: str) -> int:
    args = ["evaluate", "--model", str(run), "--labels", str(labels), "--images", str(images)]
    return main([*args, "--output", str(out), "--n-boot", "50", "--no-progress", *extra])


def write_labels(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def read_predictions(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", dtype={"image_id": str}, keep_default_na=False)


def check_against_sklearn(preds: pd.DataFrame, metrics: dict[str, Any]) -> None:
    """Every headline figure of ``metrics.json`` recomputed from ``predictions.csv``."""
    y = preds["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    check_point_against_sklearn(metrics["point"], y, preds[list(CLASSES)].to_numpy(np.float64), TOL)


def test_predictions_and_metrics(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    images, meta = external
    labels = write_labels(meta[["image_id", "lesion_id", "dx"]], tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, images, out) == 0
    preds = read_predictions(out)
    # The labels' lesion ids come along: `skinlesion compare` pairs two evaluations by them.
    assert list(preds.columns) == ["image_id", "lesion_id", "dx", "source", *CLASSES, "prediction"]
    assert set(preds["source"]) == {"labels"}  # the labels file's stem
    assert preds["image_id"].tolist() == meta["image_id"].tolist()
    assert preds["lesion_id"].tolist() == meta["lesion_id"].tolist()
    assert preds["dx"].tolist() == meta["dx"].tolist()
    probs = preds[list(CLASSES)].to_numpy(np.float64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert preds["prediction"].tolist() == [CLASSES[i] for i in probs.argmax(1)]
    metrics = json.loads((out / "metrics.json").read_text())
    check_against_sklearn(preds, metrics)
    assert metrics["bootstrap_unit"] == "lesion" and metrics["n_boot"] == 50
    # The model as shipped: threshold and confidence reference come from the OOF report.
    oof = json.loads((run / "oof_metrics.json").read_text())
    assert metrics["mel_threshold"] == oof["mel_threshold"]
    assert metrics["point"]["mel"]["threshold"] == oof["mel_threshold"]
    domain = metrics["domain"]
    assert domain["confidence_threshold"] == oof["domain"]["confidence_threshold"]
    assert domain["reference"] == {
        k: oof["domain"][k] for k in ("mean_max_probability", "share_below_threshold")
    }
    conf = probs.max(1)
    assert domain["mean_max_probability"] == pytest.approx(conf.mean(), abs=TOL)
    assert domain["share_below_threshold"] == pytest.approx(
        (conf < domain["confidence_threshold"]).mean()
    )
    assert (out / "report.md").read_text().startswith("# External evaluation:")
    assert (out / "confusion_matrix.png").is_file() and (out / "roc_curves.png").is_file()
    # ``evaluate`` and ``predict`` share one inference path.
    picks = [images / f"{i}.png" for i in meta["image_id"][1:9:4]]
    picks += [images / f"{meta['image_id'][0]}.jpg"]
    csv = tmp_path / "predict.csv"
    args = ["predict", "--model", str(run), *map(str, picks), "--output", str(csv)]
    assert main([*args, "--no-progress"]) == 0
    direct = pd.read_csv(csv)
    by_id = preds.set_index("image_id")
    for row in direct.itertuples():
        expected = by_id.loc[Path(row.image).stem, list(CLASSES)].to_numpy(np.float64)
        got = np.array([getattr(row, c) for c in CLASSES])
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_two_class_set_reports_the_rest_absent(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    images, meta = external
    subset = meta.loc[meta["dx"].isin(["nv", "mel"]), ["image_id", "dx"]]
    labels = write_labels(subset, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, images, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    p = metrics["point"]
    assert p["classes_present"] == ["mel", "nv"]
    assert p["classes_absent"] == ["akiec", "bcc", "bkl", "df", "vasc"]
    for c in p["classes_absent"]:
        assert p["per_class"][c] == ABSENT_CLASS
        assert metrics["ci95"]["per_class"][c] == {"recall": None, "f1": None, "auroc": None}
    check_against_sklearn(read_predictions(out), metrics)
    assert metrics["bootstrap_unit"] == "image"  # no lesion_id column
    assert "| vasc | 0 | absent | absent | absent | absent |" in (out / "report.md").read_text()


def test_label_map_yaml_and_csv(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    images, meta = external
    direct = meta.loc[meta["dx"].isin(["nv", "mel"]), ["image_id", "dx"]]
    # The same file name as the mapped labels' below: their predictions' source (its stem) too.
    (tmp_path / "direct").mkdir()
    direct_csv = write_labels(direct, tmp_path / "direct" / "vocab.csv")
    assert evaluate(run, direct_csv, images, tmp_path / "d") == 0

    vocab = meta[["image_id", "dx"]].copy()
    nevi = vocab.index[vocab["dx"] == "nv"]
    vocab.loc[nevi[::2], "dx"] = "common nevus"
    vocab.loc[nevi[1::2], "dx"] = "atypical nevus"
    vocab.loc[vocab["dx"] == "mel", "dx"] = "melanoma"
    vocab.loc[~vocab["dx"].isin(["common nevus", "atypical nevus", "melanoma"]), "dx"] = "other"
    labels = write_labels(vocab, tmp_path / "vocab.csv")
    yaml_map = tmp_path / "map.yaml"
    yaml_map.write_text(
        "common nevus: nv\natypical nevus: nv\nmelanoma: mel\nother: drop\n", encoding="utf-8"
    )
    csv_map = tmp_path / "map.csv"
    csv_map.write_text(
        "from,to\ncommon nevus,nv\natypical nevus,nv\nmelanoma,mel\nother,drop\n", encoding="utf-8"
    )
    for name, mapping in (("yaml", yaml_map), ("csv", csv_map)):
        out = tmp_path / name
        assert evaluate(run, labels, images, out, "--label-map", str(mapping)) == 0
        expected = (tmp_path / "d" / "predictions.csv").read_bytes()
        assert (out / "predictions.csv").read_bytes() == expected, name
        metrics = json.loads((out / "metrics.json").read_text())
        reference = json.loads((tmp_path / "d/metrics.json").read_text())
        assert metrics["point"] == reference["point"] and metrics["ci95"] == reference["ci95"]


def test_unknown_labels_fail_naming_the_line(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, meta = external
    df = meta[["image_id", "dx"]].head(6).copy()
    df["split"] = ["train", "train", "test", "train", "test", "test"]
    df.loc[3, "dx"] = "melanoma"  # file line 5 (header is line 1)
    df.loc[5, "dx"] = "common nevus"  # file line 7
    labels = write_labels(df, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, images, out) == 2
    err = capsys.readouterr().err
    assert "line 5" in err and "unknown label 'melanoma'" in err
    assert "line 7" in err and "unknown label 'common nevus'" in err
    assert "--label-map" in err and "2 problem(s)" in err
    assert not out.exists()
    # Line numbers refer to the file, also when --where drops rows before them.
    assert evaluate(run, labels, images, out, "--where", "split=test") == 2
    err = capsys.readouterr().err
    assert "line 7" in err and "common nevus" in err and "melanoma" not in err
    # A map whose target is not a class code is no escape.
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("melanoma: MEL\ncommon nevus: nv\n")
    assert evaluate(run, labels, images, out, "--label-map", str(bad_map)) == 2
    assert "line 5" in (err := capsys.readouterr().err) and "'MEL'" in err
    assert not out.exists()


def test_missing_and_corrupt_images_listed_together(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, meta = external
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    df = meta[["image_id", "dx"]].head(5).copy()
    df.loc[len(df)] = ["ISIC_missing", "nv"]  # line 7
    (folder / "ISIC_corrupt.jpg").write_text("not a jpeg")
    df.loc[len(df)] = ["ISIC_corrupt", "mel"]  # line 8
    labels = write_labels(df, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, folder, out) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert f"{labels} line 7: no image 'ISIC_missing' (.jpg/.png/...) in {folder}" in err
    assert "line 8" in err and "ISIC_corrupt.jpg" in err and "not a readable image" in err
    assert not out.exists()


def test_where_filter_and_single_checkpoint(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, meta = external
    df = meta[["image_id", "lesion_id", "dx"]].copy()
    df["split"] = np.where(np.arange(len(df)) % 3 == 0, "test", "train")
    labels = write_labels(df, tmp_path / "labels.csv")
    out = tmp_path / "out"
    ckpt = run / "fold_1" / "best.pt"
    assert evaluate(ckpt, labels, images, out, "--where", "split=test") == 0
    preds = read_predictions(out)
    assert preds["image_id"].tolist() == df.loc[df["split"] == "test", "image_id"].tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["filter"] == {"split": "test"} and metrics["point"]["n"] == len(preds)
    check_against_sklearn(preds, metrics)
    oof = json.loads((run / "oof_metrics.json").read_text())
    assert metrics["mel_threshold"] == oof["mel_threshold"]  # found from fold_1/best.pt
    assert evaluate(run, labels, images, tmp_path / "o2", "--where", "site=vienna") == 2
    assert "site" in capsys.readouterr().err


@pytest.mark.slow
@requires_isic
def test_isic2017_test_subset(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Real dermoscopy from another archive: three classes present, four absent."""
    table = pd.read_csv(ISIC_DIR / "labels.csv", dtype=str, keep_default_na=False)
    test = table[table["split"] == "test"].sort_values("image_id")
    picked = pd.concat([test[test["dx"] == dx].head(n) for dx, n in (("nv", 50), ("mel", 25))])
    picked = pd.concat([picked, test[test["dx"] == "bkl"].head(25)])
    others = table[table["split"] != "test"].head(10)  # filtered out by --where
    subset = pd.concat([others, picked])
    images = tmp_path / "images"
    images.mkdir()
    for image_id in subset["image_id"]:
        shutil.copy(ISIC_DIR / "images" / f"{image_id}.jpg", images)
    labels = write_labels(subset, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, images, out, "--where", "split=test") == 0
    preds = read_predictions(out)
    assert sorted(preds["image_id"]) == sorted(picked["image_id"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["point"]["classes_present"] == ["bkl", "mel", "nv"]
    assert metrics["point"]["classes_absent"] == ["akiec", "bcc", "df", "vasc"]
    check_against_sklearn(preds, metrics)
    share = preds["prediction"].isin(["akiec", "bcc", "df", "vasc"]).mean()
    printed = capsys.readouterr().out
    assert f"{share:.1%} predicted as a class they lack" in printed
    assert (
        f"| predicted as a class these images lack (%) | {share * 100:.1f} ["
        in (out / "report.md").read_text()
    )


def test_labels_may_name_images_by_relative_path(
    run: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    """As for a training set (data.format csv): ``sub/ID.jpg`` is a path in the image folder,
    and the predictions name the image by its id (the path without extension)."""
    images, meta = external
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    df = meta[["image_id", "dx"]].head(4).copy()
    for i in df["image_id"]:
        shutil.copy(next(images.glob(f"{i}.*")), folder / "sub" / f"{i}.jpg")
    df["image_id"] = "sub/" + df["image_id"] + ".jpg"
    labels = write_labels(df, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert evaluate(run, labels, folder, out, "--n-boot", "0") == 0
    pred = pd.read_csv(out / "predictions.csv")
    assert pred["image_id"].tolist() == [f"sub/{i}" for i in meta["image_id"].head(4)]


@pytest.mark.parametrize(
    "reference",
    [None, {}, {"domain": {}}, {"domain": {"confidence_threshold": 0.6}}],
    ids=["none", "empty", "no-figures", "threshold-only"],
)
def test_reference_domain_without_out_of_fold_figures(reference: dict[str, Any] | None) -> None:
    # A model packaged from a run without an out-of-fold report (or an older one) has no or
    # partial domain figures: the evaluation reports its own, without a reference, and never
    # fails on the missing keys.
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    domain = reference_domain(probs, reference)
    threshold = ((reference or {}).get("domain") or {}).get("confidence_threshold", 0.5)
    assert domain["confidence_threshold"] == threshold
    assert domain["share_below_threshold"] == pytest.approx((probs.max(1) < threshold).mean())
    assert "reference" not in domain


def test_reference_domain_with_out_of_fold_figures() -> None:
    ref = {"confidence_threshold": 0.6, "mean_max_probability": 0.8, "share_below_threshold": 0.1}
    domain = reference_domain(np.array([[0.9, 0.1], [0.55, 0.45]]), {"domain": ref})
    assert domain["reference"] == {"mean_max_probability": 0.8, "share_below_threshold": 0.1}
    assert domain["share_below_threshold"] == 0.5


def test_a_column_that_looks_like_metadata_is_named(
    fused: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path, caplog
) -> None:
    """A labels file's other columns are free (``split``, a hospital...), so ``site`` for
    ``localization`` cannot be refused there; it is named in a warning, and the metrics record
    which fields the model read."""
    images, meta = external
    table = meta[["image_id", "dx", "age", "sex", "localization"]].rename(
        columns={"localization": "site"}
    )
    labels = write_labels(table.assign(split="test"), tmp_path / "labels.csv")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert evaluate(fused, labels, images, out) == 0
    assert f"{labels}: column 'site' is not read as localization" in caplog.text
    assert "split" not in caplog.text
    assert json.loads((out / "metrics.json").read_text())["metadata"] == ["age", "sex"]


def test_bad_ages_are_named_by_file_line_and_image_id_as_predict_does(
    fused: Path, external: tuple[Path, pd.DataFrame], tmp_path: Path, capsys
) -> None:
    images, meta = external
    table = meta[["image_id", "dx", "age", "sex", "localization"]].astype({"age": str})
    table.loc[2, "age"], table.loc[5, "age"] = "-5.0", "sixty"
    labels = write_labels(table, tmp_path / "labels.csv")
    assert evaluate(fused, labels, images, tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"skinlesion evaluate: error: {labels}: invalid metadata: 2 problem(s)"
    assert lines[1:] == [
        f"  line 4 (image_id {meta['image_id'][2]}): age -5.0 is negative",
        f"  line 7 (image_id {meta['image_id'][5]}): age 'sixty' is not a number",
    ]
    # Without metadata the model does not read the ages: nothing to refuse.
    assert evaluate(fused, labels, images, tmp_path / "out", "--no-metadata") == 0
