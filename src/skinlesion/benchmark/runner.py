"""Throughput benchmarks: training (model-only bound vs end to end), data loading, prediction;
and the familiarity check's refer rates (:mod:`skinlesion.benchmark.familiarity`).

Each benchmark returns a dict of plain Python values (``json.dumps`` works) that
:func:`format_table` renders as a small Markdown table:

- :func:`bench_train` times, in one run, the model alone (forward, backward and AdamW step on a
  batch already on the device: the upper bound) and the real training path
  (:func:`~skinlesion.training.engine.train_one_epoch` over a uint8 image source with the
  weighted sampler and the default augmentation). Their ratio says how much the data path costs.
- :func:`bench_loader` compares the uint8 cache pipeline with decoding every JPEG per batch.
- :func:`bench_predict` gives single-image latency and batched throughput of
  :func:`~skinlesion.inference.engine.predict_logits`.

Models get random weights (``pretrained=False``): weights do not change speed and need no
download. torch, timm and the training modules are imported inside the functions, so that
registering the ``benchmark`` sub-command keeps the command line's start-up fast.

>>> r = bench_train("tf_efficientnet_lite0", 64, 8, steps=2, warmup=1)  # doctest: +SKIP
>>> print(format_table(r))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinlesion.benchmark.timing import latency_row, timed
from skinlesion.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from skinlesion.core.runtime import Runtime
    from skinlesion.data.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

# Images per class in the HAM10000 release, in CLASSES order (akiec, bcc, bkl, df, mel, nv, vasc):
# synthetic labels follow it, so the weighted sampler draws as it does in real training.
HAM10000_CLASS_COUNTS = (327, 514, 1099, 115, 1113, 6705, 142)
N_CLASSES = len(HAM10000_CLASS_COUNTS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_NOTE = "random weights (pretrained=False): weights do not change speed"


# --- shared helpers ------------------------------------------------------------------------------


def hardware_info() -> dict[str, Any]:
    """CPU, cores, threads, load and GPU of this machine: the run record's own
    :func:`~skinlesion.core.runtime.environment_info`, so both describe a machine alike."""
    from skinlesion.core.runtime import environment_info

    return environment_info()


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _rate(n_images: int, seconds: float, n_steps: int) -> dict[str, float]:
    return {
        "images_per_s": n_images / seconds,
        "ms_per_step": 1000.0 * seconds / n_steps,
        "seconds": seconds,
    }


def _chunks(total: int, parts: int) -> list[int]:
    """``total`` split into at most ``parts`` near-equal positive chunks."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def _ham_like_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    p = np.asarray(HAM10000_CLASS_COUNTS, dtype=np.float64)
    return rng.choice(N_CLASSES, size=n, p=p / p.sum())


def _image_source(
    n: int, size: int, device: torch.device, seed: int
) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """``n`` random uint8 (size, size, 3) images held as training holds its cache (a tensor on
    the GPU on CUDA, else a NumPy array), and HAM10000-like labels."""
    import torch

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = _ham_like_labels(n, rng)
    if device.type == "cuda":
        return torch.from_numpy(images).to(device), labels
    return images, labels


def _build(backbone: str, runtime: Runtime, compile: bool = False) -> tuple[nn.Module, nn.Module]:
    """(model, the module to call): the second is compiled when asked."""
    import torch

    from skinlesion.models.factory import build_placed_model

    model = build_placed_model(runtime, backbone, N_CLASSES, pretrained=False)
    return model, (torch.compile(model) if compile else model)


