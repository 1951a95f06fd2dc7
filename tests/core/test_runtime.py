"""Runtime: device and precision choice, process info, seeding, environment record."""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from skinlesion.core.runtime import (
    DistInfo,
    Runtime,
    environment_info,
    git_commit,
    init_distributed,
    resolve_runtime,
    seed_everything,
    torch_threads,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_dist_info() -> None:
    single = DistInfo()
    assert (single.rank, single.world_size, single.is_main, single.enabled) == (0, 1, True, False)
    worker = DistInfo(rank=1, world_size=2, local_rank=1)
    assert not worker.is_main and worker.enabled
    assert DistInfo(rank=0, world_size=4).is_main


def test_init_distributed_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == DistInfo()


def test_cpu_runtime_is_full_precision() -> None:
    rt = resolve_runtime("cpu", amp=True, channels_last=False)
    assert rt.device == torch.device("cpu")
    assert rt.amp_dtype is None and not rt.needs_scaler and not rt.channels_last
    assert isinstance(rt.autocast(), contextlib.nullcontext)
    assert resolve_runtime("cpu").channels_last  # NHWC is the default
    info = DistInfo(rank=1, world_size=2)
    assert resolve_runtime("cpu", dist_info=info).dist == info


@no_cuda
def test_auto_picks_the_cpu_without_cuda() -> None:
    assert resolve_runtime("auto").device.type == "cpu"


@no_cuda
def test_cuda_requested_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_runtime("cuda")


def test_scaler_only_for_float16() -> None:
    cpu = torch.device("cpu")
    assert Runtime(cpu, torch.float16, False).needs_scaler
    assert not Runtime(cpu, torch.bfloat16, False).needs_scaler
    assert not Runtime(cpu, None, False).needs_scaler


def test_autocast_uses_the_amp_dtype() -> None:
    rt = Runtime(torch.device("cpu"), torch.bfloat16, False)
    a = torch.randn(4, 4)
    with rt.autocast():
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32


def test_seed_everything_repeats_every_generator() -> None:
    def draws() -> tuple[float, float, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(3)

    seed_everything(11)
    first = draws()
    seed_everything(11)
    again = draws()
    seed_everything(12)
    other = draws()
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert first[0] != other[0] and first[1] != other[1] and not torch.equal(first[2], other[2])
    seed_everything(2**40 + 3)  # beyond NumPy's 32-bit seed range: reduced, not an error


def test_seed_everything_deterministic_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.deterministic = False


def test_environment_info(tmp_path: Path) -> None:
    info = environment_info()
    assert info["python"].count(".") == 2
    assert info["packages"]["torch"] is not None
    assert info["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda_available"] == torch.cuda.is_available()
    assert "device" not in info
    rt = resolve_runtime("cpu")
    with_rt = environment_info(rt)
    assert with_rt["device"] == "cpu" and with_rt["amp_dtype"] is None
    assert with_rt["world_size"] == 1


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None  # not a repository
    here = git_commit(Path(__file__).parent)
    if here is not None:  # a source checkout; an unpacked archive has none
        assert re.fullmatch(r"[0-9a-f]{40}", here)


def test_torch_threads_restores() -> None:
    old = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with torch_threads(None):
        assert torch.get_num_threads() == old
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError("x")
    assert torch.get_num_threads() == old
