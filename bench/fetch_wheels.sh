#!/usr/bin/env bash
# Writes .whl/ (git-ignored): DeepSpeed and the packages it needs that the GPU machine lacks, for Python 3.12
# on x86-64 Linux, so that bench/gpu_check.sh can install them there without a network (device tool: carry
# [".whl"]). Run it once on a machine with pip access:  bash bench/fetch_wheels.sh
#
# DeepSpeed's Requires-Dist: einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic torch tqdm.
# The GPU machine's package list (/work/.library/device/KINDS.md, nvidia-h200) has all of them but hjson and
# pydantic; pydantic needs pydantic-core (the one compiled wheel here), annotated-types, typing-inspection
# and typing-extensions >= 4.14.1 (carried too, so an older one there cannot break the import).
# DeepSpeed is published as a source archive only (PyPI has no wheel of it): it is built here into a
# pure-Python wheel with no ops compiled (DS_BUILD_OPS=0; the engine uses torch's fused SGD/AdamW, no
# DeepSpeed op), which needs torch installed here (--no-build-isolation). Versions: those installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED=deepspeed==0.19.8
PURE=(hjson==3.1.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0)
COMPILED=(pydantic-core==2.46.4)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do target+=(--platform "$p"); done
python3 -m pip download -q "${target[@]}" -d .whl "${PURE[@]}" "${COMPILED[@]}"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$DEEPSPEED"

for w in .whl/*.whl; do
  case "$w" in
    *-py3-none-any.whl|*-cp312-cp312-manylinux*x86_64.whl) ;;
    *) echo "fetch_wheels: $w is neither pure Python nor CPython 3.12 x86-64" >&2; exit 1 ;;
  esac
done
ls -l .whl
echo "total $(du -ck .whl/*.whl | tail -n 1 | cut -f1) KiB in $(ls .whl/*.whl | wc -l) wheels (the device tool carries 64 MiB)"
