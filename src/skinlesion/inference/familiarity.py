"""Familiarity: how far an image's features lie from those of the training images, the modality
check behind ``refer``'s reason "unlike the training images".

Method, **feature-statistics Mahalanobis**, after Lee, Lee, Lee & Shin, "A simple unified
framework for detecting out-of-distribution samples and adversarial attacks", NeurIPS 2018
(Mahalanobis distances to Gaussians fitted on training features, at several layers, combined):

1. Features: for each of the backbone's last three stages (timm ``blocks[-3:]``; Lite0's blocks 4,
   5 and 6), the per-channel spatial mean and standard deviation of its output (Lite0: 224, 384
   and 640 values), of the identity view only (how they were fitted; so the score does not
   change with ``--tta``).
2. One Gaussian per stage, class-agnostic, fitted on training images, its covariance shrunk 10%
   towards its mean diagonal (``0.9 cov + 0.1 trace(cov)/D I``); the squared Mahalanobis distance
   per stage.
3. Each stage's distance normalised as ``(d - median) / (q99 - median)``, median and 99th
   percentile taken on calibration images (training images not used for the fit); the score is
   the maximum over the stages.
4. The threshold: the 99th percentile of the scores of held-out in-distribution images (a fold's
   validation images). ``unfamiliarity`` = score / threshold, so above 1 means unfamiliar.

Why these stages (fold-0 Lite0 at 192 px; 1,000 held-out HAM10000 images, ISIC 2017 test, 62
images that are not dermoscopy): the penultimate embedding alone refers 52% of the
non-dermoscopy images at its held-out 97.5% quantile; earlier stages flag 35-90% of ISIC 2017;
the last three stages refer 1.0% of held-out HAM10000, 5.7% of ISIC 2017 test and 100% of the
non-dermoscopy images.

Stored as safetensors (float32, no pickle): ``fold_K/familiarity.safetensors`` in a run folder,
``familiarity.safetensors`` in a packaged model (keys prefixed per member as the weights are).

Example::

    with StageCapture(model) as cap:
        model(x)
    fam = fit_familiarity(train_stats, calibration_stats, heldout_stats)
    fam.unfamiliarity([s.numpy() for s in cap.identity(1)])
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skinlesion.core.errors import CheckpointError, DataError
from skinlesion.inference.refer import UNFAMILIAR_QUANTILE
from skinlesion.models.fusion import MetadataFusion

FAMILIARITY_FILE = "familiarity.safetensors"
FAMILIARITY_FORMAT = "skinlesion-familiarity"
FAMILIARITY_VERSION = 1
METHOD = "feature-statistics Mahalanobis (Lee et al. 2018), last 3 stages, max of normalised"
N_STAGES = 3
SHRINKAGE = 0.1
CALIBRATION_QUANTILE = 0.99
MAX_HELDOUT_SCORES = 2000


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The last three stages of a timm EfficientNet-style backbone (``blocks[-3:]``; a fused
    model's ``backbone``); a :class:`CheckpointError` for a backbone without them."""
    net = model.backbone if isinstance(model, MetadataFusion) else model
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) < N_STAGES:
        raise CheckpointError(
            f"{type(net).__name__}: familiarity needs a backbone with at least {N_STAGES} stages "
            "in timm's `blocks` (EfficientNet, MobileNet and the like); this one has none"
        )
    return list(blocks[-N_STAGES:])


def stage_statistics(output: torch.Tensor) -> torch.Tensor:
    """(N, 2C) per-channel spatial mean and (population) standard deviation of (N, C, H, W)."""
    x = output.float()
    mean = x.mean(dim=(2, 3))
    std = (x - mean[:, :, None, None]).pow(2).mean(dim=(2, 3)).sqrt()
    return torch.cat([mean, std], dim=1)


class StageCapture:
    """Forward hooks on a model's :func:`feature_stages` that keep each call's
    :func:`stage_statistics` while the ``with`` block runs (also inside an ONNX trace).

    Calls come in groups of ``views`` for each batch, identity first (as
    :func:`~skinlesion.inference.forward.predict_logits` and the ONNX graph run the TTA views), so
    :meth:`identity` picks every ``views``-th call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.stages = feature_stages(model)
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.stages]
        self._handles: list[Any] = []

    def __enter__(self) -> StageCapture:
        for i, stage in enumerate(self.stages):
            self._handles.append(stage.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Any:
        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.calls[i].append(stage_statistics(output))

        return keep

    def identity(self, views: int) -> list[torch.Tensor]:
        """Per stage, the (N, D) statistics of the identity view of every batch."""
        if any(len(c) % views for c in self.calls):
            raise RuntimeError(f"{[len(c) for c in self.calls]} calls are not groups of {views}")
        return [torch.cat(c[::views]) if c else torch.zeros(0, 0) for c in self.calls]

    def identity_numpy(self, views: int) -> list[np.ndarray]:
        return [t.detach().cpu().double().numpy() for t in self.identity(views)]


@dataclass(frozen=True)
class StageGaussian:
    """One stage's fitted Gaussian and the normalisation of its squared distances."""

    mean: np.ndarray  # (D,) float32
    whitener: np.ndarray  # (D, D) float32: squared distance = |(x - mean) @ whitener|^2
    median: float  # of the calibration images' squared distances
    q99: float  # their CALIBRATION_QUANTILE quantile

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``x`` (N, D), in float64."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) @ self.whitener.astype(np.float64)
        return (z * z).sum(axis=1)

    def normalised(self, x: np.ndarray) -> np.ndarray:
        return (self.distance(x) - self.median) / (self.q99 - self.median)


