"""Trained models shipped inside the package (``skinlesion/zoo/NAME/``): listed, loaded; and
:class:`LoadedModel`, a fold ensemble with its out-of-fold reference, however it was named
(:func:`~skinlesion.inference.resolve.resolve_model` turns a name, folder or file into one).

A packaged model is a folder::

    model.safetensors   the members' weights (``fold{K}.`` key prefixes), no pickle
    model.json          backbone, preprocessing spec, class names, TTA views, per-member fold and
                        temperature, the out-of-fold reference (melanoma threshold, confidence
                        indicators) and the weights' SHA-256
    familiarity.safetensors  the members' familiarity (same key prefixes; optional, listed in
                        model.json "familiarity" with its SHA-256)
    card.json, MODEL_CARD.md, LICENSE

Example::

    model = load_packaged(zoo_dir() / default_name())    # the default packaged model
    probs, errors = model.predict_proba(["lesion.jpg"])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinlesion.core.errors import CheckpointError
from skinlesion.core.runtime import Runtime, resolve_runtime
from skinlesion.data.preprocess import PreprocessSpec, size_from_plain, size_label
from skinlesion.data.tabular import MetadataInput, metadata_table
from skinlesion.inference.backend import usable_graph
from skinlesion.inference.familiarity import FAMILIARITY_FILE, Familiarity, load_familiarities
from skinlesion.inference.onnx_model import OnnxModel
from skinlesion.inference.packaged_meta import (
    MODEL_FILE,
    WEIGHTS_FILE,
    folder_file,
    read_packaged_meta,
    sha256_file,
)
from skinlesion.inference.predict import (
    ImageInput,
    Member,
    Predictions,
    as_image_input,
    backbone_id,
    ensemble_outputs,
    image_name,
    predict_images,
)
from skinlesion.inference.table import Decisions, predictions_table
from skinlesion.models.checkpoint import FINAL_FOLD
from skinlesion.models.description import ModelDescription

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
DEFAULT_FILE = "default.txt"


def zoo_dir() -> Path:
    """The folder of packaged models inside the installed package."""
    return Path(str(resources.files("skinlesion") / "zoo"))


@dataclass
class LoadedModel:
    """A fold ensemble ready to predict, with what it needs to be read honestly (a
    :class:`~skinlesion.inference.resolve.Predictor`)."""

    name: str
    origin: Path
    members: list[Member]
    reference: dict[str, Any] | None = None  # out-of-fold figures: mel_threshold, domain
    card: dict[str, Any] | None = None
    version: str = ""
    runtime: Runtime | None = field(default=None, repr=False)
    # The engine (skinlesion.inference.backend): torch, or an ONNX graph run by onnxruntime.
    backend: str = "torch"
    backend_forced: bool = False
    graph: OnnxModel | None = field(default=None, repr=False)
    fallbacks_logged: set[str] = field(default_factory=set, repr=False)
    # The engines that computed this model's outputs so far (a fallback runs torch).
    engines_used: set[str] = field(default_factory=set, repr=False)
    # Threads that decode and prepare images; None: decode_workers() (the environment).
    decode_workers: int | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.members[0].spec.class_names)

    @property
    def tta(self) -> int:
        return self.members[0].tta

    @property
    def specs(self) -> list[PreprocessSpec]:
        """The members' preprocessing specs, each once."""
        return list(dict.fromkeys(m.spec for m in self.members))

    @property
    def mel_threshold(self) -> float | None:
        return (self.reference or {}).get("mel_threshold")

    def predict_proba(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
        metadata: MetadataInput = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Calibrated probabilities (N, C), NaN rows for images that failed, and their errors.

        ``metadata``: one record per image (``{"age": 60, "sex": "male", "localization":
        "back"}``, any key may be missing) or a table with those columns; used by models fused
        with metadata, ignored by image-only ones.
        """
        out = self.predictions(images, tta, batch_size, progress, metadata, familiarity=False)
        return out.probs, out.errors

    def predictions(
        self,
        images: Sequence[ImageInput],
        tta: int | None,
        batch_size: int,
        progress: bool,
        metadata: MetadataInput,
        familiarity: bool = True,
    ) -> Predictions:
        """Probabilities, errors and unfamiliarity (``familiarity=True``) of each image, from
        the model's backend; ``metadata`` as for :meth:`predict_proba`."""
        inputs = [as_image_input(x) for x in images]
        table = metadata_table(metadata, len(inputs))
        tta = self.tta if tta is None else tta

        def outputs(prepared: Any, meta: Any) -> tuple[np.ndarray, np.ndarray | None]:
            return self.outputs(prepared, tta, batch_size, meta, familiarity)

        return predict_images(
            inputs,
            self.members,
            self.runtime or resolve_runtime("auto"),
            tta,
            batch_size,
            progress,
            table,
            familiarity,
            outputs=outputs,
            workers=self.decode_workers,
        )

    def outputs(
        self,
        images: dict[PreprocessSpec, np.ndarray],
        tta: int,
        batch_size: int,
        metadata: pd.DataFrame | None,
        familiarity: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and unfamiliarity (N,) or ``None`` of prepared images, from the
        model's backend (:mod:`skinlesion.inference.backend`)."""
        graph = usable_graph(self, tta, metadata)
        self.engines_used.add(self.backend if graph is not None else "torch")
        if graph is None:
            runtime = self.runtime or resolve_runtime("auto")
            return ensemble_outputs(
                self.members, images, runtime, tta, batch_size, metadata, familiarity
            )
        probs, u = graph.run_batched(images[self.members[0].spec], batch_size)
        return probs.astype(np.float64), (u if familiarity else None)

    @property
    def has_familiarity(self) -> bool:
        """Whether any member has a fitted familiarity (the ``unfamiliarity`` column)."""
        return any(m.familiarity is not None for m in self.members)

    def heldout_unfamiliarity(self) -> np.ndarray | None:
        """The members' stored held-out scores, each over its threshold (the reference an
        evaluated set's unfamiliarity is compared with); ``None`` without a familiarity."""
        parts = [m.familiarity.heldout_unfamiliarity() for m in self.members if m.familiarity]
        return np.concatenate(parts) if parts else None

    @property
    def uses_metadata(self) -> bool:
        """Whether any member is fused with patient metadata."""
        return any(m.metadata is not None for m in self.members)

    @property
    def metadata_inputs(self) -> dict[str, Any] | None:
        """What a fused model reads: its fields and, per category, the values its training
        data had (the union over members; sites as the model names them); ``None`` for an
        image-only model.

        The web page builds its optional patient form from this.
        """
        specs = [m.metadata for m in self.members if m.metadata is not None]
        if not specs:
            return None
        choices: dict[str, set[str]] = {}
        for spec in specs:
            for fld, values in spec.vocab:
                choices.setdefault(fld, set()).update(values)
        return {
            "fields": list(specs[0].fields),
            "choices": {f: sorted(v) for f, v in choices.items()},
            "sites": specs[0].sites,
        }

    def unseen_metadata(self, metadata: Any, where: str | None) -> dict[str, dict[str, int]]:
        """The metadata values of ``metadata`` (a table, or ``None``) that a member never saw
        in training (they encode as ``unknown``), the largest count over the members per
        value; logged as a warning naming ``where`` (``None``: not logged)."""
        from skinlesion.data.tabular import describe_unseen, unseen_values

        merged: dict[str, dict[str, int]] = {}
        for m in self.members:
            if m.metadata is None:
                continue
            for fld, counts in unseen_values(metadata, m.metadata).items():
                seen = merged.setdefault(fld, {})
                for value, n in counts.items():
                    seen[value] = max(n, seen.get(value, 0))
        merged = {f: dict(sorted(c.items())) for f, c in sorted(merged.items())}
        if merged and where is not None:
            log.warning(
                "%s: metadata the model never saw in training, encoded as unknown: %s",
                where,
                describe_unseen(merged),
            )
        return merged

    def decisions(self) -> Decisions:
        """Class names, melanoma threshold and refer rules of this model's reference."""
        return Decisions.of(self.class_names, self.reference, str(self.origin))

    def predict(
        self,
        images: Sequence[ImageInput],
        tta: int | None = None,
        metadata: MetadataInput = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> pd.DataFrame:
        """The predictions table (:mod:`skinlesion.inference.table`), one row per image:
        ``image``, the class probabilities, ``prediction``, ``melanoma_flag`` (at the model's
        out-of-fold threshold), ``unfamiliarity``, ``refer``, ``refer_reasons`` and ``error``.
        An image that cannot be read gets its ``error`` and empty probabilities and decisions.
        ``metadata`` as for :meth:`predict_proba`."""
        out = self.predictions(images, tta, batch_size, progress, metadata)
        names = [image_name(x, i) for i, x in enumerate(images)]
        return predictions_table(names, out.probs, out.errors, self.decisions(), out.unfamiliarity)


def list_packaged(root: Path | None = None) -> list[dict[str, Any]]:
    """One row per packaged model: name, backbone, input size, size on disk, OOF figures.

    A final fit (``fit-final``, fold -1) was trained on every image: the out-of-fold figure its
    card carries is its recipe's folds', not its own, so ``oof_balanced_accuracy`` is ``None``
    and ``final_fit`` says why."""
    root = root or zoo_dir()
    default = default_name(root)
    rows = []
    for d in sorted(p for p in root.glob("*") if (p / MODEL_FILE).is_file()):
        meta = read_packaged_meta(d)
        card = _read_json(d / CARD_FILE) or {}
        oof = (card.get("metrics") or {}).get("out_of_fold") or {}
        final = any(m["fold"] == FINAL_FOLD for m in meta["members"])
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        rows.append(
            {
                "name": d.name,
                "default": d.name == default,
                "backbone": meta["backbone"],
                "input_size": size_label(size_from_plain(meta["preprocessing"]["size"])),
                "members": len(meta["members"]),
                "tta": meta["tta"],
                "size_mb": round(size / 1e6, 1),
                "final_fit": final,
                "oof_balanced_accuracy": None if final else oof.get("balanced_accuracy"),
                "version": meta.get("version", ""),
            }
        )
    return rows


def default_name(root: Path | None = None) -> str | None:
    path = (root or zoo_dir()) / DEFAULT_FILE
    return path.read_text().strip() if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    if sha256_file(path) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{path}: weights file is corrupt or truncated (SHA-256 differs from {MODEL_FILE})"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    # Weights are stored in float16 (models packaged before that: float32); compute in float32.
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items()}


def read_familiarity(folder: Path, meta: dict[str, Any]) -> dict[str, Familiarity]:
    """The members' familiarity of a packaged model, by key prefix (``{}`` when it has none),
    checked against the SHA-256 in ``model.json``."""
    entry = meta.get("familiarity")
    if not entry:
        log.info("%s: no familiarity, so no unfamiliarity column or refer reason from it", folder)
        return {}
    path = folder_file(folder, "familiarity.file", entry.get("file", FAMILIARITY_FILE))
    if not path.is_file():
        raise CheckpointError(f"{path}: familiarity file listed in {MODEL_FILE} is missing")
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(
            f"{path}: familiarity file is corrupt or truncated (SHA-256 differs from {MODEL_FILE})"
        )
    return load_familiarities(path)


def load_packaged(folder: str | Path, runtime: Runtime | None = None) -> LoadedModel:
    """Load a packaged model folder onto the runtime's device."""
    folder = Path(folder)
    runtime = runtime or resolve_runtime("auto")
    meta = read_packaged_meta(folder)
    tensors = _read_weights(folder, meta)
    familiarity = read_familiarity(folder, meta)
    members = []
    for m in meta["members"]:
        prefix = m["prefix"]
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        # The shared keys of model.json with the member's own metadata branch.
        description = ModelDescription.from_dict(
            {**meta, "metadata": m.get("metadata")}, f"{folder / MODEL_FILE} (member '{prefix}')"
        )
        model = description.build(state, f"{folder / WEIGHTS_FILE} (member '{prefix}')", runtime)
        metadata = description.metadata
        members.append(
            Member(
                model=model,
                spec=description.spec,
                temperature=float(m["temperature"]),
                fold=int(m["fold"]),
                path=folder / WEIGHTS_FILE,
                tta=int(meta["tta"]),
                backbone_id=backbone_id(model),
                metadata=metadata,
                familiarity=familiarity.get(prefix),
            )
        )
    return LoadedModel(
        name=meta["name"],
        origin=folder,
        members=members,
        reference=meta.get("reference"),
        card=_read_json(folder / CARD_FILE),
        version=str(meta.get("version", "")),
        runtime=runtime,
    )
