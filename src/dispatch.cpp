// The choice of the ISA level (detail/kernels.hpp) and foveal::build_info.
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "foveal/core/build_info.hpp"
#include "foveal/core/error.hpp"
#include "foveal/version.hpp"

namespace foveal {
namespace detail {
namespace {

constexpr const char* kVariable = "FOVEAL_ISA";
constexpr const char* kAuto = "auto";

struct Level {
  const char* name;
  bool (*supported)();
  const KernelTable* table;
  bool amx_tiles = false;  // bfloat16 attention multiplies on AMX tiles (detail/amx_tiles.hpp)
};

// Each level's CPU check: every feature of the level, with the OS saving its registers
// (__builtin_cpu_supports checks both).
#define FOVEAL_ISA_SUPPORTED(ns, name, check) \
  bool supported_##ns() {                     \
    __builtin_cpu_init();                     \
    return check;                             \
  }
FOVEAL_ISA_LEVELS(FOVEAL_ISA_SUPPORTED)
#undef FOVEAL_ISA_SUPPORTED

#ifdef FOVEAL_ISA_AMX_LEVEL
// The OS must grant a process the tile data state before it uses AMX (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process; asking again is harmless).
bool os_grants_tile_data() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return granted;
#else
  return false;
#endif
}

// The AVX-512 level with AMX-TILE and AMX-BF16 (and AVX512-BF16 for the conversions).
bool supported_amx() {
  return FOVEAL_CONCAT(supported_, FOVEAL_ISA_AMX_LEVEL)() && __builtin_cpu_supports("amx-tile") &&
         __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("avx512bf16") &&
         os_grants_tile_data();
}
#endif

// The compiled levels, lowest first.
const Level kLevels[] = {
#define FOVEAL_ISA_LEVEL(ns, name, check) {name, &supported_##ns, &foveal_kernels_##ns},
    FOVEAL_ISA_LEVELS(FOVEAL_ISA_LEVEL)
#undef FOVEAL_ISA_LEVEL
#ifdef FOVEAL_ISA_AMX_LEVEL
        {"avx512-amx", &supported_amx, &FOVEAL_CONCAT(foveal_kernels_, FOVEAL_ISA_AMX_LEVEL), true},
#endif
};

std::string level_list(bool supported_only) {
  std::string list = kAuto;
  for (const Level& level : kLevels)
    if (!supported_only || level.supported()) list += std::string(", ") + level.name;
  return list;
}

// FOVEAL_ISA, or "auto" when unset or empty.
std::string requested_level() {
  const char* value = std::getenv(kVariable);
  return value == nullptr || *value == '\0' ? std::string(kAuto) : std::string(value);
}

// The level FOVEAL_ISA asks for, else the highest this CPU supports.
const Level& choose_level() {
  const std::string requested = requested_level();
  if (requested == kAuto) {
    const Level* best = nullptr;
    for (const Level& level : kLevels)
      if (level.supported()) best = &level;
    check(best != nullptr, "foveal: this CPU supports none of the compiled ISA levels (",
          level_list(false), "); foveal needs at least ", kLevels[0].name);
    return *best;
  }
  for (const Level& level : kLevels) {
    if (requested != level.name) continue;
    check(level.supported(), kVariable, "=", requested, ": this CPU does not support the ",
          requested, " ISA level; accepted on this CPU: ", level_list(true));
    return level;
  }
  throw Error(std::string(kVariable) + "=" + requested +
              ": not an ISA level of this build; accepted: " + level_list(false) +
              " (on this CPU: " + level_list(true) + ")");
}

const Level& level_in_use() {
  // Chosen once, thread-safely; a choice that throws is tried again at the next call.
  static const Level& level = choose_level();
  return level;
}

}  // namespace

const KernelTable& kernel_table() { return *level_in_use().table; }

bool amx_tiles_enabled() { return level_in_use().amx_tiles; }

}  // namespace detail

BuildInfo build_info() {
  BuildInfo info;
  info.version = FOVEAL_VERSION;
#if defined(__clang__)
  info.compiler = std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("GCC ") + __VERSION__;
#else
  info.compiler = "unknown";
#endif
  for (const detail::Level& level : detail::kLevels) {
    info.compiled_levels.emplace_back(level.name);
    if (level.supported()) info.supported_levels.emplace_back(level.name);
  }
  info.requested_level = detail::requested_level();
  info.level = detail::level_in_use().name;
  return info;
}

}  // namespace foveal
