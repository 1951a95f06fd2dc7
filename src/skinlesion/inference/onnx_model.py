"""An exported graph (a ``skinlesion export`` folder) read, checked and run by onnxruntime.

The folder (written by :func:`~skinlesion.inference.onnx_export.export_onnx`)::

    model.onnx   the graph: prepared uint8 images (N, S, S, 3) -> probabilities (N, C), and
                 unfamiliarity (N,) for a model with a familiarity
    spec.json    preprocessing spec, class names, TTA views, reference, input/output, the model
                 it was exported from (``exported_from``) and its members (fold, temperature, the
                 SHA-256 of the weights file), by which that model is recognised again
    card.json    the model card, when the model has one

:class:`OnnxModel` runs such a folder as a :class:`~skinlesion.inference.resolve.Predictor`
(images only, its fixed TTA), as :func:`~skinlesion.inference.resolve.resolve_model` loads it;
it is also the engine of a ``LoadedModel`` on the ``onnx`` backends.

Example::

    probs, errors = OnnxModel("out/onnx").predict_proba(["lesion.jpg"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import CheckpointError, ConfigError
from skinlesion.data.preprocess import PreprocessSpec, size_hw
from skinlesion.data.tabular import MetadataInput
from skinlesion.inference.predict import (
    ImageInput,
    Predictions,
    as_image_input,
    image_name,
    predict_prepared,
)
from skinlesion.inference.table import Decisions, predictions_table
from skinlesion.models.description import spec_from_dict

ONNX_FORMAT = "skinlesion-onnx"
ONNX_FILE = "model.onnx"
SPEC_FILE = "spec.json"
CARD_FILE = "card.json"
UNFAMILIARITY = "unfamiliarity"


def is_export_folder(path: str | Path | None) -> bool:
    """Whether ``path`` is a folder that ``skinlesion export`` wrote (a graph and its spec)."""
    return path is not None and all((Path(path) / f).is_file() for f in (ONNX_FILE, SPEC_FILE))


def write_export_spec(folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` as ``folder/spec.json`` (atomically) after the reader's checks: the one
    writer of the file, for an export and for its int8 copy."""
    path = folder / SPEC_FILE
    spec_from_dict(meta, path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)
    return path


def read_export_spec(path: Path) -> tuple[dict[str, Any], PreprocessSpec]:
    """``spec.json`` of an export folder and its preprocessing spec; a damaged file is a
    :class:`CheckpointError` naming it and what was expected."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: not a skinlesion ONNX export (format {ONNX_FORMAT!r})")
    if "class_names" not in meta:
        raise CheckpointError(f"{path}: class_names is missing, expected a list of names")
    return meta, spec_from_dict(meta, path)


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


class OnnxModel:
    """An exported graph run by onnxruntime on the CPU: a
    :class:`~skinlesion.inference.resolve.Predictor` that takes images only, with the TTA
    views fixed inside the graph."""

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
        card = folder / CARD_FILE
        self.card: dict[str, Any] | None = json.loads(card.read_text()) if card.is_file() else None
        self.backend = "onnx-int8" if self.meta.get("quantization") else "onnx"
        self.engines_used: set[str] = set()
        self.decode_workers: int | None = None  # decoding threads; None: decode_workers()

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.folder.name)

    @property
    def version(self) -> str:
        return str(self.meta.get("version") or "")

    @property
    def origin(self) -> Path:
        return self.folder

    @property
    def reference(self) -> dict[str, Any] | None:
        return self.meta.get("reference")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def tta(self) -> int:
        """The TTA views inside the graph."""
        return int(self.meta["tta"])

    @property
    def specs(self) -> list[PreprocessSpec]:
        return [self.spec]

    @property
    def has_familiarity(self) -> bool:
        """Whether the graph has the ``unfamiliarity`` output."""
        return any(o.name == UNFAMILIARITY for o in self.session.get_outputs())

    def heldout_unfamiliarity(self) -> np.ndarray | None:
        """``None``: an export does not carry the held-out scores of the model's familiarity."""
        return None

    @property
    def uses_metadata(self) -> bool:
        """``False``: the graph takes images only."""
        return False

    @property
    def metadata_inputs(self) -> dict[str, Any] | None:
        return None

    def unseen_metadata(self, metadata: Any, where: str | None) -> dict[str, dict[str, int]]:
        return {}

    def check_call(self, tta: int | None, metadata: Any = None) -> None:
        """Refuse what the graph cannot compute: TTA views other than those inside it, and
        patient metadata (a :class:`ConfigError` saying what to do instead)."""
        if tta is not None and tta != self.tta:
            raise ConfigError(
                f"--tta {tta}: {self.folder} is an ONNX export with {self.tta} TTA view(s) fixed "
                f"inside the graph; export again with --tta {tta}"
            )
        if metadata is not None:
            raise ConfigError(
                f"{self.folder}: an exported ONNX graph takes images only, no patient metadata; "
                f"use the model it was exported from ({self.name})"
            )

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
        return Decisions.of(self.class_names, self.reference, str(self.folder))

    def outputs(
        self,
        images: dict[PreprocessSpec, np.ndarray],
        tta: int,
        batch_size: int,
        metadata: pd.DataFrame | None,
        familiarity: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and unfamiliarity (N,) or ``None`` of prepared images."""
        self.check_call(tta, metadata)
        self.engines_used.add(self.backend)
        probs, u = self.run_batched(images[self.spec], batch_size)
        return probs.astype(np.float64), (u if familiarity else None)

    def predictions(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
        metadata: MetadataInput = None,
        familiarity: bool = True,
    ) -> Predictions:
        """Probabilities, errors and unfamiliarity (``familiarity=True``) of each image, the
        images decoded and prepared as for the PyTorch model."""
        self.check_call(tta, metadata)
        inputs = [as_image_input(x) for x in images]

        def outputs(prepared: dict[PreprocessSpec, np.ndarray], _: Any) -> Any:
            return self.outputs(prepared, self.tta, batch_size, None, familiarity)

        scored = familiarity and self.has_familiarity
        n_classes = len(self.class_names)
        return predict_prepared(
            inputs,
            [self.spec],
            n_classes,
            outputs,
            scored,
            batch_size,
            progress,
            workers=self.decode_workers,
        )

    def predict(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        metadata: MetadataInput = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> pd.DataFrame:
        """The predictions table (:mod:`skinlesion.inference.table`), as ``LoadedModel.predict``
        writes it, from the graph's probabilities and unfamiliarity."""
        out = self.predictions(images, tta, batch_size, progress, metadata)
        names = [image_name(x, i) for i, x in enumerate(images)]
        return predictions_table(names, out.probs, out.errors, self.decisions(), out.unfamiliarity)

    def predict_proba(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
        metadata: MetadataInput = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Calibrated probabilities (N, C), NaN rows for images that failed, and their errors."""
        out = self.predictions(images, tta, batch_size, progress, metadata, familiarity=False)
        return out.probs, out.errors