# --- training ------------------------------------------------------------------------------------


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
    from skinlesion.training.engine import train_one_epoch, train_step
    from skinlesion.training.losses import build_loss

    dev = runtime.device
    spec = default_spec(backbone, image_size)
    model, step_model = _build(backbone, runtime, compile)
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

    source, labels = _image_source(images, image_size, dev, seed)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)

    def epoch(n: int) -> None:
        order = draw_indices("weighted", labels, N_CLASSES, n * batch_size, gen)
        train_one_epoch(
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


def _alternate(
    bench: _TrainBench, steps: int, rounds: int, dev: torch.device
) -> tuple[float, float]:
    """Seconds of (model only, end to end), timed in alternating rounds, in A-B, B-A order, so
    that a drift of speed during the run (machine load, clocks, a long warm-up) touches both
    alike and the ratio stays fair."""
    model_only_s = end_to_end_s = 0.0
    for r, chunk in enumerate(_chunks(steps, rounds)):
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
    :func:`~skinlesion.training.engine.train_one_epoch` over ``steps`` batches of a uint8 source
    of ``images`` random images (a tensor on the GPU on CUDA, a NumPy array on the CPU, as
    :func:`~skinlesion.training.cv.run_cv` holds the cache), rows drawn by the weighted sampler,
    default augmentation. Both use the same model, optimiser, precision and layout; ``warmup``
    steps of each run first and are not timed, then the ``steps`` timed steps of each are taken
    in ``rounds`` alternating chunks (model first, then end to end first, and so on).
    """
    import torch

    from skinlesion.core.runtime import resolve_runtime, seed_everything

    if batch_size < 2 or steps < 1 or warmup < 0:
        raise ConfigError(
            f"need batch_size >= 2 (BatchNorm trains on 2+ samples), steps >= 1 and "
            f"warmup >= 0; got {batch_size}, {steps} and {warmup}"
        )
    runtime = resolve_runtime(device, amp, channels_last)
    dev = runtime.device
    hw = hardware_info()
    seed_everything(seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bench, used = _train_loops(backbone, image_size, batch_size, runtime, compile, images, seed)
    if warmup:
        bench.model_steps(warmup)
        bench.epoch(warmup)
    model_only_s, end_to_end_s = _alternate(bench, steps, rounds, dev)
    n = steps * batch_size
    result: dict[str, Any] = {
        "benchmark": "train",
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "rounds": len(_chunks(steps, rounds)),
        "source_images": images,
        "source": "torch tensor on the GPU" if dev.type == "cuda" else "numpy array",
        **_device_fields(runtime, hw),
        **used,
        "compile": compile,
        **_TRAIN_RECIPE,
        "model_only": _rate(n, model_only_s, steps),
        "end_to_end": _rate(n, end_to_end_s, steps),
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


def _device_fields(runtime: Runtime, hw: dict[str, Any]) -> dict[str, Any]:
    import torch

    cuda = runtime.device.type == "cuda"
    return {
        "device": str(runtime.device),
        "device_name": hw["gpu"]["name"] if cuda and hw.get("gpu") else hw["cpu"],
        "torch": torch.__version__,
        "amp_dtype": _dtype_name(runtime.amp_dtype),
        "channels_last": runtime.channels_last,
    }


# --- data loading --------------------------------------------------------------------------------


def _loader_images(
    data_root: str | Path | None,
    tmp: Path,
    max_images: int,
    synthetic_size: tuple[int, int],
    synthetic_images: int,
    seed: int,
) -> tuple[list[str], list[str], str]:
    """(image ids, paths, description) of the images to benchmark, sorted by image id."""
    from skinlesion.data.metadata import load_ham10000
    from skinlesion.data.synthetic import make_synthetic_ham10000

    if data_root is None:
        root = tmp / "synthetic"
        # Lesions have 1-3 images (2 on average), 7 classes.
        per_class = max(1, math.ceil(synthetic_images / (2 * N_CLASSES)))
        make_synthetic_ham10000(root, lesions_per_class=per_class, size=synthetic_size, seed=seed)
        what = f"synthetic {synthetic_size[0]}x{synthetic_size[1]} JPEGs"
    else:
        root = Path(data_root)
        what = str(root)
    # The cache build below decodes every image, so a broken file is still reported.
    df = load_ham10000(root, verify=False).sort_values("image_id").head(max_images)
    return df["image_id"].tolist(), df["path"].tolist(), what


def bench_loader(
    data_root: str | Path | None,
    image_size: int,
    batch_size: int = 64,
    batches: int = 20,
    cache_dir: Path | None = None,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (600, 450),
    synthetic_images: int = 500,
    max_images: int = 2000,
    decode_workers: int | None = None,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """Images/s of the uint8-cache pipeline against decoding the JPEGs for every batch, on CPU.

    Both pipelines prepare the same randomly drawn rows the same way (``engine.prepare`` with the
    default augmentation); they differ only in where the uint8 pixels come from: rows of the cache
    (``engine.gather``) or ``preprocess.prepare_image`` on each file (``decode_workers`` threads,
    default one per torch thread, as ``build_cache`` decodes). ``data_root=None`` writes a
    synthetic set of about ``synthetic_images`` JPEGs of ``synthetic_size`` (w, h) pixels, the
    official HAM10000 release's 600x450 by default; else the first ``max_images`` images (by
    image id) of a HAM10000 folder are used. The cache goes to ``cache_dir`` (default: a
    temporary folder); the time to build it is reported apart and not in the ratio.
    """
    import torch
    from PIL import Image

    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.cache import build_cache, cache_key

    if batch_size < 1 or batches < 1:
        raise ConfigError(f"need batch_size >= 1 and batches >= 1, got {batch_size}, {batches}")
    runtime = resolve_runtime("cpu", amp=False, channels_last=False)
    hw = hardware_info()
    workers = decode_workers or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="skinlesion-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ids, paths, what = _loader_images(
            data_root, tmp, max_images, synthetic_size, synthetic_images, seed
        )
        if not ids:
            raise DataError(f"no images found in {what}")
        cdir = Path(cache_dir) if cache_dir else tmp / "cache"
        key = cache_key(ids, paths, image_size, interpolation, False)
        reused = (cdir / key / "index.json").is_file()
        t0 = time.perf_counter()
        cache = build_cache(ids, paths, image_size, cdir, interpolation, progress=False)
        build_s = time.perf_counter() - t0
        with Image.open(paths[0]) as im:
            source_size = list(im.size)
        spec = _LoaderSpec(image_size, interpolation, batch_size, batches, workers, seed)
        cache_t, decode_t = _time_loaders(cache.images, paths, spec, runtime)
    result: dict[str, Any] = {
        "benchmark": "loader",
        "source": what,
        "source_image_size": source_size,
        "n_images": len(ids),
        "interpolation": interpolation,
        **_loader_figures(spec, torch.get_num_threads(), cache_t, decode_t),
        "cache_build_s": build_s,
        "cache_build_images_per_s": len(ids) / build_s if not reused else None,
        "cache_reused": reused,
        "hardware": hw,
    }
    result["ratio"] = result["cache"]["images_per_s"] / result["decode"]["images_per_s"]
    # Where the pixels come from alone (augmentation left out): what the cache itself saves.
    result["read_ratio"] = decode_t[0] / cache_t[0] if cache_t[0] > 0 else None
    return result


def _loader_figures(
    spec: _LoaderSpec,
    threads: int,
    cache_t: tuple[float, float],
    decode_t: tuple[float, float],
) -> dict[str, Any]:
    n = spec.batches * spec.batch_size
    return {
        "image_size": spec.image_size,
        "batch_size": spec.batch_size,
        "batches": spec.batches,
        "augment": "AugmentConfig() defaults, on CPU",
        "decode_workers": spec.workers,
        "torch_threads": threads,
        "cache": _loader_rate(n, spec.batches, *cache_t),
        "decode": _loader_rate(n, spec.batches, *decode_t),
    }


@dataclass(frozen=True)
class _LoaderSpec:
    image_size: int
    interpolation: str
    batch_size: int
    batches: int
    workers: int
    seed: int


def _time_loaders(
    cache_images: np.ndarray, paths: Sequence[str], spec: _LoaderSpec, runtime: Runtime
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(read, prepare) seconds of the cache rows and of decoding each JPEG, on the same rows."""
    import torch

    from skinlesion.data.preprocess import prepare_image
    from skinlesion.inference.engine import gather

    gen = torch.Generator().manual_seed(spec.seed)
    # The same rows for both pipelines; the first draw is a warm-up, not timed.
    draws = [
        torch.randint(len(paths), (spec.batch_size,), generator=gen)
        for _ in range(spec.batches + 1)
    ]

    def read_cache(rows: torch.Tensor) -> torch.Tensor:
        return gather(cache_images, rows, runtime.device)

    with ThreadPoolExecutor(spec.workers) as pool:

        def read_jpeg(rows: torch.Tensor) -> torch.Tensor:
            work = [(paths[i], spec.image_size, spec.interpolation) for i in rows.tolist()]
            return torch.from_numpy(np.stack(list(pool.map(lambda a: prepare_image(*a), work))))

        times = _time_pipelines(
            {"cache": read_cache, "decode": read_jpeg}, draws, runtime, spec.seed
        )
    return times["cache"], times["decode"]


