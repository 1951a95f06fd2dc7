"""Package a finished run as a model that ships inside skinlesion: safetensors weights, the spec
that travels with them, and a model card whose figures come from the run's saved predictions.

Example::

    package_run("runs/ham10000_cpu", "ham10000-lite0-cpu",
                external={"isic2017_test": "runs/ham10000_cpu/isic2017"})
"""

from __future__ import annotations

import json
import logging
import os
from datetime import date
from pathlib import Path
from typing import Any

import torch

from skinlesion.core.errors import CheckpointError
from skinlesion.core.paths import check_writable_dir
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.report import check_report_writable, write_oof_report
from skinlesion.inference.familiarity import (
    FAMILIARITY_FILE,
    METHOD,
    Familiarity,
    load_familiarity,
    save_familiarities,
)
from skinlesion.inference.packaged import CARD_FILE, DEFAULT_FILE, zoo_dir
from skinlesion.inference.packaged_meta import (
    PACKAGED_FORMAT,
    PACKAGED_VERSION,
    WEIGHTS_FILE,
    read_packaged_meta,
    sha256_file,
    write_packaged_meta,
)
from skinlesion.inference.predict import checkpoint_paths
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.models.description import ModelDescription
from skinlesion.publishing.card_text import (
    INTENDED_USE,
    LEE_2018,
    LICENSE_TEXT,
    known_limits,
    render_card,
)

log = logging.getLogger(__name__)

MAX_WEIGHTS_BYTES = 25 * 1024 * 1024
_FLOAT16_MIN_ELEMENTS = 16_384
_FLOAT32_SUFFIXES = ("running_mean", "running_var")
WEIGHTS_LICENSE = "CC-BY-NC-SA-4.0"


def _load_members(run_dir: Path, folds: list[int] | None, final: bool) -> list[dict[str, Any]]:
    if final:
        return [load_checkpoint(run_dir / "final" / "best.pt")]
    ckpts = [load_checkpoint(p) for p in checkpoint_paths(run_dir)]
    if folds is not None:
        have = [c["fold"] for c in ckpts]
        missing = sorted(set(folds) - set(have))
        if missing:
            raise CheckpointError(f"{run_dir}: no checkpoint for folds {missing} (has {have})")
        ckpts = [c for c in ckpts if c["fold"] in folds]
    first = ckpts[0]
    shared = [ModelDescription.from_dict(c, f"fold {c['fold']}").shared_dict() for c in ckpts]
    for key in shared[0]:
        odd = [c["fold"] for c, d in zip(ckpts, shared, strict=True) if d[key] != shared[0][key]]
        if odd:
            raise CheckpointError(
                f"{run_dir}: fold models {odd} differ from fold "
                f"{first['fold']} in {key}; cannot package them together"
            )
    folds = [c["fold"] for c in ckpts]
    if len(set(folds)) != len(folds):
        raise CheckpointError(f"{run_dir}: several checkpoints claim the same fold: {folds}")
    return ckpts


def _prefix(ckpt: dict[str, Any]) -> str:
    return "final." if ckpt["fold"] < 0 else f"fold{ckpt['fold']}."


def _tta(ckpt: dict[str, Any]) -> int:
    if "tta" in ckpt:
        return int(ckpt["tta"])
    return int((ckpt.get("config") or {}).get("eval", {}).get("tta", 1))


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The card's headline figures, with their 95% intervals, from a metrics result."""
    point, ci = result["point"], result["ci95"]
    mel = point["per_class"].get("mel") or {}
    mel_ci = (ci.get("per_class") or {}).get("mel") or {}
    out = {
        "n": point["n"],
        "classes_present": point["classes_present"],
        "bootstrap_unit": result.get("bootstrap_unit"),
    }
    for key in ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy", "ece", "log_loss"):
        out[key] = point[key]
        out[f"{key}_ci95"] = ci.get(key)
    lacking = point.get("classes_absent") and "predicted_absent" in point
    out["predicted_absent"] = point["predicted_absent"] if lacking else None
    out["predicted_absent_ci95"] = ci.get("predicted_absent") if lacking else None
    out["melanoma_auroc"] = mel.get("auroc")
    out["melanoma_auroc_ci95"] = mel_ci.get("auroc")
    out["melanoma_sensitivity_at_threshold"] = point["mel"]["sensitivity_at_threshold"]
    out["melanoma_specificity_at_threshold"] = point["mel"]["specificity_at_threshold"]
    return out


