#!/usr/bin/env bash
# Regenerate the committed CPU benchmark results in benchmarks/results/cpu/ (JSON, markdown
# tables, PNG plots, pytest-benchmark JSON). Run it on a quiet machine from any directory:
#
#     benchmarks/run_cpu_results.sh                 # torch's default thread count
#     THREADS=1 benchmarks/run_cpu_results.sh       # on a machine shared with other work
#     PYTHON=.venv/bin/python benchmarks/run_cpu_results.sh
#     STEPS="gan quick" benchmarks/run_cpu_results.sh   # only some of: train stress wide gan batches
#                                                       # r1 memory quick pytest
#     NOTE="quiet machine" benchmarks/run_cpu_results.sh  # a remark printed with the tables
#
# About 4 min (train) + 5 min (stress) + 4 min (wide) + 10-15 min (gan) + 10 min (batches) + 2 min
# (r1) + 1 min (memory) + 1 min (quick) on a 2-core CPU.
# `fastattn bench` uses 1 torch thread on a CPU unless THREADS says otherwise; it times the
# providers of each case interleaved, and records the load average at the start of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/cpu
mkdir -p "$OUT"
BENCH_ARGS=()
PYTEST_THREAD_ARGS=()
if [[ -n "${NOTE:-}" ]]; then
    BENCH_ARGS+=(--note "$NOTE")
fi
if [[ -n "${THREADS:-}" ]]; then
    BENCH_ARGS+=(--threads "$THREADS")
    PYTEST_THREAD_ARGS=(--fastattn-threads "$THREADS")
fi
STEPS=${STEPS:-train stress wide gan batches r1 memory quick pytest}
bench() { "$PY" -m fastattn bench --device cpu --no-progress "${BENCH_ARGS[@]}" "$@"; }
step() { [[ " $STEPS " == *" $1 "* ]]; }

# What a user gains in a whole training step (the README leads with it): G + D of the reference
# GAN with attention at half resolution, naive layers vs fastattn, at 128 and 256 px.
step train && bench --preset train-step --resolution 128,256 \
    --json "$OUT/train-step.json" --markdown "$OUT/train-step.md" | tee "$OUT/train-step.txt"
# naive vs SDPA vs fastattn (automatic choice), fp32, B=1, at the BigGAN-256 generator site
# (N=16384, M=4096, d_qk=24, d_v=96), the unpooled stress site (N=M=16384, d_qk=8, d_v=64) and the
# wide-head autoencoder site (N=M=4096, d=512).
step stress && bench --preset stress --dtype float32 \
    --json "$OUT/stress.json" --markdown "$OUT/stress.md" --plots "$OUT/stress-plots" | tee "$OUT/stress.txt"
# The wide-head site at its config's batch (B=8; the stress preset runs it at B=1): automatic
# choice takes the sdpa backend there.
step wide && bench --shape autoencoder_mid512 --batch 8 --direction fwd,fwd+bwd --repeats 3 \
    --json "$OUT/wide-b8.json" --markdown "$OUT/wide-b8.md" | tee "$OUT/wide-b8.txt"
# Every GAN site, batch scaled to this machine (stated in the output).
step gan && bench --preset gan --direction fwd,fwd+bwd \
    --json "$OUT/gan.json" --markdown "$OUT/gan.md" --plots "$OUT/gan-plots" | tee "$OUT/gan.txt"
# Every gan site at B = 1, 2, 8, 32, 128, 256 as far as the work cap allows ("never slower than naive").
step batches && bench --preset batches \
    --json "$OUT/batches.json" --markdown "$OUT/batches.md" | tee "$OUT/batches.txt"
# The R1-style gradient penalty (forward, backward with create_graph, backward of the squared
# gradients' sum) at the issue's R1 site, on 1 thread (or THREADS) and on 2.
step r1 && bench --custom N=4096,M=1024,d_qk=16,d_v=64,B=4 --direction fwd+bwd+bwd2 --min-repeats 9 \
    --json "$OUT/r1_double_backward_1thread.json" --markdown "$OUT/r1_double_backward_1thread.md" | tail -n 4
step r1 && "$PY" -m fastattn bench --device cpu --no-progress --threads 2 ${NOTE:+--note "$NOTE"} \
    --custom N=4096,M=1024,d_qk=16,d_v=64,B=4 --direction fwd+bwd+bwd2 --min-repeats 9 \
    --json "$OUT/r1_double_backward.json" --markdown "$OUT/r1_double_backward.md" | tail -n 4
# Peak memory of one generator training step with attention at 128x128, unpooled and pooled (a
# fresh process per variant): benchmarks/results/gan_step_memory*.json.
step memory && "$PY" benchmarks/gan_step_memory.py
step memory && "$PY" benchmarks/gan_step_memory.py --pool --batch 4 --tag pooled
# The CI-sized preset (the baseline for `fastattn bench --compare`).
step quick && bench --preset quick --json "$OUT/quick.json" --markdown "$OUT/quick.md" | tee "$OUT/quick.txt"
# The same providers through pytest-benchmark.
step pytest && "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider "${PYTEST_THREAD_ARGS[@]}" \
    --benchmark-json "$OUT/pytest-benchmark-quick.json" | tail -n 3
echo "results in $OUT"
