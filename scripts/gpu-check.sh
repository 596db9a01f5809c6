#!/usr/bin/env bash
# gpu-check.sh: what one GPU session needs to know, in two stages, each one device call
# (see ../shared/device/README.md). Prepare with ../shared/device/bundle.sh, then run with
# the device tool: carry [".device"], command `bash scripts/gpu-check.sh short` (first, at
# once), then, once the short stage passes, `bash scripts/gpu-check.sh long`.
#
#   short (budget GPU_CHECK_BUDGET_S, default 240 s): does it work?
#     1. nvidia-smi, `enkf-dnn --version`;
#     2. every GPU test executable (gpu_*, kernels_compile), each TEST in its own process
#        (a sticky device fault then fails one test, not every later one);
#     3. compute-sanitizer: memcheck on one forward and one update test, racecheck on the
#        forward test (skipped when the tool is missing; the stage goes on if it fails);
#     4. bench at J = 1000 and 5000 (FP32, sequential rule);
#     5. 300 iterations at J = 5000 with their test error.
#   long (budget default 480 s): the numbers.
#     1. one MNIST epoch at J = 5000, FP32 (the headline: test error ≤ 4.5 %);
#     2. J = 50,000 for 20 iterations (memory and scale);
#     3. bench with --math tf32 and with --update batch (J = 1000, 5000, 10000);
#        then the EKI variants (transform, dmc, tikhonov, nesterov, additive inflation),
#        100 iterations each at J = 5000, and layer-spec networks on the per-layer kernels
#        (bench of the paper's network as a spec; an MLP and a CNN, 100 iterations each at
#        J = 5000), none of which has run on a GPU before;
#     4. ncu --clock-control none on the forward kernel: its achieved FLOP rate (skipped
#        or recorded as failed when ncu is missing or refuses);
#     5. one MNIST epoch at J = 5000 with --math tf32, if the budget still allows.
# Every step runs under its own `timeout` and all under the stage's budget, so the script
# ends in time even when a step hangs; a failing step is recorded and the next one runs.
# Logs and run folders are written under $LOGS (default /tmp/gpu-check/<stage>): <step>.log
# and <run>/. At the end $OUT (what the device tool brings back: at most 8 files) gets four:
# <stage>-summary.md (step, exit code, seconds, key number; also printed last),
# <stage>-bench.md, <stage>-curves.txt and <stage>-logs.tar.gz (every log, and each run's
# metrics.csv, config.json and adaptive.csv; not the weights or the statistics).
set -u
cd "$(dirname "$0")/.."
STAGE=${1:-short}
case "$STAGE" in
  short) DEFAULT_BUDGET=240 ;;
  long) DEFAULT_BUDGET=480 ;;
  *) echo "usage: $0 [short|long]" >&2; exit 64 ;;
esac
OUT=${OUT:-$PWD/gpu-check-out}
LOGS=${LOGS:-/tmp/gpu-check/$STAGE}
mkdir -p "$OUT" "$LOGS"
BUDGET=${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}
BIN=.device/bin/enkf-dnn
START=$SECONDS
SUMMARY=()

if [ ! -x "$BIN" ] || [ ! -d .device/tests ]; then
  echo "no .device/bin/enkf-dnn or .device/tests: run ../shared/device/bundle.sh first and carry .device" >&2
  exit 2
fi

