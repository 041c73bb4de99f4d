#!/usr/bin/env bash
# Checks formatting and lint: clang-format (.clang-format) on the C++ sources, ruff on the
# Python ones. Installs either tool when it is missing. Fails on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v clang-format >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-format >/dev/null
fi
command -v ruff >/dev/null || python3 -m pip install -q --disable-pip-version-check ruff

git ls-files '*.hpp' '*.cpp' | xargs clang-format --dry-run --Werror
ruff check python tests/python tests/fuzz bench examples
ruff format --check python tests/python tests/fuzz bench examples
# The repository must be self-contained: no tracked file may cite the project's unshipped spec
# files (their math lives on the pages in docs/) or a path into the sibling shared folder. The pattern is built
# from pieces so that this script does not match itself.
spec_files='(DESIGN|OPERATORS|STYLE).md'
if git grep -n -E "${spec_files}|\.\./shared" -- .; then
  echo "lint: the files above cite spec files the repository does not ship; cite the docs/" \
    "page that carries the content instead" >&2
  exit 1
fi
echo "lint: clean"
