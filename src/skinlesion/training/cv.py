"""Cross-validated training: data -> folds -> cache -> one model per fold, resumable.

A run folder explains itself::

    output_dir/
      config.yaml  folds.csv  environment.json  train.log
      fold_K/metrics.csv   per-epoch train/val figures
      fold_K/best.pt       lowest validation loss (calibrated temperature added at the end)
      fold_K/last.pt       full training state for --resume
      fold_K/val_predictions.csv  fold_K/summary.json
      oof_predictions.csv  oof_metrics.json  report.md  plots/
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from skinlesion.core.config import Config, config_to_dict, save_config
from skinlesion.core.labels import CLASSES
from skinlesion.core.runtime import (
    DistInfo,
    Runtime,
    environment_info,
    init_distributed,
    resolve_runtime,
    seed_everything,
)
from skinlesion.data.augment import AugmentConfig
from skinlesion.data.cache import build_cache
from skinlesion.data.folds import align_folds, check_folds, make_folds, read_folds, save_folds
from skinlesion.data.metadata import load_ham10000, subset_by_lesion
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.sampling import draw_indices
from skinlesion.evaluation.calibration import fit_temperature
from skinlesion.inference.engine import ImageSource, predict_logits
from skinlesion.models.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from skinlesion.models.factory import build_model, default_spec
from skinlesion.models.freezing import freeze_stages
from skinlesion.training.engine import train_one_epoch
from skinlesion.training.losses import build_loss
from skinlesion.training.outputs import (
    model_kwargs,
    val_figures,
    write_metrics_rows,
    write_val_predictions,
)
from skinlesion.training.probe import run_linear_probe

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """Everything the folds share: table (with ``fold`` and ``label``), cached images, spec."""

    table: pd.DataFrame
    images: ImageSource
    spec: PreprocessSpec
    cache_root: Path


def augment_config(cfg: Config) -> AugmentConfig:
    a = cfg.augment
    return AugmentConfig(
        hflip=a.hflip,
        vflip=a.vflip,
        rotation=a.rotation,
        scale=tuple(a.scale),
        brightness=a.brightness,
        contrast=a.contrast,
        saturation=a.saturation,
        hue=a.hue,
        p_colour=a.p_colour,
        aspect=tuple(a.aspect),
        vignette=a.vignette,
    )


def load_run_data(cfg: Config, folds_out: Path | None, progress: bool = True) -> RunData:
    """Validate the data, make or read the folds, and build (or reuse) the image cache."""
    if cfg.data.root is None:
        raise ValueError(
            "data.root is not set: point it at a HAM10000 folder "
            "(or run `skinlesion download --dest DIR`)"
        )
    df = load_ham10000(cfg.data.root, cfg.data.metadata)
    df = subset_by_lesion(df, cfg.data.max_images, cfg.cv.seed)
    if cfg.cv.folds_file:
        folds = read_folds(Path(cfg.cv.folds_file))
        df = align_folds(df, folds, cfg.cv.folds_file)
    else:
        folds = make_folds(df, cfg.cv.n_folds, cfg.cv.seed, grouped=cfg.cv.grouped)
        df = df.merge(folds[["image_id", "fold"]], on="image_id", validate="one_to_one")
    if cfg.cv.grouped:
        check_folds(df)
    else:
        log.warning(
            "cv.grouped=false: images of one lesion may sit in several folds; the "
            "metrics of this run are inflated by leakage"
        )
    if folds_out is not None:
        save_folds(df, folds_out)
    df = df.sort_values("image_id").reset_index(drop=True)
    df["label"] = df["dx"].map({c: i for i, c in enumerate(CLASSES)}).astype(int)
    spec = default_spec(
        cfg.model.backbone, cfg.data.image_size, cfg.data.interpolation, cfg.data.colour_constancy
    )
    cache = build_cache(
        df["image_id"].tolist(),
        df["path"].tolist(),
        cfg.data.image_size,
        Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
        spec.interpolation,
        spec.colour_constancy,
        progress=progress,
    )
    df["row"] = cache.rows(df["image_id"].tolist())
    return RunData(table=df, images=cache.images, spec=spec, cache_root=cache.root)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.train.lr, momentum=0.9, nesterov=True, weight_decay=cfg.train.weight_decay
    )


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """Per-step cosine with linear warm-up, per-epoch plateau, or none."""
    if cfg.train.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(cfg.train.warmup_epochs * steps_per_epoch, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.scheduler == "none":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [r for r in csv.DictReader(fh) if int(r["epoch"]) <= upto_epoch]


def validation_logits(
    model: nn.Module,
    data: RunData,
    rows: np.ndarray,
    batch_size: int,
    runtime: Runtime,
    tta: int = 1,
) -> np.ndarray:
    """Logits (V, N, C) for ``rows``, computed in shards across ranks when distributed."""
    d = runtime.dist
    mine = rows[d.rank :: d.world_size]
    logits = predict_logits(
        model, data.images, mine, batch_size, runtime, data.spec.mean, data.spec.std, tta=tta
    )
    if not d.enabled:
        return logits
    parts: list[Any] = [None] * d.world_size
    dist.all_gather_object(parts, logits)
    out = np.zeros((tta, len(rows), parts[0].shape[-1]), dtype=np.float32)
    for r, part in enumerate(parts):
        out[:, r :: d.world_size] = part
    return out


@dataclass
class FoldTrainer:
    """Everything that changes while one fold trains, and what --resume restores."""

    model: nn.Module
    train_model: nn.Module  # model, or its DDP / compiled wrapper
    frozen: list[nn.Module]
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    gen: torch.Generator  # sampler draws (same on every rank)
    aug_gen: torch.Generator  # augmentation draws (per rank)
    steps: int  # optimizer steps per epoch on this rank
    state: dict[str, Any]

    def snapshot(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.gen.get_state(),
            "aug_generator": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout / drop-path draws
            "state": self.state,
        }

    def restore(self, path: Path) -> None:
        last = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(last["state_dict"])
        self.optimizer.load_state_dict(last["optimizer"])
        self.scheduler.load_state_dict(last["scheduler"])
        if self.scaler is not None and last.get("scaler"):
            self.scaler.load_state_dict(last["scaler"])
        self.gen.set_state(last["generator"])
        self.aug_gen.set_state(last["aug_generator"])
        torch.set_rng_state(last["torch_rng"])
        self.state = dict(last["state"])


def build_trainer(cfg: Config, fold: int, n_train: int, runtime: Runtime) -> FoldTrainer:
    """Model (pretrained, frozen stages, DDP/compile), loss, optimizer, schedule, generators."""
    seed_everything(cfg.seed + fold, cfg.train.deterministic)
    model = build_model(
        cfg.model.backbone,
        len(CLASSES),
        cfg.model.pretrained,
        cfg.model.weights,
        **model_kwargs(cfg),
    ).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = freeze_stages(model, cfg.train.freeze_stages)
    train_model: nn.Module = model
    if runtime.dist.enabled:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    per_epoch = cfg.train.steps_per_epoch or math.ceil(n_train / cfg.train.batch_size)
    steps = math.ceil(per_epoch / runtime.dist.world_size)
    optimizer = build_optimizer(cfg, model)
    return FoldTrainer(
        model=model,
        train_model=train_model,
        frozen=frozen,
        criterion=build_loss(
            cfg.loss.name, cfg.loss.gamma, cfg.loss.alpha, cfg.loss.label_smoothing
        ),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, steps),
        scaler=torch.amp.GradScaler("cuda") if runtime.needs_scaler else None,
        gen=torch.Generator().manual_seed(cfg.seed * 1000 + fold),
        aug_gen=torch.Generator().manual_seed(cfg.seed * 1000 + fold + 10_000 * runtime.dist.rank),
        steps=steps,
        state={"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0},
    )


def train_epoch(
    cfg: Config,
    data: RunData,
    tr: FoldTrainer,
    train_t: pd.DataFrame,
    runtime: Runtime,
    progress: bool,
) -> float:
    """Draw this epoch's weighted sample, train this rank's share; loss averaged over ranks."""
    d = runtime.dist
    picks = draw_indices(
        cfg.sampler.name,
        train_t["label"].to_numpy(),
        len(CLASSES),
        tr.steps * cfg.train.batch_size * d.world_size,
        tr.gen,
        cfg.sampler.power,
    )
    rows = torch.tensor(train_t["row"].to_numpy(), dtype=torch.long)
    order = rows[picks][d.rank :: d.world_size]
    labels_by_row = torch.zeros(len(data.images), dtype=torch.long)
    labels_by_row[torch.tensor(data.table["row"].to_numpy())] = torch.tensor(
        data.table["label"].to_numpy()
    )
    loss = train_one_epoch(
        tr.train_model,
        data.images,
        labels_by_row,
        order,
        cfg.train.batch_size,
        tr.criterion,
        tr.optimizer,
        runtime,
        data.spec.mean,
        data.spec.std,
        augment_config(cfg),
        tr.aug_gen,
        tr.scaler,
        tr.scheduler.step if cfg.train.scheduler != "plateau" else None,
        cfg.train.grad_clip,
        progress=progress and d.is_main,
        frozen=tr.frozen,
    )
    if d.enabled:
        t = torch.tensor([loss], device=runtime.device)
        dist.all_reduce(t)
        loss = float(t.item() / d.world_size)
    return loss


def fit_fold(
    cfg: Config,
    data: RunData,
    fold: int,
    run_dir: Path,
    runtime: Runtime,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one fold, keep the lowest-validation-loss checkpoint, calibrate it; its summary."""
    fold_dir = run_dir / f"fold_{fold}"
    if resume and (fold_dir / "summary.json").is_file():
        log.info("fold %d already complete, skipping", fold)
        return json.loads((fold_dir / "summary.json").read_text())
    if runtime.dist.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    table = data.table
    train_t, val_t = table[table["fold"] != fold], table[table["fold"] == fold]
    if len(train_t) == 0 or len(val_t) == 0:
        raise ValueError(
            f"fold {fold} has {len(train_t)} training and {len(val_t)} validation "
            f"images; check cv.n_folds and cv.folds_to_run"
        )
    tr = build_trainer(cfg, fold, len(train_t), runtime)
    if resume and (fold_dir / "last.pt").is_file():
        tr.restore(fold_dir / "last.pt")
        log.info("fold %d: resuming after epoch %d", fold, tr.state["epoch"])
    rows = _read_metrics(fold_dir / "metrics.csv", tr.state["epoch"])
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size * 2
    for epoch in range(tr.state["epoch"] + 1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_epoch(cfg, data, tr, train_t, runtime, progress)
        logits = validation_logits(tr.model, data, val_t["row"].to_numpy(), eval_bs, runtime)[0]
        figs = val_figures(tr.criterion, logits, val_t["label"].to_numpy())
        if cfg.train.scheduler == "plateau":
            tr.scheduler.step(figs["val_loss"])
        improved = figs["val_loss"] < tr.state["best_val_loss"]
        tr.state["epoch"] = epoch
        if improved:
            tr.state.update(best_val_loss=figs["val_loss"], best_epoch=epoch, bad_epochs=0)
        else:
            tr.state["bad_epochs"] += 1
        rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                **figs,
                "lr": tr.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
        )
        if runtime.dist.is_main:
            # best.pt first, then last.pt, then metrics.csv: a crash between two writes leaves
            # a state that --resume continues from consistently.
            if improved:
                atomic_torch_save(
                    make_checkpoint(
                        tr.model,
                        cfg.model.backbone,
                        data.spec,
                        fold,
                        epoch,
                        figs,
                        config_to_dict(cfg),
                        1.0,
                        model_kwargs(cfg),
                    ),
                    fold_dir / "best.pt",
                )
            atomic_torch_save(tr.snapshot(), fold_dir / "last.pt")
            write_metrics_rows(fold_dir / "metrics.csv", rows)
        log.info(
            "fold %d epoch %d/%d: train_loss %.4f val_loss %.4f bal_acc %.3f macro_f1 %.3f "
            "(%.0fs)%s",
            fold,
            epoch,
            cfg.train.epochs,
            train_loss,
            figs["val_loss"],
            figs["val_balanced_accuracy"],
            figs["val_macro_f1"],
            rows[-1]["seconds"],
            " *" if improved else "",
        )
        if runtime.dist.enabled:
            dist.barrier()
        if cfg.train.patience and tr.state["bad_epochs"] >= cfg.train.patience:
            log.info(
                "fold %d: early stop after %d epochs without a lower val_loss",
                fold,
                cfg.train.patience,
            )
            break
    return finish_fold(cfg, data, fold, fold_dir, runtime, val_t)


