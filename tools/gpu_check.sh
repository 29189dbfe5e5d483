#!/usr/bin/env bash
# One GPU session in one command: versions, the Triton tests run natively, then the GPU benchmark.
#
#   tools/gpu_check.sh                       # writes into $OUT (device tool) or /tmp/locattn-gpu
#   BENCH_ARGS="--quick --budget-s 90" TEST_TIMEOUT=150 tools/gpu_check.sh
#   SKIP_TESTS=1 BENCH_TIMEOUT=420 tools/gpu_check.sh       # benchmark only
#   SWEEP_ARGS="--head-dims 128 --budget-s 200" SKIP_BENCH=1 tools/gpu_check.sh   # tests + config sweep
#   DEMO_ARGS="--device cuda --dtype bfloat16 --size 256" ...                        # + the end-to-end demo
#
# Files written (at most 8, the device tool's limit): gpu.txt, tests.log, sweep.log, sweep.json, tuned.json,
# bench.log, gpu_attention.json, demo.log. Needs torch >= 2.11, triton >= 3.6, pytest and pytest-xdist. locattn is
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

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests/test_triton.py (native CUDA kernels)"
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -n "${TEST_WORKERS:-8}" -p no:cacheprovider -rfEs \
    --durations=15 tests/test_triton.py ${TEST_ARGS:-} >"$OUT/tests.log" 2>&1
  echo "pytest exit $? after $(( $(date +%s) - t0 )) s"
  grep -v PytestBenchmarkWarning "$OUT/tests.log" | grep -v "warner(" | tail -n 40
fi

if [ -n "${SWEEP_ARGS:-}" ]; then
  echo "== benchmarks/gpu_attention.py --sweep ${SWEEP_ARGS}"
  timeout "${SWEEP_TIMEOUT:-240}" python3 benchmarks/gpu_attention.py --sweep --json "$OUT/sweep.json" \
    --emit-tuned "$OUT/tuned.json" ${SWEEP_ARGS} >"$OUT/sweep.log" 2>&1
  echo "sweep exit $? after $(( $(date +%s) - t0 )) s"
  grep "sweep " "$OUT/sweep.log" | cut -c1-400
fi
if [ -n "${DEMO_ARGS:-}" ]; then
  echo "== examples/demo.py ${DEMO_ARGS}"
  timeout "${DEMO_TIMEOUT:-180}" python3 examples/demo.py ${DEMO_ARGS} >"$OUT/demo.log" 2>&1
  echo "demo exit $? after $(( $(date +%s) - t0 )) s"
  grep -v Warning "$OUT/demo.log" | tail -n 12
fi
[ -n "${SKIP_BENCH:-}" ] && exit 0

echo "== benchmarks/gpu_attention.py ${BENCH_ARGS:-}"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_attention.py --json "$OUT/gpu_attention.json" ${BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1
echo "benchmark exit $? after $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$OUT/gpu.txt"
grep -v Warning "$OUT/bench.log" | grep -v "^  block_mask = " | cut -c1-420 | tail -n 45
