"""The one description of a saved model, and the one builder of its network.

What builds a network and feeds it, in the spirit of timm's ``PretrainedCfg``: the backbone, its
timm keyword arguments, the preprocessing spec (input size, normalisation, colour constancy,
detail, class names) and, for a model fused with patient metadata, the metadata encoding and the
branch width. A checkpoint, a packaged model's ``model.json`` (members share the first keys; a
fused member carries its own ``metadata``) and an ONNX export's ``spec.json`` (the input and
output keys of :func:`io_dict`) are written from it by :meth:`ModelDescription.to_dict` and read
back by :meth:`ModelDescription.from_dict`, which names the file and the key of any fault.
:func:`model_from_state` builds every saved model and wraps every misfit as a
:class:`CheckpointError`.

Example::

    desc = ModelDescription.from_dict(ckpt, where=path)
    model = desc.build(ckpt["state_dict"], where=path)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from skinlesion.core.errors import CheckpointError
from skinlesion.core.runtime import Runtime
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.tabular import MetadataSpec

_KEYS_NAMED = 3  # keys a state-dict mismatch names of each kind


def io_dict(spec: PreprocessSpec) -> dict[str, Any]:
    """The keys that say how a model is fed and what it answers: ``preprocessing``,
    ``num_classes`` and ``class_names`` (all an exported graph needs beside itself)."""
    names = list(spec.class_names)
    return {"preprocessing": spec.to_dict(), "num_classes": len(names), "class_names": names}


def spec_from_dict(d: Mapping[str, Any], where: str | Path) -> PreprocessSpec:
    """The preprocessing spec of :func:`io_dict`'s keys, checked against the class names given
    beside it; a fault is a :class:`CheckpointError` naming ``where`` and the key."""
    try:
        spec = PreprocessSpec.from_dict(d["preprocessing"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: preprocessing is not a mapping with size, mean and std ({err!r})"
        ) from err
    names = d.get("class_names", list(spec.class_names))
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where}: class_names is {names!r}, expected a list of names")
    if "class_names" not in d["preprocessing"]:  # a spec written before it held the names
        spec = replace(spec, class_names=tuple(names))
    if tuple(names) != spec.class_names:
        raise CheckpointError(
            f"{where}: class_names {names} differ from the preprocessing's {list(spec.class_names)}"
        )
    n = d.get("num_classes", len(names))
    if n != len(names):
        raise CheckpointError(f"{where}: num_classes is {n!r} for {len(names)} class names")
    return spec


@dataclass(frozen=True)
class ModelDescription:
    """A saved model's network and input, as plain data (see the module docstring)."""

    backbone: str
    spec: PreprocessSpec
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    metadata: MetadataSpec | None = None
    metadata_hidden: int = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def shared_dict(self) -> dict[str, Any]:
        """The keys every member of a packaged model shares (all but the metadata branch)."""
        return {
            "backbone": self.backbone,
            **io_dict(self.spec),
            "model_kwargs": dict(self.model_kwargs),
        }

    def metadata_dict(self) -> dict[str, Any]:
        """``{"metadata": {"spec", "hidden"}}`` for a fused model, else ``{}``."""
        if self.metadata is None:
            return {}
        return {"metadata": {"spec": self.metadata.to_dict(), "hidden": int(self.metadata_hidden)}}

    def to_dict(self) -> dict[str, Any]:
        """Every key of the description, as plain JSON-able data."""
        return {**self.shared_dict(), **self.metadata_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | Path) -> ModelDescription:
        """The description in ``d`` (a checkpoint, or ``model.json`` merged with a member), each
        key checked; a fault is a :class:`CheckpointError` naming ``where`` and the key."""
        backbone = d.get("backbone")
        if not isinstance(backbone, str) or not backbone:
            raise CheckpointError(f"{where}: backbone is {backbone!r}, expected a name")
        kwargs = d.get("model_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise CheckpointError(f"{where}: model_kwargs is {kwargs!r}, expected a mapping")
        fused = d.get("metadata")
        try:
            metadata = MetadataSpec.from_dict(fused["spec"]) if fused else None
            hidden = int(fused["hidden"]) if fused else 0
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{where}: metadata is not a mapping with spec and hidden ({err!r})"
            ) from err
        return cls(backbone, spec_from_dict(d, where), dict(kwargs), metadata, hidden)

    def build(
        self,
        state: Mapping[str, torch.Tensor],
        where: str | Path,
        runtime: Runtime | None = None,
    ) -> torch.nn.Module:
        """The network with ``state`` loaded strictly (:func:`model_from_state`)."""
        return model_from_state(
            state,
            self.backbone,
            len(self.class_names),
            where,
            runtime,
            metadata=self.metadata,
            metadata_hidden=self.metadata_hidden,
            model_kwargs=self.model_kwargs,
        )


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
    where: str | Path,
    runtime: Runtime | None = None,
    metadata: MetadataSpec | None = None,
    metadata_hidden: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The network ``backbone`` (fused with ``metadata`` when given) with ``state`` loaded
    strictly, in eval mode, placed on the runtime's device (the CPU without one): the one builder
    of every saved model (checkpoints, run folders, packaged models).

    A state dict that does not fit (missing or unexpected keys, another shape) is a
    :class:`CheckpointError` in one line naming ``where`` and the first keys that differ.
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
        raise CheckpointError(f"{where}: weights do not fit {backbone} ({why})")
    return place_model(
        model.eval(), runtime or Runtime(torch.device("cpu"), None, channels_last=False)
    )
