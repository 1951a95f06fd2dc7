"""Devices, precision, seeding, distributed state and the environment record of a run."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    dist: DistInfo = DistInfo()

    @property
    def needs_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def planned_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``), known before joining them,
    so a config that does not fit it is refused before any work."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = planned_world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    info = DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    log.info("distributed: rank %d of %d (%s)", info.rank, info.world_size, dist.get_backend())
    return info


def resolve_runtime(
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
    dist_info: DistInfo | None = None,
) -> Runtime:
    """Pick the device; on CUDA use bf16 autocast where supported, else fp16 with a scaler."""
    dist_info = dist_info or DistInfo()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp_dtype = (
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
        )
    else:
        amp_dtype = None  # CPU autocast is slower than fp32 for these convnets
    return Runtime(
        device=dev,
        amp_dtype=amp_dtype,
        # NHWC also pays on CPUs: oneDNN's depthwise convolutions ran 1.7-1.9x faster in it.
        channels_last=channels_last,
        dist=dist_info,
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also forces deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def derive_seeds(*keys: int, n: int = 1) -> list[int]:
    """``n`` independent 63-bit seeds for the stream named by ``keys`` (e.g. seed, fold, epoch,
    rank): another key, even one apart, gives unrelated streams.

    >>> derive_seeds(42, 0, 1, 0) == derive_seeds(42, 0, 1, 0) != derive_seeds(42, 0, 1, 1)
    True
    """
    entropy = [k % 2**64 for k in keys]  # SeedSequence takes non-negative words
    words = np.random.SeedSequence(entropy).generate_state(n, dtype=np.uint64)
    return [int(w >> 1) for w in words]  # torch seeds are signed 64-bit


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | None = None) -> str | None:
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": p.name,
        "memory_gb": round(p.total_memory / 1e9, 1),
        "multiprocessors": p.multi_processor_count,
        "cuda": torch.version.cuda,
    }


def environment_info(runtime: Runtime | None = None) -> dict[str, Any]:
    """Package versions, git commit and hardware, for the run folder and benchmark results."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings; a load near the core count means the
        # numbers are low.
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "gpu": _gpu(),
        "packages": {
            p: _version(p)
            for p in (
                "skinlesion",
                "torch",
                "torchvision",
                "timm",
                "numpy",
                "scikit-learn",
                "pandas",
                "pillow",
            )
        },
        "git_commit": git_commit(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if runtime is not None:
        info["device"] = str(runtime.device)
        info["amp_dtype"] = str(runtime.amp_dtype) if runtime.amp_dtype else None
        info["world_size"] = runtime.dist.world_size
    return info


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
