"""Commands that use a trained model: ``predict``, ``evaluate``, ``compare``, ``explain``,
``export`` and ``models``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinlesion.cli.common import (
    MODEL_HELP,
    add_backend_option,
    add_detail_option,
    add_inference_options,
    int_at_least,
    key_value,
)

if TYPE_CHECKING:
    from skinlesion.inference.resolve import Predictor

log = logging.getLogger("skinlesion")


def _cmd_predict(args: argparse.Namespace) -> int:
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.preprocess import image_files
    from skinlesion.inference.resolve import resolve_model

    if args.output:
        from skinlesion.core.paths import check_writable_file

        check_writable_file(args.output, "--output")
    images = image_files(args.images)
    # The metadata file is checked before the model loads: its faults show in seconds.
    table = _read_predict_metadata(args.metadata, images)
    runtime = resolve_runtime(args.device)
    loaded = resolve_model(
        args.model, runtime, args.backend, args.tta, args.detail, images=len(images)
    )
    df = loaded.predict(
        images,
        tta=args.tta,
        metadata=_predict_metadata(table, loaded, args.metadata),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    errors = [e for e in df["error"] if e]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.output, index=False, float_format="%.6f")
        print(f"wrote {len(df) - len(errors)} prediction(s) to {args.output}")
    else:
        df.to_csv(sys.stdout, index=False, float_format="%.6f")
    for msg in errors:
        print(f"error: {msg}", file=sys.stderr)
    return 1 if errors else 0


def _read_predict_metadata(metadata: str | None, images: list[str]) -> Any:
    """The ``--metadata`` rows of the images (``image_id`` matched to a file's stem or name),
    every fault of the file raised at once; ``None`` without ``--metadata``."""
    if metadata is None:
        return None
    from skinlesion.data.metadata_file import read_metadata_csv

    return read_metadata_csv(metadata, images)


def _predict_metadata(table: Any, loaded: Predictor, source: str | None) -> Any:
    """``table`` for a model fused with metadata (values it never saw in training logged);
    ``None`` for an image-only model. An export folder refuses it: its graph may come from a
    fused model, and dropping what was asked for would go unseen."""
    from skinlesion.inference.onnx_model import OnnxModel

    if table is None:
        if loaded.uses_metadata:
            log.info("no --metadata: predicting from the images alone")
        return None
    if isinstance(loaded, OnnxModel):
        from skinlesion.core.errors import ConfigError

        raise ConfigError(
            f"--metadata: {loaded.origin} is an ONNX export, whose graph takes images only; "
            f"pass --model with the model it was exported from ({loaded.name})"
        )
    if not loaded.uses_metadata:
        log.warning("--metadata ignored: the model uses images only")
        return None
    loaded.unseen_metadata(table, source)
    return table


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.external import evaluate_external

    where = dict(key_value(w) for w in args.where)
    result = evaluate_external(
        args.model,
        args.labels,
        args.images,
        args.output,
        tta=args.tta,
        label_map=args.label_map,
        batch_size=args.batch_size,
        device=args.device,
        n_boot=args.n_boot,
        where=where,
        progress=not args.no_progress,
        use_metadata=False if args.no_metadata else None,
        backend=args.backend,
        detail=args.detail,
    )
    p = result["point"]
    absent = (
        f"; {p['predicted_absent']:.1%} predicted as a class they lack"
        if p["classes_absent"]
        else ""
    )
    print(
        f"{p['n']} images, classes present {p['classes_present']}: balanced accuracy "
        f"{p['balanced_accuracy']:.3f}, macro AUROC {p['macro_auroc'] or float('nan'):.3f}"
        f"{absent}; details in {args.output}/metrics.json and report.md"
    )
    print(_referred_line(result))
    return 0


def _referred_line(result: dict[str, Any]) -> str:
    """Evaluate's refer figures in one line."""
    ref, fam = result["referred"], result.get("familiarity")
    reasons = ", ".join(f"{k} {v:.1%}" for k, v in ref["by_reason"].items())
    line = f"referred {ref['rate']:.1%} ({reasons})"
    if fam and fam.get("auroc_vs_training") is not None:
        auroc = fam["auroc_vs_training"]
        line += f"; unfamiliarity AUROC against the training distribution {auroc:.3f}"
    return line


def _cmd_compare(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.paired import compare_runs, render_comparison, write_comparison

    if args.output:
        from skinlesion.core.paths import check_writable_file

        check_writable_file(args.output, "--output")
    result = compare_runs(args.run_a, args.run_b, n_boot=args.n_boot, seed=args.seed)
    if args.output:
        write_comparison(result, Path(args.output))
    print(render_comparison(result), end="")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from skinlesion.core.paths import check_writable_dir
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.explain import explain_to_dir
    from skinlesion.inference.resolve import resolve_torch_model

    check_writable_dir(args.output, "--output")
    runtime = resolve_runtime(args.device)
    # Grad-CAM needs the PyTorch weights: an export folder gives the model it came from.
    members = resolve_torch_model(args.model, runtime, needs="explain").members
    rows, errors = explain_to_dir(
        args.images, members, runtime, Path(args.output), tta=args.tta, class_name=args.class_name
    )
    for r in rows:
        print(f"{r['image']}: {r['class_explained']} (p={r['probability']:.3f}) -> {r['overlay']}")
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    print(f"wrote {len(rows)} overlay(s) and explanations.csv to {args.output}")
    return 1 if errors else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from skinlesion.core.paths import check_writable_dir
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.onnx_export import export_onnx
    from skinlesion.inference.resolve import resolve_torch_model

    check_writable_dir(args.output, "--output")
    if not args.int8:
        model = resolve_torch_model(args.model, resolve_runtime("cpu"), needs="export")
        path = export_onnx(model, args.output, tta=args.tta)
        print(f"exported {model.name} ({len(model.members)} member(s)) to {path}")
        return 0
    return _export_int8(args)


def _export_int8(args: argparse.Namespace) -> int:
    import shutil

    from skinlesion.core.errors import ConfigError
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.backend import cached_graph
    from skinlesion.inference.quantize import calibration_images
    from skinlesion.inference.resolve import resolve_torch_model

    if args.calibration_images is None:
        raise ConfigError("--int8 needs --calibration-images DIR (training images of the model)")
    images = calibration_images(args.calibration_images, args.calibration_count)
    model = resolve_torch_model(args.model, resolve_runtime("cpu"), needs="export")
    folder = cached_graph(model, args.tta, calibration=images)
    shutil.copytree(folder, args.output, dirs_exist_ok=True)
    print(
        f"exported {model.name} as int8 (calibrated on {len(images)} image(s) of "
        f"{args.calibration_images}) to {args.output}; `--backend onnx-int8` now uses it"
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from skinlesion.inference.packaged import list_packaged

    rows = list_packaged()
    if not rows:
        print("no packaged models")
        return 0
    header = ("name", "backbone", "input", "MB", "OOF bal.acc")
    table = [
        (r["name"], r["backbone"], str(r["input_size"]), str(r["size_mb"]), _oof_cell(r))
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *table]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # Names left-aligned, figures right-aligned, each column as wide as its widest cell.
        return " ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(header).rstrip())
    for r, cells in zip(rows, table, strict=True):
        notes = ["default"] if r["default"] else []
        if r["final_fit"]:
            notes.append("final fit on every image: no held-out images, no out-of-fold score")
        print(line(cells) + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _oof_cell(row: dict[str, Any]) -> str:
    bacc = row["oof_balanced_accuracy"]
    return "-" if row["final_fit"] else "n/a" if bacc is None else f"{bacc:.3f}"


def _add_predict(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("predict", help="class probabilities for images")
    add_inference_options(r)
    add_backend_option(r)
    add_detail_option(r)
    r.add_argument(
        "images",
        nargs="+",
        help="image files or folders of images (a folder: its .jpg, .jpeg, .png, .bmp, .tif, "
        ".tiff, .webp files in name order, not its sub-folders); one output row per image",
    )
    r.add_argument("--output", default=None, help="CSV path (default: stdout)")
    r.add_argument(
        "--metadata",
        default=None,
        help="CSV with image_id (an image's file stem, file name or path) and age, sex, "
        "localization, for models fused with metadata; checked before the model loads; images "
        "without a row are predicted without metadata",
    )
    r.set_defaults(func=_cmd_predict)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="metrics of a run on a labelled external image set")
    add_inference_options(e)
    add_backend_option(e)
    add_detail_option(e)
    e.add_argument("--labels", required=True, help="CSV with image_id and dx")
    e.add_argument("--images", required=True, help="folder with <image_id>.<jpg|png|...>")
    e.add_argument("--output", required=True)
    e.add_argument("--label-map", default=None, help="YAML or CSV (from,to) label mapping")
    e.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep only rows with this value (e.g. split=test); repeatable",
    )
    e.add_argument("--n-boot", type=int_at_least(0), default=1000)
    e.add_argument(
        "--no-metadata",
        action="store_true",
        help="ignore the labels file's age/sex/localization columns (a fused model then sees "
        "images only)",
    )
    e.set_defaults(func=_cmd_evaluate)


def _add_explain(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("explain", help="Grad-CAM overlays of the predicted class")
    ex.add_argument("--model", default=None, help=MODEL_HELP)
    ex.add_argument("images", nargs="+")
    ex.add_argument("--output", required=True, help="folder for the PNG overlays")
    ex.add_argument("--tta", type=int, default=None, help="views for the prediction explained")
    ex.add_argument(
        "--class",
        dest="class_name",
        default=None,
        metavar="NAME",
        help="explain this class for every image (e.g. mel); default: each image's predicted one",
    )
    ex.add_argument("--device", default="auto")
    ex.set_defaults(func=_cmd_explain)


def _add_export(sub: argparse._SubParsersAction) -> None:
    xp = sub.add_parser("export", help="export a model as one ONNX graph (calibrated ensemble)")
    xp.add_argument("--model", default=None, help=MODEL_HELP)
    xp.add_argument("--format", choices=("onnx",), default="onnx")
    xp.add_argument("--output", required=True)
    xp.add_argument("--tta", type=int, default=None, help="views inside the graph (default: run's)")
    xp.add_argument(
        "--int8",
        action="store_true",
        help="static int8 quantization (onnxruntime, QDQ, per-channel), calibrated on "
        "--calibration-images; also stored in the cache for `--backend onnx-int8`",
    )
    xp.add_argument(
        "--calibration-images",
        default=None,
        help="folder of training images of the model (searched recursively), for --int8",
    )
    xp.add_argument(
        "--calibration-count",
        type=int_at_least(1),
        default=100,
        help="images taken from --calibration-images, evenly spaced in name order",
    )
    xp.set_defaults(func=_cmd_export)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser(
        "compare",
        help="paired lesion-bootstrap differences of two runs on the same folds, or of two "
        "evaluations of the same labelled set",
    )
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--n-boot", type=int_at_least(0), default=1000)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--output", default=None, help="also write the result as JSON here")
    cp.set_defaults(func=_cmd_compare)


def _add_models(sub: argparse._SubParsersAction) -> None:
    mo = sub.add_parser("models", help="list the packaged trained models")
    mo.set_defaults(func=_cmd_models)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_predict(sub)
    _add_evaluate(sub)
    _add_explain(sub)
    _add_export(sub)
    _add_compare(sub)
    _add_models(sub)
