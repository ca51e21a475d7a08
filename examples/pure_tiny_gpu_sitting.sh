#!/usr/bin/env bash
# One call on a lent GPU machine: PURE-tiny's language model trained three ways side by side, each
# scoring the held-out conversations as it goes, the run with the lowest held-out loss returned in
# $OUT/model; then (unless BENCH=0) benchmarks/gpu_session.sh, its results in $OUT/results.tar.
# The machine returns at most 8 files: the model's 6, the tar and the caller's log.
#
#   run(command="bash examples/pure_tiny_gpu_sitting.sh 2>&1 | tee $OUT/sitting.log", timeout_s=570,
#       carry=["build/device", "build/pure-tiny/v2/work/vq", "build/pure-tiny/v2/work/tokens",
#              "build/pure-tiny/v2/work/tokens-heldout"])
#
# Sitting 4 (2026-11-27, H200): 204 s for the three runs, 225 s for the benchmark (docs/pure-tiny.md, v2.2).
#
# v3's data (3x the crops, tokens made here with v2's VQ: docs/pure-tiny.md, "What the next GPU sitting
# should do"): the same three runs with STEPS_SCALE=2 (3x the conversations, so 2x the steps is still
# fewer epochs) and the time that takes, the benchmark left to another call:
#   run(command="WORK=build/pure-tiny-v3/work STEPS_SCALE=2 MINUTES=4.6 BENCH=0 bash examples/pure_tiny_gpu_sitting.sh
#                2>&1 | tee $OUT/sitting.log", timeout_s=420,
#       carry=["build/pure-tiny-v3/work/vq", "build/pure-tiny-v3/work/tokens", "build/pure-tiny-v3/work/tokens-heldout"])
#
# LM_FROM=FOLDER starts the three runs from a trained model (pack_train --lm-from; carry the folder too),
# e.g. build/pure-tiny-v3/trained, the shipped v3's checkpoint, on data it has not seen.
set -uo pipefail
T0=$(date +%s)
WORK=${WORK:-build/pure-tiny/v2/work}
LM_FROM=${LM_FROM:+$(realpath "$LM_FROM")}  # the runs work from /tmp
# training needs only pure-lite itself; gpu_session.sh installs the benchmark's wheels
python -m pip install -q --no-deps --no-build-isolation ./ 2>&1 | tail -2
mkdir -p /tmp/runs
train() {  # NAME ARGS...: a copy of the work folder each, so the runs share nothing
  local n=$1; shift
  cp -r "$WORK" "/tmp/runs/work-$n"
  (cd /tmp && OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 python -m pure_lite.train.pack_train none "/tmp/runs/$n" \
     --work "/tmp/runs/work-$n" --minutes "${MINUTES:-3.2}" --publish-partial ${LM_FROM:+--lm-from "$LM_FROM"} "$@" 2>&1 \
     | grep -v -E "Writing|Loading" > "/tmp/runs/$n.log")
}
S=${STEPS_SCALE:-1}  # step counts and scoring intervals scale together
train a --lm-steps $((1000 * S)) --lm-eval-every $((50 * S)) &
train b --lm-steps $((1600 * S)) --lm-dropout 0.1 --lm-eval-every $((80 * S)) &
train c --lm-steps $((2200 * S)) --lm-dropout 0.1 --lm-eval-every $((110 * S)) &
wait
echo "trained at $(( $(date +%s) - T0 )) s"
python - <<'PY'
import os, pathlib, re, shutil

runs = {}
for log in sorted(pathlib.Path("/tmp/runs").glob("?.log")):
    scores = re.findall(r"best ([0-9.]+) at step (\d+)", log.read_text())
    folder = log.with_suffix("")
    model = next((m for m in (folder / "model", folder / "model-partial") if m.is_dir()), None)
    print(log.stem, f"best held-out loss {scores[-1][0]} at step {scores[-1][1]}" if scores else "no score", model)
    if scores and model:
        runs[log.stem] = (float(scores[-1][0]), model)
if runs:
    best = min(runs, key=lambda name: runs[name][0])
    shutil.copytree(runs[best][1], pathlib.Path(os.environ["OUT"]) / "model")
    pathlib.Path("/tmp/runs/winner.txt").write_text(f"{best} {runs[best][0]} {runs[best][1]}\n")
    print("returned run", best)
PY
mkdir -p /tmp/bench
[ "${BENCH:-1}" = 0 ] || OUT=/tmp/bench SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} \
  bash benchmarks/gpu_session.sh --skip-hf --skip-full
cp /tmp/runs/*.log /tmp/runs/winner.txt /tmp/bench/ 2>/dev/null
tar -C /tmp -cf "$OUT/results.tar" bench
echo "done at $(( $(date +%s) - T0 )) s"
