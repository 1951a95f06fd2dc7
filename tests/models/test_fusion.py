from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion.core.labels import CLASSES
from skinlesion.data.tabular import encode_metadata, fit_metadata_spec, missing_vector
from skinlesion.models.checkpoint import (
    atomic_torch_save,
    checkpoint_metadata,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from skinlesion.models.factory import build_model, default_spec
from skinlesion.models.freezing import freeze_stages
from skinlesion.models.fusion import MetadataFusion, drop_metadata

BACKBONE = "tf_efficientnet_lite0"
TABLE = pd.DataFrame(
    {"age": [30.0, 70.0, 50.0], "sex": ["male", "female", ""], "localization": ["back"] * 3}
)


@pytest.fixture(scope="module")
def spec():
    return fit_metadata_spec(TABLE, ("age", "sex", "localization"))


def test_forward_with_and_without_metadata(spec) -> None:
    torch.manual_seed(0)
    model = build_model(BACKBONE, len(CLASSES), pretrained=False, metadata=spec)
    assert isinstance(model, MetadataFusion)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    meta = torch.from_numpy(encode_metadata(TABLE, spec))
    with torch.no_grad():
        # A non-zero head so that the metadata can change the logits.
        torch.nn.init.normal_(model.classifier.weight, std=0.5)
        with_meta, without = model(x, meta), model(x)
        all_missing = model(x, torch.from_numpy(missing_vector(spec)).expand(3, -1))
    assert with_meta.shape == without.shape == (3, len(CLASSES))
    assert torch.isfinite(with_meta).all()
    assert torch.allclose(without, all_missing)
    assert not torch.allclose(with_meta[:2], without[:2])


def test_every_parameter_gets_a_gradient(spec) -> None:
    model = build_model(BACKBONE, len(CLASSES), pretrained=False, metadata=spec, drop_rate=0.0)
    model.train()
    meta = torch.from_numpy(encode_metadata(TABLE, spec))
    model(torch.randn(3, 3, 64, 64), meta).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.meta[0].weight.grad.abs().sum() > 0


def test_linear_variant_joins_the_vector(spec) -> None:
    model = build_model(BACKBONE, 3, pretrained=False, metadata=spec, metadata_hidden=0)
    assert model.classifier.in_features == model.num_features + spec.dim


def test_drop_metadata_whole_rows(spec) -> None:
    meta = torch.from_numpy(encode_metadata(pd.concat([TABLE] * 200), spec))
    missing = torch.from_numpy(missing_vector(spec))
    out = drop_metadata(meta, missing, 0.2, torch.Generator().manual_seed(0))
    dropped = (out == missing).all(1) & ~(meta == missing).all(1)
    kept = (out == meta).all(1)
    assert (dropped | kept).all()
    assert 0.12 < dropped.float().mean() < 0.28
    assert torch.equal(drop_metadata(meta, missing, 0.0, None), meta)


def test_checkpoint_round_trip(spec, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(BACKBONE, len(CLASSES), pretrained=False, metadata=spec)
    model.eval()
    ckpt = make_checkpoint(
        model,
        backbone=BACKBONE,
        spec=default_spec(BACKBONE, 64),
        fold=0,
        epoch=1,
        metrics={},
        config={},
        model_kwargs={"drop_rate": 0.3},
        metadata=spec,
    )
    atomic_torch_save(ckpt, tmp_path / "best.pt")
    loaded = load_checkpoint(tmp_path / "best.pt")  # weights_only=True
    assert checkpoint_metadata(loaded) == spec
    again, _ = model_from_checkpoint(loaded)
    x, meta = torch.randn(2, 3, 64, 64), torch.from_numpy(encode_metadata(TABLE[:2], spec))
    with torch.no_grad():
        assert torch.allclose(model(x, meta), again(x, meta))


def test_image_only_checkpoint_has_no_metadata(tmp_path: Path) -> None:
    model = build_model(BACKBONE, len(CLASSES), pretrained=False)
    ckpt = make_checkpoint(
        model,
        backbone=BACKBONE,
        spec=default_spec(BACKBONE, 64),
        fold=0,
        epoch=1,
        metrics={},
        config={},
    )
    assert "metadata" not in ckpt and checkpoint_metadata(ckpt) is None
    again, _ = model_from_checkpoint(ckpt)
    assert not isinstance(again, MetadataFusion)
    assert np.array_equal(list(again.state_dict()), list(model.state_dict()))


def test_freezing_a_fused_model_freezes_its_backbone(spec) -> None:
    model = build_model(BACKBONE, 3, pretrained=False, metadata=spec)
    frozen = freeze_stages(model, 2)
    assert frozen and not model.backbone.conv_stem.weight.requires_grad
    assert model.meta[0].weight.requires_grad and model.classifier.weight.requires_grad
