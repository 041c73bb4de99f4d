#!/usr/bin/env bash
# Builds the C++ test suite (dev preset: optimized, warnings as errors) and runs it, then runs
# the Python tests against the installed package. Fails on the first failing step; a pytest
# run that collects no test (exit code 5) fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

cmake --preset dev
cmake --build --preset dev -j"$jobs"
ctest --preset dev -j"$jobs"

python3 -m pytest -q tests/python
