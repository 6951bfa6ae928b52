#!/usr/bin/env bash
# On a GPU machine: build kernels._C, run the GPU tests, then the GPU benchmarks.
# Everything it produces goes to the folder given as the only argument.
#   usage: tests/gpu/run.sh OUTDIR
# Works offline: the build uses the packages already installed (no build isolation).
set -uo pipefail
out=${1:?usage: tests/gpu/run.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
if ! "$python" -m pip install -e . --no-build-isolation --no-deps >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "build failed; see $out/build.log"
  exit 1
fi
"$python" -c "import json, kernels; print(json.dumps(kernels.build_info(), indent=1))" | tee "$out/build_info.json"

"$python" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

"$python" bench/run.py --device cuda --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc, benchmarks exit $bench_rc"
exit $((tests_rc != 0 || bench_rc != 0))
