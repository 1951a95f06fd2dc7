"""The masked softmax of a run of sources: an image's loss over its source's classes only.

A full mask is the loss as it always was; a partial one is the same loss computed on the
sub-softmax of the kept classes (label smoothing and class weights included), and the classes
outside it get no gradient from the image.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from skinlesion.training.losses import MASKED_LOGIT, build_loss, masked_log_softmax

N_CLASSES = 7
KEPT = [2, 4, 5]  # bkl, mel, nv: ISIC 2017's label space within HAM10000's classes
SETTINGS = [
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 2.0, "label_smoothing": 0.1}),
    ("focal", {"gamma": 1.0, "alpha": [0.5, 1.0, 2.0, 1.5, 3.0, 0.25, 1.0]}),
    ("ce", {}),
    ("ce", {"label_smoothing": 0.2}),
    ("ce", {"alpha": [0.5, 1.0, 2.0, 1.5, 3.0, 0.25, 1.0], "label_smoothing": 0.1}),
]
IDS = [f"{n}-{'-'.join(k)}" if k else n for n, k in SETTINGS]


def batch(n: int = 24, seed: int = 0, kept: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Spread logits (not saturated) in float64, targets within ``kept`` (default all)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64) * 2
    classes = torch.tensor(kept if kept is not None else list(range(N_CLASSES)))
    target = classes[torch.randint(0, len(classes), (n,), generator=g)]
    return logits, target


def loss_fn(name: str, **options: object) -> torch.nn.Module:
    """The registered loss in float64 (its class weights too), for tight comparisons."""
    return build_loss(name, **options).double()  # type: ignore[arg-type]


def mask_of(n: int, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, N_CLASSES, dtype=torch.bool)
    mask[:, kept] = True
    return mask


def _restricted(options: dict, kept: list[int]) -> dict:
    """The same loss settings for the kept classes only (their alpha weights)."""
    out = dict(options)
    if "alpha" in out:
        out["alpha"] = [out["alpha"][c] for c in kept]
    return out


@pytest.mark.parametrize(("name", "options"), SETTINGS, ids=IDS)
def test_full_mask_is_the_unmasked_loss(name: str, options: dict) -> None:
    logits, target = batch()
    loss = loss_fn(name, **options)
    full = torch.ones(len(target), N_CLASSES, dtype=torch.bool)
    torch.testing.assert_close(loss(logits, target, full), loss(logits, target), rtol=1e-12, atol=0)


def test_full_mask_focal_is_bitwise_the_unmasked_loss() -> None:
    logits, target = batch(seed=1)
    loss = build_loss("focal", gamma=2.0)
    full = torch.ones(len(target), N_CLASSES, dtype=torch.bool)
    assert torch.equal(loss(logits.float(), target, full), loss(logits.float(), target))


@pytest.mark.parametrize(("name", "options"), SETTINGS, ids=IDS)
def test_masked_loss_is_the_loss_of_the_sub_softmax(name: str, options: dict) -> None:
    """Masked over 7 logits == the same loss over the 3 kept logits, targets renumbered."""
    logits, target = batch(seed=2, kept=KEPT)
    masked = loss_fn(name, **options)(logits, target, mask_of(len(target), KEPT))
    renumber = {c: i for i, c in enumerate(KEPT)}
    sub_target = torch.tensor([renumber[int(t)] for t in target])
    sub = loss_fn(name, **_restricted(options, KEPT))(logits[:, KEPT], sub_target)
    torch.testing.assert_close(masked, sub, rtol=1e-10, atol=1e-12)
    assert masked.item() != pytest.approx(loss_fn(name, **options)(logits, target).item())


@pytest.mark.parametrize(("name", "options"), SETTINGS, ids=IDS)
def test_mixed_batch_is_each_image_over_its_own_classes(name: str, options: dict) -> None:
    """A batch mixing a 7-class source and a 3-class source: each image's loss is that of
    its own label space (``reduction="none"``), against a manual log-softmax of the kept."""
    logits, target = batch(n=10, seed=3, kept=KEPT)
    mask = mask_of(10, KEPT)
    mask[::2] = True  # every other image comes from the 7-class source
    per = loss_fn(name, reduction="none", **options)(logits, target, mask)
    for i in range(10):
        kept = [c for c in range(N_CLASSES) if mask[i, c]]
        opts = _restricted(options, kept)
        y = torch.tensor([kept.index(int(target[i]))])
        expected = loss_fn(name, reduction="none", **opts)(logits[i : i + 1, kept], y)
        torch.testing.assert_close(per[i : i + 1], expected, rtol=1e-10, atol=1e-12)


def test_masked_log_softmax_is_the_manual_sub_softmax() -> None:
    logits, _ = batch(seed=4)
    logp = masked_log_softmax(logits, mask_of(len(logits), KEPT))
    torch.testing.assert_close(logp[:, KEPT], F.log_softmax(logits[:, KEPT], dim=-1))
    outside = [c for c in range(N_CLASSES) if c not in KEPT]
    assert (logp[:, outside] < MASKED_LOGIT / 2).all()


def test_masked_focal_known_value() -> None:
    """Kept logits give p = (0.5, 0.25, 0.25) whatever the masked ones are: y=0 costs
    (1 - 0.5)^2 * ln 2."""
    ln2 = math.log(2)
    # kept: classes 1, 4, 6 with logits 0.5, 0.5 - ln 2, 0.5 - ln 2 -> softmax 0.5, 0.25, 0.25
    row = torch.tensor([[50.0, 0.5, 40.0, -3.0, 0.5 - ln2, 9.0, 0.5 - ln2]], dtype=torch.float64)
    mask = torch.zeros(1, N_CLASSES, dtype=torch.bool)
    mask[0, [1, 4, 6]] = True
    loss = build_loss("focal", gamma=2.0)(row, torch.tensor([1]), mask)
    assert loss.item() == pytest.approx(0.25 * ln2, rel=1e-9)


@pytest.mark.parametrize(("name", "options"), SETTINGS, ids=IDS)
def test_masked_classes_get_no_gradient(name: str, options: dict) -> None:
    """The logits outside a 3-class-source image's classes get exactly zero gradient (and a
    head's rows of classes no image in the batch has), the kept ones do not."""
    logits, target = batch(n=6, seed=5, kept=KEPT)
    features = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    head = torch.nn.Linear(16, N_CLASSES, dtype=torch.float64)
    mask = mask_of(6, KEPT)
    mask[0] = True  # one image of the 7-class source
    out = head(features) + logits
    out.retain_grad()
    loss_fn(name, **options)(out, target, mask).backward()
    assert out.grad is not None and head.weight.grad is not None
    assert (out.grad[1:][~mask[1:]] == 0).all()
    assert (out.grad[mask].abs() > 0).all()
    # Only image 0 teaches the 4 classes outside KEPT: drop it and their rows get nothing.
    head.zero_grad()
    loss_fn(name, **options)(head(features[1:]) + logits[1:], target[1:], mask[1:]).backward()
    outside = [c for c in range(N_CLASSES) if c not in KEPT]
    assert (head.weight.grad[outside] == 0).all() and (head.bias.grad[outside] == 0).all()
    assert (head.weight.grad[KEPT].abs().sum(1) > 0).all()


def test_half_precision_masked_logits_are_finite() -> None:
    logits, target = batch(seed=7, kept=KEPT)
    for name in ("focal", "ce"):
        loss = loss_fn(name, label_smoothing=0.1)(logits.half(), target, mask_of(len(target), KEPT))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
