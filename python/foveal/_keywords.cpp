// python/foveal/_keywords.cpp — see _keywords.hpp.
#include "_keywords.hpp"

#include <limits>
#include <utility>

#include "_tensor.hpp"
#include "foveal/core/parallel.hpp"

namespace foveal::python {

bool Keywords::given(const char* name) const { return !get(name).is_none(); }

py::object Keywords::get(const char* name) const {
  read_.insert(name);
  if (!kwargs_.contains(name)) return py::none();
  return kwargs_[name];
}

std::int64_t Keywords::integer(const char* name, std::int64_t fallback) const {
  const py::object value = get(name);
  if (value.is_none()) return fallback;
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr()))
    type_error(function_, ": ", name, " must be an int, got ",
               std::string(py::str(py::type::handle_of(value).attr("__name__"))));
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) {
    if (std::string(name) == "num_threads")
      value_error(function_, ": num_threads must be in [0, ", kMaxThreads,
                  "] (0 = the global setting), got ", std::string(py::str(index)));
    value_error(function_, ": ", name, " must fit in a 64-bit integer ([-2**63, 2**63 - 1]), got ",
                std::string(py::str(index)));
  }
  return result;
}

std::int64_t Keywords::integer(const char* name) const {
  if (!given(name)) type_error(function_, ": ", name, " must be given (an int)");
  return integer(name, 0);
}

std::optional<std::vector<std::int64_t>> Keywords::integers(const char* name) const {
  const py::object given = get(name);
  if (given.is_none()) return std::nullopt;
  // Arrays and tensors as Python values (a torch tensor's elements are 0-d tensors, not ints).
  const bool convert = !py::isinstance<py::list>(given) && !py::isinstance<py::tuple>(given) &&
                       py::hasattr(given, "tolist");
  const py::object value = convert ? given.attr("tolist")() : given;
  const bool sequence = !py::isinstance<py::str>(value) && !py::isinstance<py::bytes>(value) &&
                        PySequence_Check(value.ptr()) != 0;
  std::vector<std::int64_t> result;
  if (sequence) {
    for (const py::handle item : value) {
      if (PyBool_Check(item.ptr()) || !PyIndex_Check(item.ptr())) {
        result.clear();
        break;
      }
      const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
      if (!index) {  // an __index__ that refuses (a row of a 2-D array): not an int
        PyErr_Clear();
        result.clear();
        break;
      }
      int overflow = 0;
      const long long entry = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
      if (overflow != 0)
        value_error(function_, ": ", name, "[", result.size(),
                    "] must fit in a 64-bit integer ([-2**63, 2**63 - 1]), got ",
                    std::string(py::str(index)));
      result.push_back(entry);
    }
    if (result.size() == static_cast<std::size_t>(py::len(value))) return result;
  }
  type_error(function_, ": ", name, " must be a sequence of ints, got ",
             std::string(py::str(py::type::handle_of(given).attr("__name__"))));
}

TensorView<const std::int64_t, 1> Keywords::index_view(const char* name) const {
  std::optional<std::vector<std::int64_t>> values = integers(name);
  if (!values) return {};
  // An empty sequence is still a sequence (of the wrong length, unless B = 0): its view must not
  // be null, which would mean "none given".
  static const std::int64_t kNoElement = 0;
  const std::vector<std::int64_t>& held = held_.emplace_back(std::move(*values));
  return TensorView<const std::int64_t, 1>(held.empty() ? &kNoElement : held.data(),
                                           {static_cast<Index>(held.size())});
}

double Keywords::number(const char* name, double fallback) const {
  const py::object value = get(name);
  if (value.is_none()) return fallback;
  if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyIndex_Check(value.ptr()) ||
                                     py::hasattr(value, "__float__")))
    type_error(function_, ": ", name, " must be a number, got ",
               std::string(py::str(py::type::handle_of(value).attr("__name__"))));
  const double result = PyFloat_AsDouble(value.ptr());
  if (result == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return result;
}

bool Keywords::flag(const char* name, bool fallback) const {
  const py::object value = get(name);
  if (value.is_none()) return fallback;
  const int truth = PyObject_IsTrue(value.ptr());
  if (truth < 0) throw py::error_already_set();
  return truth != 0;
}

std::string Keywords::text(const char* name, const std::string& fallback) const {
  const py::object value = get(name);
  if (value.is_none()) return fallback;
  if (!py::isinstance<py::str>(value))
    type_error(function_, ": ", name, " must be a str, got ",
               std::string(py::str(py::type::handle_of(value).attr("__name__"))));
  return value.cast<std::string>();
}

int Keywords::threads() const {
  const std::int64_t threads = integer("num_threads", 0);
  detail::require_num_threads(function_, threads);
  return static_cast<int>(threads);
}

void Keywords::require_all_read() const {
  for (const auto& item : kwargs_) {
    const std::string name = py::str(item.first);
    if (read_.count(name) == 0) type_error(function_, ": unexpected keyword argument ", name);
  }
}

AttentionOptions attention_options(const Keywords& keywords, bool causal_default) {
  const char* function = keywords.function();
  AttentionOptions options;
  if (keywords.given("scale")) {
    // 0 means "1/sqrt(D)" to the library; here None does, and a given scale must be usable.
    const double scale = keywords.number("scale", 0.0);
    if (!(scale > 0 && scale <= std::numeric_limits<double>::max()))
      value_error(function, ": scale must be finite and > 0 (None = 1/sqrt(D)), got ", scale);
    options.scale = scale;
  }
  options.causal = keywords.flag("causal", causal_default);
  options.window_left = keywords.integer("window_left", -1);
  options.window_right = keywords.integer("window_right", -1);
  options.sink_tokens = keywords.integer("sink_tokens", 0);
  options.softcap = keywords.number("softcap", 0.0);
  options.q_offset = keywords.integer("q_offset", -1);
  options.num_threads = keywords.threads();
  options.key_start = keywords.index_view("key_start");
  options.key_length = keywords.index_view("key_length");
  return options;
}

SparseKOptions sparsek_options(const Keywords& keywords) {
  SparseKOptions options;
  static_cast<AttentionOptions&>(options) = attention_options(keywords, true);
  options.topk = keywords.integer("topk");
  options.window = keywords.integer("window", 0);
  options.gate = parse_sparsek_gate(keywords.text("gate", "value"));
  return options;
}

py::dict options_dict(const AttentionOptions& options) {
  const auto unless = [](bool is_default, py::object value) {
    return is_default ? py::object(py::none()) : std::move(value);
  };
  py::dict values;
  values["scale"] = unless(options.scale == 0, py::float_(options.scale));
  values["causal"] = options.causal;
  values["window_left"] = options.window_left;
  values["window_right"] = options.window_right;
  values["sink_tokens"] = options.sink_tokens;
  values["softcap"] = options.softcap;
  values["q_offset"] = unless(options.q_offset == -1, py::int_(options.q_offset));
  values["num_threads"] = unless(options.num_threads == 0, py::int_(options.num_threads));
  return values;
}

py::dict options_dict(const SparseKOptions& options) {
  py::dict values = options_dict(static_cast<const AttentionOptions&>(options));
  values.attr("pop")("window_left");
  values.attr("pop")("window_right");
  values["topk"] = options.topk;
  values["window"] = options.window;
  values["gate"] = to_string(options.gate);
  return values;
}

}  // namespace foveal::python
