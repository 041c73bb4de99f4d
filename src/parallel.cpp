// The process-wide thread-count setting.
#include "foveal/core/parallel.hpp"

#include <atomic>

#include "foveal/core/error.hpp"

namespace foveal {
namespace {

std::atomic<int> global_num_threads{0};  // 0: OpenMP's default
std::atomic<InterruptCheck> interrupt_check{nullptr};
std::atomic<std::int64_t> work_per_thread{detail::kMinWorkPerThread};

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

std::int64_t min_work_per_thread() { return work_per_thread.load(std::memory_order_relaxed); }

std::int64_t set_min_work_per_thread(std::int64_t work) {
  check(work >= 0, "set_min_work_per_thread: work must be >= 0 (0 = no threshold), got ", work);
  return work_per_thread.exchange(work);
}

}  // namespace detail

}  // namespace foveal
