#!/usr/bin/env bash
# Fuzzing (docs/testing.md): builds the libFuzzer harnesses of tests/fuzz/cpp with clang
# (AddressSanitizer + UndefinedBehaviorSanitizer), runs each from its seed corpus
# (tests/fuzz/corpus/<harness>) for a fixed time, then runs the hypothesis fuzz suite of the
# Python API (tests/fuzz) on a fixed seed and time budget. Prints execs and findings per
# harness and cases per entry point; fails on any crash, hang or sanitizer report.
#
#   bash scripts/fuzz.sh            CI budget: 12 s per harness, 60 s of Python cases
#   bash scripts/fuzz.sh --long     an hour: 10 min per harness, 10 min of Python cases on a
#                                   new seed (FOVEAL_FUZZ_SEED, default: the date)
#   FUZZ_SECONDS=60 PY_SECONDS=300 bash scripts/fuzz.sh   any other budget
#   FUZZ_ONLY=cpp|python            one half only
#
# The Python half fuzzes the foveal package that `python3` imports (PYTHON=... to pick
# another interpreter, e.g. a virtual environment's). Installs clang and libomp when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
python=${PYTHON:-python3}
fuzz_seconds=${FUZZ_SECONDS:-12}
py_seconds=${PY_SECONDS:-60}
if [ "${1:-}" = "--long" ]; then
  fuzz_seconds=${FUZZ_SECONDS:-600}
  py_seconds=${PY_SECONDS:-600}
  export FOVEAL_FUZZ_SEED=${FOVEAL_FUZZ_SEED:-$(date +%Y%m%d)}
fi
harnesses=(attention kv_cache half paged sparsek pde_ssm spade sparse)
status=0
start=$SECONDS

only=${FUZZ_ONLY:-all}

if [ "$only" != python ]; then
  if ! command -v clang++ >/dev/null ||
    ! echo '#include <omp.h>' | clang++ -fopenmp -x c++ -fsyntax-only - 2>/dev/null; then
    echo "fuzz: apt-get install clang libomp-dev"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libomp-dev >/dev/null
  fi
  build_start=$SECONDS
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz -j"$jobs" >/dev/null
  echo "fuzz: harnesses built in $((SECONDS - build_start)) s"

  # A huge allocation fails with std::bad_alloc (MemoryError in Python: an accepted answer)
  # instead of an ASan report; one larger than the RSS limit is still reported (an allocation
  # proportional to a huge extent of an empty view is a finding).
  export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:abort_on_error=0
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  findings=build/fuzz/findings
  mkdir -p "$findings"
  for harness in "${harnesses[@]}"; do
    work=build/fuzz/corpus/$harness
    mkdir -p "$work"
    log=build/fuzz/$harness.log
    set +e
    build/fuzz/tests/fuzz/cpp/fuzz_"$harness" -max_total_time="$fuzz_seconds" -timeout=10 \
      -rss_limit_mb=2048 -max_len=512 -print_final_stats=1 \
      -artifact_prefix="$findings/$harness-" "$work" tests/fuzz/corpus/"$harness" >"$log" 2>&1
    code=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    found=$(grep -c 'Test unit written to' "$log" || true)
    echo "fuzz: $harness: ${execs:-?} execs in $fuzz_seconds s, findings $found"
    if [ "$code" -ne 0 ]; then
      status=1
      grep -E 'ERROR|runtime error|foveal fuzz|SUMMARY|Test unit written' "$log" | head -20
      echo "fuzz: $harness: reproduce with build/fuzz/tests/fuzz/cpp/fuzz_$harness <file>"
    fi
  done
fi

if [ "$only" != cpp ]; then
  py_start=$SECONDS
  FOVEAL_FUZZ_SECONDS=$py_seconds "$python" -m pytest -q -p no:cacheprovider tests/fuzz ||
    status=1
  echo "fuzz: Python fuzz suite in $((SECONDS - py_start)) s"
fi

echo "fuzz: done in $((SECONDS - start)) s, $([ $status -eq 0 ] && echo clean || echo FINDINGS)"
exit $status
