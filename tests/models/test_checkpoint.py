from pathlib import Path
from typing import Any

import pytest
import torch

from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from skinlesion.models.description import model_from_state
from skinlesion.models.factory import build_model, default_spec

BACKBONE = "tf_efficientnet_lite0"
ALL_KEYS = (
    "format_version",
    "state_dict",
    "backbone",
    "num_classes",
    "class_names",
    "preprocessing",
    "fold",
    "epoch",
    "metrics",
    "temperature",
    "config",
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(BACKBONE, len(CLASSES), pretrained=False)
    # Move BN statistics off their defaults so buffers are checked too.
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 64, 64))
    return m.eval()


def checkpoint(model: torch.nn.Module, **kw: Any) -> dict[str, Any]:
    spec = default_spec(BACKBONE, 64, interpolation="bilinear", colour_constancy=True)
    args: dict[str, Any] = {
        "backbone": BACKBONE,
        "spec": spec,
        "fold": 2,
        "epoch": 7,
        "metrics": {"balanced_accuracy": torch.tensor(0.75), "loss": 0.5},
        "config": {"model": {"backbone": BACKBONE, "size": 64}, "seed": 0, "tags": ["a", "b"]},
        "temperature": 1.3,
    }
    args.update(kw)
    return make_checkpoint(model, **args)


def saved(model: torch.nn.Module, tmp_path: Path, name: str = "best.pt") -> Path:
    path = tmp_path / name
    atomic_torch_save(checkpoint(model), path)
    return path


def test_round_trip_weights_only(model: torch.nn.Module, tmp_path: Path) -> None:
    path = saved(model, tmp_path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for key in ALL_KEYS:
        assert key in raw, key
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["backbone"] == BACKBONE
    assert raw["num_classes"] == len(CLASSES)
    assert raw["class_names"] == list(CLASSES)
    assert (raw["fold"], raw["epoch"]) == (2, 7)
    assert raw["metrics"] == {"balanced_accuracy": 0.75, "loss": 0.5}
    assert all(type(v) is float for v in raw["metrics"].values())
    assert raw["temperature"] == pytest.approx(1.3)
    assert raw["config"]["tags"] == ["a", "b"]
    own = model.state_dict()
    assert set(raw["state_dict"]) == set(own)
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in own.items())

    ckpt = load_checkpoint(path)
    assert ckpt.keys() == raw.keys()


def test_model_from_checkpoint_reproduces_outputs(model: torch.nn.Module, tmp_path: Path) -> None:
    path = saved(model, tmp_path)
    rebuilt, spec = model_from_checkpoint(load_checkpoint(path))
    assert not rebuilt.training
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert spec.size == 64


def test_spec_round_trips(model: torch.nn.Module, tmp_path: Path) -> None:
    spec = default_spec(
        BACKBONE, 96, interpolation="bilinear", colour_constancy=True, class_names=CLASSES
    )
    path = tmp_path / "spec.pt"
    atomic_torch_save(checkpoint(model, spec=spec), path)
    _, loaded = model_from_checkpoint(load_checkpoint(path))
    assert loaded == spec
    assert isinstance(loaded.mean, tuple) and isinstance(loaded.class_names, tuple)


def test_unwraps_wrapped_model(model: torch.nn.Module) -> None:
    ckpt = checkpoint(torch.nn.DataParallel(model))
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])


def test_saved_state_is_a_copy(model: torch.nn.Module) -> None:
    ckpt = checkpoint(model)
    ckpt["state_dict"]["conv_stem.weight"].zero_()
    assert model.state_dict()["conv_stem.weight"].abs().sum() > 0


def test_truncated_file_names_the_file(model: torch.nn.Module, tmp_path: Path) -> None:
    path = saved(model, tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3), "step": 10}, other)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_checkpoint(other)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="tensor.pt"):
        load_checkpoint(tensor)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)


def test_newer_format_is_rejected(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    atomic_torch_save(checkpoint(model, extra={"format_version": FORMAT_VERSION + 1}), path)
    with pytest.raises(CheckpointError, match="future.pt") as info:
        load_checkpoint(path)
    assert "newer" in str(info.value)


def test_atomic_save_leaves_no_temp_files(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "best.pt"
    atomic_torch_save(checkpoint(model), path)
    atomic_torch_save(checkpoint(model, epoch=8), path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]
    assert load_checkpoint(path)["epoch"] == 8


def test_failed_save_keeps_previous_file(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(model, tmp_path)
    before = path.read_bytes()

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(checkpoint(model, epoch=99), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_a_state_dict_that_does_not_fit_is_one_checkpoint_error(
    model: torch.nn.Module, tmp_path: Path
) -> None:
    """Missing, unexpected and misshapen keys: one line naming the file and the first keys of
    each kind, never torch's RuntimeError with its paragraphs."""
    ckpt = checkpoint(model)
    state = ckpt["state_dict"]
    del state["classifier.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["classifier.weight"] = torch.zeros(5, 1280)
    path = tmp_path / "best.pt"
    atomic_torch_save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(load_checkpoint(path), where=path)
    text = str(info.value)
    assert not isinstance(info.value, RuntimeError) and "\n" not in text
    assert text.startswith(f"{path}: weights do not fit {BACKBONE} (")
    assert "missing classifier.bias" in text and "unexpected extra.weight" in text
    assert "shape classifier.weight [5, 1280] for [7, 1280]" in text


def test_a_mismatch_names_only_the_first_keys(model: torch.nn.Module) -> None:
    state = {k: v for i, (k, v) in enumerate(model.state_dict().items()) if i >= 5}
    with pytest.raises(CheckpointError, match=r"missing \S+, \S+, \S+ and 2 more\)$"):
        model_from_state(state, BACKBONE, len(CLASSES), "weights.pt")
