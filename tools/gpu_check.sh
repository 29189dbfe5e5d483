#!/usr/bin/env bash
# One GPU session in one command: versions, the Triton tests run natively, then the GPU benchmark.
#
#   tools/gpu_check.sh                       # writes into $OUT (device tool) or /tmp/locattn-gpu
#   BENCH_ARGS="--quick --budget-s 90" TEST_TIMEOUT=150 tools/gpu_check.sh
#   SKIP_TESTS=1 BENCH_TIMEOUT=420 tools/gpu_check.sh       # benchmark only
#   SWEEP_ARGS="--head-dims 128 --budget-s 200" SKIP_BENCH=1 tools/gpu_check.sh   # tests + config sweep
#   DEMO_ARGS="--device cuda --dtype bfloat16 --size 256" ...                        # + the end-to-end demo
#   WARM_WORKERS=12 INSTALL_TUNED=1 FLEX_WARM=4 ...  # parallel precompile; benchmark on the tiles the sweep
#                                                    # just chose; FlexAttention compiled in the background by
#                                                    # 4 processes
#
# Files written (at most 8, the device tool's limit): gpu.txt, tests.log, sweep.log, sweep.json, tuned.json,
# bench.log, gpu_attention.json, demo.log or flexwarm.log. Needs torch >= 2.11, triton >= 3.6, pytest and pytest-xdist. locattn is
# imported from this checkout through PYTHONPATH; an editable install without dependencies (no network needed)
# registers the backend="locattn" entry point for the demo.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/locattn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nproc
} 2>&1 | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "editable install failed: backend=\"locattn\" (the entry point) is unavailable, locattn.backend() works"

# FLEX_WARM=1: FlexAttention's compiles (minutes on a fresh machine) run in the background from the start,
# into Inductor's on-disk caches, which the benchmark's FlexAttention pass then reads (caches on for those two
# processes only: FlexAttention is torch's code, the caches' blind spot is locattn's custom ops). Its log is
# flexwarm.log (in place of demo.log: the device tool returns 8 files).
# It runs in its own process group, stopped (SIGSTOP) while anything is timed, so the timings do not share the
# CPU or the GPU with it, and killed at the end.
# FLEX_WARM=N (N >= 1): N such processes, each compiling every N-th case (--shard), all logging to flexwarm.log.
# With SKIP_BENCH, FLEX_WAIT=S lets them run until S seconds after the start (a call that only compiles
# FlexAttention beside the tests; a later call on the same machine reads the caches with FLEX_CACHE=1).
flex_signal() { local p; for p in ${FLEX_WARM_PIDS:-}; do kill "-$1" -- "-$p" 2>/dev/null; done; return 0; }
if [ -n "${FLEX_WARM:-}" ]; then
  : >"$OUT/flexwarm.log"
  for i in $(seq 0 $((FLEX_WARM - 1))); do
    setsid env TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1 \
      python3 benchmarks/gpu_attention.py --flex-warm --shard "$i/$FLEX_WARM" ${BENCH_ARGS:-} >>"$OUT/flexwarm.log" 2>&1 &
    FLEX_WARM_PIDS="${FLEX_WARM_PIDS:-} $!"
  done
  trap 'flex_signal KILL' EXIT
fi

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests/test_triton.py (native CUDA kernels)"
  # -v: every finished test is named in tests.log, so a run cut by its time limit still says what passed.
  # Natively the file takes longer than 150 s on a fresh H200 with 12-14 workers (2026-11-28: 44 of 65 done in
  # 130 s, none failed): give it TEST_TIMEOUT=300 or select with TEST_ARGS="-k ..."
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -n "${TEST_WORKERS:-8}" -p no:cacheprovider -rfEs \
    --durations=15 tests/test_triton.py ${TEST_ARGS:-} >"$OUT/tests.log" 2>&1
  echo "pytest exit $? after $(( $(date +%s) - t0 )) s"
  echo "passed $(grep -c ' PASSED ' "$OUT/tests.log"), failed $(grep -c ' FAILED ' "$OUT/tests.log"), skipped $(grep -c ' SKIPPED ' "$OUT/tests.log")"
  grep -v PytestBenchmarkWarning "$OUT/tests.log" | grep -v "warner(" | grep -v " PASSED " | tail -n 40