# The driver's libcuda is on the loader path; the toolkit's cuBLAS, cuSOLVER and NVRTC may
# sit only in a CUDA folder or in a Python wheel (PyTorch's nvidia/cu13/lib): add the
# folder of each one the loader does not know, so the backend finds them.
for lib in libcublas.so libcublasLt.so libcusolver.so libnvrtc.so; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    hit=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets /usr/local/cuda* /usr/lib \
      /opt -name "$lib*" 2>/dev/null | head -1)
    [ -n "$hit" ] && LD_LIBRARY_PATH="$(dirname "$hit")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

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
# Runs CMD under timeout min(MAX, remaining budget), logging to $LOGS/NAME.log; skipped
# when less than MIN_SECONDS remain. NOTE-COMMAND (a shell snippet, may be ":") prints
# the key number for the summary, reading the log in $LOG. Sets STEP_RC.
step() {
  local name=$1 max=$2 min=$3 note=$4
  shift 5
  local left lim t0 rc
  left=$(remaining)
  if [ "$left" -lt "$min" ]; then
    echo "=== $name: skipped ($left s of budget left, needs $min)"
    SUMMARY+=("| $name | skipped | 0 | budget: ${left} s left |")
    STEP_RC=skipped
    return
  fi
  lim=$((max < left ? max : left))
  echo "=== $name (timeout ${lim} s): $*"
  t0=$SECONDS
  LOG="$LOGS/$name.log"
  timeout --kill-after=10 "$lim" "$@" > "$LOG" 2>&1
  rc=$?
  tail -n 15 "$LOG"
  local dt=$((SECONDS - t0))
  local key
  key=$(LOG="$LOG" bash -c "$note" 2>/dev/null | tr '\n|' ' /' | cut -c1-160)
  [ "$rc" -eq 124 ] && key="TIMED OUT after ${lim} s; $key"
  echo "=== $name: rc $rc, ${dt} s"
  SUMMARY+=("| $name | $rc | $dt | $key |")
  STEP_RC=$rc
}

# Key numbers pulled from logs.
note_bench='grep -E "^J = " "$LOG" | tr "\n" ";"'
# last evaluated test error of a run folder's metrics.csv (column test_error)
last_error() {
  local csv=$1/metrics.csv
  [ -f "$csv" ] || { echo "no $csv"; return; }
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "test_error") c = i; next }
           c && $c != "" { it = $1; e = $c }
           END { printf "iteration %s: test error %s %%; ", it, e }' "$csv"
}
export -f last_error
note_run() { echo 'last_error "'"$LOGS/$1"'"; grep -E "final test error|per iteration|Error|error:|GiB" "$LOG" | tail -3 | cut -c1-110'; }

