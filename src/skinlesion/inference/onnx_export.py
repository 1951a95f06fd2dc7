"""ONNX export of a fold ensemble as one graph.

The graph takes prepared uint8 images ``images`` (N, S, S, 3) (decoded, colour-constancy applied
if the spec says so, resized: :func:`prepare_with_spec`) and returns ``probabilities`` (N, C): for
each member the TTA views' logits are averaged, divided by the member's temperature and
softmaxed; the members' probabilities are averaged. So normalisation, the dihedral TTA views,
temperature scaling and the ensemble mean are all inside the graph; decoding and resizing stay
outside (they are not tensor work). The batch dimension is dynamic.

A model with a fitted familiarity has a second output ``unfamiliarity`` (N,), computed inside the
graph as in :func:`~skinlesion.inference.predict.ensemble_outputs`: the stage statistics of the
identity view (captured by the same forward hooks, which run while the graph is traced), each
member's Mahalanobis score over its threshold, the mean over members.

:func:`export_onnx` writes the folder that :mod:`skinlesion.inference.onnx_model` describes,
reads and runs: ``model.onnx``, ``spec.json`` (with the model it was exported from and its
members' weights hashes) and ``card.json``.

Example::

    export_onnx(resolve_torch_model("runs/quick"), "out/onnx")
    probs, errors = OnnxModel("out/onnx").predict_proba(["lesion.jpg"])
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from skinlesion.core.errors import CheckpointError
from skinlesion.core.paths import check_writable_dir
from skinlesion.data.preprocess import PreprocessSpec, size_hw
from skinlesion.inference.familiarity import FamiliarityScorer, StageCapture
from skinlesion.inference.onnx_model import (
    CARD_FILE,
    ONNX_FILE,
    ONNX_FORMAT,
    UNFAMILIARITY,
    write_export_spec,
)
from skinlesion.inference.packaged_meta import sha256_file
from skinlesion.inference.predict import Member
from skinlesion.models.description import io_dict

log = logging.getLogger(__name__)

OPSET = 17


class Exportable(Protocol):
    """What :func:`export_onnx` reads of a loaded model (``LoadedModel`` has it)."""

    name: str
    origin: Path
    members: list[Member]
    reference: dict[str, Any] | None
    card: dict[str, Any] | None
    version: str

    @property
    def tta(self) -> int: ...

    @property
    def uses_metadata(self) -> bool: ...


def _view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` of :func:`skinlesion.data.augment.tta_views`, with flips and transposes only
    (``rot90`` has no ONNX symbol in every exporter). A non-square input has the 4 views that keep
    its shape: identity, hflip, vflip, rot180."""
    h, w = -2, -1
    if x.shape[h] != x.shape[w] and k == 3:
        k = 4
    if k == 0:
        return x
    if k == 1:
        return x.flip(w)
    if k == 2:
        return x.flip(h)
    if k == 3:  # rot90 counter-clockwise
        return x.transpose(h, w).flip(h)
    if k == 4:
        return x.flip(h).flip(w)
    if k == 5:  # rot270
        return x.transpose(h, w).flip(w)
    if k == 6:
        return x.transpose(h, w)
    return x.flip(h).flip(w).transpose(h, w)


