"""An ensemble is one run's folds: a checkpoint from elsewhere is refused, naming the file; a
checkpoint in the format written before the package had rooms still loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import lesion_images

from skinlesion.cli import main
from skinlesion.core.config import config_to_dict, load_config, save_config
from skinlesion.core.errors import CheckpointError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.predict import load_ensemble
from skinlesion.models.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint
from skinlesion.models.factory import build_model, default_spec

BACKBONE = "tf_efficientnet_lite0"
RUNTIME = resolve_runtime("cpu", channels_last=False)


def _checkpoint(model: torch.nn.Module, fold: int, cfg: dict[str, Any]) -> dict[str, Any]:
    return make_checkpoint(
        model,
        backbone=BACKBONE,
        spec=default_spec(BACKBONE, 32),
        fold=fold,
        epoch=1,
        metrics={"val_loss": 1.0},
        config=cfg,
        temperature=1.5,
        model_kwargs={"drop_rate": 0.3, "drop_path_rate": 0.2},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"model.backbone={BACKBONE}", "data.image_size=32"])
    save_config(cfg, root / "config.yaml")
    model = build_model(BACKBONE, 7, pretrained=False, drop_rate=0.3, drop_path_rate=0.2)
    for fold in (0, 1):
        (root / f"fold_{fold}").mkdir()
        torch.save(_checkpoint(model, fold, config_to_dict(cfg)), root / f"fold_{fold}/best.pt")
    return root


def _copy_with(run: Path, tmp_path: Path, change: Any) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    ckpt = torch.load(dest / "fold_1/best.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, dest / "fold_1/best.pt")
    return dest


def test_one_run_loads(run: Path) -> None:
    members = load_ensemble(run, RUNTIME)
    assert [m.fold for m in members] == [0, 1]
    assert all(m.temperature == 1.5 for m in members)


def _set(path: tuple[str, ...], value: Any) -> Any:
    def change(ckpt: dict[str, Any]) -> None:
        node = ckpt
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set(("fold",), 0), "holds fold 0 but sits in fold_1"),
        (_set(("backbone",), "efficientnet_b0"), "backbone efficientnet_b0 differs"),
        (_set(("preprocessing", "size"), 64), "preprocessing .* differs"),
        (_set(("config", "model", "drop_rate"), 0.1), r"another recipe .* \['model'\]"),
        (_set(("config", "data", "image_size"), 64), r"another recipe .* \['data'\]"),
    ],
)
def test_foreign_checkpoint_refused_naming_the_file(
    run: Path, tmp_path: Path, change: Any, reason: str
) -> None:
    foreign = _copy_with(run, tmp_path, change)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_ensemble(foreign, RUNTIME)
    assert str(foreign / "fold_1" / "best.pt") in str(info.value)


def test_weights_that_do_not_fit_are_one_line_naming_the_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder's checkpoint whose state dict does not fit its backbone: the same one-line
    CheckpointError as a packaged model's, from the library and from the command line."""

    def change(ckpt: dict[str, Any]) -> None:
        del ckpt["state_dict"]["conv_head.weight"]
        ckpt["state_dict"]["classifier.weight"] = torch.zeros(3, 1280)

    broken = _copy_with(run, tmp_path, change)
    best = broken / "fold_1" / "best.pt"
    with pytest.raises(CheckpointError, match="missing conv_head.weight") as info:
        load_ensemble(broken, RUNTIME)
    assert str(info.value).startswith(f"{best}: weights do not fit {BACKBONE} (")
    assert "shape classifier.weight [3, 1280] for [7, 1280]" in str(info.value)
    image = lesion_images(tmp_path / "img", 1)[0]
    argv = ["predict", "--model", str(broken), "--backend", "torch", "--device", "cpu"]
    assert main([*argv, str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinlesion predict: error: {best}: weights do not fit")
    assert "\n" not in err


def test_machine_settings_may_differ(run: Path, tmp_path: Path) -> None:
    # A fold trained elsewhere (merge) has its own output_dir, device and cache.
    def change(ckpt: dict[str, Any]) -> None:
        ckpt["config"]["output_dir"] = "/elsewhere"
        ckpt["config"]["train"]["device"] = "cuda"
        ckpt["config"]["data"]["cache_dir"] = "/tmp/other"
        ckpt["config"]["cv"]["folds_to_run"] = [1]
        ckpt["config"]["train"]["epochs"] = 99  # --resume may extend training

    assert len(load_ensemble(_copy_with(run, tmp_path, change), RUNTIME)) == 2


def test_checkpoint_of_the_old_format_loads(tmp_path: Path) -> None:
    """Format 1 as first written: no model_kwargs, metrics, config or temperature; a
    preprocessing dict without interpolation, colour constancy or class names."""
    model = build_model(BACKBONE, 7, pretrained=False)
    old = {
        "format_version": 1,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "backbone": BACKBONE,
        "num_classes": 7,
        "class_names": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        "preprocessing": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "fold": 3,
        "epoch": 4,
    }
    (tmp_path / "fold_3").mkdir()
    path = tmp_path / "fold_3" / "best.pt"
    torch.save(old, path)
    rebuilt, spec = model_from_checkpoint(load_checkpoint(path))
    assert spec.size == 32 and spec.interpolation == "bicubic" and not spec.colour_constancy
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    (member,) = load_ensemble(tmp_path, RUNTIME)
    assert (member.fold, member.tta, member.temperature) == (3, 1, 1.0)
