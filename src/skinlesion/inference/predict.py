"""Inference that uses everything a run learned: fold ensemble, temperatures, TTA, colour constancy.

``predict`` and ``evaluate`` (and serving) share :func:`predict_images`: images are decoded and
prepared with each model's own preprocessing spec, every TTA view's logits are divided by the
fold's temperature, and the calibrated probabilities are averaged over views and folds.

In the same forward pass, a member with a fitted familiarity
(:mod:`skinlesion.inference.familiarity`, ``familiarity.safetensors`` beside its checkpoint)
scores how unlike its training images each image is, on the identity view; the ensemble's
``unfamiliarity`` is the mean over those members of their score divided by their threshold, so
above 1 is unfamiliar (a single member: its own threshold).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from skinlesion.core.errors import CheckpointError, ConfigError
from skinlesion.core.run_folder import (
    RECIPE_SECTIONS,
    RunFolder,
    fold_number,
    recipe_of,
)
from skinlesion.core.runtime import Runtime, resolve_runtime
from skinlesion.data.preprocess import ImageDecodeError, PreprocessSpec, prepare_with_spec
from skinlesion.data.tabular import MetadataSpec, encode_metadata
from skinlesion.inference.familiarity import (
    FAMILIARITY_FILE,
    Familiarity,
    StageCapture,
    load_familiarity,
)
from skinlesion.inference.forward import predict_logits
from skinlesion.models.checkpoint import (
    checkpoint_metadata,
    load_checkpoint,
    model_from_checkpoint,
)
from skinlesion.models.fusion import MetadataFusion

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One fold model of an ensemble."""

    model: nn.Module
    spec: PreprocessSpec
    temperature: float
    fold: int
    path: Path
    tta: int = 1  # the views its temperature was fitted on (see calibrated_views)
    backbone_id: str = ""  # hash of every weight but the classifier's
    metadata: MetadataSpec | None = None  # the metadata encoding of a fused model
    familiarity: Familiarity | None = None  # how unlike its training images an image is

    def encode(self, metadata: pd.DataFrame | None, n: int) -> np.ndarray | None:
        """This member's encoding of ``metadata`` (``None``: all missing); ``None`` for an
        image-only model."""
        if self.metadata is None:
            return None
        return encode_metadata(metadata, self.metadata, n)


def backbone_id(model: nn.Module) -> str:
    """Equal for models that differ only in their classifier (a linear probe's folds); for a
    fused model, in its metadata branch and classifier."""
    clf = model.get_classifier()
    if not isinstance(clf, nn.Linear):
        return f"unshared-{id(model)}"
    prefix = next(name for name, m in model.named_modules() if m is clf) + "."
    fused = isinstance(model, MetadataFusion)
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") if fused else not key.startswith(prefix):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def calibrated_views(ckpt: dict[str, Any]) -> int:
    """The TTA views a checkpoint's temperature was fitted on: its ``tta`` (a linear probe with
    flips: 3), or, for checkpoints written before it was recorded, the run's ``eval.tta``."""
    if "tta" in ckpt:
        return int(ckpt["tta"])
    return int((ckpt.get("config") or {}).get("eval", {}).get("tta", 1))


def checkpoint_paths(path: str | Path) -> list[Path]:
    """A checkpoint file, or every ``fold_*/best.pt`` of a run folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = RunFolder(path).best_checkpoints()
        if found:
            return found
        raise CheckpointError(f"{path}: no fold_*/best.pt in this run folder")
    raise CheckpointError(f"{path}: no such run folder or checkpoint")


def _recipe(ckpt_or_tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe_of(ckpt_or_tree).items() if k in RECIPE_SECTIONS}


def check_members(path: Path, loaded: Sequence[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse an ensemble whose checkpoints do not come from one run: each fold once and in its
    own ``fold_K`` folder, one backbone, one preprocessing, one recipe (the run's config)."""
    run = RunFolder(path) if path.is_dir() else None
    reference = _recipe(run.read_config_tree()) if run and run.config.is_file() else None
    first_path, first = loaded[0]
    seen: dict[int, Path] = {}

    def refuse(p: Path, why: str) -> CheckpointError:
        return CheckpointError(f"{p}: {why}; it does not belong to this ensemble, remove it")

    for p, ckpt in loaded:
        fold, folder = int(ckpt["fold"]), fold_number(p.parent)
        if run is not None and folder != fold:
            raise refuse(p, f"holds fold {fold} but sits in {p.parent.name}")
        if fold in seen:
            raise refuse(p, f"fold {fold} again (also in {seen[fold]})")
        seen[fold] = p
        for key, what in (("backbone", "backbone"), ("preprocessing", "preprocessing")):
            if ckpt[key] != first[key]:
                raise refuse(p, f"{what} {ckpt[key]} differs from {first_path}'s {first[key]}")
        own = _recipe(ckpt.get("config") or {})
        expected = reference if reference is not None else _recipe(first.get("config") or {})
        if own != expected:
            diff = sorted(k for k in RECIPE_SECTIONS if own.get(k) != expected.get(k))
            where = run.config if reference is not None and run else first_path
            raise refuse(p, f"trained with another recipe than {where} (sections {diff})")


