"""Temperature scaling: one scalar T that rescales logits to calibrate the softmax.

Fit T on out-of-fold logits (never on the data a report is computed on), store it in the
checkpoint, and apply it at evaluation and serving time::

    temperature = fit_temperature(oof_logits, oof_labels)
    probs = apply_temperature(test_logits, temperature)
"""

from __future__ import annotations

import math

import numpy as np
import torch

# T is searched in log space and clamped to this range: outside it the fitted model is either
# degenerate (perfectly separable logits push T to 0) or the logits carry no signal.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2


def _as_numpy(values: np.ndarray | torch.Tensor, dtype: type = np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    # A copy: a read-only view (a pandas column) makes torch warn when it wraps the array.
    return np.array(values, dtype=dtype)


def softmax(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = _as_numpy(logits)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply_temperature(logits: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64; rows sum to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(_as_numpy(logits) / temperature)


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def fit_temperature(
    logits: np.ndarray | torch.Tensor, y_true: np.ndarray | torch.Tensor, max_iter: int = 200
) -> float:
    """Temperature T > 0 minimising the mean NLL of ``softmax(logits / T)``.

    Optimises log T with L-BFGS in float64. The NLL is unimodal in log T, so clamping the result
    to [MIN_TEMPERATURE, MAX_TEMPERATURE] gives the constrained optimum. Never returns a T whose
    NLL is worse than T = 1.
    """
    z = torch.as_tensor(_as_numpy(logits))
    y = torch.as_tensor(_as_numpy(y_true, np.int64))
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"need logits (n, k) and labels (n,), got {tuple(z.shape)}, {y.shape}")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")

    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    log_t_value = float(log_t.detach())
    temperature = (
        math.exp(min(max(log_t_value, math.log(MIN_TEMPERATURE)), math.log(MAX_TEMPERATURE)))
        if math.isfinite(log_t_value)
        else 1.0
    )
    if _nll(z, y, temperature) > _nll(z, y, 1.0):
        return 1.0
    return temperature
