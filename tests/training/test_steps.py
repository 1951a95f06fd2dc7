"""The inner training loop: one step, one epoch over cached uint8 rows, frozen modules."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.augment import AugmentConfig
from skinlesion.data.preprocess import Normalization
from skinlesion.inference.forward import gather, prepare
from skinlesion.training.steps import train_batches, train_step

RUNTIME = resolve_runtime("cpu", channels_last=False)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
AUGMENT = AugmentConfig(rotation=30.0)  # flips, rotation, zoom and colour jitter all drawn


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 7),
    )


def cached_images(n: int = 10, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def run_epoch(
    model: nn.Module,
    images: np.ndarray,
    labels: torch.Tensor,
    order: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    seed: int,
    **options: Any,
) -> float:
    """:func:`train_batches` with what every test here shares: cross-entropy on the CPU,
    ``MEAN``/``STD``, ``AUGMENT``, a generator seeded with ``seed``, no progress bar; the
    keyword ``options`` (``step_scheduler``, ``frozen``, ...) go through."""
    return train_batches(
        model,
        images=images,
        labels=labels,
        order=order,
        batch_size=batch_size,
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        runtime=RUNTIME,
        norm=Normalization(tuple(MEAN), tuple(STD)),
        augment=AUGMENT,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
        **options,
    )


def test_train_step_returns_the_loss_before_the_step_and_descends() -> None:
    model = tiny_net()
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        before = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)
    loss = train_step(model, x, y, nn.CrossEntropyLoss(), opt, RUNTIME)
    assert loss.item() == pytest.approx(before.item(), rel=1e-6)
    for _ in range(40):
        last = train_step(model, x, y, nn.CrossEntropyLoss(), opt, RUNTIME)
    assert last.item() < 0.5 * before.item()  # six samples are memorised


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_the_step(clip: float | None) -> None:
    model = tiny_net()
    model.train()
    x, y = torch.randn(6, 3, 8, 8) * 10, torch.tensor([0, 1, 2, 3, 4, 5])
    old = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, x, y, nn.CrossEntropyLoss(), opt, RUNTIME, grad_clip=clip)
    # Plain SGD with lr 1 moves the parameters by exactly the (clipped) gradient.
    step = torch.cat(
        [(p.detach() - o).flatten() for p, o in zip(model.parameters(), old, strict=True)]
    )
    if clip is None:
        assert step.norm() > 10 * 1e-3
    else:
        assert step.norm() == pytest.approx(clip, rel=1e-3)


def test_epoch_loss_is_the_sample_weighted_mean_and_skips_single_rows() -> None:
    images = cached_images()
    labels = torch.arange(10) % 7
    order = torch.tensor([3, 1, 4, 1, 5, 9, 2])  # batches of 3: [3 1 4] [1 5 9] [2]
    model = tiny_net()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: losses are recomputable
    steps = []
    loss = run_epoch(
        model,
        images,
        labels,
        order,
        opt,
        batch_size=3,
        seed=5,
        step_scheduler=lambda: steps.append(1),
    )
    assert len(steps) == 2  # the last batch of one row is skipped (BatchNorm cannot train on it)
    gen = torch.Generator().manual_seed(5)
    ref.train()
    expected = []
    with torch.no_grad():
        for rows in (order[:3], order[3:6]):
            norm = Normalization(tuple(MEAN), tuple(STD))
            x = prepare(gather(images, rows, RUNTIME.device), norm, RUNTIME, AUGMENT, gen)
            expected.append(nn.functional.cross_entropy(ref(x), labels[rows]).item())
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_epoch_trains_and_frozen_modules_keep_their_statistics() -> None:
    images = cached_images(32, seed=1)
    labels = torch.arange(32) % 7
    model = tiny_net()
    frozen_bn = model[1]
    mean_before = frozen_bn.running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    run_epoch(model, images, labels, order, opt, batch_size=8, seed=1, frozen=[frozen_bn])
    assert model.training and not frozen_bn.training
    assert torch.equal(frozen_bn.running_mean, mean_before)
    # Without freezing, the same epoch moves the statistics.
    free = tiny_net()
    opt = torch.optim.SGD(free.parameters(), lr=0.05)
    run_epoch(free, images, labels, order, opt, batch_size=8, seed=1)
    assert not torch.equal(free[1].running_mean, mean_before)


def test_same_generator_same_epoch() -> None:
    images = cached_images(16, seed=2)
    labels = torch.arange(16) % 7
    order = torch.arange(16)
    results = []
    for _ in range(2):
        model = tiny_net(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = run_epoch(model, images, labels, order, opt, batch_size=4, seed=9)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)
