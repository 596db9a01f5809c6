#!/usr/bin/env bash
# sass-report.sh: the machine code of every kernel, without a GPU. Compiles kernels/*.cu
# to sm_90 cubins with the pinned nvcc 13.0 (the .cuda13 environment of .ci/run), prints
# registers/spills (ptxas -v) and, per kernel and per loop, the SASS instruction mix
# (scripts/sass_loops.py over `cuobjdump -sass`). For a kernel bound by instruction
# issue, such as ensemble_forward_f32, the static counts of its loops times their trip
# counts give the instructions per image, so two versions of a kernel can be compared
# here before a GPU session times them.
#
# cuobjdump and nvdisasm are not in the pinned 13.0 set on PyPI; the 13.2 ones read sm_90
# cubins built by 13.0 and go in their own environment (.sass-tools, ignored by git).
# Usage: bash scripts/sass-report.sh [kernel.cu ...]   (default: every kernels/*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
CU=$(echo "$PWD"/.cuda13/lib/python3*/site-packages/nvidia/cu13)
if [ ! -x "$CU/bin/nvcc" ]; then
  echo "no .cuda13 nvcc: run .ci/run once (or its pip line) first" >&2
  exit 2
fi
if [ ! -x .sass-tools/bin/pip ]; then
  python3 -m venv .sass-tools
fi
.sass-tools/bin/pip install -q --disable-pip-version-check \
  nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51
TOOLS=$(echo "$PWD"/.sass-tools/lib/python3*/site-packages/nvidia/cu13/bin)
OUTDIR=${SASS_OUT:-target/sass}
mkdir -p "$OUTDIR"
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(kernels/*.cu)
for f in "${files[@]}"; do
  base=$(basename "$f" .cu)
  echo "######## $f"
  "$CU/bin/nvcc" -cubin -arch=sm_90 -Ikernels -Xptxas -v -o "$OUTDIR/$base.cubin" "$f" 2>&1 |
    grep -E "Function properties|registers|spill" | sed 's/^ptxas info    : //'
  PATH="$TOOLS:$PATH" "$TOOLS/cuobjdump" -sass "$OUTDIR/$base.cubin" > "$OUTDIR/$base.sass"
  python3 scripts/sass_loops.py "$OUTDIR/$base.sass"
done
