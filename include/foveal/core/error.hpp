// foveal/core/error.hpp — the one exception type for rejected input, and the check helper.
#pragma once

#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace foveal {

// Thrown for every rejected input. The message names the function, the argument, what was
// expected and what came: "foveal: attention: k.shape[3] must equal q.shape[3] (D) = 64, got 32".
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& message) : std::invalid_argument(message) {}
};

// Thrown when memory that foveal asked the system for could not be allocated (a request that
// passed every size check but does not fit): "foveal: KVCache keys: cannot allocate 1099511627776
// bytes ([1, 1, 4294967296, 64] float32)". A std::bad_alloc, so code that handles running out of
// memory handles it too; Python gets MemoryError.
class MemoryError : public std::bad_alloc {
 public:
  explicit MemoryError(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

namespace detail {

inline void append_all(std::ostringstream&) {}

template <typename First, typename... Rest>
void append_all(std::ostringstream& out, First&& first, Rest&&... rest) {
  out << std::forward<First>(first);
  append_all(out, std::forward<Rest>(rest)...);
}

}  // namespace detail

// Throws foveal::Error("foveal: " + pieces...) when `condition` is false.
template <typename... Pieces>
void check(bool condition, Pieces&&... pieces) {
  if (condition) return;
  std::ostringstream message;
  message << "foveal: ";
  detail::append_all(message, std::forward<Pieces>(pieces)...);
  throw Error(message.str());
}

}  // namespace foveal