@dataclass
class Familiarity:
    """A fitted familiarity of one model (see the module's docstring)."""

    stages: list[StageGaussian]
    threshold: float  # held-out UNFAMILIAR_QUANTILE quantile of :meth:`score`
    heldout_scores: np.ndarray  # up to MAX_HELDOUT_SCORES held-out scores, float32
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted (plain values)

    @property
    def dims(self) -> list[int]:
        return [len(s.mean) for s in self.stages]

    def _check(self, stats: Sequence[np.ndarray]) -> None:
        got = [int(np.shape(s)[1]) if np.ndim(s) == 2 else -1 for s in stats]
        if got != self.dims:
            raise CheckpointError(
                f"familiarity fitted on stage features of sizes {self.dims}, the model gives "
                f"{got}: it belongs to another model; fit it again (`skinlesion fit-familiarity`)"
            )

    def score(self, stats: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) the maximum over stages of the normalised squared distances; above
        :attr:`threshold` is unfamiliar."""
        self._check(stats)
        per_stage = [g.normalised(x) for g, x in zip(self.stages, stats, strict=True)]
        return np.max(np.stack(per_stage), axis=0)

    def unfamiliarity(self, stats: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) :meth:`score` / :attr:`threshold`: above 1 is unfamiliar."""
        return self.score(stats) / self.threshold

    def heldout_unfamiliarity(self) -> np.ndarray:
        return self.heldout_scores.astype(np.float64) / self.threshold

    def tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {}
        for i, g in enumerate(self.stages):
            out[f"{prefix}stage{i}.mean"] = g.mean
            out[f"{prefix}stage{i}.whitener"] = g.whitener
        out[f"{prefix}normalisation"] = np.asarray([[g.median, g.q99] for g in self.stages])
        out[f"{prefix}threshold"] = np.asarray([self.threshold])
        out[f"{prefix}heldout_scores"] = self.heldout_scores
        # safetensors writes the buffer as it lies: C order, or a transpose is read back.
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, np.ndarray], prefix: str, info: dict[str, Any]
    ) -> Familiarity:
        norm = tensors[f"{prefix}normalisation"]
        stages = [
            StageGaussian(
                tensors[f"{prefix}stage{i}.mean"],
                tensors[f"{prefix}stage{i}.whitener"],
                float(norm[i, 0]),
                float(norm[i, 1]),
            )
            for i in range(len(norm))
        ]
        threshold = float(tensors[f"{prefix}threshold"][0])
        return cls(stages, threshold, tensors[f"{prefix}heldout_scores"], info)


