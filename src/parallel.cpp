// The process-wide thread-count setting.
#include "foveal/core/parallel.hpp"

#include <atomic>

#include "foveal/core/error.hpp"

namespace foveal {
namespace {

std::atomic<int> global_num_threads{0};  // 0: OpenMP's default
std::atomic<InterruptCheck> interrupt_check{nullptr};

// OpenMP's default (OMP_NUM_THREADS or the core count), clamped to [1, kMaxThreads].
int default_num_threads() {
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  return threads < 1 ? 1 : (threads > kMaxThreads ? kMaxThreads : threads);
#else
  return 1;
#endif
}

}  // namespace

void set_num_threads(int num_threads) {
  check(num_threads >= 0 && num_threads <= kMaxThreads,
        "set_num_threads: num_threads must be in [0, ", kMaxThreads, "] (0 = the default), got ",
        num_threads);
  global_num_threads.store(num_threads);
}

int get_num_threads() {
  const int configured = global_num_threads.load();
  const int resolved = configured > 0 ? configured : default_num_threads();
  return resolved > 0 ? resolved : 1;
}

void set_interrupt_check(InterruptCheck check) { interrupt_check.store(check); }

namespace detail {

void check_interrupt() {
  const InterruptCheck check = interrupt_check.load();
  if (check != nullptr) check();
}

}  // namespace detail

}  // namespace foveal
