#!/usr/bin/env bash
# Installs what foveal needs on a fresh Debian machine (run as root), skipping what is there:
# compilers and libraries from apt, Python packages from PyPI (torch pinned to the CPU build
# on this machine's disk; transformers for the tests of the optional integration), then builds
# and installs the foveal Python package from this tree.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
[ -f /usr/include/eigen3/Eigen/Core ] || need_apt+=(libeigen3-dev)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need_apt+=(libbenchmark-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# nbclient, nbformat and ipykernel execute the notebooks of examples/notebooks in the tests; the
# kernel is ipykernel's own "python3" spec, which runs this interpreter (no spec to install).
python3 - <<'PY' || python3 -m pip install -q --disable-pip-version-check \
  numpy pytest pybind11 scikit-build-core matplotlib "torch==2.13.0" "transformers==5.25.0" \
  "nbclient==0.11.0" "nbformat==5.11.1" "ipykernel==7.4.0"
import importlib.metadata as m
for name in ("numpy", "pytest", "pybind11", "scikit-build-core", "matplotlib", "transformers"):
    m.version(name)
assert m.version("torch").startswith("2.13.0"), m.version("torch")
for name, version in (("nbclient", "0.11.0"), ("nbformat", "5.11.1"), ("ipykernel", "7.4.0")):
    assert m.version(name) == version, (name, m.version(name))
PY

echo "setup: building and installing the foveal Python package"
python3 -m pip install -q --disable-pip-version-check --no-build-isolation .
