// foveal/detail/use_guard.hpp — detects concurrent misuse of a stateful object (a cache).
//
// A cache may be read by any number of threads at once (decode_attention, attend), but a
// mutation (append, truncate, reset) must run alone. Instead of locking, the object keeps a
// UseGuard and every call takes a Mutation or a Read for its duration: a mutation that meets
// another mutation or a running read, or a read that meets a running mutation, throws
// foveal::Error before touching anything. Reads never wait on each other. The counters are
// sequentially consistent, so of two calls that overlap at least one sees the other.
#pragma once

#include <atomic>

#include "foveal/core/error.hpp"

namespace foveal::detail {

class UseGuard {
 public:
  UseGuard() = default;
  // A copy describes a different object, which nothing is using yet.
  UseGuard(const UseGuard&) {}
  UseGuard& operator=(const UseGuard&) { return *this; }

  // Held by a mutating method for its whole run.
  class Mutation {
   public:
    Mutation(const UseGuard& guard, const char* object, const char* function) : guard_(guard) {
      check(!guard_.mutating_.exchange(true), function, ": the ", object,
            " is being modified by another thread; append, truncate and reset of one ", object,
            " must not run concurrently (one thread at a time, or one ", object, " per thread)");
      if (guard_.readers_.load() != 0) {
        guard_.mutating_.store(false);
        check(false, function, ": the ", object,
              " is being read by another thread (attention over it is running); modify it only "
              "when no call reads it");
      }
    }
    ~Mutation() { guard_.mutating_.store(false); }
    Mutation(const Mutation&) = delete;
    Mutation& operator=(const Mutation&) = delete;

   private:
    const UseGuard& guard_;
  };

  // Held by a reading call (attention over the object) for its whole run.
  class Read {
   public:
    Read(const UseGuard& guard, const char* object, const char* function) : guard_(guard) {
      guard_.readers_.fetch_add(1);
      if (guard_.mutating_.load()) {
        guard_.readers_.fetch_sub(1);
        check(false, function, ": the ", object,
              " is being modified by another thread (append, truncate or reset is running); "
              "read it only when no call modifies it");
      }
    }
    ~Read() { guard_.readers_.fetch_sub(1); }
    Read(const Read&) = delete;
    Read& operator=(const Read&) = delete;

   private:
    const UseGuard& guard_;
  };

 private:
  mutable std::atomic<bool> mutating_{false};
  mutable std::atomic<long> readers_{0};
};

}  // namespace foveal::detail
