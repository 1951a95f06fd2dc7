"""The one resolver: whatever a user names a model by becomes a model ready to predict.

``--model`` of every command and :func:`skinlesion.load_model` take, checked in this order:

- nothing: the default packaged model (``zoo/default.txt``);
- a packaged model's name (``skinlesion models``), unless a path of that name exists;
- a folder with ``model.json``: a packaged model, in the zoo or anywhere;
- a folder with ``model.onnx`` and ``spec.json``: a ``skinlesion export`` folder, run as it is by
  onnxruntime (images only, the TTA views fixed in its graph);
- a run folder (the fold ensemble of its ``fold_*/best.pt``) or one checkpoint file.

:func:`resolve_model` gives a :class:`Predictor`, the one interface that ``predict``,
``evaluate``, the service and :func:`skinlesion.load_model` use, whatever runs the model:
:class:`~skinlesion.inference.packaged.LoadedModel` (a fold ensemble in PyTorch, or its cached
ONNX graph) and :class:`~skinlesion.inference.onnx_model.OnnxModel` (an export folder's graph)
both satisfy it. :func:`resolve_torch_model` gives the PyTorch fold ensemble, for what needs its
weights (Grad-CAM, export): for an export folder, the model it was exported from, found again by
the path and name its ``spec.json`` records and checked to be the same model (each member's fold,
temperature and the SHA-256 of its weights file).

Example::

    model = resolve_model("onnx/")           # an export folder: an OnnxModel
    table = model.predict(["lesion.jpg"])
    cams_model = resolve_torch_model("onnx/", needs="explain")  # the model it came from
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from skinlesion.core.errors import CheckpointError, ConfigError
from skinlesion.core.run_folder import RunFolder
from skinlesion.core.runtime import Runtime, resolve_runtime
from skinlesion.data.preprocess import Detail, PreprocessSpec
from skinlesion.data.tabular import MetadataInput
from skinlesion.inference import packaged
from skinlesion.inference.backend import attach_backend, check_backend
from skinlesion.inference.onnx_export import member_records
from skinlesion.inference.onnx_model import SPEC_FILE, OnnxModel, is_export_folder, read_export_spec
from skinlesion.inference.packaged import LoadedModel, default_name, list_packaged, load_packaged
from skinlesion.inference.packaged_meta import MODEL_FILE
from skinlesion.inference.predict import ImageInput, Predictions, load_ensemble
from skinlesion.inference.table import Decisions

log = logging.getLogger(__name__)

DETAIL_SETTINGS = "model (its own), off, or SIDE[:JPEG_QUALITY] such as 200:75"


class Predictor(Protocol):
    """A model ready to predict, with what its answers are read against: every member that
    ``predict``, ``evaluate``, the service and ``load_model`` use (``LoadedModel`` and
    ``OnnxModel`` have them). What needs the PyTorch weights takes a ``LoadedModel``."""

    # What it is: named in answers, reports and logs.
    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def origin(self) -> Path: ...

    @property
    def card(self) -> dict[str, Any] | None: ...

    # What its outputs are read against: out-of-fold thresholds, refer rules, familiarity.
    @property
    def reference(self) -> dict[str, Any] | None: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def has_familiarity(self) -> bool: ...

    def heldout_unfamiliarity(self) -> np.ndarray | None: ...

    def decisions(self) -> Decisions: ...

    # What it takes and how it runs.
    @property
    def tta(self) -> int: ...

    @property
    def specs(self) -> list[PreprocessSpec]: ...

    @property
    def backend(self) -> str: ...

    @property
    def engines_used(self) -> set[str]: ...

    decode_workers: int | None  # threads that decode images; None: decode_workers()

    @property
    def uses_metadata(self) -> bool: ...

    @property
    def metadata_inputs(self) -> dict[str, Any] | None: ...

    def unseen_metadata(self, metadata: Any, where: str | None) -> dict[str, dict[str, int]]: ...

    # Its outputs: the table, probabilities, and the steps the service and evaluate share.
    def predict(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        metadata: MetadataInput = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> pd.DataFrame: ...

    def predict_proba(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
        metadata: MetadataInput = None,
    ) -> tuple[np.ndarray, dict[int, str]]: ...

    def predictions(
        self,
        images: Sequence[ImageInput],
        tta: int | None,
        batch_size: int,
        progress: bool,
        metadata: MetadataInput,
        familiarity: bool = True,
    ) -> Predictions: ...

    def outputs(
        self,
        images: dict[PreprocessSpec, np.ndarray],
        tta: int,
        batch_size: int,
        metadata: pd.DataFrame | None,
        familiarity: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


def resolve_model(
    model: str | Path | None,
    runtime: Runtime | None = None,
    backend: str = "auto",
    tta: int | None = None,
    detail: str | None = None,
    images: int | None = None,
) -> Predictor:
    """The model ``model`` names (see the module's list), ready to predict. ``backend``
    (:mod:`skinlesion.inference.backend`): ``auto`` runs a fold ensemble's ONNX graph (exported
    once into the user cache, for ``tta`` views) on a CPU; an export folder runs on its own graph,
    and refuses ``torch``, another ``tta`` and patient metadata. ``detail``: see
    :func:`set_detail`; ``None`` keeps the model's. ``images``: how many images will be predicted,
    when known (a few run on PyTorch until the graph is cached: ``EXPORT_PAYS_OFF``)."""
    loaded: LoadedModel | OnnxModel
    if is_export_folder(model):
        loaded = load_export(Path(str(model)), backend, tta)
    else:
        loaded = _resolve(model, runtime or resolve_runtime("auto"))
    if detail is not None:
        set_detail(loaded, detail)
    if isinstance(loaded, LoadedModel):
        attach_backend(loaded, backend, tta, images)
    return loaded


def load_export(folder: Path, backend: str = "auto", tta: int | None = None) -> OnnxModel:
    """An export folder as a predictor; a :class:`ConfigError` for a backend or TTA that its
    graph cannot be run with."""
    check_backend(backend)
    graph = OnnxModel(folder)
    if backend == "torch":
        raise ConfigError(
            f"--backend torch: {folder} is an ONNX export, run by onnxruntime; for PyTorch pass "
            f"--model with the model it was exported from ({graph.name})"
        )
    if backend == "onnx-int8" and graph.backend != "onnx-int8":
        raise ConfigError(
            f"--backend onnx-int8: {folder} holds an fp32 graph; `skinlesion export --int8` "
            "writes an int8 one (or use --backend auto)"
        )
    graph.check_call(tta)
    return graph


def resolve_torch_model(
    model: str | Path | None, runtime: Runtime | None = None, needs: str = "this command"
) -> LoadedModel:
    """The PyTorch fold ensemble ``model`` names, for what needs its weights (``needs`` names
    it in an error: ``explain``, ``export``). An export folder holds no PyTorch weights: it gives
    the model it was exported from (:func:`exported_from`)."""
    runtime = runtime or resolve_runtime("auto")
    if is_export_folder(model):
        return exported_from(Path(str(model)), runtime, needs)
    return _resolve(model, runtime)


def exported_from(folder: Path, runtime: Runtime, needs: str = "this command") -> LoadedModel:
    """The model the export ``folder`` was made from: the path its ``spec.json`` records, else
    the packaged model of its name, taken only when it is the same model (each member's fold,
    temperature and weights' SHA-256 as recorded); else a one-line :class:`CheckpointError`
    saying that ``needs`` needs that model, and naming it."""
    meta, _ = read_export_spec(folder / SPEC_FILE)
    name = str(meta.get("name") or folder.name)
    recorded = _identity(meta.get("members"))

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{folder}: {needs} needs the PyTorch model this ONNX graph was exported from "
            f"({name}), and {why}; pass --model with that model"
        )

    if recorded is None:
        raise refuse(f"its {SPEC_FILE} records no weights' SHA-256 to recognise it by")
    tried = []
    for candidate in _candidates(meta, name):
        loaded = _resolve(candidate, runtime)
        if _identity(member_records(loaded.members)) == recorded:
            log.info(
                "%s: %s uses %s (%s), the model the graph was exported from (same weights)",
                *(folder, needs, loaded.name, loaded.origin),
            )
            return loaded
        tried.append(str(candidate))
    if tried:
        raise refuse(f"{' and '.join(tried)} has other weights")
    where = _recorded_origin(meta)
    raise refuse(f"it is not found ({f'not at {where}, ' if where else ''}not packaged)")


def _recorded_origin(meta: dict[str, Any]) -> Any:
    """The folder an export records it came from (``source`` in exports written before
    ``exported_from``)."""
    return meta.get("exported_from") or meta.get("source")


def _identity(members: Any) -> list[tuple[int, float, str]] | None:
    """What recognises a model: each member's fold, temperature and weights' SHA-256;
    ``None`` when a hash is missing (an export written before they were recorded)."""
    try:
        out = [(int(m["fold"]), float(m["temperature"]), m["weights_sha256"]) for m in members]
    except (KeyError, TypeError, ValueError):
        return None
    return out if out and all(isinstance(h, str) and h for _, _, h in out) else None


def _candidates(meta: dict[str, Any], name: str) -> list[Path]:
    """Where the model an export names may be: its recorded path, then the packaged model of its
    name, each once."""
    found: list[Path] = []
    origin = _recorded_origin(meta)
    if isinstance(origin, str) and Path(origin).exists() and not is_export_folder(origin):
        found.append(Path(origin))
    zoo = packaged.zoo_dir() / name
    if (zoo / MODEL_FILE).is_file() and all(p.resolve() != zoo.resolve() for p in found):
        found.append(zoo)
    return found


def set_detail(loaded: LoadedModel | OnnxModel, setting: str) -> None:
    """Override the detail that a model reduces a larger input to (:class:`Detail`): ``model``
    keeps its own, ``off`` takes inputs as they come, ``SIDE[:QUALITY]`` sets one."""
    if setting == "model":
        return
    try:
        detail = None if setting == "off" else Detail.parse(setting)
    except ValueError as err:
        raise ConfigError(f"--detail: {err}; expected {DETAIL_SETTINGS}") from None
    if isinstance(loaded, OnnxModel):  # the images are prepared outside the graph
        loaded.spec = replace(loaded.spec, detail=detail)
        return
    for i, member in enumerate(loaded.members):
        loaded.members[i] = replace(member, spec=replace(member.spec, detail=detail))


def run_reference(path: Path) -> dict[str, Any] | None:
    """The out-of-fold figures of the run a run folder or a ``fold_K/best.pt`` belongs to."""
    if path.is_dir():
        run: RunFolder | None = RunFolder(path)
    elif path.parent.name == "final":  # fit-final's model: the run's out-of-fold reference
        run = RunFolder(path.parent.parent)
    else:
        run = RunFolder.of_checkpoint(path)
    if run is None or not run.oof_metrics.is_file():
        return None
    return json.loads(run.oof_metrics.read_text())


def _resolve(model: str | Path | None, runtime: Runtime) -> LoadedModel:
    """A packaged model, run folder or checkpoint as a PyTorch fold ensemble."""
    root = packaged.zoo_dir()  # looked up when called: a test may point it elsewhere
    if model is None:
        name = default_name(root)
        if name is None:
            raise CheckpointError(
                f"no default packaged model in {root}; pass --model RUN_DIR or a checkpoint"
            )
        return load_packaged(root / name, runtime)
    text = str(model)
    if (root / text / MODEL_FILE).is_file() and not Path(text).exists():
        return load_packaged(root / text, runtime)
    path = Path(text)
    if (path / MODEL_FILE).is_file():
        return load_packaged(path, runtime)
    if not path.exists():
        known = [r["name"] for r in list_packaged(root)]
        raise CheckpointError(
            f"{text}: no such packaged model, run folder, checkpoint or export folder "
            f"(packaged models: {', '.join(known) or 'none'})"
        )
    members = load_ensemble(path, runtime)
    return LoadedModel(
        name=path.name,
        origin=path,
        members=members,
        reference=run_reference(path),
        runtime=runtime,
    )
