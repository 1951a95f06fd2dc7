"""Which engine runs a model's forward pass: eager PyTorch, or its exported ONNX graph on
onnxruntime (fp32, or int8 from ``skinlesion export --int8``).

``auto`` (the default of ``predict``, ``evaluate``, ``serve`` and ``resolve_model``) is
``onnx`` on a CPU device and ``torch`` on CUDA; a ``predict`` of fewer than
:data:`EXPORT_PAYS_OFF` images runs on PyTorch until the graph is cached, so that a first
prediction takes seconds. The graph is exported once per model into the
user cache (``$SKINLESION_CACHE/onnx/KEY``), keyed by the SHA-256 of the weights files (with the
familiarity and ``model.json`` beside them), the TTA views, the opset and the versions of
skinlesion and torch (the exporter); int8 graphs have their own key, which names how they are
quantized. An entry is written in a temporary folder of the cache and renamed into place with a
completion record holding the graph's SHA-256; an entry without one, or whose graph does not
match it, is rebuilt, never used. Two processes exporting at once both succeed: the loser uses
the winner's folder.

What a graph cannot express runs on PyTorch: a model fused with patient metadata given
metadata values, a TTA other than the graph's, Grad-CAM. Under ``auto`` that falls back with
one log line; a forced ``onnx`` / ``onnx-int8`` refuses it with a :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from skinlesion.core import VERSION
from skinlesion.core.errors import ConfigError
from skinlesion.core.paths import user_cache_dir
from skinlesion.core.runtime import Runtime
from skinlesion.inference.familiarity import FAMILIARITY_FILE
from skinlesion.inference.onnx_export import OPSET, Exportable, export_onnx
from skinlesion.inference.onnx_model import ONNX_FILE, SPEC_FILE, OnnxModel
from skinlesion.inference.packaged_meta import MODEL_FILE, sha256_file
from skinlesion.inference.predict import Member
from skinlesion.inference.quantize import QUANTIZATION_ID, calibration_id, quantize_export

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
COMPLETE_FILE = "complete.json"
CACHE_VERSION = 1
EXPORT_PAYS_OFF = 100
"""Images from which ``auto`` exports a graph that is not cached yet (export: 10-30 s once; the
graph then saves about 0.1 s an image on 2 CPU cores); fewer run on PyTorch."""
# Files beside a member's weights that change what the graph computes.
_BESIDE = (FAMILIARITY_FILE, MODEL_FILE)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, runtime: Runtime) -> str:
    """``torch``, ``onnx`` or ``onnx-int8`` for the requested backend on ``runtime``'s device."""
    check_backend(backend)
    cpu = runtime.device.type == "cpu"
    if backend == "auto":
        return "onnx" if cpu else "torch"
    if backend != "torch" and not cpu:
        raise ConfigError(
            f"--backend {backend} runs on the CPU; with --device {runtime.device.type} use "
            "--backend torch (or auto)"
        )
    return backend


def onnx_cache_dir() -> Path:
    return user_cache_dir() / "onnx"


def graph_key(members: Sequence[Member], tta: int, int8: bool) -> str | None:
    """The cache key of a model's graph, or ``None`` when a member has no weights file (a model
    built in memory), which is then not cached."""
    files: list[Path] = []
    for m in members:
        if not Path(m.path).is_file():
            return None
        for f in (Path(m.path), *(Path(m.path).parent / b for b in _BESIDE)):
            if f.is_file() and f not in files:
                files.append(f)
    h = hashlib.sha256()
    parts = [CACHE_VERSION, VERSION, torch.__version__, OPSET, tta, int(int8)]
    if int8:
        parts.append(QUANTIZATION_ID)
    h.update(json.dumps(parts).encode())
    for m in members:
        h.update(json.dumps([m.fold, m.temperature, m.spec.to_dict()], default=str).encode())
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()[:40]


