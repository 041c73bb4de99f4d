// foveal/core/parallel.hpp — the thread-count setting and the one parallel loop.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace foveal {

// Sets the number of threads foveal uses when a call does not name one; 0 restores the
// default (OpenMP's, usually the number of cores). Negative values are rejected.
void set_num_threads(int num_threads);

// The number of threads a call that names none will use (always >= 1).
int get_num_threads();

namespace detail {

// The thread count for a call: `requested` when > 0, else the global setting.
inline int resolve_num_threads(int requested) {
  return requested > 0 ? requested : get_num_threads();
}

// The slot of the calling thread in the innermost running parallel_for: 0 outside of one.
inline int& thread_slot() {
  thread_local int slot = 0;
  return slot;
}

// The index of the calling thread inside a parallel_for body, in [0, num_threads): what a
// body uses to pick its per-thread scratch. Not omp_get_thread_num(), which inside a caller's
// own OpenMP team is the caller's index even where parallel_for runs the body serially.
inline int thread_index() { return thread_slot(); }

// Sets the calling thread's slot for the lifetime of the object, then restores it.
class ThreadSlot {
 public:
  explicit ThreadSlot(int slot) : saved_(thread_slot()) { thread_slot() = slot; }
  ~ThreadSlot() { thread_slot() = saved_; }
  ThreadSlot(const ThreadSlot&) = delete;
  ThreadSlot& operator=(const ThreadSlot&) = delete;

 private:
  int saved_;
};

}  // namespace detail

// Runs body(task) for every task in [0, num_tasks) on up to `num_threads` threads. Tasks are
// handed out dynamically, so which thread runs a task varies, but the tasks themselves are
// fixed by the caller: when every task writes only its own outputs, results are bitwise
// identical for any thread count. `body` must not throw.
template <typename Body>
void parallel_for(std::int64_t num_tasks, int num_threads, Body&& body) {
  if (num_tasks <= 0) return;
#ifdef _OPENMP
  if (num_threads > 1 && num_tasks > 1) {
    // Inside a caller's parallel region (nesting off) this team has one thread: slot 0.
#pragma omp parallel num_threads(num_threads)
    {
      const detail::ThreadSlot slot(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t task = 0; task < num_tasks; ++task) body(task);
    }
    return;
  }
#else
  (void)num_threads;
#endif
  const detail::ThreadSlot slot(0);
  for (std::int64_t task = 0; task < num_tasks; ++task) body(task);
}

}  // namespace foveal
