#!/usr/bin/env bash
# Checks that no code outside the ISA levels' namespaces uses an instruction above the baseline
# (x86-64-v2), so that the generic code runs on every x86-64-v2 CPU (docs/build.md).
#
#   bash scripts/check_isa_symbols.sh [BUILD_DIR]   (default build/dev)
#
# Reads the levels of the build from BUILD_DIR/generated/foveal_isa_levels.hpp and disassembles
# BUILD_DIR/libfoveal.a. A function is level code when its name mentions a level namespace
# other than the baseline (foveal::detail::avx2::..., or a template or lambda of one): such a
# name is never shared with another level or with generic code, so the linker cannot swap its
# body for another. Every other function must hold baseline instructions only: no VEX/EVEX
# instruction (a mnemonic starting with v: AVX, AVX2, FMA, F16C, AVX-512), no ymm/zmm/mask
# register, no BMI1/BMI2/LZCNT/MOVBE instruction. A function that breaks the rule is one that
# a level compiled under a name generic callers share (an inline function or template defined
# in a level region but outside its namespace, or a header first included inside a region):
# the linker may keep that copy, and a CPU without the level dies of SIGILL.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/dev}
levels_header="$build/generated/foveal_isa_levels.hpp"
library="$build/libfoveal.a"
[ -f "$levels_header" ] || { echo "check_isa_symbols: no $levels_header (configure first)" >&2; exit 2; }
[ -f "$library" ] || { echo "check_isa_symbols: no $library (build first)" >&2; exit 2; }

baseline=$(sed -n 's/^#define FOVEAL_ISA_BASELINE \([a-z0-9_]*\).*/\1/p' "$levels_header")
namespaces=$(grep -o '^  X([a-z0-9_]*' "$levels_header" | sed 's/^  X(//' | grep -v -x "$baseline" || true)
if [ -z "$namespaces" ]; then
  echo "check_isa_symbols: one level ($baseline) in $build: nothing to check"
  exit 0
fi
# foveal::detail::avx2:: or foveal::detail::avx512:: anywhere in a demangled name.
level_pattern="foveal::detail::($(echo "$namespaces" | paste -sd '|'))::"

report=$(objdump -d --no-show-raw-insn -C "$library" | awk -v level="$level_pattern" '
  /^[0-9a-f]+ <.*>:$/ {
    name = substr($0, index($0, "<") + 1); name = substr(name, 1, length(name) - 2)
    generic = (name !~ level); functions++; if (!generic) level_functions++
    next
  }
  generic && /^ +[0-9a-f]+:\t/ {
    split($0, parts, "\t"); instruction = parts[2]
    split(instruction, words, " "); mnemonic = words[1]
    if (mnemonic ~ /^v/ || instruction ~ /%[yz]mm[0-9]|%k[0-7]/ ||
        mnemonic ~ /^(andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx|tzcnt|lzcnt|movbe)[bwlq]?$/) {
      if (!(name in bad)) { bad[name] = instruction; order[++count] = name }
    }
  }
  END {
    for (i = 1; i <= count; ++i) printf "BAD %s\n    e.g. %s\n", order[i], bad[order[i]]
    printf "SUMMARY %d functions, %d of them level code, %d generic functions above the baseline\n",
      functions, level_functions, count
  }')
echo "$report" | sed 's/^SUMMARY /check_isa_symbols: /'
if echo "$report" | grep -q '^BAD '; then
  echo "check_isa_symbols: the functions above are generic (no level namespace in their name) but" \
    "hold instructions above the baseline; see src/detail/isa.hpp" >&2
  exit 1
fi
# The check must see level code at all (or it checks nothing: a renamed namespace, say).
echo "$report" | grep -q ' 0 of them level code' &&
  { echo "check_isa_symbols: no function of the levels $namespaces found in $library" >&2; exit 1; }
echo "check_isa_symbols: clean"