def entry_is_complete(folder: Path) -> bool:
    """Whether a cache entry has its completion record and a graph of the recorded SHA-256."""
    try:
        record = json.loads((folder / COMPLETE_FILE).read_text())
        return (folder / SPEC_FILE).is_file() and sha256_file(folder / ONNX_FILE) == record[
            "onnx_sha256"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(tmp: Path, final: Path, replace: bool) -> Path:
    """Rename the finished ``tmp`` into ``final``; a complete ``final`` written meanwhile by
    another process wins (unless ``replace``), an incomplete one is moved aside first."""
    record = {"onnx_sha256": sha256_file(tmp / ONNX_FILE)}
    (tmp / COMPLETE_FILE).write_text(json.dumps(record))
    for _ in range(3):
        if final.exists() and (replace or not entry_is_complete(final)):
            _discard(final)
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if not replace and entry_is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
    raise ConfigError(f"{final}: cannot write the ONNX cache entry (concurrent writers)")


def _discard(folder: Path) -> None:
    """Move a folder aside atomically (so no reader sees it half-deleted), then delete it."""
    aside = folder.with_name(f".stale-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # another process moved or replaced it already
    shutil.rmtree(aside, ignore_errors=True)


def cached_graph(
    model: Exportable,
    tta: int | None = None,
    calibration: Sequence[Path] | None = None,
    root: Path | None = None,
) -> Path:
    """The cache folder of ``model``'s fp32 graph (``calibration=None``) or int8 graph
    calibrated on ``calibration``, exported on first use.

    An int8 entry is built only when calibration images are given (then one calibrated on
    other images is replaced); without them, the cached int8 entry is used as it is.
    """
    int8 = calibration is not None
    tta = model.tta if tta is None else tta
    key = graph_key(model.members, tta, int8)
    if key is None:
        raise ConfigError(f"{model.name}: built in memory, no weights file to key its graph by")
    root = root or onnx_cache_dir()
    final = root / (f"{key}-int8" if int8 else key)
    wanted = calibration_id(calibration) if calibration is not None else None
    if entry_is_complete(final) and (wanted is None or _calibration_of(final) == wanted):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        if calibration is None:
            log.info("exporting %s to the ONNX cache %s (once)", model.name, final)
            export_onnx(model, tmp, tta=tta)
        else:
            fp32 = cached_graph(model, tta, None, root)
            log.info("quantizing %s to int8 on %d image(s)", model.name, len(calibration))
            quantize_export(fp32, tmp, calibration)
        return _publish(tmp, final, replace=wanted is not None and final.exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _calibration_of(folder: Path) -> str | None:
    meta = json.loads((folder / SPEC_FILE).read_text())
    return (meta.get("quantization") or {}).get("calibration_id")


def int8_graph(model: Exportable, tta: int | None = None, root: Path | None = None) -> Path:
    """The cached int8 graph of ``model``; a :class:`ConfigError` saying how to make it when
    there is none."""
    tta = model.tta if tta is None else tta
    key = graph_key(model.members, tta, True)
    folder = (root or onnx_cache_dir()) / f"{key}-int8"
    if key is None or not entry_is_complete(folder):
        raise ConfigError(
            f"--backend onnx-int8: no int8 graph of {model.name} (TTA {tta}) in the cache; make "
            "it with `skinlesion export --int8 --calibration-images DIR` for this model"
        )
    return folder


def attach_backend(
    model: Any, backend: str, tta: int | None = None, images: int | None = None
) -> None:
    """Give a ``LoadedModel`` the graph its backend runs (``model.graph``), or none for torch.
    ``images``: how many images the caller will predict, when it knows; under ``auto`` fewer
    than :data:`EXPORT_PAYS_OFF` run on PyTorch unless the graph is cached already."""
    runtime = model.runtime
    chosen = resolve_backend(backend, runtime)
    model.backend, model.backend_forced, model.graph = chosen, backend != "auto", None
    if chosen == "torch":
        return
    key = graph_key(model.members, model.tta if tta is None else tta, False)
    if key is None:
        if backend != "auto":
            raise ConfigError(f"--backend {backend}: {model.name} has no weights file to export")
        log.info("%s: built in memory, so it runs on PyTorch", model.name)
        model.backend = "torch"
        return
    few = images is not None and images < EXPORT_PAYS_OFF
    if backend == "auto" and few and not entry_is_complete(onnx_cache_dir() / key):
        log.info(
            "%s: %d image(s) on PyTorch; its ONNX graph is exported once from %d images on "
            "(or by --backend onnx), then used for every call",
            model.name,
            images,
            EXPORT_PAYS_OFF,
        )
        model.backend = "torch"
        return
    folder = int8_graph(model, tta) if chosen == "onnx-int8" else cached_graph(model, tta)
    model.graph = OnnxModel(folder)


def usable_graph(model: Any, tta: int, metadata: Any) -> OnnxModel | None:
    """``model.graph`` when it can compute this call (its TTA, no metadata values for a fused
    model); else ``None`` (PyTorch), logged once per model, or a :class:`ConfigError` when the
    backend was forced."""
    graph = model.graph
    if graph is None:
        return None
    why = None
    if tta != graph.tta:
        why = f"TTA {tta} differs from the graph's {graph.tta}"
    elif model.uses_metadata and metadata is not None and bool(metadata.notna().any().any()):
        why = "patient metadata was given, which the graph cannot take"
    if why is None:
        return graph
    if model.backend_forced:
        raise ConfigError(f"--backend {model.backend}: {why}; use --backend torch or auto")
    if why not in model.fallbacks_logged:
        model.fallbacks_logged.add(why)
        log.info("%s: running on PyTorch, not ONNX: %s", model.name, why)
    return None
