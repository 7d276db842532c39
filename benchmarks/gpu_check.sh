#!/usr/bin/env bash
# One timed run on one GPU (sized for an H200 lent for ~8 minutes):
#   bash benchmarks/gpu_check.sh            run every step
#   bash benchmarks/gpu_check.sh --dry-run  print the plan (steps, time caps, commands) and exit
# Steps: env, install (no network, into the machine's own torch/triton; PYTHONPATH fallback),
# dispatch (backend per site), warm (parallel Triton compile of every candidate the run uses),
# tests (pytest -m gpu), candidates (every autotune candidate vs fp64), profile (tuned winners,
# per-kernel times), bench_b8 / bench_b1 (fastattn bench, bf16+fp16, fwd and fwd+bwd), bench_flex.
# Each step is time-boxed with `timeout`; a failed step does not stop the later ones; the whole
# run stops starting steps at GPU_CHECK_BUDGET_S (default 450 s). Results: benchmarks/results/gpu/
# (logs/, bench_*.json/.md, candidates.json, summary.txt), and copied to $OUT when it is set.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_JOBS (warm processes).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
JOBS=${GPU_CHECK_JOBS:-$(( $(nproc 2>/dev/null || echo 4) > 3 ? $(nproc) - 2 : 1 ))}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results/gpu}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
SUMMARY=()
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1} PYTHONUNBUFFERED=1  # Triton 3.9 warns when unset

BENCH_COMMON="--dtype bf16,fp16 --direction fwd,fwd+bwd --min-time 0.05 --repeats 30 --no-progress"
BENCH_PROVIDERS="naive,sdpa-math,sdpa-efficient,sdpa-efficient+copy,fastattn-triton"

# name | time cap (s) | command
STEPS=(
  "env|15|nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
  "install|45|$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . && $PY -c 'import fastattn.kernels.forward' || { echo 'editable install failed: using PYTHONPATH=$REPO'; exit 10; }"
  "dispatch|20|$PY benchmarks/gpu_check.py dispatch"
  "warm|100|$PY benchmarks/gpu_check.py warm --jobs $JOBS"
  "tests|90|$PY -m pytest -q -m gpu tests/ -p no:cacheprovider \$PYTEST_EXTRA"
  "candidates|50|$PY benchmarks/gpu_check.py candidates --json $RESULTS/candidates.json"
  "profile|40|$PY benchmarks/gpu_check.py profile --shape biggan128_G --batch 8 --dtype bfloat16"
  "bench_b8|50|$PY -m fastattn bench --shape biggan128_G,sagan64_unpooled_G --batch 8 $BENCH_COMMON --provider $BENCH_PROVIDERS --json $RESULTS/bench_b8.json --markdown $RESULTS/bench_b8.md"
  "bench_b1|50|$PY -m fastattn bench --shape biggan256_G128,stress_unpooled128 --batch 1 $BENCH_COMMON --provider $BENCH_PROVIDERS --json $RESULTS/bench_b1.json --markdown $RESULTS/bench_b1.md"
  "bench_flex|45|$PY -m fastattn bench --shape biggan128_G,sagan64_unpooled_G --batch 8 --dtype bf16 --direction fwd,fwd+bwd --min-time 0.05 --repeats 30 --no-progress --provider flex,fastattn-triton --json $RESULTS/bench_flex.json --markdown $RESULTS/bench_flex.md"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_check plan (dry run): budget ${BUDGET} s, warm processes ${JOBS}, results in $RESULTS"
  total=0
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name cap cmd <<< "$entry"
    total=$((total + cap))
    printf '  %-11s cap %3ss  %s\n' "$name" "$cap" "$cmd"
  done
  echo "  sum of caps ${total} s; steps still pending at the budget are skipped"
  $PY benchmarks/gpu_check.py warm --dry-run 2>&1 | head -3
  exit 0
fi

mkdir -p "$RESULTS/logs"
# pytest-xdist and pytest-timeout are on the device image: the GPU tests then run in parallel
# processes (each compiles its own kernels) and no single test can eat the step
PYTEST_EXTRA=""
$PY -c 'import xdist' 2>/dev/null && PYTEST_EXTRA="-n 8"
$PY -c 'import pytest_timeout' 2>/dev/null && PYTEST_EXTRA="$PYTEST_EXTRA --timeout 90"
export PYTEST_EXTRA

run_step() {
  local name=$1 cap=$2 cmd=$3 now left rc t0
  now=$(date +%s); left=$((START + BUDGET - now))
  if [ "$left" -lt 10 ]; then
    SUMMARY+=("$(printf '%-11s SKIP    (budget of %ss spent)' "$name" "$BUDGET")"); return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (cap ${cap}s, $((now - START))s into the run) ==="
  t0=$(date +%s)
  timeout -k 5 "$cap" bash -c "$cmd" > "$RESULTS/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$RESULTS/logs/$name.log"
  local took=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status=OK ;;
    77) status=SKIP ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL rc=$rc" ;;
  esac
  if [ "$name" = install ] && [ "$rc" != 0 ]; then
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"; status="$status (PYTHONPATH fallback)"
  fi
  SUMMARY+=("$(printf '%-11s %-8s %4ss of %3ss  logs/%s.log' "$name" "$status" "$took" "$cap" "$name")")
}

for entry in "${STEPS[@]}"; do
  IFS='|' read -r name cap cmd <<< "$entry"
  run_step "$name" "$cap" "$cmd"
done

{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( $(date +%s) - START ))s, budget ${BUDGET}s)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
} > "$RESULTS/summary.txt"
cat "$RESULTS"/bench_*.md > "$RESULTS/bench_all.md" 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device tool returns at most 8 files from $OUT
  mkdir -p "$OUT/gpu"
  tar -czf "$OUT/gpu/gpu_check_results.tar.gz" -C "$RESULTS" . 2>/dev/null
  for f in summary.txt bench_all.md candidates.json; do [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/gpu/"; done
  cat "$RESULTS"/logs/*.log > "$OUT/gpu/all_logs.txt" 2>/dev/null
fi
echo
cat "$RESULTS/summary.txt"
