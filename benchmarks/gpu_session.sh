#!/usr/bin/env bash
# One run on a lent GPU machine: install pure-lite, run the GPU tests, run benchmarks/gpu_decode.py;
# results land in $OUT (JSON, the docs table, the logs). Sized for one call of ~6 minutes on an H100/H200.
#
# The GPU machine has torch and transformers but no bitsandbytes and no network. Prepare the wheel on
# this machine first (build/ is git-ignored; the wheel is carried, never committed):
#
#   python -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \
#       --platform manylinux_2_24_x86_64 -d build/device
#   cd build/device && zip -q -d bitsandbytes-*.whl $(unzip -Z1 bitsandbytes-*.whl | grep '\.so$' | grep -v -E 'cuda130|cpu\.so')
#   python -m pip download torchao==0.18.0 --no-deps -d build/device      # 3.4 MB, the int4/int8 variants
#
# then call the device tool with:  command="bash benchmarks/gpu_session.sh --quick"  carry=["build/device"]
# (--quick, --skip-hf, --skip-full are passed to the benchmark; without --quick it runs every variant, more than
# one call allows with the tests; SKIP_TESTS=1 leaves out the GPU tests (at most 150 s), BENCH_TIMEOUT=S bounds the
# benchmark, default 400 s, so that tests and benchmark fit one 600 s call: the
# results so far are in $OUT/gpu_decode.partial.json even when it is cut short).
set -uo pipefail
# `python -m pip`, not `pip`: on the lent machine `pip` belongs to another interpreter than `python`
# (found 2026-11-27: the install "succeeded" and nothing could import it).
REPO=$(pwd)
OUT=${OUT:-/tmp/pure-lite-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for wheel in build/device/bitsandbytes-*.whl build/device/torchao-*.whl; do
  [ -f "$wheel" ] && python -m pip install -q --no-deps "$wheel" 2>&1 | tail -2
done
python -m pip install -q --no-deps --no-build-isolation ./ 2>&1 | tail -2
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# from another folder: the source tree would shadow the installed pure_lite.runtime / pure_lite.export
[ "${SKIP_TESTS:-0}" = 1 ] || (cd /tmp && timeout 150 python -m pytest -q -p no:cacheprovider -m gpu "$REPO/tests" 2>&1 | tail -25) | tee "$OUT/tests.txt"
(cd "$REPO/benchmarks" && timeout "${BENCH_TIMEOUT:-400}" python gpu_decode.py --partial "$OUT/gpu_decode.partial.json" "$@" 2>&1 | tail -40) | tee "$OUT/benchmark.txt"
cp -f "$REPO/benchmarks/results/gpu_decode.json" "$REPO/docs/benchmarks.md" "$OUT/" 2>/dev/null || true
