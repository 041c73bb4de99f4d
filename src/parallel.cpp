// The process-wide thread-count setting.
#include "foveal/core/parallel.hpp"

#include <atomic>

#include "foveal/core/error.hpp"

namespace foveal {
namespace {

std::atomic<int> global_num_threads{0};  // 0: OpenMP's default

int default_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void set_num_threads(int num_threads) {
  check(num_threads >= 0, "set_num_threads: num_threads must be >= 0 (0 = default), got ",
        num_threads);
  global_num_threads.store(num_threads);
}

int get_num_threads() {
  const int configured = global_num_threads.load();
  const int resolved = configured > 0 ? configured : default_num_threads();
  return resolved > 0 ? resolved : 1;
}

}  // namespace foveal
