"""Training throughput: the model alone (forward, backward and AdamW step on a batch already on
the device: the upper bound) against the real training path
(:func:`~skinlesion.training.steps.train_batches` over a uint8 image source with the weighted
sampler and the default augmentation). Their ratio says how much the data path costs.

>>> r = bench_train("tf_efficientnet_lite0", 64, 8, steps=2, warmup=1)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skinlesion.benchmark.timing import timed
from skinlesion.benchmark.workload import (
    N_CLASSES,
    WEIGHTS_NOTE,
    build_model,
    chunks,
    device_fields,
    hardware_info,
    image_source,
    rate,
)
from skinlesion.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from skinlesion.core.runtime import Runtime


@dataclass
class _TrainBench:
    """The two timed loops of :func:`bench_train`, sharing model, optimiser and precision."""

    model_steps: Callable[[int], None]
    epoch: Callable[[int], None]


def _train_loops(
    backbone: str,
    image_size: int,
    batch_size: int,
    runtime: Runtime,
    compile: bool,
    images: int,
    seed: int,
) -> tuple[_TrainBench, dict[str, Any]]:
    """(a) model only: a normalised float batch already on the device; (b) end to end: the real
    training step path over a uint8 image source. Also what was used, for the result."""
    import torch

    from skinlesion.data.augment import AugmentConfig
    from skinlesion.data.sampling import draw_indices
    from skinlesion.models.factory import default_spec
    from skinlesion.training.losses import build_loss
    from skinlesion.training.steps import train_batches, train_step

    dev = runtime.device
    spec = default_spec(backbone, image_size)
    model, step_model = build_model(backbone, runtime, compile)
    criterion = build_loss("focal")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_scaler else None
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(N_CLASSES, (batch_size,), device=dev)

    def model_steps(n: int) -> None:
        model.train()
        for _ in range(n):
            train_step(step_model, x, y, criterion, optimizer, runtime, scaler)

    source, labels = image_source(images, image_size, dev, seed)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)

    def epoch(n: int) -> None:
        order = draw_indices("weighted", labels, N_CLASSES, n * batch_size, gen)
        train_batches(
            step_model,
            images=source,
            labels=labels_t,
            order=order,
            batch_size=batch_size,
            criterion=criterion,
            optimizer=optimizer,
            runtime=runtime,
            norm=spec.normalization,
            augment=AugmentConfig(),
            generator=aug_gen,
            scaler=scaler,
            progress=False,
        )

    return _TrainBench(model_steps, epoch), {"grad_scaler": scaler is not None}


def _check_counts(batch_size: int, steps: int, warmup: int) -> None:
    if batch_size < 2 or steps < 1 or warmup < 0:
        raise ConfigError(
            f"need batch_size >= 2 (BatchNorm trains on 2+ samples), steps >= 1 and "
            f"warmup >= 0; got {batch_size}, {steps} and {warmup}"
        )


def _alternate(
    bench: _TrainBench, steps: int, rounds: int, dev: torch.device, warmup: int = 0
) -> tuple[float, float]:
    """Seconds of (model only, end to end) after ``warmup`` untimed steps of each, timed in
    alternating rounds, in A-B, B-A order, so that a drift of speed during the run (machine
    load, clocks, a long warm-up) touches both alike and the ratio stays fair."""
    if warmup:
        bench.model_steps(warmup)
        bench.epoch(warmup)
    model_only_s = end_to_end_s = 0.0
    for r, chunk in enumerate(chunks(steps, rounds)):
        first_model = r % 2 == 0
        if first_model:
            model_only_s += timed(lambda c=chunk: bench.model_steps(c), dev)
        end_to_end_s += timed(lambda c=chunk: bench.epoch(c), dev)
        if not first_model:
            model_only_s += timed(lambda c=chunk: bench.model_steps(c), dev)
    return model_only_s, end_to_end_s


def bench_train(
    backbone: str,
    image_size: int,
    batch_size: int,
    steps: int = 20,
    warmup: int = 5,
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    images: int = 2048,
    seed: int = 0,
    rounds: int = 4,
) -> dict[str, Any]:
    """Training images/s of the model alone and of the real training step path, and their ratio.

    *Model only*: forward, focal loss, backward and AdamW step on one random float batch already
    on the device, repeated: the bound that no data pipeline can beat. *End to end*:
    :func:`~skinlesion.training.steps.train_batches` over ``steps`` batches of a uint8 source
    of ``images`` random images (a tensor on the GPU on CUDA, a NumPy array on the CPU, as
    :func:`~skinlesion.training.cv.run_cv` holds the cache), rows drawn by the weighted sampler,
    default augmentation. Both use the same model, optimiser, precision and layout; ``warmup``
    steps of each run first and are not timed, then the ``steps`` timed steps of each are taken
    in ``rounds`` alternating chunks (model first, then end to end first, and so on).
    """
    import torch

    from skinlesion.core.runtime import resolve_runtime, seed_everything

    _check_counts(batch_size, steps, warmup)
    runtime = resolve_runtime(device, amp, channels_last)
    dev = runtime.device
    hw = hardware_info()
    seed_everything(seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bench, used = _train_loops(backbone, image_size, batch_size, runtime, compile, images, seed)
    model_only_s, end_to_end_s = _alternate(bench, steps, rounds, dev, warmup)
    result: dict[str, Any] = {
        "benchmark": "train",
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "rounds": len(chunks(steps, rounds)),
        "source_images": images,
        "source": "torch tensor on the GPU" if dev.type == "cuda" else "numpy array",
        **device_fields(runtime, hw),
        **used,
        "compile": compile,
        **_TRAIN_RECIPE,
        "model_only": rate(steps * batch_size, model_only_s, steps),
        "end_to_end": rate(steps * batch_size, end_to_end_s, steps),
        "hardware": hw,
    }
    result["ratio"] = result["end_to_end"]["images_per_s"] / result["model_only"]["images_per_s"]
    if dev.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    return result


_TRAIN_RECIPE: dict[str, str] = {
    "loss": "focal",
    "optimizer": "AdamW",
    "sampler": "weighted",
    "augment": "AugmentConfig() defaults",
    "weights": WEIGHTS_NOTE,
}
