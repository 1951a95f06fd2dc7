"""MixStyle: what the mixing does to feature statistics, that it acts only in training, and that
``train.mixstyle`` reaches the model the trainer trains."""

from __future__ import annotations

import pytest
import timm
import torch

from skinlesion.core.config import load_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.models import mixstyle
from skinlesion.models.freezing import freeze_stages
from skinlesion.models.mixstyle import add_mixstyle, mix_styles
from skinlesion.training.builders import run_spec
from skinlesion.training.fold_trainer import build_trainer


def _two_styles() -> torch.Tensor:
    """Two images whose channels have means 0 and 10 and standard deviations 1 and 3."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    x[1] = x[1] * 3 + 10
    return x


def test_mixed_statistics_lie_between_the_batch_s_styles_and_keep_the_content() -> None:
    x = _two_styles()
    torch.manual_seed(3)
    y = mix_styles(x, alpha=1.0)
    mu, sig = y.mean(dim=(2, 3)), y.std(dim=(2, 3))
    mu_x = x.mean(dim=(2, 3))
    assert ((mu >= mu_x.min(0).values - 1e-4) & (mu <= mu_x.max(0).values + 1e-4)).all()
    assert not torch.allclose(mu, mu_x, atol=0.1)  # a style moved
    assert (sig > 0.9).all() and (sig < 3.1).all()
    # The content (the normalised feature map) is kept: only the statistics change.
    z = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(z(y), z(x), atol=1e-3)


def test_a_single_image_is_left_alone() -> None:
    x = _two_styles()[:1]
    assert torch.equal(mix_styles(x, 0.1), x)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=3)


def test_hooks_mix_in_training_only_and_with_their_probability() -> None:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, mixed, never = _model(), _model(), _model()
    add_mixstyle(mixed, p=1.0, alpha=1.0, stages=[1, 2])
    add_mixstyle(never, p=0.0, alpha=0.1, stages=[1, 2])
    for m in (plain, mixed, never):
        m.eval()
    with torch.no_grad():
        assert torch.equal(mixed(x), plain(x))
        for m in (plain, mixed, never):
            m.train()
        torch.manual_seed(5)
        ref = plain(x)
        torch.manual_seed(5)
        assert torch.equal(never(x), ref)
        torch.manual_seed(5)
        assert not torch.allclose(mixed(x), ref, atol=1e-4)


def test_a_frozen_stage_in_eval_mode_is_still_mixed_while_the_model_trains() -> None:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, mixed = _model(), _model()
    add_mixstyle(mixed, p=1.0, alpha=1.0, stages=[0])
    with torch.no_grad():
        for m in (plain, mixed):
            m.train()
            for frozen in freeze_stages(m, 1):
                frozen.eval()
        torch.manual_seed(5)
        ref = plain(x)
        torch.manual_seed(5)
        assert not torch.allclose(mixed(x), ref, atol=1e-4)


def test_stages_out_of_range_or_a_backbone_without_stages_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"mixstyle_stages: \[4\].*at most 3"):
        add_mixstyle(_model(), 0.5, 0.1, [1, 4])
    with pytest.raises(ConfigError, match="no stages in 'blocks'"):
        add_mixstyle(timm.create_model("resnet10t", num_classes=3), 0.5, 0.1, [1])


TINY = ["model.backbone=test_efficientnet", "model.pretrained=false", "data.image_size=32"]
CPU = resolve_runtime("cpu", channels_last=False)


def test_train_mixstyle_hooks_the_configured_stages_of_the_trained_model() -> None:
    def hooked(*overrides: str) -> list[int]:
        cfg = load_config(None, [*TINY, *overrides])
        model = build_trainer(cfg, run_spec(cfg), 0, 16, CPU).model
        return [i for i, stage in enumerate(model.blocks) if stage._forward_hooks]

    assert hooked() == []
    assert hooked("train.mixstyle=0.5") == [1, 2, 3]
    assert hooked("train.mixstyle=0.5", "train.mixstyle_stages=[0,2]") == [0, 2]


def test_train_mixstyle_alpha_and_probability_reach_the_mixing(monkeypatch) -> None:
    alphas: list[float] = []
    monkeypatch.setattr(mixstyle, "mix_styles", lambda x, alpha: alphas.append(alpha) or x)
    cfg = load_config(None, [*TINY, "train.mixstyle=1.0", "train.mixstyle_alpha=0.3"])
    model = build_trainer(cfg, run_spec(cfg), 0, 16, CPU).model
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)
        assert alphas == []  # evaluation never mixes
        model.train()(x)
    assert alphas == [0.3, 0.3, 0.3]  # p=1: every configured stage, with the configured alpha