def finish_fold(
    cfg: Config, data: RunData, fold: int, fold_dir: Path, runtime: Runtime, val_t: pd.DataFrame
) -> dict[str, Any]:
    """Reload the best checkpoint, fit its temperature, save validation predictions."""
    best_path = fold_dir / "best.pt"
    if runtime.dist.enabled:
        dist.barrier()
    ckpt = load_checkpoint(best_path)
    model = build_model(ckpt["backbone"], ckpt["num_classes"], False, **ckpt["model_kwargs"]).to(
        runtime.device
    )
    model.load_state_dict(ckpt["state_dict"])
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Out-of-fold predictions use the same TTA as inference (eval.tta), views averaged in logit
    # space, so the temperature is fitted on exactly the output it will calibrate.
    logits = (
        validation_logits(
            model,
            data,
            val_t["row"].to_numpy(),
            cfg.train.eval_batch_size or cfg.train.batch_size * 2,
            runtime,
            tta=cfg.eval.tta,
        )
        .mean(0)
        .astype(np.float64)
    )
    y = val_t["label"].to_numpy()
    temperature = fit_temperature(logits, y) if cfg.eval.calibrate else 1.0
    summary = {
        "fold": fold,
        "best_epoch": ckpt["epoch"],
        "metrics": ckpt["metrics"],
        "temperature": temperature,
        "n_train": int((data.table["fold"] != fold).sum()),
        "n_val": len(val_t),
    }
    if runtime.dist.is_main:
        ckpt["temperature"] = float(temperature)
        ckpt["tta"] = int(cfg.eval.tta)  # the views the temperature was fitted on
        atomic_torch_save(ckpt, best_path)
        write_val_predictions(val_t, logits, temperature, fold_dir / "val_predictions.csv")
        (fold_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "fold %d done: best epoch %d, val_loss %.4f, temperature %.3f",
        fold,
        ckpt["epoch"],
        ckpt["metrics"]["val_loss"],
        temperature,
    )
    return summary


