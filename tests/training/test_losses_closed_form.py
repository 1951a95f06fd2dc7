"""Focal loss against its closed form at fractional gamma, and its gradient against autograd's
numerical one (a modulating factor cut from the graph gives the wrong gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinlesion.training.losses import FocalLoss, build_loss


def batch(n: int = 12, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    return logits, torch.randint(0, c, (n,), generator=g)


def closed_form(
    logits: np.ndarray,
    y: np.ndarray,
    gamma: float,
    alpha: np.ndarray | None = None,
    smoothing: float = 0.0,
) -> np.ndarray:
    """Per-sample ``-sum_c alpha_c q_c (1 - p_c)^gamma log p_c`` with ``q`` the (smoothed)
    one-hot target, written out in NumPy."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    c = logits.shape[1]
    q = np.eye(c)[y] * (1 - smoothing) + smoothing / c
    a = np.ones(c) if alpha is None else alpha
    return -(a * q * (1 - p) ** gamma * np.log(p)).sum(1)


@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_fractional_gamma_matches_closed_form(gamma: float) -> None:
    logits, y = batch(seed=int(gamma * 10))
    expected = closed_form(logits.numpy(), y.numpy(), gamma)
    per_sample = FocalLoss(gamma=gamma, reduction="none")(logits, y)
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=1e-10)
    mean = FocalLoss(gamma=gamma)(logits, y)
    assert mean.item() == pytest.approx(expected.mean(), rel=1e-10)
    total = FocalLoss(gamma=gamma, reduction="sum")(logits, y)
    assert total.item() == pytest.approx(expected.sum(), rel=1e-10)


def test_hand_value_gamma_half() -> None:
    # p_y = 0.75: (1 - 0.75)^0.5 * -ln 0.75 = 0.5 * 0.28768207 = 0.14384104
    logits = torch.tensor([[0.75, 0.25]], dtype=torch.float64).log()
    loss = FocalLoss(gamma=0.5)(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(0.5 * -np.log(0.75), abs=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_alpha_and_smoothing_match_closed_form(gamma: float) -> None:
    logits, y = batch(seed=3)
    alpha = np.linspace(0.5, 2.0, 7)
    expected = closed_form(logits.numpy(), y.numpy(), gamma, alpha, smoothing=0.1)
    loss = build_loss("focal", gamma, list(alpha), 0.1, reduction="none")(logits, y)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gradient_matches_numerical(gamma: float, smoothing: float) -> None:
    logits, y = batch(n=6, seed=7)
    logits.requires_grad_()
    loss = FocalLoss(
        gamma=gamma, alpha=[1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 3.0], label_smoothing=smoothing
    )
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (logits,), eps=1e-6, atol=1e-7)


def test_gradient_closed_form_two_classes() -> None:
    # Binary case, t = p_y, by the chain rule:
    # L = -(1-t)^g ln t, dL/dt = g (1-t)^(g-1) ln t - (1-t)^g / t, dt/dz_y = t (1 - t).
    g, t = 1.5, 0.8
    z = torch.tensor([[np.log(t), np.log(1 - t)]], dtype=torch.float64, requires_grad=True)
    FocalLoss(gamma=g)(z, torch.tensor([0])).backward()
    d_dt = g * (1 - t) ** (g - 1) * np.log(t) - (1 - t) ** g / t
    expected = d_dt * t * (1 - t)
    assert z.grad is not None
    assert z.grad[0, 0].item() == pytest.approx(expected, rel=1e-10)
    assert z.grad[0, 1].item() == pytest.approx(-expected, rel=1e-10)
