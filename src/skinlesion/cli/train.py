"""Training commands: ``train``, ``merge``, ``report``, ``package``, ``fit-final``,
``fit-familiarity``, ``yardstick`` and ``set-detail``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from skinlesion.cli.common import int_at_least, key_value, load_checked_config, run_n_boot


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_checked_config(args)
    from skinlesion.training.cv import run_cv

    run_dir = run_cv(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {run_dir}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from skinlesion.training.merge import merge_runs

    out = merge_runs(args.runs, args.out, n_boot=run_n_boot(args.runs[0], args.n_boot))
    print(f"merged {len(args.runs)} run(s) into {out} (report: {out}/report.md)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.report import write_oof_report

    result = write_oof_report(Path(args.run_dir), n_boot=run_n_boot(args.run_dir, args.n_boot))
    print(
        f"{args.run_dir}/report.md: balanced accuracy "
        f"{result['point']['balanced_accuracy']:.3f} over {result['point']['n']} images"
    )
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from skinlesion.publishing.card_update import attach_cross_site, read_cross_site
    from skinlesion.publishing.package import package_run

    external = dict(key_value(x) for x in args.external)
    if args.cross_site:
        read_cross_site(args.cross_site)  # a wrong folder fails before anything is written
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
    if args.cross_site:
        attach_cross_site(out, args.cross_site)
    print(f"packaged model: {out}")
    return 0


def _cmd_fit_final(args: argparse.Namespace) -> int:
    from skinlesion.training.final import fit_final

    path = fit_final(args.run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"final model: {path}")
    return 0


def _cmd_fit_familiarity(args: argparse.Namespace) -> int:
    from skinlesion.inference.packaged import MODEL_FILE
    from skinlesion.publishing.familiarity import fit_packaged_familiarity
    from skinlesion.training.fit_familiarity import fit_run_familiarity

    target = _packaged_or_path(args.model)
    progress = not args.no_progress
    if args.threshold_from is not None:
        return _site_threshold(target, args)
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


def _site_threshold(target: Path, args: argparse.Namespace) -> int:
    from skinlesion.core.errors import ConfigError
    from skinlesion.inference.packaged import MODEL_FILE
    from skinlesion.publishing.card_update import SITE_RATE, set_site_threshold

    if not (target / MODEL_FILE).is_file():
        raise ConfigError(f"--threshold-from: {target} is not a packaged model")
    if args.overrides or args.refit:
        raise ConfigError("--threshold-from sets the threshold only: no overrides or --refit")
    rate = SITE_RATE if args.site_rate is None else args.site_rate
    basis = set_site_threshold(target, args.threshold_from, rate)
    sites = ", ".join(f"{s} {q:.3f}" for s, q in basis["sites"].items())
    print(f"{target}: familiarity threshold x{basis['scale']:.3f} ({sites})")
    return 0


def _packaged_or_path(model: str) -> Path:
    """A path as given, or the packaged model of that name when no such path exists."""
    from skinlesion.inference.packaged import MODEL_FILE, zoo_dir

    target = Path(model)
    if not target.exists() and (zoo_dir() / model / MODEL_FILE).is_file():
        return zoo_dir() / model
    return target


def _cmd_set_detail(args: argparse.Namespace) -> int:
    from skinlesion.core.errors import ConfigError
    from skinlesion.data.preprocess import Detail
    from skinlesion.publishing.card_update import set_packaged_detail

    target = _packaged_or_path(args.model)
    try:
        given = Detail.parse(args.detail) if args.detail else None
    except ValueError as err:
        raise ConfigError(f"--detail: {err}") from None
    detail = set_packaged_detail(target, given, args.overrides)
    print(f"{target}: larger inputs reduced to {detail.label()}")
    return 0


def _add_set_detail(sub: argparse._SubParsersAction) -> None:
    sd = sub.add_parser(
        "set-detail",
        help="store the training images' detail in a packaged model (larger inputs reduced to it)",
    )
    sd.add_argument("model", help="packaged model name or folder")
    sd.add_argument(
        "--detail",
        default=None,
        help="SIDE[:JPEG_QUALITY]; default: measured from the recipe's images",
    )
    sd.add_argument("overrides", nargs="*", help="key=value for the recipe, e.g. data.root=DIR")
    sd.set_defaults(func=_cmd_set_detail)


def _cmd_yardstick(args: argparse.Namespace) -> int:
    from skinlesion.evaluation.yardstick import (
        compare_yardsticks,
        render_yardstick_comparison,
        write_yardstick,
        yardstick_score,
    )

    if args.ensemble_of and (args.config is not None or args.overrides or args.seeds):
        print(
            "skinlesion yardstick: --ensemble-of trains nothing: no --config, --seeds or "
            "key=value with it",
            file=sys.stderr,
        )
        return 2
    if args.ensemble_of:
        from skinlesion.evaluation.yardstick import write_ensemble

        made = write_ensemble(args.ensemble_of, args.output)
        print(f"ensemble of {len(made['members'])} run(s) on {', '.join(made['sets'])}")
    elif args.config is not None:
        from skinlesion.training.yardstick import run_yardstick

        isic = None if args.isic2017 == "none" else args.isic2017
        run_yardstick(
            args.config,
            args.output,
            args.overrides,
            isic,
            args.resume,
            not args.no_progress,
            seeds=args.seeds or (),
        )
    elif args.overrides or args.seeds:
        print(
            "skinlesion yardstick: key=value overrides and --seeds need --config", file=sys.stderr
        )
        return 2
    _print_score(yardstick_score(args.output))
    if args.against:
        result = compare_yardsticks(args.against, args.output, args.n_boot)
        write_yardstick(result, Path(args.output) / "comparison.json")
        print(render_yardstick_comparison(result))
    return 0


def _print_score(score: dict[str, Any]) -> None:
    """Each set's and the mean's figures (each run's melanoma AUROC where there are several)."""
    print(f"{len(score['runs'])} training run(s): {', '.join(score['runs'])}")
    for name, f in [*score["sets"].items(), ("mean", score["mean"])]:
        n = f" ({f['n']} images)" if "n" in f else ""
        each = ""
        if len(f.get("runs", {}).get("mel_auroc", [])) > 1:
            each = " (runs: " + ", ".join(f"{v:.3f}" for v in f["runs"]["mel_auroc"]) + ")"
        print(
            f"{name}{n}: mel AUROC {f['mel_auroc']:.3f}{each}, bal acc {f['balanced_accuracy']:.3f}"
        )


def _seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated non-negative integers."""
    parse = int_at_least(0)
    seeds = [parse(part.strip()) for part in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


def _add_yardstick(sub: argparse._SubParsersAction) -> None:
    y = sub.add_parser(
        "yardstick",
        help="the cross-site score of a recipe (held-out HAM10000 sites, ISIC 2017 test), "
        "paired against another",
    )
    y.add_argument("--config", default=None, help="the recipe; without it, score --output as is")
    y.add_argument("--output", required=True, help="the recipe's yardstick folder")
    y.add_argument(
        "--against", default=None, help="another yardstick folder: the paired table, B = --output"
    )
    y.add_argument(
        "--isic2017",
        default="../shared/data/isic2017",
        help="ISIC 2017 folder (labels.csv, images/), or none",
    )
    y.add_argument("--n-boot", type=int_at_least(1), default=1000)
    y.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="comma-separated, e.g. 42,7: train the recipe once per seed (the config's seed "
        "in --output, others in --output/seed_N); comparisons resample runs as well as lesions",
    )
    y.add_argument(
        "--ensemble-of",
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="write --output as the ensemble of every run of these yardstick folders (mean "
        "calibrated probabilities, on the sets all predicted); trains nothing",
    )
    y.add_argument("--resume", action="store_true", help="continue the runs in --output")
    y.add_argument("--no-progress", action="store_true")
    y.add_argument("overrides", nargs="*", help="key=value for the recipe")
    y.set_defaults(func=_cmd_yardstick)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="cross-validated training from a config")
    t.add_argument("--config", default=None)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=3")
    t.set_defaults(func=_cmd_train)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="join runs of different folds into one run folder")
    m.add_argument("runs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument(
        "--n-boot", type=int_at_least(0), default=None, help="default: the runs' eval.n_boot"
    )
    m.set_defaults(func=_cmd_merge)


def _add_report(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="regenerate a run's out-of-fold report")
    rp.add_argument("run_dir")
    rp.add_argument(
        "--n-boot", type=int_at_least(0), default=None, help="default: the run's eval.n_boot"
    )
    rp.set_defaults(func=_cmd_report)


def _add_package(sub: argparse._SubParsersAction) -> None:
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
    pk.add_argument(
        "--cross-site",
        default=None,
        metavar="RUN",
        help="a cross-site run of the model's recipe (e.g. runs/yardstick/NAME/cross_site) "
        "whose figures per held-out source go into the card",
    )
    pk.set_defaults(func=_cmd_package)


def _add_fit_final(sub: argparse._SubParsersAction) -> None:
    ff = sub.add_parser("fit-final", help="train the run's recipe on all images (final model)")
    ff.add_argument("run_dir")
    ff.add_argument("--resume", action="store_true")
    ff.add_argument("--no-progress", action="store_true")
    ff.set_defaults(func=_cmd_fit_final)


def _add_fit_familiarity(sub: argparse._SubParsersAction) -> None:
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
    fa.add_argument(
        "--threshold-from",
        metavar="CROSS_SITE_RUN",
        help="packaged model: set the threshold from held-out sources instead, the cross-site "
        "run of its recipe (e.g. runs/yardstick/NAME/cross_site); fits nothing",
    )
    fa.add_argument(
        "--site-rate",
        type=float,
        default=None,
        help="with --threshold-from: share of each held-out source called unlike (default 0.02)",
    )
    fa.add_argument("--no-progress", action="store_true")
    fa.set_defaults(func=_cmd_fit_familiarity)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_merge(sub)
    _add_report(sub)
    _add_package(sub)
    _add_fit_final(sub)
    _add_fit_familiarity(sub)
    _add_yardstick(sub)
    _add_set_detail(sub)
