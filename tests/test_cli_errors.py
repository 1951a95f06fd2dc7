"""The command line's contract: a user's fault is one line and exit 2, a bug keeps its
traceback, a config typo fails before any work, a bad image costs only its own row."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion import cli
from skinlesion.cli import main
from skinlesion.core.config import config_to_dict, load_config, save_config
from skinlesion.core.errors import ConfigError
from skinlesion.models.checkpoint import make_checkpoint
from skinlesion.models.factory import build_model, default_spec

BACKBONE = "tf_efficientnet_lite0"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-fold run folder with a random-weights model at 32 px."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"model.backbone={BACKBONE}", "data.image_size=32"])
    save_config(cfg, root / "config.yaml")
    model = build_model(BACKBONE, 7, pretrained=False)
    ckpt = make_checkpoint(
        model,
        backbone=BACKBONE,
        spec=default_spec(BACKBONE, 32),
        fold=0,
        epoch=1,
        metrics={"val_loss": 1.0},
        config=config_to_dict(cfg),
    )
    (root / "fold_0").mkdir()
    torch.save(ckpt, root / "fold_0" / "best.pt")
    return root


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    rng = np.random.default_rng(0)
    good = []
    for i in range(3):
        p = tmp_path / f"good{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(p)
        good.append(p)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the PNG is now over 2x the limit
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    return [good[0], bomb, good[1], text, good[2]]


def test_predict_keeps_every_good_row_and_names_the_bad(
    run: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "pred.csv"
    args = ["predict", "--model", str(run), "--output", str(out), "--no-progress"]
    assert main([*args, *map(str, images)]) == 1
    df = pd.read_csv(out, keep_default_na=False)
    assert df["image"].tolist() == [str(p) for p in images]
    bad = df["error"] != ""
    assert bad.tolist() == [False, True, False, True, False]
    assert (df.loc[~bad, "prediction"] != "").all()
    np.testing.assert_allclose(df.loc[~bad, ["akiec", "mel", "nv"]].astype(float).sum(1) > 0, 1)
    err = capsys.readouterr().err
    assert "bomb.png: refused, too many pixels" in err and "notes.jpg" in err


def test_unwritable_output_fails_before_inference(
    run: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(
        ["predict", "--model", str(run), "--output", str(blocker / "p.csv"), str(images[0])]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skinlesion predict: error: --output: ") and "\n" not in err
    assert str(blocker) in err


def test_bad_metadata_file_fails_before_the_model_loads(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,sex\ngood0.jpg,500,male\ngood2.png,40,female\n")
    argv = ["predict", "--model", str(tmp_path / "no_such_run"), "--metadata", str(meta)]
    assert main([*argv, "--no-progress", *map(str, images)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no_such_run" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"skinlesion predict: error: {meta}: invalid metadata: 2 problem(s)"
    assert lines[1:] == [
        "  line 2 (image_id good0.jpg): age 500 is over 120",
        "  line 3: no image named good2.png; did you mean good2?",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "m", "--batch-size", "0", "x.jpg"],
        ["predict", "--model", "m", "--tta", "0", "x.jpg"],
        ["predict", "--model", "m", "--tta", "-1", "x.jpg"],
        ["predict", "--model", "m", "--tta", "9", "x.jpg"],
        [
            "evaluate",
            "--model",
            "m",
            "--labels",
            "l",
            "--images",
            "i",
            "--output",
            "o",
            "--batch-size",
            "0",
        ],
    ],
)
def test_argparse_rejects_out_of_range_numbers(
    argv: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected an integer" in capsys.readouterr().err


def test_flags_may_sit_between_overrides() -> None:
    args = cli.build_parser().parse_args(
        ["train", "train.epochs=2", "--resume", "train.lr=0.1", "--no-progress"]
    )
    assert args.overrides == ["train.epochs=2", "train.lr=0.1"]
    assert args.resume and args.no_progress
    p = cli.build_parser().parse_args(["predict", "a.jpg", "--model", "m", "b.jpg"])
    assert p.images == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize(
    ("override", "key", "close"),
    [
        ("model.backbone=efficientnet_b33", "model.backbone", "efficientnet_b3"),
        ("loss.name=focall", "loss.name", "focal"),
        ("sampler.name=weigthed", "sampler.name", "weighted"),
        ("train.scheme=linear_prob", "train.scheme", "linear_probe"),
    ],
)
def test_name_typos_fail_before_any_work(
    override: str, key: str, close: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [
        "train",
        "--config",
        str(ROOT / "configs" / "quick.yaml"),
        f"output_dir={out}",
        f"data.cache_dir={cache}",
        override,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and key in err and close in err
    assert not out.exists() and not cache.exists()


def test_unreadable_last_checkpoint_on_resume_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from skinlesion.data.synthetic import make_synthetic_ham10000

    root = tmp_path / "syn"
    make_synthetic_ham10000(root, lesions_per_class=3)
    out = tmp_path / "run"
    argv = [
        "train",
        "--no-progress",
        f"data.root={root}",
        "data.image_size=32",
        f"data.cache_dir={tmp_path / 'c'}",
        "cv.n_folds=2",
        "cv.folds_to_run=[0]",
        f"model.backbone={BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.batch_size=8",
        "train.steps_per_epoch=1",
        "eval.n_boot=0",
        f"output_dir={out}",
    ]
    assert main(argv) == 0
    (out / "fold_0" / "summary.json").unlink()
    (out / "fold_0" / "last.pt").write_bytes(b"truncated")
    assert main(["--verbose", *argv[:1], "--resume", *argv[1:]]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "last.pt: cannot resume from it" in line[0]


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise ValueError("an internal bug, not the user's fault")

    monkeypatch.setattr(cli.train, "_cmd_report", broken)  # the report command's handler
    with pytest.raises(ValueError, match="internal bug"):
        main(["report", "somewhere"])


def test_user_error_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skinlesion report: error:") and "\n" not in err
    assert isinstance(ConfigError("x"), ValueError)  # old except clauses still catch it


def test_verbose_adds_debug_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert main(["--verbose", "report", str(tmp_path)]) == 2
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_config_typo_is_fast_through_the_real_entry_point(tmp_path: Path) -> None:
    """The installed command as a user runs it: exit 2, one line, nothing written."""
    if shutil.which("skinlesion") is None and not (ROOT / "src").is_dir():
        pytest.skip("no entry point")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "skinlesion",
            "train",
            "--config",
            str(ROOT / "configs" / "quick.yaml"),
            "model.backbone=efficientnet_b33",
            f"output_dir={out}",
            f"data.cache_dir={tmp_path / 'c'}",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.backbone" in proc.stderr
    assert not out.exists()


# -- damaged model files, outputs that cannot be written, folds that do not exist ---------------


def one_error_line(err: str, command: str) -> str:
    """The one line a user's fault prints (``skinlesion CMD: error: ...``), and nothing else."""
    err = err.strip()
    assert err.startswith(f"skinlesion {command}: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def exported(tiny_packaged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    assert main(["export", "--model", str(tiny_packaged), "--output", str(out)]) == 0
    return out


@pytest.fixture
def lesion(tmp_path: Path) -> Path:
    path = tmp_path / "lesion.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_onnx_graph_is_one_line(
    exported: Path, tmp_path: Path, lesion: Path, capfd: pytest.CaptureFixture, damage: str
) -> None:
    folder = Path(shutil.copytree(exported, tmp_path / "export"))
    graph = folder / "model.onnx"
    data = graph.read_bytes()
    graph.write_bytes(b"\x08\x07garbage" * 50 if damage == "garbage" else data[: len(data) // 2])
    capfd.readouterr()
    assert main(["predict", "--backend", "onnx", "--model", str(folder), str(lesion)]) == 2
    err = one_error_line(capfd.readouterr().err, "predict")  # fd 2: onnxruntime's own log too
    assert f"{graph}: not a loadable ONNX graph" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"format": "skinlesion-onnx", "preproc', "not valid JSON"),
        ('{"format": "skinlesion-onnx", "class_names": ["a"]}', "preprocessing is not a mapping"),
        ('["skinlesion-onnx"]', "not a skinlesion ONNX export"),
    ],
    ids=["truncated", "no-preprocessing", "not-a-mapping"],
)
def test_damaged_export_spec_is_one_line(
    exported: Path,
    tmp_path: Path,
    lesion: Path,
    capsys: pytest.CaptureFixture,
    text: str,
    expected: str,
) -> None:
    folder = Path(shutil.copytree(exported, tmp_path / "export"))
    (folder / "spec.json").write_text(text)
    assert main(["predict", "--backend", "onnx", "--model", str(folder), str(lesion)]) == 2
    err = one_error_line(capsys.readouterr().err, "predict")
    assert f"{folder / 'spec.json'}: {expected}" in err


