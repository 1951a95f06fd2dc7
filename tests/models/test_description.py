"""The one model description: a checkpoint, a packaged model's model.json and an export's spec.json
carry the same keys written by one dataclass, read back equal, and a fault names file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skinlesion.core.errors import CheckpointError
from skinlesion.data.tabular import fit_metadata_spec
from skinlesion.inference.onnx_model import read_export_spec
from skinlesion.inference.packaged_meta import read_packaged_meta
from skinlesion.models.checkpoint import make_checkpoint, model_from_checkpoint
from skinlesion.models.description import ModelDescription, io_dict, spec_from_dict
from skinlesion.models.factory import build_model, default_spec

NAMES = ("bkl", "mel", "nv")


def _description(fused: bool = False) -> ModelDescription:
    spec = default_spec("test_efficientnet", 32, class_names=NAMES)
    if not fused:
        return ModelDescription("test_efficientnet", spec, {"drop_rate": 0.1})
    import pandas as pd

    table = pd.DataFrame({"age": [30.0, 50.0], "sex": ["male", "female"]})
    return ModelDescription(
        "test_efficientnet", spec, {}, fit_metadata_spec(table, ["age", "sex"]), 8
    )


@pytest.mark.parametrize("fused", [False, True])
def test_to_dict_reads_back_equal_and_is_plain_json(fused: bool) -> None:
    desc = _description(fused)
    plain = json.loads(json.dumps(desc.to_dict()))
    assert ModelDescription.from_dict(plain, "x") == desc
    assert plain["num_classes"] == 3 and plain["class_names"] == list(NAMES)
    assert ("metadata" in plain) is fused


def test_a_checkpoint_is_written_from_the_description_and_built_from_it() -> None:
    desc = _description(fused=True)
    model = build_model(
        desc.backbone, 3, False, metadata=desc.metadata, metadata_hidden=8, drop_rate=0.0
    )
    ckpt = make_checkpoint(
        model,
        backbone=desc.backbone,
        spec=desc.spec,
        fold=0,
        epoch=1,
        metrics={},
        config={},
        metadata=desc.metadata,
    )
    assert {k: ckpt[k] for k in desc.to_dict()} == desc.to_dict()
    rebuilt, spec = model_from_checkpoint(ckpt)
    assert spec == desc.spec
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in rebuilt.state_dict().items())


def test_packaged_and_export_files_carry_the_description_s_keys(
    tiny_packaged: Path, tmp_path: Path
) -> None:
    from skinlesion.cli import main

    meta = read_packaged_meta(tiny_packaged)
    member = {**meta, "metadata": meta["members"][0].get("metadata")}
    desc = ModelDescription.from_dict(member, tiny_packaged)
    assert {k: meta[k] for k in desc.shared_dict()} == desc.shared_dict()
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tiny_packaged), "--output", str(out)]) == 0
    exported, spec = read_export_spec(out / "spec.json")
    assert spec == desc.spec
    assert {k: exported[k] for k in io_dict(spec)} == io_dict(spec)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"backbone": 3}, "backbone is 3, expected a name"),
        ({"model_kwargs": [1]}, r"model_kwargs is \[1\], expected a mapping"),
        ({"preprocessing": {"size": 32}}, "preprocessing is not a mapping with size, mean and std"),
        ({"class_names": ["a", "b", "c"]}, "class_names .* differ from the preprocessing's"),
        ({"class_names": "mel"}, "class_names is 'mel', expected a list of names"),
        ({"num_classes": 7}, "num_classes is 7 for 3 class names"),
        ({"metadata": {"hidden": 8}}, "metadata is not a mapping with spec and hidden"),
    ],
)
def test_a_damaged_description_names_the_file_and_the_key(change: dict, match: str) -> None:
    plain = {**_description().to_dict(), **change}
    with pytest.raises(CheckpointError, match=match) as err:
        ModelDescription.from_dict(plain, "model.json")
    assert str(err.value).startswith("model.json: ")


def test_a_spec_written_before_it_held_the_class_names_takes_them_from_beside_it() -> None:
    plain = _description().to_dict()
    del plain["preprocessing"]["class_names"]
    assert spec_from_dict(plain, "old.pt").class_names == NAMES
