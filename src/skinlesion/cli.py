"""Command line: each sub-command parses its arguments and calls one library function.

Imports of the library happen inside the handlers, so ``--help`` and a config error answer in
about a second. A :class:`~skinlesion.core.errors.SkinlesionError` (the user's fault) is printed
as one line and exits with 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("skinlesion")


def _cmd_download(args: argparse.Namespace) -> int:
    from skinlesion.data.download import download_dataset

    dest = download_dataset(
        Path(args.dest),
        doi=args.doi,
        server=args.server,
        retries=args.retries,
        extract=not args.no_extract,
    )
    print(f"HAM10000 is in {dest}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from skinlesion.core.errors import ConfigError
    from skinlesion.core.paths import check_writable_file
    from skinlesion.data.folds import (
        check_folds,
        fold_balance,
        make_folds,
        save_folds,
        source_balance,
    )

    check_writable_file(args.out, "--out")
    n_folds, seed, grouped = args.folds or 5, 42 if args.seed is None else args.seed, True
    if args.config is not None:
        # Any labelled set the config's data section describes (csv, isic2019, ham10000), or
        # several (data.sources: folds stratified by source x diagnosis, with a source column).
        from skinlesion.training.run_data import load_labelled, warn_ungrouped_sources

        # --folds and --seed win over the config (the set is checked against the folds).
        # split makes every fold, so the config's folds_to_run (checked against n_folds) is moot.
        args.overrides += [f"cv.n_folds={args.folds}", "cv.folds_to_run=null"] if args.folds else []
        args.overrides += [f"cv.seed={args.seed}"] if args.seed is not None else []
        cfg = _load_checked_config(args)
        n_folds, seed = cfg.cv.n_folds, cfg.cv.seed
        labelled = load_labelled(cfg)
        df, grouped = labelled.table, labelled.grouped
        warn_ungrouped_sources(labelled)
    elif args.overrides:
        raise ConfigError(f"key=value overrides {args.overrides} need --config")
    else:
        from skinlesion.data.metadata import read_metadata

        df = read_metadata(Path(args.metadata))
    folds = make_folds(df, n_folds, seed)
    check_folds(folds)
    save_folds(folds, Path(args.out))
    worst = float(fold_balance(folds).abs().to_numpy().max())
    several = "source" in folds.columns  # some sources may name lesions, others not
    unit = "lesions" if grouped else "groups" if several else "groups (one image each)"
    print(
        f"wrote {args.out}: {len(folds)} images, {folds['lesion_id'].nunique()} {unit}, "
        f"{n_folds} folds; largest class-share deviation {worst:.2f} points"
    )
    for name, deviation in source_balance(folds).items():
        part = folds[folds["source"] == name]
        print(
            f"  source {name}: {len(part)} images, {part['lesion_id'].nunique()} groups; "
            f"largest class-share deviation within it {deviation:.2f} points"
        )
    return 0


def _load_checked_config(args: argparse.Namespace) -> Any:
    """The config with every name checked, before the heavy imports of training."""
    from skinlesion.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    from skinlesion.training.checks import check_config

    check_config(cfg)
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_checked_config(args)
    from skinlesion.training.cv import run_cv

    run_dir = run_cv(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {run_dir}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.output:
        from skinlesion.core.paths import check_writable_file

        check_writable_file(args.output, "--output")
    if args.backend == "onnx":
        df = _predict_onnx(args)
    else:
        from skinlesion.core.runtime import resolve_runtime
        from skinlesion.inference.packaged import resolve_model

        # The metadata file is checked before the model loads: its faults show in seconds.
        table = _read_predict_metadata(args)
        loaded = resolve_model(args.model, resolve_runtime(args.device))
        df = loaded.predict(
            args.images,
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


def _read_predict_metadata(args: argparse.Namespace) -> Any:
    """The ``--metadata`` rows of the images (``image_id`` matched to a file's stem or name),
    every fault of the file raised at once; ``None`` without ``--metadata``."""
    if args.metadata is None:
        return None
    from skinlesion.data.tabular import read_metadata_csv

    return read_metadata_csv(args.metadata, args.images)


def _predict_metadata(table: Any, loaded: Any, source: str | None) -> Any:
    """``table`` for a model fused with metadata (values it never saw in training logged);
    ``None`` for an image-only model."""
    if table is None:
        if loaded.uses_metadata:
            log.info("no --metadata: predicting from the images alone")
        return None
    if not loaded.uses_metadata:
        log.warning("--metadata ignored: the model uses images only")
        return None
    loaded.unseen_metadata(table, source)
    return table


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.external import evaluate_external

    where = dict(_key_value(w) for w in args.where)
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
        use_metadata=not args.no_metadata,
    )
    p = result["point"]
    print(
        f"{p['n']} images, classes present {p['classes_present']}: balanced accuracy "
        f"{p['balanced_accuracy']:.3f}, macro AUROC {p['macro_auroc'] or float('nan'):.3f}; "
        f"details in {args.output}/metrics.json and report.md"
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


def _cmd_models(args: argparse.Namespace) -> int:
    from skinlesion.inference.packaged import list_packaged

    rows = list_packaged()
    if not rows:
        print("no packaged models")
        return 0
    print(f"{'name':28} {'backbone':24} {'input':>5} {'MB':>5} {'OOF bal.acc':>11}")
    for r in rows:
        bacc = r["oof_balanced_accuracy"]
        mark = " (default)" if r["default"] else ""
        print(
            f"{r['name']:28} {r['backbone']:24} {r['input_size']:>5} {r['size_mb']:>5} "
            f"{'n/a' if bacc is None else f'{bacc:.3f}':>11}{mark}"
        )
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from skinlesion.training.package import package_run

    external = dict(_key_value(x) for x in args.external)
    out = package_run(
        args.run_dir,
        args.name,
        out_root=args.out_root,
        external=external,
        hardware=args.hardware,
        make_default=args.default,
        folds=[int(f) for f in args.folds.split(",")] if args.folds else None,
        final=args.final,
    )
    print(f"packaged model: {out}")
    return 0


def _cmd_fit_final(args: argparse.Namespace) -> int:
    from skinlesion.training.final import fit_final

    path = fit_final(args.run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"final model: {path}")
    return 0


def _cmd_fit_familiarity(args: argparse.Namespace) -> int:
    from skinlesion.inference.packaged import MODEL_FILE, zoo_dir
    from skinlesion.training.fit_familiarity import fit_packaged_familiarity, fit_run_familiarity

    target = Path(args.model)
    if not target.exists() and (zoo_dir() / args.model / MODEL_FILE).is_file():
        target = zoo_dir() / args.model
    progress = not args.no_progress
    if (target / MODEL_FILE).is_file():
        path = fit_packaged_familiarity(
            target, args.overrides, args.device, progress=progress, refit=args.refit
        )
        print(f"familiarity: {path}" if path else f"{target} already has a familiarity")
        return 0
    if args.overrides:
        from skinlesion.core.errors import ConfigError

        raise ConfigError(f"key=value overrides {args.overrides} apply to a packaged model only")
    written = fit_run_familiarity(target, progress=progress, refit=args.refit)
    print(f"fitted {len(written)} member(s): {', '.join(str(p) for p in written) or 'none left'}")
    return 0


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


def _cmd_report(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.report import write_oof_report

    result = write_oof_report(Path(args.run_dir), n_boot=_run_n_boot(args.run_dir, args.n_boot))
    print(
        f"{args.run_dir}/report.md: balanced accuracy "
        f"{result['point']['balanced_accuracy']:.3f} over {result['point']['n']} images"
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    cfg = _load_checked_config(args)
    from skinlesion.training.leakage import audit_leakage

    result = audit_leakage(
        cfg, resume=args.resume, n_boot=args.n_boot, progress=not args.no_progress
    )
    ba = result["metrics"]["balanced_accuracy"]
    print(
        f"balanced accuracy: lesion-grouped {ba['lesion_grouped']:.3f}, image-random "
        f"{ba['image_random']:.3f}, inflation {ba['inflation']:+.3f}; see "
        f"{cfg.output_dir}/leakage.md"
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from skinlesion.training.merge import merge_runs

    out = merge_runs(args.runs, args.out, n_boot=_run_n_boot(args.runs[0], args.n_boot))
    print(f"merged {len(args.runs)} run(s) into {out} (report: {out}/report.md)")
    return 0


def _run_n_boot(run_dir: str, given: int | None) -> int:
    """``--n-boot`` if given, else the run's own ``eval.n_boot`` (so a report reproduces)."""
    if given is not None:
        return given
    from skinlesion.core.run_folder import RunFolder, saved_eval_settings

    run = RunFolder(Path(run_dir))
    return saved_eval_settings(run.read_config_tree(), str(run.config)).n_boot


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        from skinlesion.core.errors import ConfigError

        raise ConfigError(f"--where '{text}' is not COLUMN=VALUE")
    return key, value


def _int_at_least(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


class _Parser(argparse.ArgumentParser):
    """Options may sit between positional arguments (``train a=1 --resume b=2``)."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # The sub-command's parser is called through parse_known_args; route it through the
        # intermixed parse once (which itself calls parse_known_args, hence the flag).
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if has_sub or self._intermixed:
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("download", help="fetch HAM10000 from Harvard Dataverse")
    d.add_argument("--dest", required=True)
    d.add_argument("--doi", default="doi:10.7910/DVN/DBW86T")
    d.add_argument("--server", default="https://dataverse.harvard.edu")
    d.add_argument("--retries", type=_int_at_least(0), default=5)
    d.add_argument("--no-extract", action="store_true")
    d.set_defaults(func=_cmd_download)

    s = sub.add_parser("split", help="lesion-grouped stratified folds -> folds.csv")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--metadata", help="HAM10000's metadata CSV")
    source.add_argument("--config", help="a config whose data section names any labelled set")
    s.add_argument("--folds", type=_int_at_least(2), default=None, help="default 5 or cv.n_folds")
    s.add_argument("--seed", type=int, default=None, help="default 42 or cv.seed")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="key=value, with --config")
    s.set_defaults(func=_cmd_split)


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="cross-validated training from a config")
    t.add_argument("--config", default=None)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=3")
    t.set_defaults(func=_cmd_train)

    a = sub.add_parser("audit-leakage", help="metric inflation of image-level vs lesion folds")
    a.add_argument("--config", default=None)
    a.add_argument("--resume", action="store_true")
    a.add_argument("--n-boot", type=_int_at_least(0), default=None)
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("overrides", nargs="*", help="key=value")
    a.set_defaults(func=_cmd_audit)

    m = sub.add_parser("merge", help="join runs of different folds into one run folder")
    m.add_argument("runs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument(
        "--n-boot", type=_int_at_least(0), default=None, help="default: the runs' eval.n_boot"
    )
    m.set_defaults(func=_cmd_merge)

    rp = sub.add_parser("report", help="regenerate a run's out-of-fold report")
    rp.add_argument("run_dir")
    rp.add_argument(
        "--n-boot", type=_int_at_least(0), default=None, help="default: the run's eval.n_boot"
    )
    rp.set_defaults(func=_cmd_report)

    cp = sub.add_parser(
        "compare",
        help="paired lesion-bootstrap differences of two runs on the same folds, or of two "
        "evaluations of the same labelled set",
    )
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--n-boot", type=_int_at_least(0), default=1000)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--output", default=None, help="also write the result as JSON here")
    cp.set_defaults(func=_cmd_compare)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="packaged model name (see `skinlesion models`), packaged folder, run folder (fold "
        "ensemble) or checkpoint; default: the default packaged model",
    )
    p.add_argument(
        "--tta",
        type=_int_at_least(1, 8),
        default=None,
        help="test-time views, 1..8 (default: the run's eval.tta)",
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    mo = sub.add_parser("models", help="list the packaged trained models")
    mo.set_defaults(func=_cmd_models)

    pk = sub.add_parser("package", help="package a run as a model inside skinlesion")
    pk.add_argument("run_dir")
    pk.add_argument("--name", required=True)
    pk.add_argument("--out-root", default=None, help="default: the package's zoo folder")
    pk.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="NAME=EVAL_DIR",
        help="an `evaluate` output folder whose metrics go into the card; repeatable",
    )
    pk.add_argument("--hardware", default="", help="what trained it, for the card")
    pk.add_argument("--default", action="store_true", help="make it the default model")
    pk.add_argument("--folds", default=None, help="comma-separated folds to package (default all)")
    pk.add_argument("--final", action="store_true", help="package RUN/final/best.pt (fit-final)")
    pk.set_defaults(func=_cmd_package)

    ff = sub.add_parser("fit-final", help="train the run's recipe on all images (final model)")
    ff.add_argument("run_dir")
    ff.add_argument("--resume", action="store_true")
    ff.add_argument("--no-progress", action="store_true")
    ff.set_defaults(func=_cmd_fit_final)

    fa = sub.add_parser(
        "fit-familiarity",
        help="fit the refer check 'unlike the training images' of a run's members (fold_K/, "
        "final/) or of a packaged model; members that have one are skipped",
    )
    fa.add_argument("model", help="run folder, packaged model folder or packaged name")
    fa.add_argument(
        "overrides",
        nargs="*",
        help="packaged model: key=value changes to its card's recipe, e.g. data.root=DIR "
        "data.cache_dir=DIR",
    )
    fa.add_argument("--refit", action="store_true", help="fit again members that have one")
    fa.add_argument("--device", default="auto", help="packaged model (a run uses its own)")
    fa.add_argument("--no-progress", action="store_true")
    fa.set_defaults(func=_cmd_fit_familiarity)


_MODEL_HELP = (
    "packaged model name (see `skinlesion models`), packaged folder, run folder (fold ensemble) "
    "or checkpoint; default: the default packaged model"
)


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("predict", help="class probabilities for images")
    _add_inference_options(r)
    r.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: --model is a `skinlesion export` folder, run with onnxruntime",
    )
    r.add_argument("images", nargs="+")
    r.add_argument("--output", default=None, help="CSV path (default: stdout)")
    r.add_argument(
        "--metadata",
        default=None,
        help="CSV with image_id (an image's file stem, file name or path) and age, sex, "
        "localization, for models fused with metadata; checked before the model loads; images "
        "without a row are predicted without metadata",
    )
    r.set_defaults(func=_cmd_predict)

    e = sub.add_parser("evaluate", help="metrics of a run on a labelled external image set")
    _add_inference_options(e)
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
    e.add_argument("--n-boot", type=_int_at_least(0), default=1000)
    e.add_argument(
        "--no-metadata",
        action="store_true",
        help="ignore the labels file's age/sex/localization columns (a fused model then sees "
        "images only)",
    )
    e.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="skinlesion",
        description="Train, evaluate and serve leakage-free classifiers of dermoscopic images.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_model_commands(sub)

    from skinlesion.benchmark.runner import add_benchmark_parser

    add_benchmark_parser(sub)
    _add_serving_parsers(sub)
    return p


# --- serving, explanation and export: the model as a service, its Grad-CAM and ONNX graph ---


def _predict_onnx(args: argparse.Namespace) -> Any:
    from skinlesion.core.errors import ConfigError
    from skinlesion.inference.onnx_export import OnnxModel

    if args.model is None:
        raise ConfigError("--backend onnx needs --model EXPORT_DIR (from `skinlesion export`)")
    if args.tta is not None:
        raise ConfigError("--tta is fixed inside an exported graph; export again with --tta")
    if args.metadata is not None:
        raise ConfigError("--metadata: an exported ONNX graph takes images only")
    return OnnxModel(args.model).predict(args.images, batch_size=args.batch_size)


def _cmd_serve(args: argparse.Namespace) -> int:
    from skinlesion.serving.app import ServeSettings
    from skinlesion.serving.server import serve
    from skinlesion.serving.uploads import UploadLimits

    limits = UploadLimits(int(args.max_upload_mb * 1024 * 1024), args.max_pixels)
    settings = ServeSettings(limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    serve(args.model, args.host, args.port, settings, device=args.device)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from skinlesion.core.paths import check_writable_dir
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.explain import explain_to_dir
    from skinlesion.inference.packaged import resolve_model

    check_writable_dir(args.output, "--output")
    runtime = resolve_runtime(args.device)
    members = resolve_model(args.model, runtime).members
    rows, errors = explain_to_dir(args.images, members, runtime, Path(args.output), tta=args.tta)
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
    from skinlesion.inference.packaged import resolve_model

    check_writable_dir(args.output, "--output")
    model = resolve_model(args.model, resolve_runtime("cpu"))
    path = export_onnx(model, args.output, tta=args.tta)
    print(f"exported {model.name} ({len(model.members)} member(s)) to {path}")
    return 0


def _add_serving_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="HTTP service and web page for a model")
    sv.add_argument("--model", default=None, help=_MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted")
    sv.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest image (width x height)"
    )
    sv.add_argument("--max-batch", type=int, default=32, help="micro-batch size")
    sv.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a micro-batch waits to fill"
    )
    sv.add_argument("--device", default="auto")
    sv.set_defaults(func=_cmd_serve)

    ex = sub.add_parser("explain", help="Grad-CAM overlays of the predicted class")
    ex.add_argument("--model", default=None, help=_MODEL_HELP)
    ex.add_argument("images", nargs="+")
    ex.add_argument("--output", required=True, help="folder for the PNG overlays")
    ex.add_argument("--tta", type=int, default=None, help="views for the prediction explained")
    ex.add_argument("--device", default="auto")
    ex.set_defaults(func=_cmd_explain)

    xp = sub.add_parser("export", help="export a model as one ONNX graph (calibrated ensemble)")
    xp.add_argument("--model", default=None, help=_MODEL_HELP)
    xp.add_argument("--format", choices=("onnx",), default="onnx")
    xp.add_argument("--output", required=True)
    xp.add_argument("--tta", type=int, default=None, help="views inside the graph (default: run's)")
    xp.set_defaults(func=_cmd_export)


def _quiet_handled_warnings() -> None:
    """Library warnings the library already reports as one log line; their own text (file,
    line, source) would only repeat it. A filter set once here, not around each call: images
    are decoded in worker threads, where ``warnings.catch_warnings`` is not safe."""
    import warnings

    from PIL import Image

    # decode_image logs an image over PIL's pixel limit (one over twice the limit is refused).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    _quiet_handled_warnings()
    from skinlesion.core.errors import SkinlesionError

    try:
        return args.func(args)
    except SkinlesionError as err:
        log.debug("user error", exc_info=True)
        print(f"skinlesion {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
