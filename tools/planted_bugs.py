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
        "prepare_image(source, spec.size, spec.interpolation, spec.colour_constancy, spec.detail)",
        "prepare_image(source, spec.size, spec.interpolation, False, spec.detail)",
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
