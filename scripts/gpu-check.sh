#!/usr/bin/env bash
# gpu-check.sh: everything one GPU session needs to know, in one run on the device
# machine (see ../shared/device/README.md). Prepare with ../shared/device/bundle.sh, then
# run with the device tool: carry [".device"], command `bash scripts/gpu-check.sh`.
#
# Steps, in order of importance, each under its own `timeout` and all under one overall
# budget (GPU_CHECK_BUDGET_S, default 540 s), so the script ends in time even when a step
# hangs; a failing step is recorded and the next one runs:
#   1. nvidia-smi summary;
#   2. the GPU test executables (gpu_*, kernels_compile) with REQUIRE_GPU=1 and
#      ENKF_DATA_DIR as .device/run-tests.sh sets them (one timeout and one exit code per
#      executable, rather than run-tests.sh's single pass);
#   3. bench at J = 1000, 5000, 10000 (FP32, sequential rule);
#   4. one MNIST epoch at J = 5000, FP32 (the headline: ≤ 90 s, test error ≤ 4.5 %);
#   5. J = 50,000 for 20 iterations (memory and scale);
#   6. bench with --math tf32 and with --update batch;
#   7. every other (CPU-only) test executable, as run-tests.sh would run it;
#   8. one MNIST epoch at J = 5000 with --math tf32, if the budget still allows.
# Logs go to $OUT/*.log (each step's stdout and stderr), run folders to $OUT/epoch-*,
# and a summary table (step, exit code, seconds, key number) is printed last and written
# to $OUT/summary.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-540}
BIN=.device/bin/enkf-dnn
START=$SECONDS
SUMMARY=()

if [ ! -x "$BIN" ] || [ ! -d .device/tests ]; then
  echo "no .device/bin/enkf-dnn or .device/tests: run ../shared/device/bundle.sh first and carry .device" >&2
  exit 2
fi

