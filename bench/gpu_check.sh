#!/usr/bin/env bash
# One prepared call on a GPU machine (fits in 8 minutes): numerics of the fused kernels against the float64
# reference in fp32/fp16/bf16 (`hcd verify`), then the benchmarks (`hcd bench`). Full logs and the results
# JSON go under $OUT (or bench/results); the short tables are printed last.
#   PYTHONPATH=. bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
dest="${OUT:-bench/results}"
mkdir -p "$dest"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown (no .git)"
  date -u +%Y-%m-%dT%H:%MZ
} > "$dest/machine.txt" 2>&1

timeout 200 python -m engine.cli verify > "$dest/verify.txt" 2>&1
verify_rc=$?
timeout 260 python -m engine.cli bench --out "$dest" > "$dest/bench.txt" 2>&1
bench_rc=$?

echo "== machine"; cat "$dest/machine.txt"
echo "== hcd verify (exit $verify_rc)"; tail -n 40 "$dest/verify.txt"
echo "== hcd bench (exit $bench_rc)"; tail -n 60 "$dest/bench.txt"
[ "$verify_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
