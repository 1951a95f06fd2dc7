"""The command line's contract: exit 0 on success, 2 and one line naming the culprit for the
user's mistakes, 1 when some images of a batch could not be read (the others still predicted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import atomic_torch_save, make_checkpoint
from skinlesion.models.factory import build_model, default_spec


def one_error_line(err: str, command: str) -> str:
    """The one ``skinlesion COMMAND: error: ...`` message of stderr, no traceback; a message
    that lists several problems (a config, a labels file) puts each on an indented line below."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    starts = [
        i for i, line in enumerate(lines) if line.startswith(f"skinlesion {command}: error: ")
    ]
    assert len(starts) == 1, err
    assert all(line.startswith("  ") for line in lines[starts[0] + 1 :]), err
    return "\n".join(lines[starts[0] :])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("tf_efficientnet_lite0", len(CLASSES), pretrained=False)
    spec = default_spec("tf_efficientnet_lite0", 32)
    path = tmp_path_factory.mktemp("cli") / "fold_0" / "best.pt"
    atomic_torch_save(
        make_checkpoint(
            model,
            backbone="tf_efficientnet_lite0",
            spec=spec,
            fold=0,
            epoch=1,
            metrics={},
            config={},
        ),
        path,
    )
    return path


def test_unknown_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--no-progress", "train.lrr=0.1"]) == 2
    assert "train.lrr" in one_error_line(capsys.readouterr().err, "train")


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert "nope.yaml" in one_error_line(capsys.readouterr().err, "train")


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", str(tmp_path / "run"), "x.jpg", "--no-progress"]) == 2
    assert str(tmp_path / "run") in one_error_line(capsys.readouterr().err, "predict")


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "best.pt"
    fake.write_bytes(b"not a checkpoint")
    assert main(["predict", "--model", str(fake), "x.jpg", "--no-progress"]) == 2
    assert "best.pt" in one_error_line(capsys.readouterr().err, "predict")


def test_missing_metadata_for_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = tmp_path / "meta.csv"
    assert main(["split", "--labels", str(meta), "--out", str(tmp_path / "f.csv")]) == 2
    assert "meta.csv" in one_error_line(capsys.readouterr().err, "split")


def test_bad_where_filter(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--model", str(checkpoint), "--labels", "l.csv", "--images", "i"]
    assert main([*argv, "--output", str(tmp_path / "o"), "--where", "split"]) == 2
    assert "COLUMN=VALUE" in one_error_line(capsys.readouterr().err, "evaluate")


def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["predict"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_split_succeeds(syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "folds.csv"
    meta = syn_root / "HAM10000_metadata.csv"
    assert main(["split", "--labels", str(meta), "--folds", "3", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(pd.read_csv(out)["fold"].unique()) == [0, 1, 2]


def test_split_of_a_config_reads_data_without_the_training_room(
    syn_root: Path, tmp_path: Path
) -> None:
    """``split --config`` reads the set through the data room's loader: in a fresh process,
    no module of ``skinlesion.training`` is imported, and the folds are written."""
    out = tmp_path / "folds.csv"
    config = tmp_path / "set.yaml"
    config.write_text(f"data:\n  root: {syn_root}\n  max_images: 20\ncv:\n  n_folds: 2\n")
    code = (
        "import sys\n"
        "from skinlesion.cli import main\n"
        f"rc = main(['split', '--config', {str(config)!r}, '--out', {str(out)!r}])\n"
        "print(rc, sorted(m for m in sys.modules if m.startswith('skinlesion.training')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "0 []"
    assert sorted(pd.read_csv(out)["fold"].unique()) == [0, 1]


def test_split_old_metadata_flag_still_works(
    syn_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--metadata``, the old name of ``--labels``: the same folds, and a warning."""
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    meta = str(syn_root / "HAM10000_metadata.csv")
    assert main(["split", "--labels", meta, "--folds", "3", "--out", str(new)]) == 0
    with pytest.warns(DeprecationWarning, match="--metadata is deprecated; use --labels"):
        assert main(["split", "--metadata", meta, "--folds", "3", "--out", str(old)]) == 0
    assert "--metadata is deprecated; use --labels" in caplog.text
    assert new.read_text() == old.read_text()


def test_bad_image_exits_1_and_predicts_the_others(
    checkpoint: Path, syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [str(p) for p in sorted(syn_root.rglob("*.jpg"))[:3]]
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", str(checkpoint), good[0], str(bad), *good[1:], "--output"]
    assert main([*argv, str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "wrote 3 prediction(s)" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "scan.png" in errors[0]
    df = pd.read_csv(out, keep_default_na=False)
    assert df["image"].tolist() == [good[0], str(bad), *good[1:]]
    assert (df["error"] != "").tolist() == [False, True, False, False]
    assert set(df.loc[df["error"] == "", "prediction"]) <= set(CLASSES)
    # Without --output the CSV goes to stdout, and the exit code is the same.
    assert main(["predict", "--model", str(checkpoint), good[0], str(bad), "--no-progress"]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith("image,")


def test_predict_help_describes_every_argument(capsys: pytest.CaptureFixture[str]) -> None:
    from skinlesion.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    predict = sub.choices["predict"]
    undescribed = [a.dest for a in predict._actions if not a.help]
    assert undescribed == []
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images image files or folders of images" in text


def test_predict_a_folder_predicts_its_images_in_name_order(
    checkpoint: Path, syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "scans"
    (folder / "nested").mkdir(parents=True)
    sources = sorted(syn_root.rglob("*.jpg"))[:3]
    for name, src in zip(["b.jpg", "a.JPG", "c.png"], sources, strict=True):
        shutil.copy(src, folder / name)
    shutil.copy(sources[0], folder / "nested" / "d.jpg")  # not inside: a sub-folder's
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", str(checkpoint), str(folder), str(sources[0])]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    names = ["a.JPG", "b.jpg", "c.png"]
    assert df["image"].tolist() == [str(folder / n) for n in names] + [str(sources[0])]
    assert (df["error"] == "").all()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    assert main(["predict", "--model", str(checkpoint), str(empty)]) == 2
    err = one_error_line(capsys.readouterr().err, "predict")
    assert f"{empty}: no image files" in err and ".jpg" in err
