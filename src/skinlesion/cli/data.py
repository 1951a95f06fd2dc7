"""Data commands: ``download``, ``split`` and ``audit-leakage``."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.cli.common import DeprecatedOption, int_at_least, load_checked_config


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
    from skinlesion.core.config import DEFAULT_FOLD_SEED, DEFAULT_N_FOLDS, load_config
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
    n_folds = args.folds or DEFAULT_N_FOLDS
    seed = DEFAULT_FOLD_SEED if args.seed is None else args.seed
    grouped = True
    if args.config is not None:
        # Any labelled set the config's data section describes (csv, isic2019, ham10000), or
        # several (data.sources: folds stratified by source x diagnosis, with a source column),
        # through the loader training uses; only the data section is checked (no training).
        from skinlesion.data.sources import check_data_paths, load_labelled, warn_ungrouped_sources

        # --folds and --seed win over the config (the set is checked against the folds).
        # split makes every fold, so the config's folds_to_run (checked against n_folds) is moot.
        args.overrides += [f"cv.n_folds={args.folds}", "cv.folds_to_run=null"] if args.folds else []
        args.overrides += [f"cv.seed={args.seed}"] if args.seed is not None else []
        cfg = load_config(args.config, args.overrides)
        check_data_paths(cfg.data)
        n_folds, seed = cfg.cv.n_folds, cfg.cv.seed
        labelled = load_labelled(cfg)
        df, grouped = labelled.table, labelled.grouped
        warn_ungrouped_sources(labelled)
    elif args.overrides:
        raise ConfigError(f"key=value overrides {args.overrides} need --config")
    else:
        from skinlesion.data.ham10000 import read_labels

        df = read_labels(Path(args.labels))
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


def _cmd_audit(args: argparse.Namespace) -> int:
    cfg = load_checked_config(args)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("download", help="fetch HAM10000 from Harvard Dataverse")
    d.add_argument("--dest", required=True)
    d.add_argument("--doi", default="doi:10.7910/DVN/DBW86T")
    d.add_argument("--server", default="https://dataverse.harvard.edu")
    d.add_argument("--retries", type=int_at_least(0), default=5)
    d.add_argument("--no-extract", action="store_true")
    d.set_defaults(func=_cmd_download)

    s = sub.add_parser("split", help="lesion-grouped stratified folds -> folds.csv")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="HAM10000's labels file (HAM10000_metadata.csv)")
    source.add_argument(
        "--metadata", dest="labels", action=DeprecatedOption, new="--labels", help=argparse.SUPPRESS
    )
    source.add_argument("--config", help="a config whose data section names any labelled set")
    s.add_argument("--folds", type=int_at_least(2), default=None, help="default: cv.n_folds")
    s.add_argument("--seed", type=int, default=None, help="default: cv.seed")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="key=value, with --config")
    s.set_defaults(func=_cmd_split)

    a = sub.add_parser("audit-leakage", help="metric inflation of image-level vs lesion folds")
    a.add_argument("--config", default=None)
    a.add_argument("--resume", action="store_true")
    a.add_argument("--n-boot", type=int_at_least(0), default=None)
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("overrides", nargs="*", help="key=value")
    a.set_defaults(func=_cmd_audit)