class EnsembleGraph(nn.Module):
    """uint8 (N, S, S, 3) -> calibrated ensemble probabilities (N, C), and the unfamiliarity (N,)
    when a member has a familiarity (then the members without one do not take part in it)."""

    def __init__(self, members: Sequence[Member], tta: int) -> None:
        super().__init__()
        spec = members[0].spec
        if any(m.spec != spec for m in members):
            raise CheckpointError("fold models with different preprocessing cannot share a graph")
        if not 1 <= tta <= 8:
            raise ValueError(f"tta must be in 1..8, got {tta}")
        # Copies: exporting must not change the memory format of the models still in use.
        self.models = nn.ModuleList(copy.deepcopy(m.model).cpu() for m in members)
        self.tta = tta
        self.register_buffer("temperature", torch.tensor([m.temperature for m in members]))
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.scored = [i for i, m in enumerate(members) if m.familiarity is not None]
        self.scorers = nn.ModuleList(
            FamiliarityScorer(members[i].familiarity)  # type: ignore[arg-type]
            for i in self.scored
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        views = [_view(x, k) for k in range(self.tta)]
        total, unfamiliar = None, None
        for i, model in enumerate(self.models):
            scorer = self.scorers[self.scored.index(i)] if i in self.scored else None
            with StageCapture(model) if scorer is not None else nullcontext() as cap:
                logits = torch.stack([model(v) for v in views]).mean(0) / self.temperature[i]
            probs = torch.softmax(logits, dim=-1)
            total = probs if total is None else total + probs
            if scorer is not None:
                u = scorer(cap.identity(self.tta))
                unfamiliar = u if unfamiliar is None else unfamiliar + u
        assert total is not None
        probs = total / len(self.models)
        return probs if unfamiliar is None else (probs, unfamiliar / len(self.scored))


def export_onnx(model: Exportable, output: str | Path, tta: int | None = None) -> Path:
    """Write ``model.onnx``, ``spec.json`` (and ``card.json``) into ``output``.

    The graph takes images only: a model fused with patient metadata is exported as it predicts
    without metadata (the all-missing encoding is part of its weights).
    """
    import onnx

    if model.uses_metadata:
        log.warning("%s uses patient metadata; the ONNX graph takes images only", model.name)

    output = Path(output)
    check_writable_dir(output, "ONNX export folder")
    output.mkdir(parents=True, exist_ok=True)
    tta = model.tta if tta is None else tta
    graph = EnsembleGraph(model.members, tta).cpu().eval()
    graph = graph.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    spec = model.members[0].spec
    height, width = size_hw(spec.size)
    dummy = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    path = output / ONNX_FILE
    outputs = ["probabilities", *([UNFAMILIARITY] if graph.scored else [])]
    with torch.no_grad(), warnings.catch_warnings():
        # _view's shape test is traced as a constant, rightly: only the batch axis is dynamic.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean")
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    spec_json = _spec_json(model, spec, tta)
    if graph.scored:
        spec_json["outputs"] = [spec_json["output"], _unfamiliarity_output(len(graph.scored))]
    write_export_spec(output, spec_json)
    if model.card:
        (output / CARD_FILE).write_text(json.dumps(model.card, indent=2))
    log.info("exported %s to %s", model.name, path)
    return path


def _spec_json(model: Exportable, spec: PreprocessSpec, tta: int) -> dict[str, Any]:
    return {
        "format": ONNX_FORMAT,
        "name": model.name,
        "version": model.version,
        **io_dict(spec),
        "tta": tta,
        "exported_from": str(Path(model.origin).resolve()),
        "members": member_records(model.members),
        "reference": model.reference,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", *size_hw(spec.size), 3],
            "prepared_by": "skinlesion.data.preprocess.prepare_with_spec (decode, "
            "colour constancy if set, resize without crop)",
        },
        "output": {
            "name": "probabilities",
            "shape": ["batch", len(spec.class_names)],
            "meaning": "mean over members of softmax(mean over TTA views of logits / T)",
        },
    }


def member_records(members: Sequence[Member]) -> list[dict[str, Any]]:
    """Each member's fold, temperature and the SHA-256 of its weights file (``None`` for one
    built in memory): what an export records of the model it came from, to find it again."""
    hashes: dict[Path, str] = {}
    for m in members:
        path = Path(m.path)
        if path.is_file() and path not in hashes:
            hashes[path] = sha256_file(path)
    return [
        {"fold": m.fold, "temperature": m.temperature, "weights_sha256": hashes.get(Path(m.path))}
        for m in members
    ]


def _unfamiliarity_output(members: int) -> dict[str, Any]:
    return {
        "name": UNFAMILIARITY,
        "shape": ["batch"],
        "meaning": "mean over the members with a familiarity "
        f"({members}) of their feature-statistics Mahalanobis score (last 3 stages, identity "
        "view) divided by their held-out 99th-percentile threshold; above 1: unlike the "
        "training images (skinlesion.inference.familiarity)",
    }
