// foveal/core/error.hpp — the one exception type for rejected input, and the check helper.
#pragma once

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