def _no_members(meta: dict) -> None:
    del meta["members"]


def _warm_temperature(meta: dict) -> None:
    meta["members"][1]["temperature"] = "warm"


def _no_checksum(meta: dict) -> None:
    del meta["weights_sha256"]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_no_members, "model.json: members is missing, expected a non-empty list"),
        (_warm_temperature, "members[1].temperature is 'warm', expected a positive number"),
        (_no_checksum, "has no weights_sha256"),
    ],
    ids=["no-members", "text-temperature", "no-weights-sha256"],
)
def test_damaged_packaged_model_is_one_line(
    tiny_packaged: Path,
    tmp_path: Path,
    lesion: Path,
    capsys: pytest.CaptureFixture,
    damage: Any,
    expected: str,
) -> None:
    folder = Path(shutil.copytree(tiny_packaged, tmp_path / "tiny"))
    meta = json.loads((folder / "model.json").read_text())
    damage(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    assert main(["predict", "--no-progress", "--model", str(folder), str(lesion)]) == 2
    err = one_error_line(capsys.readouterr().err, "predict")
    assert f"error: {folder}" in err and expected in err


class _MakesDir:
    """Unpickling it creates a folder: a stand-in for a pickle that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.makedirs, (str(self.path),)


def test_pickle_that_runs_code_is_refused_in_one_sentence(
    tmp_path: Path, lesion: Path, capsys: pytest.CaptureFixture
) -> None:
    from skinlesion.core.errors import CheckpointError
    from skinlesion.models.factory import load_weights_file

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _MakesDir(marker)}, evil)
    assert main(["predict", "--no-progress", "--model", str(evil), str(lesion)]) == 2
    err = one_error_line(capsys.readouterr().err, "predict")
    assert f"{evil}: refused: it holds pickled objects that could run code" in err
    assert "os.makedirs" in err or "posix.makedirs" in err
    assert "PyTorch" not in err and "weights_only" not in err  # not torch's paragraphs
    # model.weights=PATH goes through the same refusal.
    with pytest.raises(CheckpointError, match="refused") as info:
        load_weights_file(build_model(BACKBONE, 7, pretrained=False), evil)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: an output folder below it cannot be made (root or not)."""
    path = tmp_path / "file.txt"
    path.write_text("")
    return path


def _boom(*args: object, **kwargs: object) -> None:
    raise AssertionError("the long part started although the output cannot be written")


def test_export_to_an_unwritable_folder_fails_before_loading(
    tiny_packaged: Path, blocker: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from skinlesion.inference import resolve

    monkeypatch.setattr(resolve, "resolve_torch_model", _boom)
    out = blocker / "sub"
    assert main(["export", "--model", str(tiny_packaged), "--output", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err, "export")
    assert f"--output: cannot create {out}: {blocker} is a file" in err


def test_explain_to_an_unwritable_folder_fails_before_loading(
    tiny_packaged: Path, blocker: Path, lesion: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from skinlesion.inference import resolve

    monkeypatch.setattr(resolve, "resolve_torch_model", _boom)
    out = blocker / "sub"
    argv = ["explain", "--model", str(tiny_packaged), "--output", str(out), str(lesion)]
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err, "explain")
    assert f"--output: cannot create {out}: {blocker} is a file" in err


def test_package_to_an_unwritable_folder_fails_before_loading(
    run: Path, blocker: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from skinlesion.publishing import package

    monkeypatch.setattr(package, "_load_members", _boom)
    out = blocker / "sub"
    assert main(["package", str(run), "--name", "tiny", "--out-root", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err, "package")
    assert f"cannot create {out / 'tiny'}: {blocker} is a file" in err


def test_report_with_a_file_in_the_way_fails_before_the_bootstrap(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from skinlesion.evaluation import report

    monkeypatch.setattr(report, "collect_oof", _boom)
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    (folder / "plots").write_text("a file where the plots folder goes")
    assert main(["report", str(folder)]) == 2
    err = one_error_line(capsys.readouterr().err, "report")
    assert f"{folder / 'plots'} exists and is not a folder" in err


def test_fit_final_with_a_file_in_the_way_fails_before_training(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from skinlesion.training import final

    monkeypatch.setattr(final, "load_run_data", _boom)
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    (folder / "fold_0" / "summary.json").write_text(
        json.dumps({"fold": 0, "best_epoch": 1, "temperature": 1.2})
    )
    (folder / "final").write_text("a file where the final model goes")
    assert main(["fit-final", str(folder)]) == 2
    err = one_error_line(capsys.readouterr().err, "fit-final")
    assert f"{folder / 'final'} exists and is not a folder" in err


def test_fold_that_does_not_exist_fails_before_any_work(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [
        "train",
        f"data.root={syn_root}",
        f"data.cache_dir={cache}",
        f"output_dir={out}",
        "cv.n_folds=5",
        "cv.folds_to_run=[0,7]",
    ]
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err, "train")
    assert "cv.folds_to_run=[0, 7]: no fold 7; cv.n_folds=5 makes folds 0..4" in err
    assert not out.exists() and not cache.exists()


def test_fold_missing_from_the_folds_file_fails_before_any_work(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folds = tmp_path / "folds.csv"
    split = ["split", "--labels", str(syn_root / "HAM10000_metadata.csv"), "--folds", "3"]
    assert main([*split, "--out", str(folds)]) == 0
    capsys.readouterr()
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [
        "train",
        f"data.root={syn_root}",
        f"data.cache_dir={cache}",
        f"output_dir={out}",
        f"cv.folds_file={folds}",
        "cv.folds_to_run=[4]",  # cv.n_folds=5, but the file has 3
    ]
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err, "train")
    assert f"no fold 4 in cv.folds_file {folds} (its folds: [0, 1, 2])" in err
    assert not out.exists() and not cache.exists()


# -- library warnings the project reports itself ------------------------------------------------


def test_large_image_is_one_log_line_not_a_warning(
    tiny_packaged: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recwarn: pytest.WarningsRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (50, 40), (120, 80, 60)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 2000 pixels: over it, under twice it
    with caplog.at_level(logging.INFO):
        assert main(["predict", "--no-progress", "--model", str(tiny_packaged), str(big)]) == 0
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    lines = [r.getMessage() for r in caplog.records if str(big) in r.getMessage()]
    assert len(lines) == 1 and "2000 pixels, over PIL's decompression-bomb limit" in lines[0]


def test_classes_absent_from_the_labels_give_no_warning(
    run: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    from conftest import lesion_images

    from skinlesion.core.labels import CLASSES
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.resolve import resolve_model

    folder = tmp_path / "images"
    folder.mkdir()
    for p in lesion_images(tmp_path / "found", 6):
        shutil.copy(p, folder / p.name)
    images = sorted(folder.iterdir())
    predicted = resolve_model(run, resolve_runtime("cpu")).predict(images)["prediction"]
    # Labels of a class the model never predicts: every predicted class is absent from them.
    absent = next(c for c in CLASSES if c not in set(predicted))
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": [p.stem for p in images], "dx": absent}).to_csv(labels, index=False)
    argv = ["evaluate", "--model", str(run), "--labels", str(labels), "--images", str(folder)]
    assert main([*argv, "--output", str(tmp_path / "ev"), "--n-boot", "0", "--no-progress"]) == 0
    assert not [w for w in recwarn if "sklearn" in w.filename or "not in y_true" in str(w.message)]


def test_export_gives_no_tracer_warning(
    tiny_packaged: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    assert main(["export", "--model", str(tiny_packaged), "--output", str(tmp_path / "x")]) == 0
    assert not [w for w in recwarn if "Converting a tensor to a Python boolean" in str(w.message)]


def test_misspelt_metadata_column_fails_naming_it(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A ``site`` column is not ``localization``: refused, not predicted as if no site."""
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,site\ngood0,50,back\n")
    argv = ["predict", "--model", str(tmp_path / "no_such_run"), "--metadata", str(meta)]
    assert main([*argv, "--no-progress", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no_such_run" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"skinlesion predict: error: {meta}: invalid metadata: 1 problem(s)"
    assert lines[1].startswith("  unknown column 'site'; did you mean localization? (")
