// foveal/core/parallel.hpp — the thread-count setting and the one parallel loop.
#pragma once

#include <cstdint>

#include "foveal/core/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace foveal {

// The most threads foveal accepts for a call's num_threads or for set_num_threads: larger
// values throw foveal::Error. A default taken from OpenMP (OMP_NUM_THREADS) is clamped to it.
// Whatever the setting, a loop never starts more threads than it has tasks.
inline constexpr int kMaxThreads = 1024;

// Sets the number of threads foveal uses when a call does not name one; 0 restores the
// default (OpenMP's, usually the number of cores, at most kMaxThreads). Values outside
// [0, kMaxThreads] are rejected.
void set_num_threads(int num_threads);

// The number of threads a call that names none will use (always >= 1).
int get_num_threads();

// Long loops (k-means' seeding and Lloyd steps) call the installed interrupt check between
// steps, on the calling thread; a check that throws stops the call, which restores the state
// it changed and lets the exception through. The Python bindings install one that raises
// KeyboardInterrupt on Ctrl-C. nullptr (the default) checks nothing.
using InterruptCheck = void (*)();
void set_interrupt_check(InterruptCheck check);

namespace detail {

// Calls the installed interrupt check, if any (see set_interrupt_check).
void check_interrupt();

// A call's num_threads argument: 0 (the global setting) to kMaxThreads.
inline void require_num_threads(const char* function, std::int64_t num_threads) {
  check(num_threads >= 0 && num_threads <= kMaxThreads, function, ": num_threads must be in [0, ",
        kMaxThreads, "] (0 = the global setting), got ", num_threads);
}

// The thread count for a call: `requested` when > 0, else the global setting. A count above
// kMaxThreads that no entry point checked is rejected here, before any thread starts.
inline int resolve_num_threads(int requested) {
  check(requested <= kMaxThreads, "num_threads must be in [0, ", kMaxThreads,
        "] (0 = the global setting), got ", requested);
  return requested > 0 ? requested : get_num_threads();
}

// The team a loop of `num_tasks` tasks starts for `num_threads` requested threads: at least 1,
// at most num_tasks and kMaxThreads. Per-thread scratch is sized by this count.
inline int team_size(std::int64_t num_tasks, int num_threads) {
  std::int64_t team = num_threads < 1 ? 1 : num_threads;
  if (team > kMaxThreads) team = kMaxThreads;
  if (team > num_tasks) team = num_tasks < 1 ? 1 : num_tasks;
  return static_cast<int>(team);
}

// The work a thread must have before a loop starts another one, in multiply-adds (an
// attention call's work is rows × keys × (D + Dv)): below it, starting and waking a thread
// costs more than the thread saves, and on a busy machine much more. Measured with
// bench/thread_threshold.py (docs/getting_started.md#threads).
inline constexpr std::int64_t kMinWorkPerThread = std::int64_t{1} << 21;

// The work per thread in force (kMinWorkPerThread unless set_min_work_per_thread changed it).
std::int64_t min_work_per_thread();

// Replaces the work per thread (0: every loop starts the threads it has tasks for, as before
// the threshold; what bench/thread_threshold.py uses to find it) and returns the previous
// value; negative values are rejected. Process-wide; for benchmarks and tests.
std::int64_t set_min_work_per_thread(std::int64_t work);

// The team of a loop of `num_tasks` tasks that together do `work` multiply-adds (an upper
// bound will do): team_size(num_tasks, num_threads), but no more threads than whole
// min_work_per_thread() portions of the work, and so one thread for a small call whatever the
// setting. Only how many threads run the tasks changes, never the tasks, so results do not.
inline int team_size(std::int64_t num_tasks, int num_threads, std::int64_t work) {
  const int team = team_size(num_tasks, num_threads);
  const std::int64_t per_thread = min_work_per_thread();
  if (per_thread <= 0 || team == 1) return team;
  const std::int64_t portions = work / per_thread;
  return portions < 2 ? 1 : (portions < team ? static_cast<int>(portions) : team);
}

// The slot of the calling thread in the innermost running parallel_for: 0 outside of one.
inline int& thread_slot() {
  thread_local int slot = 0;
  return slot;
}

// The largest team a parallel_for called from this thread started since the caller last set it
// to 0: what the tests read to see that a small call ran on one thread.
inline int& widest_team() {
  thread_local int widest = 0;
  return widest;
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

// Runs body(task) for every task in [0, num_tasks) on up to team_size(num_tasks, num_threads)
// threads (never more threads than tasks), so detail::thread_index() is below both; a caller
// that knows its work passes detail::team_size(num_tasks, num_threads, work). Tasks are
// handed out dynamically, so which thread runs a task varies, but the tasks themselves are
// fixed by the caller: when every task writes only its own outputs, results are bitwise
// identical for any thread count. `body` must not throw.
template <typename Body>
void parallel_for(std::int64_t num_tasks, int num_threads, Body&& body) {
  if (num_tasks <= 0) return;
  num_threads = detail::team_size(num_tasks, num_threads);
  if (num_threads > detail::widest_team()) detail::widest_team() = num_threads;
#ifdef _OPENMP
  if (num_threads > 1) {
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
