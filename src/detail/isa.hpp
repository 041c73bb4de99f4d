// src/detail/isa.hpp (private) — the ISA levels of this build and the level regions.
//
// The kernels (src/kernels) are compiled once per ISA level (CMakeLists.txt's
// FOVEAL_ISA_LEVEL_TABLE): each copy is src/kernels/level.cpp compiled with FOVEAL_LEVEL set to
// the level's namespace and FOVEAL_LEVEL_TARGET to its GCC target features. Everything else is
// generic code, compiled once for the baseline (-march=x86-64-v2).
//
// A level region is where code of one level is defined:
//   FOVEAL_LEVEL_PUSH
//   namespace foveal::detail {
//   inline namespace FOVEAL_LEVEL {
//   ...
//   }  // namespace FOVEAL_LEVEL
//   }  // namespace foveal::detail
//   FOVEAL_LEVEL_POP
// Inside it every function is compiled for the level (`#pragma GCC target`) and named in the
// level's namespace, so no two levels (and no level and the generic code) ever define the same
// symbol: the linker cannot swap a level's copy of an inline function or template for another.
// Functions defined outside any region (the public headers, the standard library, the shared
// private headers such as flash_plan.hpp) stay baseline code wherever they are instantiated,
// since a target pragma applies to the functions defined after it; they are inlined into the
// kernels all the same (a baseline function may be inlined into a function of any level). Hence
// the rule for a file with a region: every #include comes before FOVEAL_LEVEL_PUSH.
// scripts/check_isa_symbols.sh checks the result: no function outside a level namespace holds
// an instruction above the baseline.
//
// In a generic translation unit (FOVEAL_LEVEL unset) a region is the baseline level's, without
// a pragma: the private kernel headers can still be used there, as the baseline's code.
#pragma once

#include "foveal_isa_levels.hpp"  // generated: FOVEAL_ISA_LEVELS, FOVEAL_ISA_BASELINE

#ifndef FOVEAL_LEVEL
#define FOVEAL_LEVEL FOVEAL_ISA_BASELINE
#endif

#define FOVEAL_STRINGIZE_(x) #x
#define FOVEAL_STRINGIZE(x) FOVEAL_STRINGIZE_(x)
#define FOVEAL_CONCAT_(a, b) a##b
#define FOVEAL_CONCAT(a, b) FOVEAL_CONCAT_(a, b)

#if defined(FOVEAL_LEVEL_TARGET)
#define FOVEAL_LEVEL_PUSH \
  _Pragma("GCC push_options") _Pragma(FOVEAL_STRINGIZE(GCC target(FOVEAL_LEVEL_TARGET)))
#define FOVEAL_LEVEL_POP _Pragma("GCC pop_options")
#else
#define FOVEAL_LEVEL_PUSH
#define FOVEAL_LEVEL_POP
#endif

// The vector width in bytes and the number of vector registers of the level being compiled, for
// the preprocessor (GCC's target pragma does not define __AVX2__ and the like in C++): the
// level's own (FOVEAL_LEVEL_VECTOR_BYTES, set with FOVEAL_LEVEL), else the compiler's flags'
// (the generic code: the baseline; a FOVEAL_NATIVE build: this machine).
#if defined(FOVEAL_LEVEL_VECTOR_BYTES) && FOVEAL_LEVEL_VECTOR_BYTES > 0
#define FOVEAL_SIMD_BYTES FOVEAL_LEVEL_VECTOR_BYTES
#define FOVEAL_SIMD_REGISTERS FOVEAL_LEVEL_VECTOR_REGISTERS
#elif defined(__AVX512F__)
#define FOVEAL_SIMD_BYTES 64
#define FOVEAL_SIMD_REGISTERS 32
#elif defined(__AVX__)
#define FOVEAL_SIMD_BYTES 32
#define FOVEAL_SIMD_REGISTERS 16
#elif defined(__x86_64__)
#define FOVEAL_SIMD_BYTES 16
#define FOVEAL_SIMD_REGISTERS 16
#else
#define FOVEAL_SIMD_BYTES 16
#define FOVEAL_SIMD_REGISTERS 32  // AArch64 NEON
#endif

namespace foveal::detail {

// The compiled levels, lowest first.
enum class IsaLevel : int {
#define FOVEAL_ISA_ENUM(ns, name, check) ns,
  FOVEAL_ISA_LEVELS(FOVEAL_ISA_ENUM)
#undef FOVEAL_ISA_ENUM
};

// True when the dispatcher chose the avx512-amx level: the AVX-512 level's kernels, with
// bfloat16 attention multiplying on AMX tiles (detail/amx_tiles.hpp; src/dispatch.cpp).
bool amx_tiles_enabled();

}  // namespace foveal::detail
