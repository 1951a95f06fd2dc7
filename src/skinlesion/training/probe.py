"""The CPU path that trains in minutes: frozen pretrained backbone, linear head per fold.

Each image's embedding (the backbone's pooled features, optionally averaged over flips) is
computed once and cached on disk, keyed by backbone, weights, size and the image cache it was
computed from. A multinomial linear head is then fitted per fold on the embeddings with the same
folds and class weighting as fine-tuning, its L2 strength chosen on the fold's validation loss.
The head is written into the backbone's own classifier, so the checkpoint is an ordinary model
and ``predict``/``evaluate`` work unchanged.

With ``model.metadata`` the head is linear on ``[embedding, encoded metadata]`` (a
:class:`~skinlesion.models.fusion.MetadataFusion` without a metadata MLP), the encoding fitted on
the fold's training images. Metadata dropout becomes data: every training image is added a second
time with the all-missing encoding, the copies weighted ``model.metadata_drop`` and the originals
``1 - model.metadata_drop``, which is the expected loss of dropping each vector at random with
that probability; the head then also works without metadata.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from skinlesion.core.config import Config, config_to_dict
from skinlesion.core.run_folder import FoldFolder, RunFolder
from skinlesion.core.runtime import Runtime
from skinlesion.data.augment import tta_views
from skinlesion.data.cache import default_cache_dir
from skinlesion.data.preprocess import Normalization
from skinlesion.data.sampling import sample_weights
from skinlesion.data.tabular import MetadataSpec, encode_metadata, missing_vector
from skinlesion.inference.forward import prepare
from skinlesion.models.checkpoint import atomic_torch_save, make_checkpoint
from skinlesion.models.factory import fuse_metadata
from skinlesion.training.builders import (
    build_criterion,
    build_run_model,
    model_kwargs,
    run_metadata_spec,
)
from skinlesion.training.outputs import (
    close_fold,
    fold_temperature,
    val_figures,
    write_metrics_rows,
)
from skinlesion.training.run_data import RunData
from skinlesion.training.tracking import Tracker

log = logging.getLogger(__name__)

L2_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
PROBE_FLIP_VIEWS = 3  # identity, hflip, vflip: the first 3 of ``augment.tta_views``


def embedding_key(backbone: str, weights_id: str, image_cache: Path, flips: bool) -> str:
    text = f"v1|{backbone}|{weights_id}|{image_cache.resolve()}|{flips}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    norm: Normalization,
    runtime: Runtime,
    batch_size: int = 64,
    flips: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Pooled pre-logit features (N, D) for every cached image, averaged over h/v flips."""
    model.eval()
    out = []
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc="embedding", disable=not progress):
        rows = np.arange(start, min(start + batch_size, n))
        batch = (
            images[rows]
            if isinstance(images, torch.Tensor)
            else torch.from_numpy(np.ascontiguousarray(images[rows]))
        )
        x = prepare(batch.to(runtime.device), norm, runtime)
        views = tta_views(x, PROBE_FLIP_VIEWS) if flips else [x]
        with runtime.autocast():
            feats = [model.forward_head(model.forward_features(v), pre_logits=True) for v in views]
        out.append(torch.stack(feats).float().mean(0).cpu())
    return torch.cat(out).numpy()


