"""The final model: the run's recipe trained on every image, for as many epochs as its folds
chose, calibrated with the folds' temperature.

Cross-validation estimates how good the recipe is; the model to ship sees all the data. Nothing
is left to validate it on, so its epoch count is the median of the folds' best epochs and its
temperature the mean of theirs; with ``train.average_from``, it ships its weight average where
most folds kept theirs. The run's out-of-fold figures stay the honest estimate of it.

    run_dir/final/config.yaml  the config it trains with (the run's, with the chosen epochs)
    run_dir/final/best.pt      (fold -1; ``final_fit`` says how it was made)
    run_dir/final/last.pt      training state for --resume
    run_dir/final/summary.json
    run_dir/final/familiarity.safetensors   its familiarity, thresholded on a 20% split of its own
                                            training images (so its refer rate is optimistic)
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from skinlesion.core.config import Config, config_to_dict, load_config, save_config
from skinlesion.core.errors import CheckpointError, ConfigError, OutputError
from skinlesion.core.paths import check_writable_dir
from skinlesion.core.run_folder import check_resume_config
from skinlesion.core.runtime import init_distributed, planned_world_size, resolve_runtime
from skinlesion.models.checkpoint import FINAL_FOLD, atomic_torch_save, make_checkpoint
from skinlesion.training.builders import model_kwargs
from skinlesion.training.checks import check_world_size
from skinlesion.training.fit_familiarity import fit_checkpoint_familiarity
from skinlesion.training.fold_trainer import train_one_epoch, trainer_for_table
from skinlesion.training.run_data import load_run_data

log = logging.getLogger(__name__)


def fold_choices(run_dir: Path) -> dict[str, Any]:
    """Epoch count and temperature for the final fit, from the folds' summaries."""
    summaries = [json.loads(p.read_text()) for p in sorted(run_dir.glob("fold_*/summary.json"))]
    if not summaries:
        raise CheckpointError(
            f"{run_dir}: no finished fold (fold_*/summary.json); train folds first"
        )
    epochs = [int(s["best_epoch"]) for s in summaries]
    temps = [float(s["temperature"]) for s in summaries]
    averaged = [bool(s.get("averaged")) for s in summaries]
    return {
        "folds": [int(s["fold"]) for s in summaries],
        "fold_best_epochs": epochs,
        "epochs": max(1, round(statistics.median(epochs))),
        "temperature": statistics.fmean(temps),
        "fold_temperatures": temps,
        "average": 2 * sum(averaged) > len(averaged),  # most folds kept their weight average
    }


def check_final_resume(out: Path, cfg: Config, resume: bool) -> None:
    """A final model is not overwritten without --resume, and --resume continues one that was
    started, only with the config it started with (the folds' median best epoch may have moved
    since)."""
    if resume and not out.is_dir():
        raise ConfigError(
            f"fit-final --resume: {out} does not exist, so there is no final fit to resume; "
            f"check the run folder, or drop --resume to start one"
        )
    if (out / "best.pt").is_file() and not resume:
        raise OutputError(f"{out / 'best.pt'} exists; pass --resume to continue, or remove it")
    if resume and (out / "last.pt").is_file() and (out / "config.yaml").is_file():
        hint = " (train.epochs is the median of the folds' best epochs)"
        check_resume_config(out / "config.yaml", cfg, hint)


def fit_final(run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``run_dir/final/best.pt`` on all images; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "final"
    check_writable_dir(out, "fit-final's output folder")
    choice = fold_choices(run_dir)
    cfg = load_config(run_dir / "config.yaml", [f"train.epochs={choice['epochs']}"])
    check_world_size(cfg, planned_world_size())
    check_final_resume(out, cfg, resume)
    runtime = resolve_runtime(
        cfg.train.device, cfg.train.amp, cfg.train.channels_last, init_distributed()
    )
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data = load_run_data(cfg, None, progress=progress)
    table = data.table
    tr = trainer_for_table(cfg, data, cfg.cv.n_folds, table, runtime)  # a seed no fold used
    if resume and (out / "last.pt").is_file():
        tr.restore(out / "last.pt")
        log.info("final fit: resuming after epoch %d", tr.state["epoch"])
    for epoch in range(tr.state["epoch"] + 1, choice["epochs"] + 1):
        loss = train_one_epoch(cfg, data, tr, table, runtime, progress)
        tr.state["epoch"] = epoch
        atomic_torch_save(tr.snapshot(), out / "last.pt")
        log.info("final fit epoch %d/%d: train_loss %.4f", epoch, choice["epochs"], loss)
    model, extra = tr.model, {}
    if choice["average"] and tr.average is not None and tr.average.count:
        model = tr.average.averaged(tr.model)
        extra = {"weights": tr.average.describe()}
    ckpt = make_checkpoint(
        model,
        backbone=cfg.model.backbone,
        spec=data.spec,
        fold=FINAL_FOLD,
        epoch=choice["epochs"],
        metrics={},
        config=config_to_dict(cfg),
        temperature=choice["temperature"],
        model_kwargs=model_kwargs(cfg.model),
        metadata=tr.metadata,
        extra={"final_fit": {**choice, "n_train": len(table)}, "tta": cfg.eval.tta, **extra},
    )
    atomic_torch_save(ckpt, out / "best.pt")
    (out / "summary.json").write_text(json.dumps({**choice, "n_train": len(table)}, indent=2))
    # Its threshold comes from images it was trained on (there are no others): logged as such.
    if runtime.dist.is_main and cfg.eval.familiarity:
        fit_checkpoint_familiarity(out / "best.pt", cfg, data, runtime, progress, strict=False)
    log.info(
        "final model: %s (%d epochs, temperature %.3f)",
        out / "best.pt",
        choice["epochs"],
        choice["temperature"],
    )
    return out / "best.pt"
