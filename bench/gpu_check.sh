#!/usr/bin/env bash
# One prepared call on a GPU machine (H100/H200) that fits in 8 minutes: a wheel install, then five phases,
# each with a time limit of min(its cap, what is left of HCD_CHECK_SECONDS = 465 s from the start):
#   verify   75 s  hcd verify --quick: the fused kernels against the float64 reference (fp32/fp16/bf16)
#   steps   150 s  hcd bench --quick --only step: the real trainer step (trainer._micro_step on the DeepSpeed
#                  engine of configs/imagenet/swin_tiny-resnet18.yaml: Swin-T -> ResNet18, 224 px, B=128, bf16,
#                  ZeRO-1) against the reference loop a user would write and a KD step, with a breakdown; last
#                  the ViT-recipe step (convnext_tiny-deit_tiny.yaml: erasing + Mixup/CutMix soft targets + EMA),
#                  the row the cap cuts first (the JSON is written after every row)
#   train   15 + 170 s  `hcd train` smoke: the same config on a generated folder of noise JPEGs (10 classes x
#                  64, 256 px), random teacher (no checkpoint: a smoke run needs none), torch loader, 60 steps
#                  of B=32, one worker per core: images/s and a falling loss from metrics.jsonl
#   kernels 200 s  hcd bench --quick --only kernel,profile: kernel rows, the ImageNet headline shape first
#                  (fp32 rows also with TF32 allowed for the baselines), then the per-launch profile; it writes
#                  its JSON after every row, so a run cut short by its limit still reports what it measured
#   graph    60 s  (last: it gets what is left) bench/graph_check.py --engine: train.cuda_graph_loss (the loss
#                  replayed from CUDA graphs) against the plain call, the same steps from the same start: hcd_loss alone at the headline
#                  shape (SGD, 2 micro-batches per step) and the trainer step above; losses and ms per step
# The GPU machine has PyTorch, Triton and timm but neither DeepSpeed nor a network: DeepSpeed's wheel and its
# missing pure-Python dependencies travel in .whl/ (bench/fetch_wheels.sh writes them on a machine with pip
# access) and are installed into /tmp/site first. With the device tool: carry [".whl"], command
# `bash bench/gpu_check.sh`. Logs and JSON go to $OUT (log.txt, verify.json, steps.json, graph.json,
# kernels.json, metrics.jsonl: the tool brings back at most 8 files) or bench/results; the tables are printed last.
#   HCD_COMMIT=<short hash> bash bench/gpu_check.sh      (HCD_COMMIT names the commit where .git did not travel)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
budget=${HCD_CHECK_SECONDS:-465}
dest="${OUT:-bench/results}"
work=$(mktemp -d /tmp/hcd_check.XXXXXX)
trap 'rm -rf "$work"' EXIT  # the JPEG folder and the run's checkpoints: what matters is copied to $dest
mkdir -p "$dest"
log="$dest/log.txt"
: > "$log"
declare -A status

if compgen -G ".whl/*.whl" > /dev/null; then
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$log" 2>&1; then
    echo "gpu_check: installing .whl/*.whl failed:"; tail -n 20 "$log"; exit 1
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch, triton, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__, deepspeed.__file__)" 2>&1 | tail -n 1
  echo "commit ${HCD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown: pass HCD_COMMIT=<hash> (no .git here)')}"
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$work/machine.txt" 2>&1
cat "$work/machine.txt" >> "$log"

# phase NAME CAP CMD...: CMD under a limit of min(CAP, the budget left); its output to $work/NAME.txt and the log
phase() {
  local name=$1 cap=$2 left t0 rc
  shift 2
  left=$((budget - SECONDS))
  ((left < cap)) && cap=$left
  if ((left < 20)); then status[$name]="skipped: ${left} s of the budget left"; return; fi
  t0=$SECONDS
  timeout -k 10 "$cap" "$@" > "$work/$name.txt" 2>&1
  rc=$?
  status[$name]="exit $rc after $((SECONDS - t0)) s (limit $cap s)$( ((rc == 124 || rc == 137)) && echo ': CUT SHORT')"
  { echo; echo "=== $name: $* -> ${status[$name]}"; tr '\r' '\n' < "$work/$name.txt" | grep -v -E "it/s\]|s/it\]"; } >> "$log"
}

# keep_json FOLDER NAME: a bench run's results file (finished, or .partial when cut short) as $dest/NAME
keep_json() { local f; for f in "$1"/*.json; do [ -f "$f" ] && cp "$f" "$dest/$2" && return 0; done; return 1; }

phase verify 75 $PY -m hcd.engine.cli verify --quick --json "$dest/verify.json"
phase steps 150 $PY -m hcd.engine.cli bench --quick --only step --out "$work/steps"
keep_json "$work/steps" steps.json
phase train_data 15 $PY bench/train_smoke.py data "$work/jpegs"
phase train 170 $PY -m hcd.engine.cli train --config configs/imagenet/swin_tiny-resnet18.yaml --out "$work/run" \
  --set model.num_classes=10 --set "data.root=$work/jpegs" --set data.loader=torch --set train.max_steps=60 \
  --set model.teacher_checkpoint=null --set train.save_every_steps=null --set train.log_every=10 \
  --set data.batch_size=32 --set "data.num_workers=$(nproc)"
cp "$work/run/metrics.jsonl" "$dest/metrics.jsonl" 2>/dev/null
phase kernels 200 $PY -m hcd.engine.cli bench --quick --only kernel,profile --out "$work/kernels"
keep_json "$work/kernels" kernels.json
# last: the switch is optional, the phases above measure the issue's targets
phase graph 60 $PY bench/graph_check.py --engine --json "$dest/graph.json"

report() { [ -f "$dest/$1" ] && $PY -m hcd.engine.cli bench --report "$dest/$1" 2>&1 || echo "(no $1)"; }
echo "== machine"; cat "$work/machine.txt"
echo "== phases (total $SECONDS s)"
for name in verify steps graph train_data train kernels; do echo "$name: ${status[$name]:-not run}"; done
echo "== hcd verify --quick"
grep -E "FAIL|all outputs|error|Error" "$work/verify.txt" 2>/dev/null | tail -n 20 || echo "(no verdict: see log.txt)"
echo "== kernel rows (hcd bench --quick --only kernel,profile)"; report kernels.json | tail -n 60
echo "== hcd train smoke: configs/imagenet/swin_tiny-resnet18.yaml, 10 classes of noise, random teacher, B=32, 60 steps"
tr '\r' '\n' < "$work/train.txt" 2>/dev/null | grep -E "val top-1|^stopped|^done|error|Error" | tail -n 12
[ -f "$work/run/metrics.jsonl" ] && $PY bench/train_smoke.py table "$work/run"
echo "== step rows (hcd bench --quick --only step)"; report steps.json
echo "== train.cuda_graph_loss: captured vs plain loss (bench/graph_check.py)"
grep -v -E "^\s*$" "$work/graph.txt" 2>/dev/null | tail -n 12 || echo "(no graph check output)"
for name in verify steps graph train_data train kernels; do [[ "${status[$name]:-}" == "exit 0 "* ]] || exit 1; done
