// foveal/core/build_info.hpp — how this foveal was built and which ISA level it runs.
#pragma once

#include <string>
#include <vector>

namespace foveal {

// The library's kernels are compiled for several x86-64 ISA levels and the fastest one the CPU
// supports is used, chosen once, at the first kernel call (docs/build.md):
//   "sse4.2"  x86-64-v2: SSE4.2, POPCNT (the baseline: all other code is compiled for it)
//   "avx2"    x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
//   "avx512"  x86-64-v4: AVX-512 F, BW, CD, DQ, VL
// A FOVEAL_NATIVE build has one level, "native" (-march=native). The environment variable
// FOVEAL_ISA, read at that first call, forces a level by name ("auto" or unset: the fastest);
// a name that is not a compiled level, or a level this CPU lacks, makes every call that needs a
// kernel throw foveal::Error (build_info too) and write nothing.
struct BuildInfo {
  std::string version;                        // FOVEAL_VERSION
  std::string compiler;                       // e.g. "GCC 12.2.0"
  std::vector<std::string> compiled_levels;   // lowest first
  std::vector<std::string> supported_levels;  // the compiled levels this CPU runs
  std::string requested_level;                // FOVEAL_ISA, or "auto" when unset
  std::string level;                          // the level in use
};

// Chooses the level if no call did yet (so it throws foveal::Error for a bad FOVEAL_ISA).
BuildInfo build_info();

}  // namespace foveal