def build_card(
    name: str,
    ckpts: list[dict[str, Any]],
    oof: dict[str, Any],
    external: dict[str, dict[str, Any]],
    hardware: str,
) -> dict[str, Any]:
    cfg = ckpts[0].get("config") or {}
    return {
        "name": name,
        "date": date.today().isoformat(),
        "intended_use": INTENDED_USE,
        "training_data": _training_data(cfg, ckpts[0]["class_names"]),
        "weights_license": WEIGHTS_LICENSE,
        "backbone": ckpts[0]["backbone"],
        "input": ckpts[0]["preprocessing"],
        "members": [{"fold": c["fold"], "epoch": c["epoch"], **_final_fit(c)} for c in ckpts],
        "tta_views": _tta(ckpts[0]),
        "metadata": _metadata(cfg),
        "hardware": hardware,
        "recipe": cfg,
        "metrics": {
            "out_of_fold": _figures(oof),
            **{k: _figures(v) for k, v in external.items()},
        },
        "calibration": oof.get("calibration"),
        "melanoma_threshold": oof["mel_threshold"],
        "melanoma_threshold_rule": oof.get("mel_threshold_rule"),
        "known_limits": known_limits(cfg),
    }


def familiarity_card(fams: dict[str, Familiarity]) -> dict[str, Any]:
    """The card's ``familiarity`` entry: the method and, per member, what it was fitted on."""
    keys = ("fold", "n_fit", "n_calibration", "n_heldout", "heldout", "trained_on")
    keys += ("threshold_in_source", "threshold_sites")
    return {
        "method": METHOD,
        "reference": LEE_2018,
        "refer_reason": "unlike the training images",
        "members": [
            {"prefix": p, "threshold": f.threshold, **{k: f.info[k] for k in keys if k in f.info}}
            for p, f in fams.items()
        ],
    }


def _final_fit(ckpt: dict[str, Any]) -> dict[str, Any]:
    """How a final fit (fold -1) was set up: its data size and what it took from the folds."""
    fit = ckpt.get("final_fit") or {}
    keys = ("n_train", "folds", "fold_best_epochs", "epochs", "temperature")
    return {"final_fit": {k: fit[k] for k in keys if k in fit}} if fit else {}


