#!/usr/bin/env bash
# Generates python/foveal/_core.pyi, the stubs of the compiled module, from the installed
# package with pybind11-stubgen (formatted by ruff), so they cannot drift from the bindings.
#   bash scripts/stubs.sh           rewrite the committed stubs
#   bash scripts/stubs.sh --check   fail when the committed stubs differ from the generated ones
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import pybind11_stubgen" 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check "pybind11-stubgen==3.0.0"
command -v ruff >/dev/null || python3 -m pip install -q --disable-pip-version-check ruff

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Run from the work folder so that the installed package, not this tree's python/, is imported.
(cd "$work" && python3 -m pybind11_stubgen foveal._core -o out >/dev/null)
generated="$work/out/foveal/_core.pyi"
ruff check -q --fix --config pyproject.toml "$generated" >/dev/null || true
ruff format -q --config pyproject.toml "$generated"

if [ "${1:-}" = "--check" ]; then
  if ! diff -u python/foveal/_core.pyi "$generated"; then
    echo "stubs: python/foveal/_core.pyi is out of date; run bash scripts/stubs.sh" >&2
    exit 1
  fi
  echo "stubs: python/foveal/_core.pyi matches the bindings"
else
  cp "$generated" python/foveal/_core.pyi
  echo "stubs: wrote python/foveal/_core.pyi"
fi
