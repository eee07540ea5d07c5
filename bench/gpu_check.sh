#!/usr/bin/env bash
# One prepared call on a GPU machine (fits in about 8 minutes): numerics of the fused kernels against the
# float64 reference in fp32/fp16/bf16 (`hcd verify`), the benchmarks (`hcd bench --quick`: n=4 at the CIFAR
# and ImageNet shapes, bf16 and fp32, forward/backward/full, launch-inclusive and CUDA-graph device times,
# a per-launch profile at the ImageNet shape, steps), then the kernel tests compiled on CUDA (the bf16
# cases run only there; the interpreter's tests are left to CPU machines). Full logs and the results JSON
# go under $OUT (or bench/results); the short tables are printed last.
#   HCD_COMMIT=<short hash> bash bench/gpu_check.sh      (HCD_COMMIT names the commit where .git did not travel)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
dest="${OUT:-bench/results}"
mkdir -p "$dest"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${HCD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown: pass HCD_COMMIT=<hash> (no .git here)')}"
  date -u +%Y-%m-%dT%H:%MZ
} > "$dest/machine.txt" 2>&1

timeout 100 python -m hcd.engine.cli verify --json "$dest/verify.json" > "$dest/verify.txt" 2>&1
verify_rc=$?
timeout 330 python -m hcd.engine.cli bench --quick --out "$dest" > "$dest/bench.txt" 2>&1
bench_rc=$?
# the cases only CUDA can check (bf16, unchecked labels, the frozen-operand launches); the rest of the
# file runs in the interpreter on every CPU machine, and `hcd verify` covered fp32/fp16/bf16 above
timeout 60 python -m pytest tests/kernels/test_triton_kernels.py -q -p no:cacheprovider \
  -k "bf16 or out_of_range or frozen or parts" > "$dest/pytest_kernels.txt" 2>&1
tests_rc=$?

echo "== machine"; cat "$dest/machine.txt"
echo "== kernel tests on CUDA (exit $tests_rc)"; tail -n 4 "$dest/pytest_kernels.txt"
echo "== hcd verify (exit $verify_rc)"; grep -E "FAIL|imagenet|all outputs|error" "$dest/verify.txt" | tail -n 30
echo "== hcd bench (exit $bench_rc)"
if [ "$bench_rc" -eq 0 ]; then
  tr '\r' '\n' < "$dest/bench.txt" | grep -v -E "it/s|s/it" | tail -n 60
else  # cut short or failed: its last lines, then the rows it wrote (the JSON is rewritten after each row)
  tr '\r' '\n' < "$dest/bench.txt" | grep -v -E "it/s|s/it" | tail -n 8
  for f in "$dest"/*.json; do
    [ -f "$f" ] && [ "$(basename "$f")" != verify.json ] && python -m hcd.engine.cli bench --report "$f"
  done
fi
[ "$verify_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
