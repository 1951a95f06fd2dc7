"""``skinlesion benchmark KIND``: throughput of training (model only vs end to end), data loading
and prediction; onnxruntime against PyTorch; a load test of ``serve``; the familiarity check's
refer rates. Each kind calls one function of :mod:`skinlesion.benchmark`, prints its result as a
table and writes it as JSON if asked."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where the familiarity, onnx and serve benchmarks look for HAM10000 by default (the shared
# data folder beside a checkout); onnx and serve fall back to synthetic images without it.
DEFAULT_HAM10000 = "../shared/data/ham10000"


def _size_pair(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT, e.g. 600x450")
    return int(w), int(h)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.train import bench_train

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
        images=args.images or 2048,
        seed=args.seed,
    )


def _loader(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.loader import bench_loader

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


def _familiarity(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.familiarity import bench_familiarity
    from skinlesion.benchmark.workload import hardware_info

    return bench_familiarity(
        args.model,
        args.data or DEFAULT_HAM10000,
        isic=args.isic,
        folds_file=args.folds,
        max_heldout=args.max_images,
        batch_size=args.batch_size or 32,
        device=args.device,
        hardware=hardware_info(),
    )


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.workload import hardware_info

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
    from skinlesion.benchmark.predict import bench_predict

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


def _onnx(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.serving import bench_onnx

    return bench_onnx(
        args.model,
        args.data or DEFAULT_HAM10000,
        batch_sizes=(1, args.batch_size or 32),
        threads=args.threads or 2,
        seconds=args.seconds,
    )


def _predict_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.predict_e2e import bench_predict_e2e

    return bench_predict_e2e(
        None if args.model in (None, "default") else args.model,
        args.data or DEFAULT_HAM10000,
        n_images=args.images or 300,
        size=args.synthetic_size,
        batch_size=args.batch_size or 32,
    )


def _serve(args: argparse.Namespace) -> dict[str, Any]:
    from skinlesion.benchmark.serving import bench_serve

    return bench_serve(
        args.model,
        args.data or DEFAULT_HAM10000,
        clients=args.clients,
        duration_s=args.duration,
        max_requests=args.max_requests,
        images=args.images or 16,
    )


KINDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "train": _train,
    "loader": _loader,
    "predict": _predict,
    "familiarity": _familiarity,
    "onnx": _onnx,
    "predict-e2e": _predict_e2e,
    "serve": _serve,
}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark that parsed ``benchmark`` arguments ask for."""
    return KINDS[args.kind](args)


def benchmark_command(args: argparse.Namespace) -> int:
    """Handler of ``skinlesion benchmark``: print the table, write the JSON if asked; 1 when a
    load test saw failed requests."""
    from skinlesion.benchmark.tables import format_table
    from skinlesion.core.runtime import torch_threads

    with torch_threads(args.threads):
        result = run_benchmark(args)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if result.get("errors") else 0


def add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``benchmark KIND`` on a sub-command set (the CLI's)."""
    b = sub.add_parser(
        "benchmark",
        help="throughput: training (model-only vs end to end), data loading, prediction, "
        "onnxruntime vs PyTorch, a load test of `serve`; familiarity: refer rates of the check "
        "'unlike the training images'",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    b.add_argument("kind", choices=tuple(KINDS))
    b.add_argument("--backbone", default="efficientnet_b3", help="timm model name")
    b.add_argument("--image-size", type=int, default=300)
    b.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="train: default 32; loader: default 64; predict, onnx: the batched size (default "
        "32), timed beside batch 1",
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
    b.add_argument(
        "--images",
        type=int,
        default=None,
        help="train: images in the uint8 source (default 2048); serve: distinct images sent "
        "(default 16); predict-e2e: JPEGs predicted (default 300)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own; onnx: 2, for both backends)",
    )
    b.add_argument(
        "--model",
        default=None,
        help="predict: time a trained model end to end (members, temperatures, its TTA): "
        "'default', a packaged name, a run folder or a checkpoint; --backbone is then ignored; "
        "familiarity, onnx, serve: the model measured (as for `skinlesion predict --model`)",
    )
    b.add_argument(
        "--tta", type=int, default=None, help="predict --model: views (default: its own)"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _add_data_options(b)
    _add_familiarity_options(b)
    _add_serving_options(b)
    b.set_defaults(func=benchmark_command)


def _add_data_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--data",
        default=None,
        help="loader: HAM10000 folder (default: synthetic); familiarity, onnx, serve: HAM10000 "
        f"folder (default {DEFAULT_HAM10000}; onnx and serve: synthetic images without it)",
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
        help="loader without --data, predict-e2e: JPEG size (default 600x450, the official "
        "release's)",
    )
    b.add_argument("--synthetic-images", type=int, default=500, help="loader without --data")
    b.add_argument("--decode-workers", type=int, default=None, help="loader: decoding threads")


def _add_familiarity_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--isic", default=None, help="familiarity: ISIC 2017 folder (labels.csv, images/)"
    )
    b.add_argument(
        "--folds",
        default=None,
        help="familiarity: the model's folds.csv (default: made as `skinlesion split` does)",
    )


def _add_serving_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--seconds", type=float, default=5.0, help="onnx: per batch size and backend (default 5)"
    )
    b.add_argument("--clients", type=int, default=50, help="serve: concurrent clients")
    b.add_argument("--duration", type=float, default=60.0, help="serve: seconds at most")
    b.add_argument("--max-requests", type=int, default=20_000, help="serve: requests at most")
