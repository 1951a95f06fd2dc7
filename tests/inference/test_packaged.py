"""Packaged models: packaging a run, loading it back without pickle, the card's figures, the
default model, and the errors for corrupt or missing weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BATCH_ATOL, lesion_images, make_tiny_packaged
from PIL import Image

import skinlesion
from skinlesion.cli import main
from skinlesion.core.errors import CheckpointError, OutputError
from skinlesion.core.labels import CLASSES
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.synthetic import make_synthetic_ham10000
from skinlesion.evaluation.metrics import evaluate_predictions, melanoma_threshold_for_specificity
from skinlesion.inference import packaged
from skinlesion.inference.packaged import load_packaged, sha256_file
from skinlesion.inference.resolve import resolve_model
from skinlesion.publishing.package import package_run

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pkg")
    make_synthetic_ham10000(base / "syn", lesions_per_class=4)
    out = base / "run"
    overrides = {
        "data.root": base / "syn",
        "data.image_size": 32,
        "data.cache_dir": base / "cache",
        "cv.n_folds": 2,
        "model.backbone": "tf_efficientnet_lite0",
        "model.pretrained": "false",
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.steps_per_epoch": 2,
        "train.patience": "null",
        "eval.tta": 2,
        "eval.n_boot": 30,
        "output_dir": out,
    }
    args = [f"{k}={v}" for k, v in overrides.items()]
    assert main(["train", "--no-progress", *args]) == 0
    return out


@pytest.fixture(scope="module")
def zoo(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    # Two float16 Lite0 members (13.7 MiB) are over a 10 MiB limit: nothing is left behind.
    with (
        pytest.MonkeyPatch.context() as mp,
        pytest.raises(CheckpointError, match="over the 10 MiB"),
    ):
        mp.setattr("skinlesion.publishing.package.MAX_WEIGHTS_BYTES", 10 * 1024 * 1024)
        package_run(tiny_run, "tiny", out_root=root)
    assert not (root / "tiny" / "model.safetensors").exists()
    package_run(tiny_run, "tiny", out_root=root, hardware="test CPU", make_default=True, folds=[1])
    return root


def _images(tiny_run: Path, n: int = 6) -> list[str]:
    return sorted(str(p) for p in (tiny_run.parent / "syn").rglob("*.jpg"))[:n]


def test_package_writes_safe_formats_only(zoo: Path) -> None:
    folder = zoo / "tiny"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "LICENSE",
        "MODEL_CARD.md",
        "card.json",
        "familiarity.safetensors",  # the run's fold_1 familiarity, fitted at the end of training
        "model.json",
        "model.safetensors",
    ]
    assert (zoo / "default.txt").read_text().strip() == "tiny"
    assert (folder / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    assert "CC BY-NC-SA 4.0" in (folder / "LICENSE").read_text()
    card_md = (folder / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card_md and "Known limits" in card_md
    meta = json.loads((folder / "model.json").read_text())
    assert [m["fold"] for m in meta["members"]] == [1]
    assert meta["tta"] == 2


def test_packaged_predictions_equal_the_run_folders(tiny_run: Path, zoo: Path) -> None:
    runtime = resolve_runtime("cpu")
    from_run = resolve_model(tiny_run / "fold_1" / "best.pt", runtime)
    from_zoo = load_packaged(zoo / "tiny", runtime)
    imgs = _images(tiny_run)
    a, err_a = from_run.predict_proba(imgs)
    b, err_b = from_zoo.predict_proba(imgs)
    assert not err_a and not err_b
    # The zoo stores float16 weights (test_float16_weights_keep_probabilities bounds the error).
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(b.sum(1), 1.0, atol=1e-6)
    assert from_zoo.tta == from_run.tta == 2
    assert from_zoo.mel_threshold == from_run.mel_threshold


def test_card_figures_equal_those_recomputed_from_saved_predictions(tiny_run: Path, zoo: Path):
    card = json.loads((zoo / "tiny" / "card.json").read_text())
    oof = pd.read_csv(tiny_run / "oof_predictions.csv", dtype={"image_id": str, "lesion_id": str})
    y = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p = oof[list(CLASSES)].to_numpy(dtype=np.float64)
    thr = melanoma_threshold_for_specificity(y, p, 0.95, classes=CLASSES)
    res = evaluate_predictions(
        y, p, groups=oof["lesion_id"].to_numpy(), classes=CLASSES, mel_threshold=thr, n_boot=30
    )
    fig = card["metrics"]["out_of_fold"]
    assert fig["n"] == len(oof)
    assert fig["balanced_accuracy"] == pytest.approx(res["point"]["balanced_accuracy"], abs=1e-12)
    assert fig["balanced_accuracy_ci95"] == pytest.approx(res["ci95"]["balanced_accuracy"])
    assert fig["melanoma_auroc"] == pytest.approx(res["point"]["per_class"]["mel"]["auroc"])
    assert card["melanoma_threshold"] == pytest.approx(thr)


def test_python_api_takes_paths_pil_images_and_arrays(tiny_run: Path, zoo: Path) -> None:
    model = skinlesion.load_model(zoo / "tiny", device="cpu")
    path = _images(tiny_run, 1)[0]
    pil = Image.open(path).convert("RGB")
    table = model.predict([path, pil, np.asarray(pil), b"not an image"])
    assert list(table.columns[:1]) == ["image"] and "melanoma_flag" in table.columns
    probs = table[model.class_names].to_numpy()
    np.testing.assert_allclose(probs[0], probs[1], atol=BATCH_ATOL)
    np.testing.assert_allclose(probs[0], probs[2], atol=BATCH_ATOL)
    assert np.isnan(probs[3]).all() and table["prediction"][3] == "" and table["error"][3]


def test_default_model_and_names(monkeypatch: pytest.MonkeyPatch, zoo: Path) -> None:
    monkeypatch.setattr(packaged, "zoo_dir", lambda: zoo)
    assert resolve_model(None, resolve_runtime("cpu")).name == "tiny"
    assert resolve_model("tiny", resolve_runtime("cpu")).origin == zoo / "tiny"
    with pytest.raises(CheckpointError, match="packaged models: tiny"):
        resolve_model("tinny")
    rows = packaged.list_packaged()
    assert rows[0]["name"] == "tiny" and rows[0]["default"] and rows[0]["size_mb"] > 0


def test_cli_models_and_predict_without_model(
    monkeypatch: pytest.MonkeyPatch, zoo: Path, tiny_run: Path, tmp_path: Path, capsys
) -> None:
    monkeypatch.setattr(packaged, "zoo_dir", lambda: zoo)
    assert main(["models"]) == 0
    assert "tiny" in capsys.readouterr().out
    out = tmp_path / "p.csv"
    assert main(["predict", "--no-progress", *_images(tiny_run, 2), "--output", str(out)]) == 0
    df = pd.read_csv(out)
    np.testing.assert_allclose(df[list(CLASSES)].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_corrupt_or_missing_weights_name_the_file(zoo: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(zoo / "tiny", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match=str(weights)):
        load_packaged(folder)


def test_weights_that_do_not_fit_name_the_member_and_keys(tmp_path: Path) -> None:
    """The same builder as a run folder's checkpoints: one CheckpointError naming the file, the
    member and the first keys that differ."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_packaged(tmp_path, "misfit")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["fold1.conv_head.weight"]
    save_file(tensors, str(weights))
    meta = json.loads((folder / "model.json").read_text())
    meta["weights_sha256"] = sha256_file(weights)
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_packaged(folder)
    assert str(info.value) == (
        f"{weights} (member 'fold1.'): weights do not fit test_efficientnet "
        "(missing conv_head.weight)"
    )