def load_ensemble(path: str | Path, runtime: Runtime | None = None) -> list[Member]:
    """Load the fold models of a run folder (or one checkpoint) onto the runtime's device.

    The checkpoints must come from one run (see :func:`check_members`).
    """
    runtime = runtime or resolve_runtime("auto")
    path = Path(path)
    loaded = [(p, load_checkpoint(p)) for p in checkpoint_paths(path)]
    check_members(path, loaded)
    members = []
    for p, ckpt in loaded:
        model, spec = model_from_checkpoint(ckpt, runtime, p)
        tta = calibrated_views(ckpt)
        temperature = float(ckpt.get("temperature", 1.0))
        bid = backbone_id(model)
        meta = checkpoint_metadata(ckpt)
        fam = member_familiarity(p)
        members.append(Member(model, spec, temperature, int(ckpt["fold"]), p, tta, bid, meta, fam))
    classes = {m.spec.class_names for m in members}
    if len(classes) > 1:
        raise CheckpointError(f"{path}: fold models disagree on class names: {classes}")
    return members


def member_familiarity(checkpoint: Path) -> Familiarity | None:
    """The familiarity fitted for a checkpoint (``familiarity.safetensors`` beside it), if any."""
    path = checkpoint.parent / FAMILIARITY_FILE
    if not path.is_file():
        log.info("%s: no %s, so no unfamiliarity from it", checkpoint.parent, FAMILIARITY_FILE)
        return None
    return load_familiarity(path)


def ensemble_probs(
    members: Sequence[Member],
    images: dict[PreprocessSpec, np.ndarray],
    runtime: Runtime,
    tta: int = 1,
    batch_size: int = 32,
    metadata: pd.DataFrame | None = None,
) -> np.ndarray:
    """Mean calibrated probabilities over members and TTA views for prepared uint8 images
    (:func:`ensemble_outputs` without the unfamiliarity)."""
    return ensemble_outputs(members, images, runtime, tta, batch_size, metadata, False)[0]