# tests EXECUTABLE: every test of a test executable in its own process, one summary row
# per executable (passed, failed, timed out, and the names of the failures).
run_tests() {
  local t=$1 name list pass=0 fail=0 failed="" t0=$SECONDS
  name=$(basename "$t")
  LOG="$LOGS/test-$name.log"
  : > "$LOG"
  list=$("$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
  for tc in $list; do
    local left=$(( $(remaining) ))
    if [ "$left" -lt 15 ]; then
      failed+=" (budget out before $tc)"
      break
    fi
    local lim=$((left < 90 ? left : 90))
    echo "--- $name $tc" >> "$LOG"
    if timeout --kill-after=5 "$lim" "$t" --exact "$tc" --test-threads=1 --nocapture >> "$LOG" 2>&1; then
      pass=$((pass + 1))
    else
      fail=$((fail + 1))
      failed+=" $tc"
      echo "FAILED: $tc" >> "$LOG"
    fi
  done
  local why=""
  [ "$fail" -gt 0 ] && why=$(grep -m1 -A1 "panicked at" "$LOG" | tail -1 | cut -c1-120 | tr '|' '/')
  echo "=== test-$name: $pass passed, $fail failed${failed:+:$failed} ($((SECONDS - t0)) s)${why:+; first failure: $why}"
  grep -E "^GPU: " "$LOG" | head -1
  SUMMARY+=("| test-$name | $fail | $((SECONDS - t0)) | $pass passed, $fail failed${failed:+:$failed}${why:+; first: $why} |")
}

device_header() {
  step nvidia-smi 30 5 'grep -m1 -E "H200|H100|A100|L40|RTX|NVIDIA" "$LOG"' -- \
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
  nvidia-smi 2>&1 | head -20 > "$LOGS/nvidia-smi-full.log"
  "$BIN" --version 2>&1 | tee "$LOGS/version.log"
}

short_stage() {
  device_header
  # ---- 2. the GPU tests, one process per test
  for t in .device/tests/gpu_* .device/tests/kernels_compile*; do
    [ -x "$t" ] && run_tests "$t"
  done
  # ---- 3. compute-sanitizer (small J, a few seconds each)
  if command -v compute-sanitizer > /dev/null 2>&1; then
    local twins
    twins=$(ls .device/tests/gpu_twins* 2>/dev/null | head -1)
    if [ -n "$twins" ]; then
      local san=(compute-sanitizer --error-exitcode 1 --print-limit 20)
      local pick='grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$LOG" | tr "\n" " "'
      step memcheck-forward 60 20 "$pick" -- "${san[@]}" --tool memcheck \
        "$twins" --exact forward_matches_cpu_for_every_arch_and_activation --test-threads=1
      step memcheck-update 60 20 "$pick" -- "${san[@]}" --tool memcheck \
        "$twins" --exact enkf_update_matches_cpu_for_both_rules_and_orders --test-threads=1
      step racecheck-forward 60 20 "$pick" -- "${san[@]}" --tool racecheck \
        "$twins" --exact forward_matches_cpu_for_every_arch_and_activation --test-threads=1
    fi
  else
    SUMMARY+=("| compute-sanitizer | skipped | 0 | not installed |")
  fi
  # ---- 4. bench at J = 1000 and 5000
  step bench-fp32 60 20 "$note_bench" -- "$BIN" bench --backend cuda -J 1000,5000 --iters 20 \
    --warmup 3 --csv "$LOGS/bench-fp32.csv"
  # ---- 5. 300 iterations at J = 5000
  step j5000-300 90 30 "$(note_run j5000-300)" -- "$BIN" train --backend cuda --members 5000 \
    --iterations 300 --eval-every 100 --out "$LOGS/j5000-300"
}

long_stage() {
  device_header
  # ---- 1. one epoch at J = 5000, FP32
  step epoch-fp32 240 100 "$(note_run epoch-fp32)" -- "$BIN" train --backend cuda \
    --members 5000 --epochs 1 --out "$LOGS/epoch-fp32"
  # ---- 2. scale: J = 50,000, 20 iterations
  step j50000 90 40 "$(note_run j50000)" -- "$BIN" train --backend cuda --members 50000 \
    --iterations 20 --eval-every 10 --out "$LOGS/j50000"
  # ---- 3. benchmark variants
  local bench=(bench --backend cuda -J 1000,5000,10000 --iters 20 --warmup 3)
  step bench-tf32 60 25 "$note_bench" -- "$BIN" "${bench[@]}" --math tf32 --csv "$LOGS/bench-tf32.csv"
  step bench-batch 60 25 "$note_bench" -- "$BIN" "${bench[@]}" --update batch --csv "$LOGS/bench-batch.csv"
  # ---- 3b. the EKI variants (issue 13) on the device: 100 iterations each at J = 5000
  local v name
  for v in "transform:--update transform" "dmc:--update batch --step dmc" \
    "tikhonov:--update batch --tikhonov 1" "nesterov:--accelerator nesterov" \
    "additive:--additive-inflation 0.3 --additive-from spread" \
    "transform-additive:--update transform --additive-inflation 0.3 --additive-from spread"; do
    name="variant-${v%%:*}"
    # shellcheck disable=SC2086 # the flags are meant to split
    step "$name" 60 15 "$(note_run "$name")" -- "$BIN" train --backend cuda --members 5000 \
      --iterations 100 --eval-every 50 ${v#*:} --out "$LOGS/$name"
  done
  # ---- 3c. layer-spec networks on CUDA (issue 12, never run on a GPU before): the paper's
  # network through the per-layer kernels (bench: against the fused rows above), the
  # 6-layer MLP of `reproduce deep` and a deeper convolutional network, 100 iterations each
  local paper_spec="conv2d(10,5,bias=false) logistic maxpool2d(2) conv2d(20,5,bias=false) logistic maxpool2d(2) flatten linear(10,bias=false)"
  step bench-spec 60 20 "$note_bench" -- "$BIN" bench --backend cuda -J 1000,5000 --iters 10 \
    --warmup 2 --net "$paper_spec" --csv "$LOGS/bench-spec.csv"
  for v in "mlp6:flatten linear(32) logistic linear(32) logistic linear(32) logistic linear(32) logistic linear(32) logistic linear(10)" \
    "cnn4:conv2d(16,3,padding=1) logistic conv2d(16,3,padding=1) logistic maxpool2d(2) conv2d(32,3,padding=1) logistic maxpool2d(2) flatten linear(64) logistic linear(10)"; do
    name="spec-${v%%:*}"
    step "$name" 60 15 "$(note_run "$name")" -- "$BIN" train --backend cuda --members 5000 \
      --iterations 100 --eval-every 50 --net "${v#*:}" --out "$LOGS/$name"
  done
  # ---- 3d. SGD through the CUDA backpropagation of a layer-spec network (issue 12, never
  # run on a GPU before): one epoch of the convolutional network above (the loop's last
  # entry, still in v)
  step spec-sgd 45 15 "$(note_run spec-sgd)" -- "$BIN" train --backend cuda --optimizer sgd \
    --epochs 1 --eval-every 500 --net "${v#*:}" --out "$LOGS/spec-sgd"
  # ---- 4. the forward kernel's achieved FLOP rate (ncu, unlocked clocks). bench launches
  # ensemble_forward_f32 three times an iteration (J members, then the mean network on the
  # batch and on the test set): launch 3 is the J = 5000 forward of the second iteration.
  if command -v ncu > /dev/null 2>&1; then
    local metrics=gpu__time_duration.sum,sm__sass_thread_inst_executed_op_ffma_pred_on.sum,sm__sass_thread_inst_executed_op_fadd_pred_on.sum,sm__sass_thread_inst_executed_op_fmul_pred_on.sum,sm__warps_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed
    local flops='awk '"'"'/gpu__time_duration.sum/ { t = $NF; u = $(NF-1) } /op_ffma_pred_on.sum/ { f = $NF } /op_fadd_pred_on.sum/ { a = $NF } /op_fmul_pred_on.sum/ { m = $NF } /warps_active/ { o = $NF }
      END { gsub(",", "", t); gsub(",", "", f); gsub(",", "", a); gsub(",", "", m); s = (u == "msecond" ? t / 1e3 : (u == "usecond" ? t / 1e6 : t / 1e9)); if (s > 0) printf "forward %.3f ms, %.1f TFLOP/s FP32, occupancy %s %%", s * 1e3, (2 * f + a + m) / s / 1e12, o }'"'"' "$LOG"'
    step ncu-forward 90 40 "$flops" -- ncu --clock-control none --kernel-name ensemble_forward_f32 \
      --launch-skip 3 --launch-count 1 --metrics "$metrics" \
      "$BIN" bench --backend cuda -J 5000 --iters 2 --warmup 2
  else
    SUMMARY+=("| ncu-forward | skipped | 0 | ncu not installed |")
  fi
  # ---- 5. one epoch at J = 5000, TF32, if a whole one fits
  step epoch-tf32 200 130 "$(note_run epoch-tf32)" -- "$BIN" train --backend cuda \
    --members 5000 --epochs 1 --math tf32 --out "$LOGS/epoch-tf32"
}

"${STAGE}_stage"

# ---- summary
for f in "$LOGS"/bench-*.log; do
  [ -f "$f" ] && { echo "--- $(basename "$f" .log)"; grep -E "^\|" "$f"; }
done | tee "$LOGS/bench-tables.md"
for r in j5000-300 epoch-fp32 epoch-tf32; do
  csv="$LOGS/$r/metrics.csv"
  [ -f "$csv" ] || continue
  echo "--- $r: test error every evaluation (iteration, %, elapsed s)"
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "test_error") c = i; if ($i == "elapsed_s") s = i }; next }
           c && $c != "" { printf "%s, %s, %s\n", $1, $c, (s ? $s : "") }' "$csv"
done | tee "$LOGS/curves.txt"
{
  echo "stage: $STAGE"
  echo
  echo "| step | rc | s | key |"
  echo "|---|---:|---:|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total: $((SECONDS - START)) s of a ${BUDGET} s budget"
} | tee "$LOGS/summary.md"

# ---- what comes back: four files
cp "$LOGS/summary.md" "$OUT/$STAGE-summary.md"
cp "$LOGS/bench-tables.md" "$OUT/$STAGE-bench.md"
cp "$LOGS/curves.txt" "$OUT/$STAGE-curves.txt"
tar -czf "$OUT/$STAGE-logs.tar.gz" -C "$LOGS" --exclude='*.npy' --exclude='*.safetensors' \
  --exclude='stats.csv' --exclude='hist.csv' --exclude='checkpoint.bin' . 2>/dev/null
ls -l "$OUT"