def _shipped() -> Path | None:
    name = packaged.default_name()
    return packaged.zoo_dir() / name if name else None


@pytest.mark.skipif(_shipped() is None, reason="no packaged model in this checkout")
def test_shipped_default_model_predicts_from_outside_the_repo(tmp_path: Path) -> None:
    folder = _shipped()
    assert folder is not None
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in folder.iterdir())
    assert (folder / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    rng = np.random.default_rng(0)
    img = tmp_path / "lesion.png"
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(img)
    code = "import importlib.resources as r; print(r.files('skinlesion') / 'zoo')"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert Path(where.stdout.strip()) == folder.parent
    # The eager path: exporting the shipped model's graph would cost the suite a minute.
    run = subprocess.run(
        [sys.executable, "-m", "skinlesion", "predict", "--no-progress", "--backend", "torch"]
        + [str(img)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    df = pd.read_csv(__import__("io").StringIO(run.stdout))
    assert list(df.columns[1:8]) == list(CLASSES)
    assert df[list(CLASSES)].sum(axis=1).iloc[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(_shipped() is None, reason="no packaged model in this checkout")
def test_shipped_default_model_reads_metadata_when_it_is_fused() -> None:
    """The default is fused with age, sex and site: records given change its probabilities, and
    a record with nothing known predicts as no metadata at all (the image-only path)."""
    model = skinlesion.load_model(device="cpu", backend="torch")
    if not model.uses_metadata:
        pytest.skip(f"{model.name} is image-only")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (150, 200, 3), dtype=np.uint8) for _ in range(2)]
    none, _ = model.predict_proba(images, tta=1)
    unknown, _ = model.predict_proba(images, tta=1, metadata=[{}, {}])
    records = [
        {"age": 75, "sex": "male", "localization": "back"},
        {"age": 20, "sex": "female", "localization": "face"},
    ]
    given, _ = model.predict_proba(images, tta=1, metadata=records)
    assert np.allclose(unknown, none, atol=1e-6)
    assert np.allclose(given.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(given - none).max() > 1e-3


@pytest.mark.skipif(_shipped() is None, reason="no packaged model in this checkout")
def test_wheel_contains_the_packaged_models(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("skinlesion-*.whl"))
    # A lean wheel: the default model (and at most one other), not every model ever trained.
    assert wheel.stat().st_size <= 30 * 10**6, wheel.stat().st_size
    names = zipfile.ZipFile(wheel).namelist()
    folder = _shipped()
    assert folder is not None
    for f in folder.iterdir():
        assert f"skinlesion/zoo/{folder.name}/{f.name}" in names
    assert "skinlesion/zoo/default.txt" in names


def test_fit_final_trains_on_all_images_and_packages(tiny_run: Path, tmp_path: Path) -> None:
    from skinlesion.models.checkpoint import load_checkpoint
    from skinlesion.training.final import fit_final, fold_choices

    choice = fold_choices(tiny_run)
    summaries = [json.loads(p.read_text()) for p in sorted(tiny_run.glob("fold_*/summary.json"))]
    assert choice["temperature"] == pytest.approx(np.mean([s["temperature"] for s in summaries]))
    assert choice["epochs"] == round(float(np.median([s["best_epoch"] for s in summaries])))
    path = fit_final(tiny_run, progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["fold"] == -1 and ckpt["epoch"] == choice["epochs"]
    assert ckpt["temperature"] == pytest.approx(choice["temperature"])
    assert ckpt["final_fit"]["n_train"] == len(pd.read_csv(tiny_run / "folds.csv"))
    with pytest.raises(OutputError, match="pass --resume"):
        fit_final(tiny_run, progress=False)
    again = load_checkpoint(fit_final(tiny_run, resume=True, progress=False))
    for k, v in ckpt["state_dict"].items():
        assert torch_equal(v, again["state_dict"][k]), k
    out = package_run(tiny_run, "final", out_root=tmp_path, final=True)
    meta = json.loads((out / "model.json").read_text())
    assert [m["prefix"] for m in meta["members"]] == ["final."]
    card = json.loads((out / "card.json").read_text())
    assert card["members"][0]["final_fit"]["n_train"] == ckpt["final_fit"]["n_train"]
    assert "no held-out images of its own" in (out / "MODEL_CARD.md").read_text()
    probs, errors = load_packaged(out, resolve_runtime("cpu")).predict_proba(_images(tiny_run, 2))
    assert not errors
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.skipif(_shipped() is None, reason="no packaged model in this checkout")
def test_float16_weights_keep_probabilities_within_the_documented_bound(tmp_path: Path) -> None:
    """Storing a trained model's weights as the zoo does (float16, the small tensors float32)
    moves no probability by more than the 1e-3 that ``half_precision`` documents, and by less
    than storing every tensor in float16. The float32 model is the shipped one with each weight
    moved by a relative 1e-3, so that it is not already representable in float16."""
    from safetensors.torch import load_file, save_file

    from skinlesion.publishing.package import half_precision

    shipped = _shipped()
    assert shipped is not None
    gen = torch.Generator().manual_seed(0)
    fp32 = {}
    for k, v in load_file(str(shipped / "model.safetensors")).items():
        v = v.float() if v.is_floating_point() else v
        noise = 1 + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else 1
        fp32[k] = (v * noise).contiguous() if v.is_floating_point() else v
    everything = {k: v.half() if v.is_floating_point() else v for k, v in fp32.items()}
    probs = {}
    imgs = [str(p) for p in lesion_images(tmp_path / "imgs", n=12)]
    for name, tensors in (("fp32", fp32), ("rule", half_precision(fp32)), ("all", everything)):
        folder = tmp_path / name
        shutil.copytree(shipped, folder)
        save_file(tensors, str(folder / "model.safetensors"))
        meta = json.loads((folder / "model.json").read_text())
        meta["weights_sha256"] = sha256_file(folder / "model.safetensors")
        (folder / "model.json").write_text(json.dumps(meta))
        probs[name], errors = load_packaged(folder, resolve_runtime("cpu")).predict_proba(imgs)
        assert not errors
    # Informative outputs: the check could see a change (p(mel) spreads across images).
    assert np.ptp(probs["fp32"][:, CLASSES.index("mel")]) > 0.02
    rule = np.abs(probs["rule"] - probs["fp32"]).max()
    assert 0 < rule <= 1e-3, rule
    assert np.abs(probs["all"] - probs["fp32"]).max() > rule


def test_packaged_weights_follow_the_float32_rule(tmp_path: Path) -> None:
    """What ``skinlesion package`` writes (``write_weights``): a floating tensor is stored in
    float16 only if it has at least 16,384 elements and is not a BatchNorm statistic (the rule
    whose error the test above bounds); integers as they are; nothing else changes."""
    from safetensors.torch import load_file

    from skinlesion.models.factory import build_model
    from skinlesion.publishing.package import half_precision, write_weights

    state = build_model("tf_efficientnet_lite0", 7, pretrained=False).state_dict()
    write_weights([{"fold": 3, "state_dict": state}], tmp_path / "model.safetensors")
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(stored) == sorted(f"fold3.{k}" for k in state)
    kinds = set()
    for name, value in state.items():
        got = stored[f"fold3.{name}"]
        small = value.numel() < 16_384 or name.endswith(("running_mean", "running_var"))
        kind = "other" if not value.is_floating_point() else "float32" if small else "float16"
        kinds.add(kind)
        assert got.dtype == {"float16": torch.float16}.get(kind, value.dtype), name
        torch.testing.assert_close(got.to(value.dtype), value, rtol=1e-3, atol=1e-6, msg=name)
    assert kinds == {"float16", "float32", "other"}  # the fixture holds every kind
    # A BatchNorm statistic stays float32 whatever its size (no lite0 layer is that wide).
    big = {"bn.running_var": torch.rand(20_000), "conv.weight": torch.rand(20_000)}
    assert {k: v.dtype for k, v in half_precision(big).items()} == {
        "bn.running_var": torch.float32,
        "conv.weight": torch.float16,
    }


def _listed_model(root: Path, name: str, folds: list[int], bacc: float) -> None:
    """A packaged folder as `skinlesion models` reads it: model.json and card.json only."""
    from skinlesion.inference.packaged_meta import PACKAGED_FORMAT, write_packaged_meta
    from skinlesion.models.factory import default_spec

    folder = root / name
    folder.mkdir(parents=True)
    members = [{"fold": f, "prefix": f"fold{f}.", "temperature": 1.0} for f in folds]
    meta = {
        "format": PACKAGED_FORMAT,
        "name": name,
        "backbone": "tf_efficientnet_lite0",
        "preprocessing": default_spec("tf_efficientnet_lite0", 160).to_dict(),
        "tta": 4,
        "members": members,
        "weights_sha256": "0" * 64,
    }
    write_packaged_meta(folder, meta)
    card = {"metrics": {"out_of_fold": {"balanced_accuracy": bacc}}}
    (folder / packaged.CARD_FILE).write_text(json.dumps(card))


def test_models_lists_aligned_columns_and_no_oof_figure_for_a_final_fit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    long = "ham10000-isic2017-lite0-160-masked-and-more"
    _listed_model(tmp_path, long, [0], 0.685)
    _listed_model(tmp_path, "short", [0, 1, 2], 0.671)
    # fit-final's model (fold -1) trained on every image: the folds' score is not its own.
    _listed_model(tmp_path, "short-final", [-1], 0.671)
    (tmp_path / packaged.DEFAULT_FILE).write_text("short\n")
    monkeypatch.setattr(packaged, "zoo_dir", lambda: tmp_path)
    rows = {r["name"]: r for r in packaged.list_packaged()}
    assert rows["short-final"]["final_fit"] and rows["short-final"]["oof_balanced_accuracy"] is None
    assert not rows["short"]["final_fit"] and rows["short"]["oof_balanced_accuracy"] == 0.671
    assert main(["models"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, [long, "short", "short-final"], strict=True):
        assert line.startswith(name + " ")
        assert line.index("tf_efficientnet_lite0") == header.index("backbone")
        assert line.index(" 160 ") + 4 == header.index("input") + len("input")
    by_name = dict(zip([long, "short", "short-final"], lines, strict=True))
    assert "0.685" in by_name[long] and "0.671 (default)" in by_name["short"]
    assert "0.671" not in by_name["short-final"] and "final fit" in by_name["short-final"]
