"""Self-describing checkpoints of plain types, written atomically.

A checkpoint holds everything needed to rebuild and use a model without the run that made it:
format version, backbone, class names, preprocessing spec, fold, epoch, metrics, temperature and
the resolved config. It loads with ``torch.load(..., weights_only=True)``: nothing pickled runs
code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from skinlesion.core.errors import CheckpointError, torch_load_problem
from skinlesion.core.runtime import Runtime
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.tabular import MetadataSpec
from skinlesion.models.description import ModelDescription

FORMAT_VERSION = 1
FINAL_FOLD = -1
"""The ``fold`` of a model trained on every image (``fit-final``): no images were held out."""
REQUIRED_KEYS = (
    "format_version",
    "state_dict",
    "backbone",
    "num_classes",
    "class_names",
    "preprocessing",
    "fold",
    "epoch",
)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed save (disk full, interrupt) must not leave a half-written temp file behind.
        tmp.unlink(missing_ok=True)
        raise


def make_checkpoint(
    model: torch.nn.Module,
    *,
    backbone: str,
    spec: PreprocessSpec,
    fold: int,
    epoch: int,
    metrics: dict[str, float],
    config: dict[str, Any],
    temperature: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    metadata: MetadataSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint of plain types; ``config`` is the resolved run config as plain data.

    A model fused with patient metadata also stores its encoding and branch width under
    ``metadata`` (checkpoints without the key are image-only models, as before).
    """
    module = getattr(model, "module", model)  # unwrap DDP / compile
    module = getattr(module, "_orig_mod", module)
    state = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
        for k, v in module.state_dict().items()
    }
    meta_branch = getattr(module, "meta", None)
    hidden = meta_branch[0].out_features if isinstance(meta_branch, torch.nn.Sequential) else 0
    description = ModelDescription(backbone, spec, dict(model_kwargs or {}), metadata, hidden)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        **description.to_dict(),
        "fold": int(fold),
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "temperature": float(temperature),
        "config": config,
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def checkpoint_metadata(ckpt: dict[str, Any]) -> MetadataSpec | None:
    """The metadata encoding a checkpoint's model takes; ``None`` for an image-only model."""
    return ModelDescription.from_dict(ckpt, "checkpoint").metadata


def load_plain(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file it refuses or cannot read (a
    pickle that would run code, a truncated file) is a :class:`CheckpointError` in one sentence
    naming it."""
    try:
        with warnings.catch_warnings():
            # Raised for plain pickles, which are refused anyway (or are tensors only).
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
        raise CheckpointError(f"{path}: {torch_load_problem(err, what)}") from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = load_plain(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a skinlesion checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a skinlesion checkpoint (missing {missing})")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {ckpt['format_version']} is newer than this "
            f"skinlesion understands ({FORMAT_VERSION}); upgrade skinlesion"
        )
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any], runtime: Runtime | None = None, where: str | Path = "checkpoint"
) -> tuple[torch.nn.Module, PreprocessSpec]:
    """Rebuild the model (eval mode, placed on the runtime's device; CPU without one) and its
    preprocessing spec from a loaded checkpoint; ``where`` (its file) names it in an error."""
    description = ModelDescription.from_dict(ckpt, where)
    return description.build(ckpt["state_dict"], where, runtime), description.spec