def ensemble_outputs(
    members: Sequence[Member],
    images: dict[PreprocessSpec, np.ndarray],
    runtime: Runtime,
    tta: int = 1,
    batch_size: int = 32,
    metadata: pd.DataFrame | None = None,
    familiarity: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean calibrated probabilities (N, C) over members and TTA views for prepared uint8 images,
    and the ensemble's unfamiliarity (N,) (``None`` when no member has a familiarity, or
    ``familiarity=False``).

    Members that share a backbone (a linear probe's folds) run it once: the pooled features are
    computed once and each member applies only its own classifier. ``metadata`` (raw columns
    ``age``/``sex``/``localization``, a row per image; ``None`` = unknown) reaches the fused
    members, each encoding it its own way; image-only members ignore it.
    """
    groups: dict[tuple[PreprocessSpec, str], list[Member]] = {}
    for m in members:
        groups.setdefault((m.spec, m.backbone_id), []).append(m)
    total, unfamiliar, scored = None, None, 0
    settings = (runtime, tta, batch_size, metadata, familiarity)
    for (spec, _), group in groups.items():
        per_member, stats = _group_logits(group, images[spec], *settings)
        for m, logits in zip(group, per_member, strict=True):
            # Views are averaged in logit space, as when the temperature was fitted.
            z = torch.from_numpy(logits).double().mean(0) / m.temperature
            probs = torch.softmax(z, -1).numpy()
            total = probs if total is None else total + probs
            if stats is not None and m.familiarity is not None:
                u = m.familiarity.unfamiliarity(stats)
                unfamiliar, scored = (u if unfamiliar is None else unfamiliar + u), scored + 1
    assert total is not None
    return total / len(members), (None if unfamiliar is None else unfamiliar / scored)


def _group_logits(
    group: Sequence[Member],
    arr: np.ndarray,
    runtime: Runtime,
    tta: int,
    batch_size: int,
    metadata: pd.DataFrame | None,
    familiarity: bool,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each member's logits (V, N, C) of one backbone group, and the stage statistics of the
    identity view (``None`` unless a member of the group has a familiarity)."""
    first = group[0].model
    rows = np.arange(len(arr))
    spec = group[0].spec
    kw = {"batch_size": batch_size, "runtime": runtime, "norm": spec.normalization, "tta": tta}
    want = familiarity and any(m.familiarity is not None for m in group)
    capture = StageCapture(first) if want else None
    with capture or nullcontext():
        if len(group) == 1:
            meta = group[0].encode(metadata, len(arr))
            per_member = [predict_logits(first, arr, rows, metadata=meta, **kw)]
        else:
            features = lambda v, f=first: f.forward_head(f.forward_features(v), pre_logits=True)  # noqa: E731
            feats = torch.from_numpy(predict_logits(first, arr, rows, forward=features, **kw))
            per_member = [_head(feats, m, m.encode(metadata, len(arr))) for m in group]
    stats = capture.identity_numpy(tta) if capture is not None and len(arr) else None
    return per_member, stats


def _linear(feats: torch.Tensor, clf: nn.Module) -> np.ndarray:
    w, b = clf.weight.detach().float().cpu(), clf.bias.detach().float().cpu()
    return torch.nn.functional.linear(feats, w, b).numpy()


@torch.no_grad()
def _head(feats: torch.Tensor, member: Member, metadata: np.ndarray | None) -> np.ndarray:
    """A member's logits (V, N, C) from shared pooled features (V, N, D)."""
    model = member.model
    if not isinstance(model, MetadataFusion):
        return _linear(feats, model.get_classifier())
    device = model.missing.device
    meta = None if metadata is None else torch.from_numpy(metadata).to(device)
    views = [model.head(v.to(device), meta).float().cpu() for v in feats]
    return torch.stack(views).numpy()


# Prepared images per spec and their metadata rows -> (probabilities, unfamiliarity or None).
Outputs = Callable[
    [dict[PreprocessSpec, np.ndarray], pd.DataFrame | None], tuple[np.ndarray, np.ndarray | None]
]


ImageInput = str | Path | bytes | Image.Image | np.ndarray


def as_image_input(x: ImageInput) -> str | Path | bytes | Image.Image:
    """What the image loaders take: a uint8 array becomes a PIL image."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3):
            raise TypeError(
                f"an image array must be uint8 (H, W) or (H, W, 3), got {x.dtype} {x.shape}"
            )
        return Image.fromarray(x)
    return x


def image_name(x: ImageInput, i: int) -> str:
    """The predictions table's ``image``: the path as given, ``<image i>`` for one in memory."""
    return str(x) if isinstance(x, str | Path) else f"<image {i}>"


@dataclass
class Predictions:
    """What :func:`predict_images` returns."""

    probs: np.ndarray  # (N, C) calibrated probabilities; NaN rows for inputs that failed
    errors: dict[int, str]  # {index: error message} of the inputs that could not be decoded
    unfamiliarity: np.ndarray | None  # (N,), NaN where failed; None: no member has familiarity


def predict_images(
    inputs: Sequence[str | Path | bytes],
    members: Sequence[Member],
    runtime: Runtime,
    tta: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    metadata: pd.DataFrame | None = None,
    familiarity: bool = True,
    outputs: Outputs | None = None,
    workers: int | None = None,
) -> Predictions:
    """Probabilities, errors and unfamiliarity of each image (see :class:`Predictions`).

    ``tta=None`` uses the views the run calibrated on (the checkpoint's ``tta``). ``metadata``:
    a row per image with any of ``age``, ``sex``, ``localization`` (missing values allowed),
    used by models fused with metadata; ``None``: no metadata for any image. ``outputs``
    replaces :func:`ensemble_outputs` on each chunk of prepared images (another backend, e.g. an
    ONNX graph). ``workers``: decoding threads (default :func:`decode_workers`). See
    :func:`predict_prepared`.
    """
    if not members:
        raise ValueError("no models to predict with")
    tta = members[0].tta if tta is None else tta
    scored = familiarity and any(m.familiarity is not None for m in members)

    def run(stacked: dict[PreprocessSpec, np.ndarray], meta: pd.DataFrame | None) -> Any:
        return ensemble_outputs(members, stacked, runtime, tta, batch_size, meta, scored)

    specs = list(dict.fromkeys(m.spec for m in members))
    n_classes = len(members[0].spec.class_names)
    return predict_prepared(
        inputs, specs, n_classes, outputs or run, scored, batch_size, progress, metadata, workers
    )


def predict_prepared(
    inputs: Sequence[str | Path | bytes],
    specs: Sequence[PreprocessSpec],
    n_classes: int,
    outputs: Outputs,
    scored: bool,
    batch_size: int = 32,
    progress: bool = True,
    metadata: pd.DataFrame | None = None,
    workers: int | None = None,
) -> Predictions:
    """Each image prepared for each of ``specs`` and given, a chunk at a time, to ``outputs``
    (the engine: probabilities (N, ``n_classes``) and, when ``scored``, unfamiliarity), with
    its rows of ``metadata``. One bad file never costs the predictions of the others. Images
    are decoded and prepared by a thread pool (PIL releases the GIL while it decodes and
    resizes): ``workers`` of them, default :func:`decode_workers`."""
    out = np.full((len(inputs), n_classes), np.nan)
    unfamiliar = np.full(len(inputs), np.nan) if scored else None
    errors: dict[int, str] = {}
    chunk = max(batch_size * 4, 64)
    bar = tqdm(total=len(inputs), desc="predict", disable=not progress)
    with ThreadPoolExecutor(workers or decode_workers()) as pool:
        for start in range(0, len(inputs), chunk):
            idx = list(range(start, min(start + chunk, len(inputs))))
            stacked, ok = _prepare_chunk(inputs, idx, list(specs), errors, pool)
            if ok:
                meta = None if metadata is None else metadata.iloc[ok].reset_index(drop=True)
                probs, u = outputs(stacked, meta)
                out[ok] = probs
                if unfamiliar is not None and u is not None:
                    unfamiliar[ok] = u
            bar.update(len(idx))
    bar.close()
    return Predictions(out, errors, unfamiliar)


DECODE_WORKERS_ENV = "SKINLESION_DECODE_WORKERS"


def decode_workers() -> int:
    """Threads that decode and prepare images: ``$SKINLESION_DECODE_WORKERS`` if set, else the
    CPUs this process may use, at most 8."""
    raw = os.environ.get(DECODE_WORKERS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{DECODE_WORKERS_ENV}={raw!r}: expected a whole number >= 1")
        return int(raw)
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _prepare_one(
    image: str | Path | bytes, specs: list[PreprocessSpec]
) -> dict[PreprocessSpec, np.ndarray] | ImageDecodeError:
    try:
        return {s: prepare_with_spec(image, s) for s in specs}
    except ImageDecodeError as err:
        return err


def _prepare_chunk(
    inputs: Sequence[str | Path | bytes],
    idx: list[int],
    specs: list[PreprocessSpec],
    errors: dict[int, str],
    pool: Executor,
) -> tuple[dict[PreprocessSpec, np.ndarray], list[int]]:
    """The inputs ``idx`` prepared for each spec (on ``pool``), and the indices that decoded;
    the others' errors go into ``errors``."""
    prepared: dict[PreprocessSpec, list[np.ndarray]] = {s: [] for s in specs}
    ok: list[int] = []
    results = pool.map(lambda i: _prepare_one(inputs[i], specs), idx)
    for i, arrays in zip(idx, results, strict=True):
        if isinstance(arrays, ImageDecodeError):
            errors[i] = str(arrays)
            log.error("%s", arrays)
            continue
        ok.append(i)
        for s in specs:
            prepared[s].append(arrays[s])
    return ({s: np.stack(v) for s, v in prepared.items()} if ok else {}), ok
