"""Self-describing checkpoints of plain types, written atomically.

A checkpoint holds everything needed to rebuild and use a model without the run that made it:
format version, backbone, class names, preprocessing spec, fold, epoch, metrics, temperature and
the resolved config. It loads with ``torch.load(..., weights_only=True)``: nothing pickled runs
code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from skinlesion.core.errors import CheckpointError, torch_load_problem
from skinlesion.core.runtime import Runtime
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.tabular import MetadataSpec

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
_KEYS_NAMED = 3  # keys a mismatch names of each kind


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
    ckpt = {
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "backbone": backbone,
        "num_classes": len(spec.class_names),
        "class_names": list(spec.class_names),
        "preprocessing": spec.to_dict(),
        "fold": int(fold),
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "temperature": float(temperature),
        "model_kwargs": dict(model_kwargs or {}),
        "config": config,
    }
    if metadata is not None:
        meta_branch = getattr(module, "meta", None)
        hidden = meta_branch[0].out_features if isinstance(meta_branch, torch.nn.Sequential) else 0
        ckpt["metadata"] = {"spec": metadata.to_dict(), "hidden": int(hidden)}
    if extra:
        ckpt.update(extra)
    return ckpt


def checkpoint_metadata(ckpt: dict[str, Any]) -> MetadataSpec | None:
    """The metadata encoding a checkpoint's model takes; ``None`` for an image-only model."""
    meta = ckpt.get("metadata")
    return MetadataSpec.from_dict(meta["spec"]) if meta else None


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


def state_mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """How a state dict ``given`` does not fit a network whose own is ``own``, in one line naming
    the first few keys of each kind (missing, unexpected, another shape); empty when it fits."""

    def first(keys: list[str]) -> str:
        more = f" and {len(keys) - _KEYS_NAMED} more" if len(keys) > _KEYS_NAMED else ""
        return ", ".join(keys[:_KEYS_NAMED]) + more

    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [
        f"{k} {list(given[k].shape)} for {list(own[k].shape)}"
        for k in own
        if k in given and tuple(given[k].shape) != tuple(own[k].shape)
    ]
    parts = [
        f"{what} {first(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    return "; ".join(parts)


def model_from_state(
    state: Mapping[str, torch.Tensor],
    backbone: str,
    num_classes: int,
    source: str | Path,
    runtime: Runtime | None = None,
    metadata: MetadataSpec | None = None,
    metadata_hidden: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The network ``backbone`` (fused with ``metadata`` when given) with ``state`` loaded
    strictly, in eval mode, placed on the runtime's device (the CPU without one): the one builder
    of every saved model (checkpoints, run folders, packaged models).

    A state dict that does not fit (missing or unexpected keys, another shape) is a
    :class:`CheckpointError` in one line naming ``source`` and the first keys that differ.
    """
    from skinlesion.models.factory import build_model, place_model

    model = build_model(
        backbone,
        num_classes,
        False,
        metadata=metadata,
        metadata_hidden=metadata_hidden,
        **dict(model_kwargs or {}),
    )
    why = state_mismatch(model.state_dict(), state)
    try:
        if not why:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # what the key and shape checks above do not foresee
        why = str(err).strip().splitlines()[0]
    if why:
        raise CheckpointError(f"{source}: weights do not fit {backbone} ({why})")
    return place_model(
        model.eval(), runtime or Runtime(torch.device("cpu"), None, channels_last=False)
    )


def model_from_checkpoint(
    ckpt: dict[str, Any], runtime: Runtime | None = None, source: str | Path = "checkpoint"
) -> tuple[torch.nn.Module, PreprocessSpec]:
    """Rebuild the model (eval mode, placed on the runtime's device; CPU without one) and its
    preprocessing spec from a loaded checkpoint; ``source`` (its file) names it in an error."""
    meta = ckpt.get("metadata")
    model = model_from_state(
        ckpt["state_dict"],
        ckpt["backbone"],
        ckpt["num_classes"],
        source,
        runtime,
        metadata=checkpoint_metadata(ckpt),
        metadata_hidden=int(meta["hidden"]) if meta else 0,
        model_kwargs=ckpt.get("model_kwargs", {}),
    )
    return model, PreprocessSpec.from_dict(ckpt["preprocessing"])