def _time_pipelines(
    readers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    draws: Sequence[torch.Tensor],
    runtime: Runtime,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """(read seconds, prepare seconds) of each reader over ``draws[1:]``; ``draws[0]`` warms up.

    The readers take turns batch by batch, in alternating order, so that a change of machine
    load touches all alike; each has its own augmentation generator, seeded alike, so all prepare
    the very same batches.
    """
    import torch

    from skinlesion.data.augment import AugmentConfig
    from skinlesion.data.preprocess import Normalization
    from skinlesion.inference.engine import prepare

    aug = AugmentConfig()
    norm = Normalization(IMAGENET_MEAN, IMAGENET_STD)
    gens = {name: torch.Generator().manual_seed(seed + 1) for name in readers}
    totals = {name: [0.0, 0.0] for name in readers}
    for b, rows in enumerate(draws):
        order = list(readers.items())
        for name, read in order if b % 2 else order[::-1]:
            t0 = time.perf_counter()
            u8 = read(rows)
            t1 = time.perf_counter()
            prepare(u8, norm, runtime, aug, gens[name])
            t2 = time.perf_counter()
            if b > 0:
                totals[name][0] += t1 - t0
                totals[name][1] += t2 - t1
    return {name: (t[0], t[1]) for name, t in totals.items()}


def _loader_rate(n: int, batches: int, read_s: float, prep_s: float) -> dict[str, float]:
    total = read_s + prep_s
    return {
        "images_per_s": n / total,
        "ms_per_batch": 1000.0 * total / batches,
        "read_ms_per_batch": 1000.0 * read_s / batches,
        "augment_ms_per_batch": 1000.0 * prep_s / batches,
        "seconds": total,
    }


# --- prediction ----------------------------------------------------------------------------------


def bench_predict(
    backbone: str,
    image_size: int,
    batch_sizes: Sequence[int] = (1, 32),
    steps: int = 20,
    warmup: int = 3,
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency (median, p95) and images/s of
    :func:`~skinlesion.inference.engine.predict_logits` per batch size; batch 1 is the
    single-image latency.

    Inputs are prepared uint8 images in a NumPy array, as ``inference.predict_sources`` hands
    them over, so each call includes the host-to-device copy; JPEG decoding is not included.
    """

    from skinlesion.core.runtime import resolve_runtime, seed_everything
    from skinlesion.models.factory import default_spec

    if not batch_sizes or min(batch_sizes) < 1 or steps < 1 or warmup < 0:
        raise ConfigError(
            f"need batch sizes >= 1, steps >= 1, warmup >= 0; got {batch_sizes}, {steps}, {warmup}"
        )
    runtime = resolve_runtime(device, amp, channels_last)
    hw = hardware_info()
    seed_everything(seed)
    spec = default_spec(backbone, image_size)
    model, _ = _build(backbone, runtime)
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (max(batch_sizes), image_size, image_size, 3), dtype=np.uint8)

    rows_out = [_time_predict(model, source, b, steps, warmup, runtime, spec) for b in batch_sizes]
    single = next((r for r in rows_out if r["batch_size"] == 1), None)
    return {
        "benchmark": "predict",
        "backbone": backbone,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        **_device_fields(runtime, hw),
        "tta": 1,
        "weights": WEIGHTS_NOTE,
        "results": rows_out,
        "latency_median_ms": single["median_ms"] if single else None,
        "latency_p95_ms": single["p95_ms"] if single else None,
        "max_images_per_s": max(r["images_per_s"] for r in rows_out),
        "hardware": hw,
    }


def _time_predict(
    model: nn.Module,
    source: np.ndarray,
    b: int,
    steps: int,
    warmup: int,
    runtime: Runtime,
    spec: PreprocessSpec,
) -> dict[str, float]:
    from skinlesion.inference.engine import predict_logits

    rows = np.arange(b)

    def call() -> None:
        predict_logits(model, source, rows, batch_size=b, runtime=runtime, norm=spec.normalization)

    return latency_row(call, b, steps, warmup, runtime.device)


# --- rendering -----------------------------------------------------------------------------------


def _hardware_line(hw: dict[str, Any]) -> str:
    gpu = hw.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gb']} GB, CUDA {gpu['cuda']})" if gpu else "none"
    return (
        f"hardware: CPU {hw.get('cpu')} ({hw.get('cpu_count')} cores, "
        f"{hw.get('torch_threads')} torch threads, load {hw.get('load_average_1m')}); "
        f"GPU {gpu_text}; torch {hw.get('torch')}"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _format_train(r: dict[str, Any]) -> list[str]:
    mo, e2e = r["model_only"], r["end_to_end"]
    return [
        f"train: {r['backbone']} at {r['image_size']} px, batch {r['batch_size']}, "
        f"{r['steps']} timed steps after {r['warmup']} warm-up, on {r['device']} "
        f"({r['device_name']})",
        f"amp {r['amp_dtype'] or 'off (fp32)'}, channels_last {r['channels_last']}, "
        f"compile {r['compile']}; {r['weights']}",
        "",
        *_table(
            ["measure", "images/s", "ms/step"],
            [
                [
                    "model only (fwd+bwd+AdamW, batch on device)",
                    f"{mo['images_per_s']:.1f}",
                    f"{mo['ms_per_step']:.1f}",
                ],
                [
                    "end to end (train_one_epoch: gather, augment, step)",
                    f"{e2e['images_per_s']:.1f}",
                    f"{e2e['ms_per_step']:.1f}",
                ],
                ["ratio end-to-end / model-only", f"{r['ratio']:.3f}", ""],
            ],
        ),
    ] + ([f"peak GPU memory {r['peak_gpu_memory_gb']:.2f} GB"] if "peak_gpu_memory_gb" in r else [])


def _format_loader(r: dict[str, Any]) -> list[str]:
    def row(name: str, d: dict[str, float]) -> list[str]:
        return [
            name,
            f"{d['images_per_s']:.1f}",
            f"{d['ms_per_batch']:.1f}",
            f"{d['read_ms_per_batch']:.1f}",
            f"{d['augment_ms_per_batch']:.1f}",
        ]

    w, h = r["source_image_size"]
    build = (
        "reused an existing cache"
        if r["cache_reused"]
        else f"{r['cache_build_images_per_s']:.0f} images/s"
    )
    return [
        f"loader: {r['n_images']} images from {r['source']} ({w}x{h}) -> {r['image_size']} px, "
        f"batch {r['batch_size']}, {r['batches']} timed batches, augmentation on CPU, "
        f"{r['decode_workers']} decode thread(s), {r['torch_threads']} torch thread(s)",
        "",
        *_table(
            ["pipeline", "images/s", "ms/batch", "read ms/batch", "augment ms/batch"],
            [
                row("cache (uint8 memmap rows -> gather -> prepare)", r["cache"]),
                row("decode (PIL + prepare_image per image -> prepare)", r["decode"]),
                ["ratio cache / decode", f"{r['ratio']:.2f}", "", _ratio(r.get("read_ratio")), ""],
            ],
        ),
        f"cache build (not in the ratio): {r['cache_build_s']:.1f} s, {build}",
    ]


def _ratio(value: float | None) -> str:
    return f"{value:.1f}x" if value is not None else ""


def _format_predict(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            str(x["batch_size"]),
            f"{x['median_ms']:.2f}",
            f"{x['p95_ms']:.2f}",
            f"{x['images_per_s']:.1f}",
        ]
        for x in r["results"]
    ]
    return [
        f"predict: {r['backbone']} at {r['image_size']} px on {r['device']} ({r['device_name']}), "
        f"amp {r['amp_dtype'] or 'off (fp32)'}, {r['steps']} timed calls per batch size; "
        f"{r['weights']}",
        "",
        *_table(["batch", "median ms", "p95 ms", "images/s"], rows),
    ]


def _format_familiarity(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            x["set"],
            str(x["n"]),
            f"{x['unfamiliar'] * 100:.1f}",
            f"{x['referred'] * 100:.1f}",
            "" if x["auroc_vs_heldout"] is None else f"{x['auroc_vs_heldout']:.3f}",
        ]
        for x in r["sets"]
    ]
    missed = ", ".join(r["not_unfamiliar"]) or "none"
    return [
        f"familiarity: {r['model']}",
        "",
        *_table(["set", "images", "unfamiliar %", "referred %", "AUROC vs held out"], rows),
        f"not dermoscopy yet not unfamiliar: {missed}; not referred at all: "
        f"{', '.join(r['not_referred']) or 'none'}",
    ]


_FORMATTERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "train": _format_train,
    "loader": _format_loader,
    "predict": _format_predict,
    "familiarity": _format_familiarity,
}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table (with a heading line and the hardware) of a benchmark's result."""
    kind = result.get("benchmark")
    if kind not in _FORMATTERS:
        raise ValueError(f"unknown benchmark result '{kind}'; known: {sorted(_FORMATTERS)}")
    return "\n".join([*_FORMATTERS[kind](result), _hardware_line(result["hardware"])])


# --- command line --------------------------------------------------------------------------------


def _size_pair(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT, e.g. 600x450")
    return int(w), int(h)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark that parsed ``benchmark`` arguments ask for."""
    if args.kind == "train":
        return bench_train(
            args.backbone,
            args.image_size,
            args.batch_size or 32,
            steps=args.steps or 20,
            warmup=5 if args.warmup is None else args.warmup,
            device=args.device,
            amp=not args.no_amp,
            channels_last=not args.no_channels_last,
            compile=args.compile,
            images=args.images,
            seed=args.seed,
        )
    if args.kind == "loader":
        return bench_loader(
            args.data,
            args.image_size,
            batch_size=args.batch_size or 64,
            batches=args.steps or 20,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            seed=args.seed,
            synthetic_size=args.synthetic_size,
            synthetic_images=args.synthetic_images,
            max_images=args.max_images,
            decode_workers=args.decode_workers,
        )
    if args.kind == "familiarity":
        from skinlesion.benchmark.familiarity import bench_familiarity

        return bench_familiarity(
            args.model,
            args.data or "../shared/data/ham10000",
            isic=args.isic,
            folds_file=args.folds,
            max_heldout=args.max_images,
            batch_size=args.batch_size or 32,
            device=args.device,
            hardware=hardware_info(),
        )
    if args.model:
        from skinlesion.benchmark.model_predict import bench_model_predict

        return bench_model_predict(
            args.model,
            batch_sizes=(1, args.batch_size or 32),
            steps=args.steps or 10,
            warmup=2 if args.warmup is None else args.warmup,
            device=args.device,
            tta=args.tta,
            seed=args.seed,
            hardware=hardware_info(),
        )
    return bench_predict(
        args.backbone,
        args.image_size,
        batch_sizes=(1, args.batch_size or 32),
        steps=args.steps or 20,
        warmup=3 if args.warmup is None else args.warmup,
        device=args.device,
        amp=not args.no_amp,
        channels_last=not args.no_channels_last,
        seed=args.seed,
    )


def benchmark_command(args: argparse.Namespace) -> int:
    """Handler of ``skinlesion benchmark``: print the table, write the JSON if asked."""
    from skinlesion.core.runtime import torch_threads

    with torch_threads(args.threads):
        result = run_benchmark(args)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``benchmark {train,loader,predict}`` on a sub-command set (the CLI's)."""
    b = sub.add_parser(
        "benchmark",
        help="throughput: training (model-only vs end to end), data loading, prediction; "
        "familiarity: refer rates of the check 'unlike the training images'",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    b.add_argument("kind", choices=("train", "loader", "predict", "familiarity"))
    b.add_argument("--backbone", default="efficientnet_b3", help="timm model name")
    b.add_argument("--image-size", type=int, default=300)
    b.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="train: default 32; loader: default 64; predict: the batched size (default 32), "
        "timed beside batch 1",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (train), batches (loader) or calls per batch size (predict); default 20",
    )
    b.add_argument("--warmup", type=int, default=None, help="untimed steps first (5 / 3)")
    b.add_argument("--device", default="auto")
    b.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    b.add_argument("--no-channels-last", action="store_true")
    b.add_argument("--compile", action="store_true", help="torch.compile the model (train)")
    b.add_argument("--images", type=int, default=2048, help="train: images in the uint8 source")
    b.add_argument(
        "--data",
        default=None,
        help="loader: HAM10000 folder (default: synthetic); familiarity: HAM10000 folder "
        "(default ../shared/data/ham10000)",
    )
    b.add_argument("--cache-dir", default=None, help="loader: cache folder (default: temporary)")
    b.add_argument(
        "--max-images",
        type=int,
        default=2000,
        help="loader: first N images by id; familiarity: at most N held-out images",
    )
    b.add_argument(
        "--synthetic-size",
        type=_size_pair,
        default=(600, 450),
        metavar="WxH",
        help="loader without --data: JPEG size (default 600x450, the official release's)",
    )
    b.add_argument("--synthetic-images", type=int, default=500, help="loader without --data")
    b.add_argument("--decode-workers", type=int, default=None, help="loader: decoding threads")
    b.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    b.add_argument(
        "--model",
        default=None,
        help="predict: time a trained model end to end (members, temperatures, its TTA): "
        "'default', a packaged name, a run folder or a checkpoint; --backbone is then ignored; "
        "familiarity: the model whose refer check is measured",
    )
    b.add_argument(
        "--tta", type=int, default=None, help="predict --model: views (default: its own)"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _add_familiarity_options(b)
    b.set_defaults(func=benchmark_command)


def _add_familiarity_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--isic", default=None, help="familiarity: ISIC 2017 folder (labels.csv, images/)"
    )
    b.add_argument(
        "--folds",
        default=None,
        help="familiarity: the model's folds.csv (default: made as `skinlesion split` does)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m skinlesion.benchmark.runner {train,loader,predict} ...`` without the main CLI."""
    p = argparse.ArgumentParser(prog="python -m skinlesion.benchmark.runner")
    sub = p.add_subparsers(dest="command", required=True)
    add_benchmark_parser(sub)
    args = p.parse_args(["benchmark", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