def _metadata(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The patient metadata a fused model takes, from its recipe; ``None`` for image-only."""
    model = cfg.get("model") or {}
    fields = model.get("metadata")
    if not fields:
        return None
    return {"fields": list(fields), "dropout": model.get("metadata_drop")}


def _training_data(cfg: dict[str, Any], class_names: list[str]) -> str:
    """What the models were trained on, from the recipe's ``data`` section and the classes."""
    data = cfg.get("data") or {}
    fmt = data.get("format", "ham10000")
    if data.get("sources"):
        parts = [
            f"{s['name']} ({s['format']} set {s.get('labels') or s.get('root')}; loss over "
            f"{', '.join(s['classes']) if s.get('classes') else 'the classes it contains'})"
            for s in data["sources"]
        ]
        return (
            f"{len(parts)} sources: {'; '.join(parts)}; classes {', '.join(class_names)}; folds "
            "stratified by source x diagnosis, grouped by lesion where a source names them."
        )
    if fmt == "ham10000":
        return (
            "HAM10000 (10,015 dermoscopic images, 7,470 lesions, 7 diagnoses); "
            "lesion-grouped stratified folds."
        )
    source = data.get("labels") if fmt == "csv" else data.get("root")
    return (
        f"{fmt} set {source} ({len(class_names)} classes: {', '.join(class_names)}); "
        "stratified folds, grouped where the labels name a lesion or patient."
    )


def half_precision(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as stored in a packaged model: large floating tensors in float16, which
    halves the file (so a small fold ensemble fits the size limit); loading upcasts to float32.

    Tensors of fewer than 16,384 elements stay float32. They are about 4% of a Lite0's bytes but
    hold the early, narrow layers, where float16 rounding is amplified most: with every floating
    tensor in float16 a packaged Lite0 moved a probability by up to 3.0e-3, with this rule by
    3.1e-4 (a 192 px fold model, 24 images) and 7.2e-4 (the 160 px default made float32 by a
    relative 1e-3 perturbation, 12 images): the bound kept is 1e-3
    (``tests/inference/test_packaged.py``). BatchNorm statistics (a variance near zero would land
    in float16's subnormals) and integer counters are among them.
    """
    out = {}
    for name, v in tensors.items():
        v = v.detach().cpu().contiguous()
        small = v.numel() < _FLOAT16_MIN_ELEMENTS or name.endswith(_FLOAT32_SUFFIXES)
        out[name] = v.clone() if small or not v.is_floating_point() else v.to(torch.float16)
    return out


def write_weights(ckpts: list[dict[str, Any]], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = half_precision(
        {f"{_prefix(c)}{k}": v for c in ckpts for k, v in c["state_dict"].items()}
    )
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": PACKAGED_FORMAT, "dtype": "float16"})
    size = tmp.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        tmp.unlink()
        raise CheckpointError(
            f"{path}: {size / 2**20:.1f} MiB of weights is over the "
            f"{MAX_WEIGHTS_BYTES / 2**20:.0f} MiB a packaged model may hold; package fewer folds "
            f"(--folds) or a smaller backbone"
        )
    tmp.chmod(0o644)  # the zoo's files are read by whoever installs the package
    os.replace(tmp, path)


def familiarity_entry(folder: Path, fams: dict[str, Familiarity]) -> dict[str, Any]:
    """``model.json``'s ``familiarity``: the file (written here) and its SHA-256."""
    path = save_familiarities(folder / FAMILIARITY_FILE, fams)
    return {"file": path.name, "sha256": sha256_file(path), "method": METHOD}


def attach_familiarity(folder: Path, fams: dict[str, Familiarity]) -> Path:
    """Add the members' familiarity (keys prefixed as the weights: ``fold0.``, ``final.``) to a
    packaged model: the file, its entry in ``model.json``, the card's ``familiarity`` and the
    Markdown card rendered again."""
    folder = Path(folder)
    meta = read_packaged_meta(folder)
    prefixes = [m["prefix"] for m in meta["members"]]
    if sorted(fams) != sorted(prefixes):
        raise CheckpointError(f"{folder}: familiarity for {sorted(fams)}, members {prefixes}")
    meta["familiarity"] = familiarity_entry(folder, fams)
    write_packaged_meta(folder, meta)
    card_path = folder / CARD_FILE
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        card["familiarity"] = familiarity_card(fams)
        card_path.write_text(json.dumps(card, indent=2, allow_nan=False))
        if (folder / "MODEL_CARD.md").is_file():
            (folder / "MODEL_CARD.md").write_text(render_card(card))
    return folder / FAMILIARITY_FILE


def _store_familiarity(out: Path, meta: dict[str, Any], fams: dict[str, Familiarity]) -> None:
    if fams:
        meta["familiarity"] = familiarity_entry(out, fams)
    elif (out / FAMILIARITY_FILE).is_file():
        (out / FAMILIARITY_FILE).unlink()  # from an earlier packaging of other members


def run_familiarities(run_dir: Path, ckpts: list[dict[str, Any]], final: bool) -> dict[str, Any]:
    """The members' familiarity from the run folder (``fold_K/`` or ``final/``), by prefix;
    ``{}`` (logged) unless every member has one."""
    found = {}
    for c in ckpts:
        folder = run_dir / ("final" if final else f"fold_{c['fold']}")
        path = folder / FAMILIARITY_FILE
        if not path.is_file():
            log.warning(
                "%s: no %s, so the package has no familiarity; run `skinlesion fit-familiarity "
                "%s` first to add one",
                folder,
                FAMILIARITY_FILE,
                run_dir,
            )
            return {}
        found[_prefix(c)] = load_familiarity(path)
    return found


def _member_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A member's entry in ``model.json``; a fused model's metadata encoding and branch width
    come along as plain JSON."""
    return {
        "fold": ckpt["fold"],
        "prefix": _prefix(ckpt),
        "temperature": ckpt["temperature"],
        **ModelDescription.from_dict(ckpt, f"fold {ckpt['fold']}").metadata_dict(),
    }


def _model_meta(
    name: str, version: str, ckpts: list[dict[str, Any]], oof: dict[str, Any], sha256: str
) -> dict[str, Any]:
    """``model.json`` of a packaged model (its familiarity is added by the caller)."""
    return {
        "format": PACKAGED_FORMAT,
        "format_version": PACKAGED_VERSION,
        "name": name,
        "version": version,
        **ModelDescription.from_dict(ckpts[0], f"fold {ckpts[0]['fold']}").shared_dict(),
        "tta": _tta(ckpts[0]),
        "members": [_member_meta(c) for c in ckpts],
        "reference": {
            "mel_threshold": oof["mel_threshold"],
            "domain": oof["domain"],
            "refer": oof.get("refer"),
        },
        "weights_sha256": sha256,
    }


def package_run(
    run_dir: str | Path,
    name: str,
    out_root: str | Path | None = None,
    external: dict[str, str | Path] | None = None,
    hardware: str = "",
    make_default: bool = False,
    version: str = "1",
    folds: list[int] | None = None,
    final: bool = False,
) -> Path:
    """Write ``out_root/name/`` (default: the package's zoo) from a finished run folder.

    ``folds`` packages only those fold models (default: all); the card's out-of-fold figures
    always cover every fold the run predicted. ``final`` packages ``run_dir/final/best.pt`` (see
    ``skinlesion fit-final``) instead of the fold models."""
    run_dir = Path(run_dir)
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise CheckpointError(f"package name '{name}' must be a plain folder name")
    root = Path(out_root) if out_root else zoo_dir()
    check_writable_dir(root / name, "package folder")
    check_report_writable(RunFolder(run_dir))  # the card's figures are recomputed there
    ckpts = _load_members(run_dir, folds, final)
    n_boot = int((ckpts[0].get("config") or {}).get("eval", {}).get("n_boot", 1000))
    oof = write_oof_report(run_dir, n_boot=n_boot)  # recomputed from oof_predictions
    ext = {
        k: json.loads((Path(v) / "metrics.json").read_text()) for k, v in (external or {}).items()
    }
    fams = run_familiarities(run_dir, ckpts, final)
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    write_weights(ckpts, out / WEIGHTS_FILE)
    meta = _model_meta(name, version, ckpts, oof, sha256_file(out / WEIGHTS_FILE))
    _store_familiarity(out, meta, fams)
    write_packaged_meta(out, meta)
    card = build_card(name, ckpts, oof, ext, hardware or "unspecified hardware")
    if fams:
        card["familiarity"] = familiarity_card(fams)
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, allow_nan=False))
    (out / "MODEL_CARD.md").write_text(render_card(card))
    (out / "LICENSE").write_text(LICENSE_TEXT)
    if make_default:
        (root / DEFAULT_FILE).write_text(name + "\n")
    log.info("packaged %s into %s", run_dir, out)
    return out