export REQUIRE_GPU=1
if [ -n "$(ls -A .device/data 2>/dev/null)" ]; then
  for d in data/*/; do
    [ -d "$d" ] && [ ! -e ".device/data/$(basename "$d")" ] && ln -s "$PWD/$d" ".device/data/"
  done
  export ENKF_DATA_DIR="$PWD/.device/data"
else
  export ENKF_DATA_DIR="$PWD/data"
fi

remaining() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS MIN_SECONDS NOTE-COMMAND -- CMD...
# Runs CMD under timeout min(MAX, remaining budget), logging to $OUT/NAME.log; skipped
# when less than MIN_SECONDS remain. NOTE-COMMAND (a shell snippet, may be ":") prints
# the key number for the summary, reading the log in $LOG.
step() {
  local name=$1 max=$2 min=$3 note=$4
  shift 5
  local left lim t0 rc
  left=$(remaining)
  if [ "$left" -lt "$min" ]; then
    echo "=== $name: skipped ($left s of budget left, needs $min)"
    SUMMARY+=("| $name | skipped | 0 | budget: ${left} s left |")
    return
  fi
  lim=$((max < left ? max : left))
  echo "=== $name (timeout ${lim} s): $*"
  t0=$SECONDS
  LOG="$OUT/$name.log"
  timeout --kill-after=10 "$lim" "$@" 2>&1 | tee "$LOG"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  local key
  key=$(LOG="$LOG" bash -c "$note" 2>/dev/null | tr '\n|' ' /' | cut -c1-140)
  [ "$rc" -eq 124 ] && key="TIMED OUT after ${lim} s; $key"
  echo "=== $name: rc $rc, ${dt} s"
  SUMMARY+=("| $name | $rc | $dt | $key |")
}

# Key numbers pulled from logs.
note_tests='grep -E "^test result:" "$LOG" | awk "{p+=\$4; f+=\$6} END {printf \"%d passed, %d failed\", p, f}"; grep -m3 -E "skipped|panicked" "$LOG"'
note_bench='grep -E "^J = " "$LOG" | tr "\n" ";"'
# last evaluated test error of a run folder's metrics.csv (column test_error)
last_error() {
  local csv=$1/metrics.csv
  [ -f "$csv" ] || { echo "no $csv"; return; }
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "test_error") c = i; next }
           c && $c != "" { it = $1; e = $c; el = $NF }
           END { printf "iteration %s: test error %s %%; ", it, e }' "$csv"
}
export -f last_error

# ---- 1. the device
step nvidia-smi 30 5 'grep -m1 -E "H200|H100|NVIDIA" "$LOG"' -- \
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
nvidia-smi | tee -a "$OUT/nvidia-smi.log" | head -20
"$BIN" --version 2>&1 | tee "$OUT/version.log"

# ---- 2. GPU test executables (one test at a time: --test-threads=1)
for t in .device/tests/gpu_* .device/tests/kernels_compile*; do
  [ -x "$t" ] || continue
  step "test-$(basename "$t")" 300 60 "$note_tests" -- "$t" --test-threads=1
done

# ---- 3. benchmark, FP32 sequential
BENCH=(bench --backend cuda -J 1000,5000,10000 --iters 20 --warmup 3)
step bench-fp32 120 40 "$note_bench" -- "$BIN" "${BENCH[@]}" --csv "$OUT/bench-fp32.csv"

# ---- 4. one epoch at J = 5000, FP32
step epoch-fp32 240 120 'last_error "'"$OUT"'/epoch-fp32"; grep -E "final test error|per iteration" "$LOG" | cut -c1-90' -- \
  "$BIN" train --backend cuda --members 5000 --epochs 1 --out "$OUT/epoch-fp32"

# ---- 5. scale: J = 50,000, 20 iterations
step j50000 150 60 'last_error "'"$OUT"'/j50000"; grep -E "final test error|per iteration|Error|GiB" "$LOG" | tail -2 | cut -c1-90' -- \
  "$BIN" train --backend cuda --members 50000 --iterations 20 --eval-every 10 --out "$OUT/j50000"

# ---- 6. benchmark variants
step bench-tf32 90 40 "$note_bench" -- "$BIN" "${BENCH[@]}" --math tf32 --csv "$OUT/bench-tf32.csv"
step bench-batch 90 40 "$note_bench" -- "$BIN" "${BENCH[@]}" --update batch --csv "$OUT/bench-batch.csv"

# ---- 7. the CPU-only test executables (CI runs them too; here they confirm the bundle)
for t in .device/tests/*; do
  case "$(basename "$t")" in gpu_*|kernels_compile*) continue ;; esac
  [ -x "$t" ] || continue
  step "test-$(basename "$t")" 180 40 "$note_tests" -- "$t"
done

# ---- 8. one epoch at J = 5000, TF32, if the budget allows a whole one
step epoch-tf32 240 150 'last_error "'"$OUT"'/epoch-tf32"; grep -E "final test error|per iteration" "$LOG" | cut -c1-90' -- \
  "$BIN" train --backend cuda --members 5000 --epochs 1 --math tf32 --out "$OUT/epoch-tf32"

# ---- summary
for f in "$OUT"/bench-*.log; do
  [ -f "$f" ] && { echo "--- $(basename "$f" .log)"; grep -E "^\|" "$f"; }
done | tee "$OUT/bench-tables.md"
for r in epoch-fp32 epoch-tf32; do
  csv="$OUT/$r/metrics.csv"
  [ -f "$csv" ] || continue
  echo "--- $r: test error every evaluation (iteration, %, elapsed s)"
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "test_error") c = i; if ($i == "elapsed_s") s = i }; next }
           c && $c != "" { printf "%s, %s, %s\n", $1, $c, (s ? $s : "") }' "$csv"
done | tee "$OUT/curves.txt"
{
  echo "| step | rc | s | key |"
  echo "|---|---:|---:|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total: $((SECONDS - START)) s of a ${BUDGET} s budget"
} | tee "$OUT/summary.md"
