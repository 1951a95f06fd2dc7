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


def sample_weights(
    labels: np.ndarray, n_classes: int, power: float = 1.0, sources: np.ndarray | None = None
) -> np.ndarray:
    """Per-image weights for a weighted random sampler: ``(1 / count) ** power`` with count the
    images of the image's class, or of its (source, class) with ``sources`` (one value per
    image; several labelled sets); at ``power=1`` classes (source x class) are drawn equally.
    One source gives the weights of none."""
    if sources is None:
        return class_weights(labels, n_classes, power)[labels]
    codes = np.unique(np.asarray(sources), return_inverse=True)[1].reshape(-1)
    strata = codes * n_classes + labels
    return class_weights(strata, int(codes.max() + 1) * n_classes, power)[strata]


def weighted_indices(
    labels: np.ndarray,
    n_classes: int,
    num_samples: int,
    generator: torch.Generator,
    power: float = 1.0,
    sources: np.ndarray | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` indices with replacement, weighted by inverse class (or source x
    class) frequency."""
    w = torch.as_tensor(sample_weights(labels, n_classes, power, sources), dtype=torch.float64)
    return torch.multinomial(w, num_samples, replacement=True, generator=generator)


def random_indices(
    labels: np.ndarray,
    n_classes: int,
    num_samples: int,
    generator: torch.Generator,
    power: float = 1.0,
    sources: np.ndarray | None = None,
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
    sources: np.ndarray | None = None,
) -> torch.Tensor:
    """Indices for one epoch from the sampler called ``name``; ``sources`` (one value per
    image) balances the weighted sampler by source x class."""
    check_name("sampler.name", name, SAMPLERS, "sampler")
    return SAMPLERS[name](labels, n_classes, num_samples, generator, power, sources=sources)
