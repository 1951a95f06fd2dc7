import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinlesion.core.errors import ConfigError
from skinlesion.training.losses import LOSSES, FocalLoss, build_loss


def random_batch(n: int = 32, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (each row sums to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def test_gamma_zero_equals_cross_entropy() -> None:
    for seed in range(3):
        logits, target = random_batch(seed=seed)
        focal = build_loss("focal", gamma=0.0)(logits, target)
        assert focal.item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-6)


def test_ce_registry_entry_is_cross_entropy() -> None:
    logits, target = random_batch()
    ce = build_loss("ce")(logits, target)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-6)


def test_known_value_gamma_two() -> None:
    # softmax rows (0.5, 0.25, 0.25) with y=0 and (0.1, 0.2, 0.7) with y=2:
    # mean of (1 - 0.5)^2 * -ln 0.5 and (1 - 0.7)^2 * -ln 0.7.
    logits = logits_for([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 2])
    expected = (0.25 * math.log(2) + 0.09 * -math.log(0.7)) / 2
    assert expected == pytest.approx(0.10269373, abs=1e-7)
    loss = FocalLoss(gamma=2.0)(logits, target)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_easy_examples_weigh_less() -> None:
    gamma = 2.0
    focal = FocalLoss(gamma=gamma)
    easy = logits_for([[0.99, 0.005, 0.005]])
    hard = logits_for([[0.1, 0.45, 0.45]])
    y = torch.tensor([0])
    ratio_easy = (focal(easy, y) / F.cross_entropy(easy, y)).item()
    ratio_hard = (focal(hard, y) / F.cross_entropy(hard, y)).item()
    # The ratio is exactly the modulating factor (1 - p_y)^gamma.
    assert ratio_easy == pytest.approx(0.01**gamma, rel=1e-4)
    assert ratio_hard == pytest.approx(0.9**gamma, rel=1e-4)
    assert ratio_easy < 0.01 * ratio_hard


def test_alpha_scales_per_class() -> None:
    logits, _ = random_batch(n=2, c=3, seed=1)
    plain = FocalLoss(gamma=2.0)
    weighted = FocalLoss(gamma=2.0, alpha=[1.0, 2.0, 1.0])
    one = torch.tensor([1])
    zero = torch.tensor([0])
    # A sample of the doubled class costs twice as much; the others are unchanged.
    assert weighted(logits[:1], one).item() == pytest.approx(2 * plain(logits[:1], one).item())
    assert weighted(logits[:1], zero).item() == pytest.approx(plain(logits[:1], zero).item())
    # In a batch, alpha acts per sample before the mean.
    both = torch.tensor([1, 0])
    expected = (2 * plain(logits[:1], one) + plain(logits[1:], zero)) / 2
    assert weighted(logits, both).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0, 1000.0])
def test_gradient_finite(gamma: float, scale: float) -> None:
    logits, target = random_batch(seed=2)
    # Include samples that are confidently right (p_y -> 1) and confidently wrong.
    logits = logits.clone()
    logits[0] = 0
    logits[0, target[0]] = 1
    logits = (logits * scale).requires_grad_()
    loss = FocalLoss(gamma=gamma, alpha=[1.0] * 7, label_smoothing=0.1)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_label_smoothing_gamma_zero_equals_ce() -> None:
    logits, target = random_batch(seed=3)
    for eps in (0.05, 0.1, 0.3):
        focal = build_loss("focal", gamma=0.0, label_smoothing=eps)(logits, target)
        ce = F.cross_entropy(logits, target, label_smoothing=eps)
        assert focal.item() == pytest.approx(ce.item(), abs=1e-6)


def test_half_precision_logits() -> None:
    logits, target = random_batch(seed=4)
    loss = FocalLoss(gamma=2.0)(logits.half(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(FocalLoss(gamma=2.0)(logits, target).item(), rel=1e-2)


def test_unknown_loss_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dice'") as info:
        build_loss("dice")
    for name in LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize("gamma", [-0.5, -2.0])
def test_negative_gamma_raises(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        build_loss("focal", gamma=gamma)


def test_alpha_wrong_length_raises() -> None:
    logits, target = random_batch(c=7)
    with pytest.raises(ValueError, match="alpha has 3 weights for 7 classes"):
        build_loss("focal", alpha=[1.0, 2.0, 3.0])(logits, target)
    with pytest.raises((ValueError, RuntimeError)):
        build_loss("ce", alpha=[1.0, 2.0, 3.0])(logits, target)


def test_default_gamma_is_two() -> None:
    logits = logits_for([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 2])
    assert build_loss("focal")(logits, target).item() == pytest.approx(0.10269373, abs=1e-7)


def test_ce_passes_weights_smoothing_and_reduction_on() -> None:
    logits, target = random_batch(c=3, seed=5)
    # Integer weights are accepted and act as float class weights.
    weighted = build_loss("ce", alpha=[1, 2, 1])(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 1.0]))
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    smoothed = build_loss("ce", label_smoothing=0.2)(logits, target)
    assert smoothed.item() == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.2).item(), rel=1e-6
    )
    per_sample = build_loss("ce", reduction="none")(logits, target)
    assert per_sample.shape == (32,)
    torch.testing.assert_close(per_sample, F.cross_entropy(logits, target, reduction="none"))


def test_unknown_loss_names_the_config_key() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.name: unknown loss 'dice'"):
        build_loss("dice")


def test_focal_defaults_buffers_and_messages() -> None:
    logits = logits_for([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]).float()
    target = torch.tensor([0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no implicit-dimension or dtype warnings on the way
        assert FocalLoss()(logits, target).item() == pytest.approx(0.10269373, abs=1e-6)
    # alpha follows the config, not the checkpoint: it is a buffer outside the state dict, and
    # float64 weights do not turn a float32 loss into float64.
    weighted = FocalLoss(alpha=np.array([1.0, 2.0, 1.0]))
    assert weighted.state_dict() == {}
    assert weighted(logits, target).dtype == torch.float32
    with pytest.raises(ValueError, match=r"^reduction must be mean, sum or none, got 'avg'$"):
        FocalLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"^gamma must be >= 0, got -1$"):
        FocalLoss(gamma=-1)
