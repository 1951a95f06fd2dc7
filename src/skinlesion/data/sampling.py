"""Class-imbalance samplers: which training images each step draws.

Samplers return image indices for one epoch; training turns them into batches. Drawing on an
explicit ``torch.Generator`` keeps runs reproducible and lets each distributed rank draw its own
share of the same weighted sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from skinlesion.core.config import check_name


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> np.ndarray:
    """Weight per class, ``(1 / frequency) ** power``; absent classes weigh 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, (1.0 / np.maximum(counts, 1)) ** power, 0.0)
    return w


def sample_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> np.ndarray:
    """Per-image weights for a weighted random sampler; at ``power=1`` classes are drawn equally."""
    return class_weights(labels, n_classes, power)[labels]


def weighted_indices(
    labels: np.ndarray,
    n_classes: int,
    num_samples: int,
    generator: torch.Generator,
    power: float = 1.0,
) -> torch.Tensor:
    """Draw ``num_samples`` indices with replacement, weighted by inverse class frequency."""
    w = torch.as_tensor(sample_weights(labels, n_classes, power), dtype=torch.float64)
    return torch.multinomial(w, num_samples, replacement=True, generator=generator)


def random_indices(
    labels: np.ndarray,
    n_classes: int,
    num_samples: int,
    generator: torch.Generator,
    power: float = 1.0,
) -> torch.Tensor:
    """Plain shuffling (no rebalancing): repeated permutations up to ``num_samples``."""
    n = len(labels)
    reps = -(-num_samples // n)
    perm = torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])
    return perm[:num_samples]


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "weighted": weighted_indices,
    "random": random_indices,
}


def draw_indices(
    name: str,
    labels: np.ndarray,
    n_classes: int,
    num_samples: int,
    generator: torch.Generator,
    power: float = 1.0,
) -> torch.Tensor:
    """Indices for one epoch from the sampler called ``name``."""
    check_name("sampler.name", name, SAMPLERS, "sampler")
    return SAMPLERS[name](labels, n_classes, num_samples, generator, power)
