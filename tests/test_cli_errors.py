"""The command line's contract: a user's fault is one line and exit 2, a bug keeps its
traceback, a config typo fails before any work, a bad image costs only its own row."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path

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

    monkeypatch.setattr(cli, "_cmd_report", broken)
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
