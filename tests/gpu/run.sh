#!/usr/bin/env bash
# On a GPU machine: build llama_kernels._C, run the GPU tests, then the GPU benchmarks.
# Everything it produces goes to the folder given as the only argument.
#   usage: tests/gpu/run.sh OUTDIR
# Environment (all optional):
#   SUITES="rms_norm int4"   benchmark suites, one process each (default: every suite)
#   BENCH_ARGS="--quick"     extra arguments for bench/run.py
#   PYTEST_ARGS="-n 8"       extra arguments for pytest (pytest-xdist compiles Triton kernels in parallel)
#   TEST_TIMEOUT=300 BENCH_TIMEOUT=300   wall-clock limits in seconds for the tests and for each suite
#   SKIP_TESTS=1 / SKIP_BENCH=1
#   TUNE=1                   also sweep the attention kernels' launch configurations (bench/tune_attention.py)
#   PROFILE=1                also profile the model's prefill and decode step, bf16 and int4 (bench/profile_model.py)
# Works offline: the build uses the packages already installed (no build isolation).
set -uo pipefail
out=${1:?usage: tests/gpu/run.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
stamp build
if ! "$python" -m pip install -e . --no-build-isolation --no-deps >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "build failed; see $out/build.log"
  exit 1
fi
"$python" -c "import json, llama_kernels; print(json.dumps(llama_kernels.build_info(), indent=1))" | tee "$out/build_info.json"

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  stamp tests
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-900}" "$python" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider ${PYTEST_ARGS:-} \
    --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
  suites=${SUITES:-$("$python" bench/run.py --list | awk '{print $1}')}
  for s in $suites; do
    stamp "bench $s"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-1800}" "$python" bench/run.py --device cuda --suite "$s" --out "$out" ${BENCH_ARGS:-} \
      2>&1 | tee "$out/bench-$s.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && bench_rc=$rc
  done
fi

if [ -n "${TUNE:-}" ]; then
  stamp "tune attention"
  timeout "${BENCH_TIMEOUT:-1800}" "$python" bench/tune_attention.py --out "$out" 2>&1 | tee "$out/tune-attention.log"
fi

if [ -n "${PROFILE:-}" ]; then
  stamp "profile model"
  timeout "${BENCH_TIMEOUT:-1800}" "$python" bench/profile_model.py --out "$out/profile" --hf 2>&1 | tee "$out/profile.log"
  timeout "${BENCH_TIMEOUT:-1800}" "$python" bench/profile_model.py --out "$out/profile-int4" --int4 2>&1 \
    | tee -a "$out/profile.log"
fi

stamp "gpu tests exit $tests_rc, benchmarks exit $bench_rc"
exit $((tests_rc != 0 || bench_rc != 0))
