"""What the throughput benchmarks run on: models with random weights, HAM10000-like synthetic
images and labels, and the description of the machine and precision a result came from.

Models get random weights (``pretrained=False``): weights do not change speed and need no
download. torch and timm are imported inside the functions, so that registering the
``benchmark`` sub-command keeps the command line's start-up fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from skinlesion.core.runtime import Runtime

# Images per class in the HAM10000 release, in CLASSES order (akiec, bcc, bkl, df, mel, nv, vasc):
# synthetic labels follow it, so the weighted sampler draws as it does in real training.
HAM10000_CLASS_COUNTS = (327, 514, 1099, 115, 1113, 6705, 142)


N_CLASSES = len(HAM10000_CLASS_COUNTS)


WEIGHTS_NOTE = "random weights (pretrained=False): weights do not change speed"


def hardware_info() -> dict[str, Any]:
    """CPU, cores, threads, load and GPU of this machine: the run record's own
    :func:`~skinlesion.core.runtime.environment_info`, so both describe a machine alike."""
    from skinlesion.core.runtime import environment_info

    return environment_info()


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def rate(n_images: int, seconds: float, n_steps: int) -> dict[str, float]:
    return {
        "images_per_s": n_images / seconds,
        "ms_per_step": 1000.0 * seconds / n_steps,
        "seconds": seconds,
    }


def chunks(total: int, parts: int) -> list[int]:
    """``total`` split into at most ``parts`` near-equal positive chunks."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def ham_like_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    p = np.asarray(HAM10000_CLASS_COUNTS, dtype=np.float64)
    return rng.choice(N_CLASSES, size=n, p=p / p.sum())


def image_source(
    n: int, size: int, device: torch.device, seed: int
) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """``n`` random uint8 (size, size, 3) images held as training holds its cache (a tensor on
    the GPU on CUDA, else a NumPy array), and HAM10000-like labels."""
    import torch

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = ham_like_labels(n, rng)
    if device.type == "cuda":
        return torch.from_numpy(images).to(device), labels
    return images, labels


def build_model(
    backbone: str, runtime: Runtime, compile: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(model, the module to call): the second is compiled when asked."""
    import torch

    from skinlesion.models.factory import build_placed_model

    model = build_placed_model(runtime, backbone, N_CLASSES, pretrained=False)
    return model, (torch.compile(model) if compile else model)


def device_fields(runtime: Runtime, hw: dict[str, Any]) -> dict[str, Any]:
    import torch

    cuda = runtime.device.type == "cuda"
    return {
        "device": str(runtime.device),
        "device_name": hw["gpu"]["name"] if cuda and hw.get("gpu") else hw["cpu"],
        "torch": torch.__version__,
        "amp_dtype": dtype_name(runtime.amp_dtype),
        "channels_last": runtime.channels_last,
    }