def cached_embeddings(
    model: nn.Module, cfg: Config, data: RunData, runtime: Runtime, progress: bool = True
) -> np.ndarray:
    """Embeddings from disk if this backbone, weights, size and data were embedded before."""
    flips = cfg.train.probe_flips
    weights_id = cfg.model.weights or ("imagenet" if cfg.model.pretrained else "random")
    key = embedding_key(cfg.model.backbone, weights_id, data.cache_root, flips)
    folder = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    path = folder / "embeddings" / f"{key}.npy"
    if path.is_file():
        emb = np.load(path)
        if len(emb) == len(data.images):
            log.info("embeddings from %s", path)
            return emb
    t0 = time.perf_counter()
    emb = compute_embeddings(
        model, data.images, data.spec.normalization, runtime, flips=flips, progress=progress
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    log.info("embedded %d images in %.0fs -> %s", len(emb), time.perf_counter() - t0, path)
    return emb


def fit_linear_head(
    x: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray,
    l2: float,
    criterion: nn.Module,
    n_classes: int,
    max_iter: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted multinomial head on standardised features with L-BFGS; returns (W, b) in the
    original feature space, so it drops straight into the model's classifier.

    ``criterion`` is the run's loss built with ``reduction="none"`` (one value per sample).
    """
    xt = torch.from_numpy(x).double()
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-6)
    z = (xt - mu) / sd
    yt = torch.tensor(y, dtype=torch.long)  # a copy: y may be a read-only view (pandas)
    wt = torch.from_numpy(sample_weight).double()
    wt = wt / wt.mean()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    per_sample = criterion.to(torch.float64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (per_sample(z @ w.T + b, yt) * wt).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_orig = (w / sd).detach()
    b_orig = (b - (w * (mu / sd)).sum(1)).detach()
    return w_orig.numpy(), b_orig.numpy()


@dataclass
class HeadFit:
    """The head of one L2 strength: weights, its validation figures and logits."""

    l2: float
    index: int  # position in the grid, from 1 (the "epoch" of metrics.csv)
    w: np.ndarray
    b: np.ndarray
    figs: dict[str, float]
    logits: np.ndarray  # validation logits, float32


@dataclass
class ProbeSet:
    """A fold's head inputs: training features, labels and loss weights; validation ones."""

    x_tr: np.ndarray
    y_tr: np.ndarray
    w_tr: np.ndarray
    x_va: np.ndarray
    y_va: np.ndarray


def probe_set(
    cfg: Config,
    emb: np.ndarray,
    tr: pd.DataFrame,
    va: pd.DataFrame,
    n_classes: int,
    metadata: MetadataSpec | None = None,
) -> ProbeSet:
    """Embeddings of the fold's images (joined with their encoded ``metadata``, and the
    all-missing copies of the training images; see the module docstring)."""
    x_tr, x_va = emb[tr["row"].to_numpy()], emb[va["row"].to_numpy()]
    y_tr, y_va = tr["label"].to_numpy(), va["label"].to_numpy()
    # The weighted sampler's weights, applied to the loss instead of to drawing.
    w_tr = (
        sample_weights(y_tr, n_classes, cfg.sampler.power)
        if cfg.sampler.name == "weighted"
        else np.ones(len(y_tr))
    )
    if metadata is None:
        return ProbeSet(x_tr, y_tr, w_tr, x_va, y_va)
    x_va = np.concatenate([x_va, encode_metadata(va, metadata)], axis=1)
    joined = np.concatenate([x_tr, encode_metadata(tr, metadata)], axis=1)
    p = cfg.model.metadata_drop
    if p == 0:
        return ProbeSet(joined, y_tr, w_tr, x_va, y_va)
    dropped = np.concatenate([x_tr, np.tile(missing_vector(metadata), (len(x_tr), 1))], axis=1)
    return ProbeSet(
        np.concatenate([joined, dropped]),
        np.concatenate([y_tr, y_tr]),
        np.concatenate([w_tr * (1 - p), w_tr * p]),
        x_va,
        y_va,
    )


def _sweep_l2(
    cfg: Config, s: ProbeSet, n_classes: int, fold: int
) -> tuple[list[dict[str, Any]], HeadFit]:
    """Fit a head for every strength of :data:`L2_GRID`; the metrics rows and the best fit."""
    x_tr, y_tr, weights, x_va, y_va = s.x_tr, s.y_tr, s.w_tr, s.x_va, s.y_va
    criterion = build_criterion(cfg.loss)
    per_sample = build_criterion(cfg.loss, reduction="none")
    rows: list[dict[str, Any]] = []
    best: HeadFit | None = None
    for i, l2 in enumerate(L2_GRID, 1):
        t0 = time.perf_counter()
        w, b = fit_linear_head(x_tr, y_tr, weights, l2, per_sample, n_classes)
        logits = (x_va @ w.T + b).astype(np.float32)
        figs = val_figures(criterion, logits, y_va)
        logits_tr = torch.from_numpy(x_tr @ w.T + b).float()
        train_loss = float(criterion(logits_tr, torch.tensor(y_tr, dtype=torch.long)))
        seconds = time.perf_counter() - t0
        rows.append({"epoch": i, "train_loss": train_loss, **figs, "lr": l2, "seconds": seconds})
        if best is None or figs["val_loss"] < best.figs["val_loss"]:
            best = HeadFit(l2, i, w, b, figs, logits)
        log.info(
            "fold %d probe l2=%g: val_loss %.4f bal_acc %.3f",
            fold,
            l2,
            figs["val_loss"],
            figs["val_balanced_accuracy"],
        )
    assert best is not None
    return rows, best


def probe_fold(
    cfg: Config,
    data: RunData,
    emb: np.ndarray,
    fold: int,
    run_dir: Path,
    backbone: nn.Module,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Fit the head of one fold over the L2 grid; keep the lowest validation loss. The grid's
    rows (one "epoch" per L2 value), and the fold's end, go to ``tracker``."""
    folder = RunFolder(run_dir).fold(fold)
    folder.root.mkdir(parents=True, exist_ok=True)
    table = data.table
    tr, va = table[table["fold"] != fold], table[table["fold"] == fold]
    metadata = run_metadata_spec(cfg, tr)
    n_classes = len(data.spec.class_names)
    rows, best = _sweep_l2(cfg, probe_set(cfg, emb, tr, va, n_classes, metadata), n_classes, fold)
    write_metrics_rows(folder.metrics, rows)
    for row in rows if tracker is not None else ():
        tracker.log_epoch(fold, row)
    if metadata is not None:
        # Each fold's head joins its own encoding; the shared backbone stays untouched.
        backbone = fuse_metadata(copy.deepcopy(backbone), metadata, hidden=0)
    classifier = backbone.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(best.w).float())
        classifier.bias.copy_(torch.from_numpy(best.b).float())
    logits = best.logits.astype(np.float64)
    temperature = fold_temperature(logits, va["label"].to_numpy(), cfg.eval.calibrate)
    _save_probe_fold(cfg, data, backbone, folder, best, temperature, metadata)
    summary = {
        "fold": fold,
        "best_epoch": best.index,
        "probe_l2": best.l2,
        "metrics": best.figs,
        "temperature": temperature,
        "n_train": len(tr),
        "n_val": len(va),
    }
    close_fold(folder, summary, va, logits, data.spec.class_names, tracker)
    return summary


def _save_probe_fold(
    cfg: Config,
    data: RunData,
    backbone: nn.Module,
    folder: FoldFolder,
    best: HeadFit,
    temperature: float,
    metadata: MetadataSpec | None = None,
) -> None:
    ckpt = make_checkpoint(
        backbone,
        backbone=cfg.model.backbone,
        spec=data.spec,
        fold=folder.number,
        epoch=best.index,
        metrics=best.figs,
        config=config_to_dict(cfg),
        temperature=temperature,
        model_kwargs=model_kwargs(cfg.model),
        metadata=metadata,
        # The embeddings averaged the identity and its h/v flips, the first 3 TTA views: the
        # temperature was fitted on exactly what ``predict`` gives with tta=3.
        extra={"probe_l2": best.l2, "tta": PROBE_FLIP_VIEWS if cfg.train.probe_flips else 1},
    )
    atomic_torch_save(ckpt, folder.best)


def run_linear_probe(
    cfg: Config,
    data: RunData,
    run_dir: Path,
    runtime: Runtime,
    folds: list[int],
    resume: bool = False,
    progress: bool = True,
    tracker: Tracker | None = None,
) -> None:
    """Embed every image once, then fit and save one linear head per fold."""
    backbone = build_run_model(cfg, data.spec, runtime)
    if not cfg.model.pretrained and cfg.model.weights is None:
        log.warning("linear probe on a randomly initialised backbone: expect chance level")
    emb = cached_embeddings(backbone, cfg, data, runtime, progress)
    # Checkpoints hold plain contiguous CPU tensors.
    backbone = backbone.cpu().to(memory_format=torch.contiguous_format)
    run = RunFolder(run_dir)
    for fold in folds:
        if resume and run.fold(fold).finished:
            log.info("fold %d already complete, skipping", fold)
            continue
        probe_fold(cfg, data, emb, fold, run_dir, backbone, tracker)
