"""A benchmark's result (a dict of plain values) as a small Markdown table, with the hardware.

>>> print(format_table(bench_train("tf_efficientnet_lite0", 64, 8, steps=2)))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


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
                    "end to end (train_batches: gather, augment, step)",
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


def _format_onnx(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            str(x["batch_size"]),
            f"{x['torch_images_per_s']:.1f}",
            f"{x['onnxruntime_images_per_s']:.1f}",
            f"{x['ratio']:.2f}",
            str(x["calls"]),
        ]
        for x in r["rows"]
    ]
    return [
        f"onnx: {r['model']} ({r['members']} member(s), {r['tta']} view(s), {r['input_size']} px) "
        f"on {r['threads']} thread(s), {r['images']} images",
        "",
        *_table(["batch", "torch images/s", "onnxruntime images/s", "ratio", "calls"], rows),
    ]


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def _format_serve(r: dict[str, Any]) -> list[str]:
    lat, rss = r["latency_ms"], r["server_rss_mb"]
    row = [
        str(r["clients"]),
        str(r["requests"]),
        f"{r['requests_per_s']}",
        f"{lat['p50']}",
        f"{lat['p99']}",
        str(r["errors"]),
    ]
    return [
        f"serve: {r['clients']} clients for {r['duration_s']} s",
        "",
        *_table(["clients", "requests", "requests/s", "p50 ms", "p99 ms", "errors"], [row]),
        f"server RSS {_mib(rss['start'])} at start, {_mib(rss['end'])} at the end; errors: "
        f"{'; '.join(r['error_examples']) or 'none'}",
    ]


def _format_predict_e2e(r: dict[str, Any]) -> list[str]:
    rows = []
    for x in r["results"]:
        if "skipped" in x:
            rows.append([x["backend"], "-", "-", "-", "-", "-", "-", f"skipped: {x['skipped']}"])
            continue
        diff = x.get("max_abs_diff_vs_torch")
        rows.append(
            [
                x["backend"],
                str(x["decode_threads"]),
                f"{x['load_s']:.2f}",
                f"{x['total_s']:.2f}",
                f"{x['images_per_s']:.1f}",
                f"{x.get('speedup_vs_torch', float('nan')):.2f}x",
                "-" if diff is None else f"{diff:.1e}",
                "",
            ]
        )
    head = (
        f"predict end to end: {r['model']}, {r['n_images']} JPEGs of {r['image_size']} "
        f"({r['images']}), batch {r['batch_size']}, model load and decoding included"
    )
    cols = ["backend", "decode threads", "load s", "total s", "images/s", "vs torch"]
    cols += ["max |p - p_torch|", "note"]
    return [head, "", *_table(cols, rows), ""]


_FORMATTERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "train": _format_train,
    "loader": _format_loader,
    "predict": _format_predict,
    "familiarity": _format_familiarity,
    "onnx": _format_onnx,
    "predict-e2e": _format_predict_e2e,
    "serve": _format_serve,
}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table (with a heading line and the hardware) of a benchmark's result."""
    kind = result.get("benchmark")
    if kind not in _FORMATTERS:
        raise ValueError(f"unknown benchmark result '{kind}'; known: {sorted(_FORMATTERS)}")
    return "\n".join([*_FORMATTERS[kind](result), _hardware_line(result["hardware"])])