def _whitener(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitener of the shrunk covariance of ``x`` (N, D), computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    r = x - mean
    cov = r.T @ r / len(x)
    d = cov.shape[0]
    trace = float(np.trace(cov))
    if not trace > 0:
        raise DataError("familiarity", ["the stage features do not vary over the images"])
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * trace / d * np.eye(d)
    # cov = L L^T, so (x - m)^T cov^-1 (x - m) = |L^-1 (x - m)|^2 = |(x - m) @ L^-T|^2.
    lower = np.linalg.cholesky(cov)
    return mean, np.ascontiguousarray(np.linalg.inv(lower).T)


def _f32(x: float) -> float:
    """``x`` as it is stored (float32), so a fitted familiarity scores as its file does."""
    return float(np.float32(x))


def _stage(fit: np.ndarray, calibration: np.ndarray) -> StageGaussian:
    mean, whitener = _whitener(fit)
    g = StageGaussian(mean.astype(np.float32), whitener.astype(np.float32), 0.0, 1.0)
    d = g.distance(calibration)  # with the float32 values that are stored
    median, q99 = _f32(np.median(d)), _f32(np.quantile(d, CALIBRATION_QUANTILE))
    if not q99 > median:
        raise DataError("familiarity", ["the calibration images' distances do not spread"])
    return StageGaussian(g.mean, g.whitener, median, q99)


def fit_familiarity(
    fit: Sequence[np.ndarray],
    calibration: Sequence[np.ndarray],
    heldout: Sequence[np.ndarray],
    info: dict[str, Any] | None = None,
    seed: int = 0,
) -> Familiarity:
    """Fit on per-stage statistics (a list of (N, D) arrays each) of training images (``fit``),
    other training images (``calibration``: the normalisation) and held-out in-distribution
    images (``heldout``: the threshold)."""
    sizes = {"fit": fit, "calibration": calibration, "heldout": heldout}
    problems = [
        f"{name}: {len(s[0]) if len(s) else 0} image(s), need at least 2"
        for name, s in sizes.items()
        if not len(s) or len(s[0]) < 2
    ]
    if len({len(fit), len(calibration), len(heldout)}) > 1:
        problems.append("fit, calibration and held-out statistics differ in their stages")
    if problems:
        raise DataError("familiarity", problems)
    stages = [_stage(f, c) for f, c in zip(fit, calibration, strict=True)]
    fam = Familiarity(stages, 1.0, np.zeros(0, np.float32))
    held = fam.score(heldout)
    threshold = _f32(np.quantile(held, UNFAMILIAR_QUANTILE))
    if not threshold > 0:
        raise DataError("familiarity", [f"held-out threshold {threshold:.3g} is not positive"])
    if len(held) > MAX_HELDOUT_SCORES:
        rng = np.random.default_rng(seed)
        held = np.sort(rng.choice(held, MAX_HELDOUT_SCORES, replace=False))
    counts = {"n_fit": len(fit[0]), "n_calibration": len(calibration[0])}
    info = {**counts, "n_heldout": len(heldout[0]), **(info or {})}
    return Familiarity(stages, threshold, held.astype(np.float32), info)


def save_familiarities(path: str | Path, members: Mapping[str, Familiarity]) -> Path:
    """Write ``{prefix: familiarity}`` (prefix ``""`` for a run folder's single member,
    ``fold0.`` ... in a packaged model) as one safetensors file, atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    for prefix, fam in members.items():
        tensors.update(fam.tensors(prefix))
    meta = {
        "format": FAMILIARITY_FORMAT,
        "format_version": str(FAMILIARITY_VERSION),
        "method": METHOD,
        "shrinkage": str(SHRINKAGE),
        "calibration_quantile": str(CALIBRATION_QUANTILE),
        "threshold_quantile": str(UNFAMILIAR_QUANTILE),
        "members": json.dumps({p: f.info for p, f in members.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def load_familiarities(path: str | Path) -> dict[str, Familiarity]:
    """``{prefix: familiarity}`` of a file written by :func:`save_familiarities`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable familiarity file ({err})") from err
    if meta.get("format") != FAMILIARITY_FORMAT:
        raise CheckpointError(f"{path}: not a skinlesion familiarity file")
    if int(meta.get("format_version", "0")) > FAMILIARITY_VERSION:
        raise CheckpointError(f"{path}: familiarity format newer than this skinlesion; upgrade")
    infos = json.loads(meta.get("members", "{}"))
    return {p: Familiarity.from_tensors(tensors, p, info) for p, info in infos.items()}


def load_familiarity(path: str | Path) -> Familiarity:
    """The single member of a run folder's familiarity file."""
    members = load_familiarities(path)
    if list(members) != [""]:
        raise CheckpointError(f"{path}: holds members {sorted(members)}, expected one")
    return members[""]


class FamiliarityScorer(nn.Module):
    """:meth:`Familiarity.unfamiliarity` as a module of float32 tensors, for the ONNX graph."""

    def __init__(self, fam: Familiarity) -> None:
        super().__init__()
        self.n = len(fam.stages)
        for i, g in enumerate(fam.stages):
            self.register_buffer(f"mean{i}", torch.from_numpy(g.mean.astype(np.float32)))
            self.register_buffer(f"whitener{i}", torch.from_numpy(g.whitener.astype(np.float32)))
        median = torch.tensor([g.median for g in fam.stages], dtype=torch.float32)
        scale = torch.tensor([g.q99 - g.median for g in fam.stages], dtype=torch.float32)
        self.register_buffer("median", median)
        self.register_buffer("scale", scale)
        self.threshold = float(fam.threshold)

    def forward(self, stats: list[torch.Tensor]) -> torch.Tensor:
        scores = []
        for i, x in enumerate(stats):
            z = (x - getattr(self, f"mean{i}")) @ getattr(self, f"whitener{i}")
            scores.append(((z * z).sum(dim=1) - self.median[i]) / self.scale[i])
        return torch.stack(scores).amax(dim=0) / self.threshold