fi

# WARM_WORKERS=N: N processes compile, in parallel, what the sweep / the benchmark will then time (Triton's
# on-disk cache is shared), so the timed runs spend their budget timing rather than compiling
warm() {
  [ -n "${WARM_WORKERS:-}" ] || return 0
  local w0=$(date +%s) i pids=""
  rm -f /tmp/warm_*.log
  for i in $(seq 0 $((WARM_WORKERS - 1))); do
    timeout "${WARM_TIMEOUT:-120}" python3 benchmarks/gpu_attention.py --compile-only --shard "$i/$WARM_WORKERS" "$@" \
      >"/tmp/warm_$i.log" 2>&1 &
    pids="$pids $!"
  done
  wait $pids  # not the FlexAttention warm-up
  echo "warm ($*): $(( $(date +%s) - w0 )) s; $(cat /tmp/warm_*.log | grep -c 'compiled') shards done"
  grep -h "Error\|shard.*compiled" /tmp/warm_*.log | sort | uniq -c | sort -rn | head -n 6
}

if [ -n "${SWEEP_ARGS:-}" ]; then
  warm --sweep ${SWEEP_ARGS}
  echo "== benchmarks/gpu_attention.py --sweep ${SWEEP_ARGS}"
  flex_signal STOP
  timeout "${SWEEP_TIMEOUT:-240}" python3 benchmarks/gpu_attention.py --sweep --json "$OUT/sweep.json" \
    --emit-tuned "$OUT/tuned.json" ${SWEEP_ARGS} >"$OUT/sweep.log" 2>&1
  echo "sweep exit $? after $(( $(date +%s) - t0 )) s"
  flex_signal CONT
  grep "sweep " "$OUT/sweep.log" | cut -c1-400
  # INSTALL_TUNED=1: the benchmark below runs on the tiles just measured (shipped-tiles file of this GPU)
  if [ -n "${INSTALL_TUNED:-}" ] && [ -s "$OUT/tuned.json" ]; then
    dst=$(python3 -c "import torch; from locattn.codegen.triton_impl import packaged_tuning_file as f; print(f(torch.cuda.get_device_name()))")
    cp "$OUT/tuned.json" "$dst" && echo "installed the swept tiles as $dst"
  fi
fi
if [ -n "${DEMO_ARGS:-}" ]; then
  echo "== examples/demo.py ${DEMO_ARGS}"
  timeout "${DEMO_TIMEOUT:-180}" python3 examples/demo.py ${DEMO_ARGS} >"$OUT/demo.log" 2>&1
  echo "demo exit $? after $(( $(date +%s) - t0 )) s"
  grep -v Warning "$OUT/demo.log" | tail -n 12
fi
if [ -n "${SKIP_BENCH:-}" ]; then
  if [ -n "${FLEX_WARM_PIDS:-}" ]; then
    while [ $(( $(date +%s) - t0 )) -lt "${FLEX_WAIT:-0}" ] && kill -0 ${FLEX_WARM_PIDS} 2>/dev/null; do sleep 5; done
    echo "flex warm-up: $(grep -c "flex warm" "$OUT/flexwarm.log") case(s) compiled after $(( $(date +%s) - t0 )) s"
  fi
  exit 0
fi

warm ${BENCH_ARGS:-}
echo "== benchmarks/gpu_attention.py ${BENCH_ARGS:-}"
flex_signal KILL
if [ -n "${FLEX_WARM_PIDS:-}" ]; then
  echo "flex warm-up stopped after $(grep -c "flex warm" "$OUT/flexwarm.log") case(s)"
fi
if [ -n "${FLEX_WARM_PIDS:-}" ] || [ -n "${FLEX_CACHE:-}" ]; then  # FlexAttention reads what the warm-up compiled
  export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_attention.py --json "$OUT/gpu_attention.json" ${BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1
echo "benchmark exit $? after $(( $(date +%s) - t0 )) s"

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$OUT/gpu.txt"
grep -v Warning "$OUT/bench.log" | grep -v "^  block_mask = " | cut -c1-420 | tail -n 45
