"""Plant known bugs one at a time in a copy of the repository and check that the suite catches each.

Each bug is a one-place source edit (file, exact old text, new text) and the tests that should
fail with it. For every bug the working tree's tracked and untracked files are copied to a
temporary folder, the edit is applied, and those tests run there with the copy's ``src`` first on
``PYTHONPATH``. A bug whose tests still pass is a hole in the suite: the script prints it and
exits 1.

    python tools/planted_bugs.py            # every bug
    python tools/planted_bugs.py --list     # names only
    python tools/planted_bugs.py resume_forgets_best oof_one_view
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


_OOF = "tests/inference/test_oof_reproduction.py"
_SOURCES = "tests/training/test_multi_source.py"
_RANKS = "tests/training/test_rank_wiring.py"
_EXPLAIN = "tests/inference/test_explain.py"
_KEYS = "tests/core/test_config_keys.py"
_YARD = "tests/evaluation/test_yardstick.py"

BUGS: tuple[Bug, ...] = (
    Bug(
        "focal_int_gamma",
        "src/skinlesion/training/losses.py",
        ".pow(self.gamma) if self.gamma",
        ".pow(int(self.gamma)) if self.gamma",
        ("tests/training/test_losses_closed_form.py",),
    ),
    Bug(
        "focal_detached_modulator",
        "src/skinlesion/training/losses.py",
        "modulator = (1 - logp.exp())",
        "modulator = (1 - logp.exp().detach())",
        ("tests/training/test_losses_closed_form.py",),
    ),
    Bug(
        "resume_forgets_best",
        "src/skinlesion/training/fold_trainer.py",
        'self.state = dict(last["state"])',
        'self.state = {**last["state"], "best_val_loss": math.inf}',
        ("tests/training/test_selection.py::test_resumed_run_ships_the_same_best_checkpoint",),
    ),
    Bug(
        "early_stop_never_fires",
        "src/skinlesion/training/fold.py",
        'if cfg.train.patience and tr.state["bad_epochs"] >= cfg.train.patience:',
        'if cfg.train.patience and tr.state["bad_epochs"] >= cfg.train.patience + 10**6:',
        ("tests/training/test_selection.py::test_early_stopping_stops_where_it_should",),
    ),
    Bug(
        "last_epoch_kept",
        "src/skinlesion/training/fold.py",
        'if tr.state["best_epoch"] == row["epoch"]:',
        "if True:",
        ("tests/training/test_selection.py",),
    ),
    Bug(
        "oof_one_view",
        "src/skinlesion/training/fold.py",
        "_eval_batch_size(cfg), runtime, cfg.eval.tta, meta)",
        "_eval_batch_size(cfg), runtime, 1, meta)",
        ("tests/inference/test_oof_reproduction.py",),
    ),
    Bug(
        "probe_records_one_view",
        "src/skinlesion/training/probe.py",
        '"tta": PROBE_FLIP_VIEWS if cfg.train.probe_flips else 1',
        '"tta": 1',
        ("tests/inference/test_oof_reproduction.py",),
    ),
    Bug(
        "failed_rows_uniform",
        "src/skinlesion/inference/predict.py",
        "    bar.close()\n    return Predictions(out, errors, unfamiliar)",
        "    bar.close()\n    out[list(errors)] = 1.0 / n_classes\n"
        "    return Predictions(out, errors, unfamiliar)",
        ("tests/inference/test_ensemble.py",),
    ),
    Bug(
        "mel_flag_at_half",
        "src/skinlesion/inference/table.py",
        "bool(p_mel >= threshold)",
        "bool(p_mel >= 0.5)",
        (
            "tests/inference/test_table.py::"
            "test_every_entry_point_flags_the_same_rows_at_the_cards_threshold",
        ),
    ),
    Bug(
        "folds_by_image",
        "src/skinlesion/data/folds.py",
        'groups=data["lesion_id"].to_numpy()',
        'groups=data["image_id"].to_numpy()',
        ("tests/data/test_folds.py",),
    ),
    Bug(
        "sampler_inverse_sqrt",
        "src/skinlesion/data/sampling.py",
        "(1.0 / np.maximum(counts, 1)) ** power",
        "(1.0 / np.maximum(counts, 1)) ** (power / 2)",
        ("tests/data/test_sampling.py",),
    ),
    Bug(
        "temperature_multiplied",
        "src/skinlesion/evaluation/calibration.py",
        "softmax(_as_numpy(logits) / temperature)",
        "softmax(_as_numpy(logits) * temperature)",
        ("tests/evaluation/test_calibration.py",),
    ),
    Bug(
        "colour_constancy_off_at_inference",
        "src/skinlesion/data/preprocess.py",
        "prepare_image(image, spec.size, spec.interpolation, spec.colour_constancy, spec.detail)",
        "prepare_image(image, spec.size, spec.interpolation, False, spec.detail)",
        (f"{_OOF}::test_fused_finetune_with_colour_constancy_reproduces_its_oof_rows",),
    ),
    Bug(
        "age_not_standardised_at_inference",
        "src/skinlesion/inference/predict.py",
        "return encode_metadata(metadata, self.metadata, n)",
        "m = self.metadata\n"
        "        raw = MetadataSpec(m.fields, 0.0, 1.0, m.vocab, m.sites)\n"
        "        return encode_metadata(metadata, raw, n)",
        (f"{_OOF}::test_fused_finetune_with_colour_constancy_reproduces_its_oof_rows",),
    ),
    Bug(
        "probe_age_not_standardised_at_inference",
        "src/skinlesion/inference/predict.py",
        "return encode_metadata(metadata, self.metadata, n)",
        "m = self.metadata\n"
        "        raw = MetadataSpec(m.fields, 0.0, 1.0, m.vocab, m.sites)\n"
        "        return encode_metadata(metadata, raw, n)",
        (
            "tests/training/test_fusion_training.py"
            "::test_probe_with_metadata_reproduces_oof_and_evaluates",
        ),
    ),
    Bug(
        "body_limit_thousandfold",
        "src/skinlesion/serving/app.py",
        "max_body = max_bytes + _MULTIPART_SLACK",
        "max_body = 1000 * max_bytes + _MULTIPART_SLACK",
        ("tests/serving/test_app.py::test_request_body_limit_at_the_boundary",),
    ),
    Bug(
        "upload_default_thousandfold",
        "src/skinlesion/serving/uploads.py",
        "max_bytes: int = 10 * 1024 * 1024",
        "max_bytes: int = 10 * 1024 * 1024 * 1000",
        ("tests/serving/test_app.py::test_serve_command_uses_the_documented_limits",),
    ),
    Bug(
        "pixel_limit_off_by_one",
        "src/skinlesion/serving/uploads.py",
        "if w * h > limits.max_pixels:",
        "if w * h >= limits.max_pixels:",
        ("tests/serving/test_uploads.py::test_pixel_limit",),
    ),
    Bug(
        "bootstrap_ignores_lesions",
        "src/skinlesion/evaluation/metrics.py",
        "    if groups is None:\n        return _row_counts(",
        "    if True:\n        return _row_counts(",
        ("tests/evaluation/test_metrics.py",),
    ),
    # Wiring: the helpers stay right, the product stops calling them as it should.
    Bug(
        "loss_without_the_source_mask",
        "src/skinlesion/training/steps.py",
        "loss = criterion(logits, y) if mask is None else criterion(logits, y, mask)",
        "loss = criterion(logits, y)",
        (f"{_SOURCES}::test_every_training_step_masks_each_image_to_its_source",),
    ),
    Bug(
        "sampler_without_sources",
        "src/skinlesion/training/fold_trainer.py",
        "sources=table_sources(train_t),",
        "sources=None,",
        (f"{_SOURCES}::test_the_sampler_draws_by_source_and_class",),
    ),
    Bug(
        "ranks_share_one_stream",
        "src/skinlesion/training/fold_trainer.py",
        "tr.seed_epoch(cfg.seed, d.rank)",
        "tr.seed_epoch(cfg.seed, 0)",
        (f"{_RANKS}::test_each_rank_draws_its_own_augmentation_and_dropout",),
    ),
    Bug(
        "every_rank_saves_epochs",
        "src/skinlesion/training/fold.py",
        "        if runtime.dist.is_main:\n            _save_epoch(",
        "        if True:\n            _save_epoch(",
        (f"{_RANKS}::test_only_rank_0_writes_logs_and_tracks",),
    ),
    Bug(
        "every_rank_tracks",
        "src/skinlesion/training/cv.py",
        "tracker = open_tracker(saved, run, dist_info.is_main, resume)",
        "tracker = open_tracker(saved, run, True, resume)",
        (f"{_RANKS}::test_only_rank_0_writes_logs_and_tracks",),
    ),
    Bug(
        "graph_key_without_familiarity",
        "src/skinlesion/inference/backend.py",
        "_BESIDE = (FAMILIARITY_FILE, MODEL_FILE)",
        "_BESIDE = (MODEL_FILE,)",
        (
            "tests/inference/test_graph_key.py",
            "tests/training/test_fit_familiarity.py"
            "::test_fit_familiarity_skips_members_that_have_one_and_fits_the_same_again",
        ),
    ),
    Bug(
        "graph_key_without_spec",
        "src/skinlesion/inference/backend.py",
        "[m.fold, m.temperature, m.spec.to_dict()]",
        "[m.fold, m.temperature]",
        ("tests/inference/test_graph_key.py",),
    ),
    Bug(
        "explain_ignores_the_requested_class",
        "src/skinlesion/inference/explain.py",
        "classes = [int(p.argmax()) if class_index is None else class_index for p in probs]",
        "classes = [int(p.argmax()) for p in probs]",
        (f"{_EXPLAIN}::test_a_requested_class_is_the_one_whose_map_is_drawn",),
    ),
    Bug(
        "explain_drops_tta",
        "src/skinlesion/inference/explain.py",
        "(ex,) = explain_images([src], members, runtime, tta, class_index)",
        "(ex,) = explain_images([src], members, runtime, class_index=class_index)",
        (f"{_EXPLAIN}::test_explain_command_predicts_with_the_tta_it_is_given",),
    ),
    Bug(
        "explain_command_drops_the_class",
        "src/skinlesion/inference/explain.py",
        "(ex,) = explain_images([src], members, runtime, tta, class_index)",
        "(ex,) = explain_images([src], members, runtime, tta)",
        (f"{_EXPLAIN}::test_explain_command_class_reaches_every_map",),
    ),
    Bug(
        "mixstyle_mixes_in_evaluation",
        "src/skinlesion/models/mixstyle.py",
        "if not root.training or torch.rand(()) >= p:",
        "if torch.rand(()) >= p:",
        (
            "tests/models/test_mixstyle.py::test_hooks_mix_in_training_only_and_with_their_probability",
        ),
    ),
    Bug(
        "resume_allows_more_epochs",
        "src/skinlesion/core/run_folder.py",
        '    ("train", "num_threads"),\n',
        '    ("train", "num_threads"),\n    ("train", "epochs"),\n',
        (f"{_KEYS}::test_resume_refuses_every_key_but_the_per_run_ones",),
    ),
    Bug(
        "resume_compares_all_keys_but_the_last",
        "src/skinlesion/core/run_folder.py",
        "        for key in old_leaves\n",
        "        for key in list(old_leaves)[:-1]\n",
        (f"{_KEYS}::test_resume_refuses_every_key_but_the_per_run_ones",),
    ),
    Bug(
        "untested_new_default",
        "src/skinlesion/core/config.py",
        "    calibrate: bool = True\n",
        "    calibrate: bool = True\n    views_seed: int = 0\n",
        (f"{_KEYS}::test_every_default_no_shipped_config_sets_is_exercised_by_a_test",),
    ),
    Bug(
        "float16_without_the_size_rule",
        "src/skinlesion/publishing/package.py",
        "small = v.numel() < _FLOAT16_MIN_ELEMENTS or name.endswith(_FLOAT32_SUFFIXES)",
        "small = name.endswith(_FLOAT32_SUFFIXES)",
        (
            "tests/inference/test_packaged.py"
            "::test_float16_weights_keep_probabilities_within_the_documented_bound",
        ),
    ),
    Bug(
        "float16_batchnorm_variance",
        "src/skinlesion/publishing/package.py",
        '_FLOAT32_SUFFIXES = ("running_mean", "running_var")',
        '_FLOAT32_SUFFIXES = ("running_mean",)',
        ("tests/inference/test_packaged.py::test_packaged_weights_follow_the_float32_rule",),
    ),
    Bug(
        "yardstick_ignores_training_randomness",
        "src/skinlesion/evaluation/yardstick.py",
        "draws = {side: rng.integers(0, k, size=(n_boot, k)) for side, k in n_runs.items()}",
        "draws = {side: np.tile(np.arange(k), (n_boot, 1)) for side, k in n_runs.items()}",
        (f"{_YARD}::test_runs_are_averaged_and_their_spread_widens_the_interval",),
    ),
    Bug(
        "yardstick_seed_run_keeps_the_configs_seed",
        "src/skinlesion/training/yardstick.py",
        'extra = [] if seed == own else [f"seed={seed}"]',
        "extra = []",
        (
            "tests/training/test_cross_site.py"
            "::test_yardstick_seeds_run_the_recipe_once_each_in_its_folder",
        ),
    ),
    Bug(
        "service_answers_the_wrong_request",
        "src/skinlesion/serving/batcher.py",
        "for it, row in zip(items, out, strict=True):",
        "for it, row in zip(items, out[::-1], strict=True):",
        ("tests/serving/test_app.py::test_concurrent_requests_share_batches",),
    ),
)


def check_applies(bug: Bug, root: Path = REPO) -> None:
    """Raise if the bug's old text is not in its file exactly once (the list went stale)."""
    text = (root / bug.path).read_text()
    count = text.count(bug.old)
    if count != 1:
        raise ValueError(f"{bug.name}: {bug.path} contains the old text {count} times, expected 1")


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = raw.decode()
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_bug(bug: Bug, base: Path) -> tuple[bool, float, str]:
    """Plant ``bug`` in a copy; True when its tests fail (the suite catches it).

    Only pytest's exit status 1 (tests ran and some failed) counts: a collection or import error
    (status 2) or no tests collected (5) means the plant itself broke, which proves nothing.
    """
    check_applies(bug)
    work = base / bug.name
    _copy_tree(work)
    target = work / bug.path
    target.write_text(target.read_text().replace(bug.old, bug.new))
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "SKINLESION_REQUIRE_DATA": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = tail[-1] if tail else ""
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{bug.name}: pytest exited {proc.returncode}: {summary}")
    return proc.returncode == 1, time.perf_counter() - t0, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="print the bug names and exit")
    args = parser.parse_args(argv)
    known = {b.name: b for b in BUGS}
    if args.list:
        print("\n".join(known))
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown bug(s) {unknown}; known: {sorted(known)}")
    chosen = [known[n] for n in args.names] if args.names else list(BUGS)
    missed = []
    width = max(len(b.name) for b in chosen)
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        for bug in chosen:
            caught, seconds, summary = run_bug(bug, Path(tmp))
            verdict = "caught" if caught else "MISSED"
            print(f"{bug.name:{width}s} {verdict:7s} {seconds:6.1f} s  {summary}", flush=True)
            if not caught:
                missed.append(bug.name)
    print(f"{len(chosen) - len(missed)}/{len(chosen)} planted bugs caught", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
