"""ONNX export of a fold ensemble as one graph, and prediction with onnxruntime.

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

Folder written by :func:`export_onnx`::

    model.onnx   the graph
    spec.json    preprocessing spec, class names, TTA views, members, reference, input/output
    card.json    the model card, when the model has one

Example::

    export_onnx(resolve_model("runs/quick"), "out/onnx")
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

import numpy as np
import pandas as pd
import torch
from torch import nn

from skinlesion.core.paths import check_writable_dir
from skinlesion.data.preprocess import ImageDecodeError, PreprocessSpec, prepare_with_spec, size_hw
from skinlesion.inference.familiarity import FamiliarityScorer, StageCapture
from skinlesion.inference.predict import Member
from skinlesion.inference.table import Decisions, predictions_table
from skinlesion.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

ONNX_FORMAT = "skinlesion-onnx"
ONNX_FILE = "model.onnx"
SPEC_FILE = "spec.json"
OPSET = 17
UNFAMILIARITY = "unfamiliarity"


class Exportable(Protocol):
    """What :func:`export_onnx` reads of a loaded model (``LoadedModel`` has it)."""

    name: str
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
    (output / SPEC_FILE).write_text(json.dumps(spec_json, indent=2))
    if model.card:
        (output / "card.json").write_text(json.dumps(model.card, indent=2))
    log.info("exported %s to %s", model.name, path)
    return path


def _spec_json(model: Exportable, spec: PreprocessSpec, tta: int) -> dict[str, Any]:
    return {
        "format": ONNX_FORMAT,
        "name": model.name,
        "version": model.version,
        "preprocessing": spec.to_dict(),
        "class_names": list(spec.class_names),
        "tta": tta,
        "members": [{"fold": m.fold, "temperature": m.temperature} for m in model.members],
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


def read_export_spec(path: Path) -> tuple[dict[str, Any], PreprocessSpec]:
    """``spec.json`` of an export folder and its preprocessing spec; a damaged file is a
    :class:`CheckpointError` naming it and what was expected."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: not a skinlesion ONNX export (format {ONNX_FORMAT!r})")
    try:
        spec = PreprocessSpec.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: preprocessing is not a mapping with size, mean and std ({err!r})"
        ) from err
    names = meta.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: class_names is {names!r}, expected a list of names")
    return meta, spec


def _check_graph_io(session: Any, graph: Path, spec: PreprocessSpec) -> None:
    """The graph takes ``images`` of the spec's size and gives ``probabilities``."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    h, w = size_hw(spec.size)
    shape = inputs.get("images")
    if shape is None or "probabilities" not in outputs or list(shape[1:]) != [h, w, 3]:
        raise CheckpointError(
            f"{graph}: takes {inputs} and gives {outputs}; expected images [batch, {h}, {w}, 3] "
            f"-> probabilities, as its {SPEC_FILE} says"
        )


def _unfamiliarity_output(members: int) -> dict[str, Any]:
    return {
        "name": UNFAMILIARITY,
        "shape": ["batch"],
        "meaning": "mean over the members with a familiarity "
        f"({members}) of their feature-statistics Mahalanobis score (last 3 stages, identity "
        "view) divided by their held-out 99th-percentile threshold; above 1: unlike the "
        "training images (skinlesion.inference.familiarity)",
    }


class OnnxModel:
    """An exported graph run by onnxruntime on the CPU."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.folder = folder
        spec_path = folder / SPEC_FILE
        if not spec_path.is_file() or not (folder / ONNX_FILE).is_file():
            raise CheckpointError(
                f"{folder}: not an exported ONNX model (needs {ONNX_FILE} and {SPEC_FILE})"
            )
        self.meta, self.spec = read_export_spec(spec_path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        graph = folder / ONNX_FILE
        try:
            self.session = ort.InferenceSession(
                str(graph), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types per fault
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{graph}: not a loadable ONNX graph, truncated or not written by `skinlesion "
                f"export` ({first})"
            ) from err
        _check_graph_io(self.session, graph, self.spec)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def tta(self) -> int:
        """The TTA views inside the graph."""
        return int(self.meta["tta"])

    @property
    def has_familiarity(self) -> bool:
        """Whether the graph has the ``unfamiliarity`` output."""
        return any(o.name == UNFAMILIARITY for o in self.session.get_outputs())

    def run(self, images_u8: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) for prepared uint8 (N, S, S, 3) images."""
        return self.session.run(["probabilities"], {"images": images_u8})[0]

    def run_all(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and unfamiliarity (N,) (``None``: the graph has none)."""
        if not self.has_familiarity:
            return self.run(images_u8), None
        probs, u = self.session.run(["probabilities", UNFAMILIARITY], {"images": images_u8})
        return probs, u

    def run_batched(
        self, images_u8: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`run_all` over prepared images in batches of ``batch_size``."""
        starts = range(0, len(images_u8), batch_size)
        parts = [self.run_all(images_u8[i : i + batch_size]) for i in starts]
        if not parts:
            return np.zeros((0, len(self.class_names)), np.float32), None
        probs = np.concatenate([p for p, _ in parts])
        u = None if parts[0][1] is None else np.concatenate([u for _, u in parts])  # type: ignore[misc]
        return probs, u

    def decisions(self) -> Decisions:
        """Class names, melanoma threshold and refer rules of the exported model's reference."""
        return Decisions.of(self.class_names, self.meta.get("reference"), str(self.folder))

    def predict(self, sources: Sequence[str | Path], batch_size: int = 32) -> pd.DataFrame:
        """The predictions table (:mod:`skinlesion.inference.table`), as ``LoadedModel.predict``
        writes it, from the graph's probabilities and unfamiliarity."""
        probs, errors, u = self._predict(sources, batch_size)
        names = [str(s) for s in sources]
        return predictions_table(names, probs, errors, self.decisions(), u)

    def predict_proba(
        self, sources: Sequence[str | Path | bytes], batch_size: int = 32
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Like :func:`predict_images`: NaN rows and ``{index: error}`` for bad images."""
        probs, errors, _ = self._predict(sources, batch_size)
        return probs, errors

    def _predict(
        self, sources: Sequence[str | Path | bytes], batch_size: int
    ) -> tuple[np.ndarray, dict[int, str], np.ndarray | None]:
        out = np.full((len(sources), len(self.class_names)), np.nan)
        unfamiliar = np.full(len(sources), np.nan) if self.has_familiarity else None
        errors: dict[int, str] = {}
        ok, arrays = [], []
        for i, s in enumerate(sources):
            try:
                arrays.append(prepare_with_spec(s, self.spec))
                ok.append(i)
            except ImageDecodeError as err:
                errors[i] = str(err)
        for start in range(0, len(ok), batch_size):
            rows = ok[start : start + batch_size]
            probs, u = self.run_all(np.stack(arrays[start : start + batch_size]))
            out[rows] = probs
            if unfamiliar is not None and u is not None:
                unfamiliar[rows] = u
        return out, errors, unfamiliar