def setup_logging(run_dir: Path | None, is_main: bool = True) -> logging.Handler | None:
    """Console logging, plus ``train.log`` in the run folder on the main process.

    Returns the file handler, which the caller removes when the run ends.
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in root.handlers
    ):
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
        return fh
    return None


def check_resume(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Refuse to mix runs: a folder with results needs --resume and the same config."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    if not resume and (any(run_dir.glob("fold_*/last.pt")) or any(run_dir.glob("fold_*/best.pt"))):
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it, "
            f"or choose another output_dir"
        )
    if resume:
        import yaml

        old = yaml.safe_load(saved.read_text())
        new = config_to_dict(cfg)
        diff = [
            k
            for k in ("data", "cv", "model", "loss", "sampler", "augment")
            if old.get(k) != new.get(k)
        ]
        if diff:
            raise ValueError(
                f"--resume with a different config than {saved} (sections "
                f"{diff} differ); use the saved config or another output_dir"
            )


def run_cv(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train every fold of ``cv.folds_to_run``; write the run folder and its OOF report."""
    dist_info = init_distributed()
    run_dir = Path(cfg.output_dir)
    handler = setup_logging(run_dir, dist_info.is_main)
    try:
        _run_cv(cfg, run_dir, dist_info, resume, progress)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def _run_cv(cfg: Config, run_dir: Path, dist_info: DistInfo, resume: bool, progress: bool) -> None:
    runtime = resolve_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last, dist_info)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if dist_info.is_main:
        check_resume(run_dir, cfg, resume)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "environment.json").write_text(json.dumps(environment_info(runtime), indent=2))
    # The main process builds the image cache first; the others then find it ready.
    if dist_info.is_main:
        data = load_run_data(cfg, run_dir / "folds.csv", progress=progress)
    if dist_info.enabled:
        dist.barrier()
    if not dist_info.is_main:
        data = load_run_data(cfg, None, progress=False)
    if runtime.device.type == "cuda":
        # The whole uint8 cache lives on the GPU (HAM10000 at 300 px: ~2.7 GB).
        data.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(runtime.device)
    present = sorted(set(data.table["fold"].tolist()))
    folds = cfg.cv.folds_to_run if cfg.cv.folds_to_run is not None else present
    unknown = [f for f in folds if f not in present]
    if unknown:
        raise ValueError(f"cv.folds_to_run names folds {unknown}; the folds are {present}")
    if cfg.train.scheme == "linear_probe":
        if dist_info.enabled:
            raise ValueError("train.scheme=linear_probe runs in one process; drop torchrun")
        run_linear_probe(cfg, data, run_dir, runtime, folds, data.cache_root, resume, progress)
    else:
        for fold in folds:
            fit_fold(cfg, data, fold, run_dir, runtime, resume=resume, progress=progress)
    if dist_info.is_main:
        from skinlesion.evaluation.report import write_oof_report

        write_oof_report(run_dir, n_boot=cfg.eval.n_boot)
    if dist_info.enabled:
        dist.barrier()
