// python/foveal/_tensor.cpp — reading numpy arrays, DLPack capsules (torch and others) and
// buffer-protocol objects into Tensor (see _tensor.hpp).
#include "_tensor.hpp"

#include <cstring>

namespace foveal::python {

namespace {

// The DLPack C ABI (the "dltensor" capsule of __dlpack__() without max_version), as the DLPack
// specification lays it out.
struct DLDevice {
  std::int32_t device_type;  // 1: CPU
  std::int32_t device_id;
};
struct DLDataType {
  std::uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  std::int32_t ndim;
  DLDataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null means compact row-major
  std::uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

constexpr std::int32_t kDLCPU = 1;

DType dlpack_dtype(const DLDataType& type) {
  if (type.lanes != 1) return DType::other;
  switch (type.code) {
    case 0:
      return type.bits == 64 ? DType::int64 : type.bits == 32 ? DType::int32 : DType::other;
    case 1:
      return type.bits == 8 ? DType::uint8 : DType::other;
    case 2:
      return type.bits == 32   ? DType::float32
             : type.bits == 64 ? DType::float64
             : type.bits == 16 ? DType::float16
                               : DType::other;
    case 4:
      return type.bits == 16 ? DType::bfloat16 : DType::other;
    case 6:
      return type.bits == 8 ? DType::boolean : DType::other;
    default:
      return DType::other;
  }
}

std::string dlpack_dtype_name(const DLDataType& type) {
  static const char* const kinds[] = {"int",    "uint",    "float", "opaque",
                                      "bfloat", "complex", "bool"};
  std::string name = type.code < 7 ? kinds[type.code] : "code" + std::to_string(type.code);
  name += std::to_string(type.bits);
  if (type.lanes != 1) name += "x" + std::to_string(type.lanes);
  return name;
}

DType numpy_dtype(const py::dtype& dtype) {
  const char order = dtype.byteorder();
  if (order == '>') return DType::other;  // non-native byte order (this is a little-endian build)
  const auto bytes = dtype.itemsize();
  switch (dtype.kind()) {
    case 'f':
      return bytes == 4   ? DType::float32
             : bytes == 8 ? DType::float64
             : bytes == 2 ? DType::float16
                          : DType::other;
    case 'i':
      return bytes == 8 ? DType::int64 : bytes == 4 ? DType::int32 : DType::other;
    case 'u':
      return bytes == 1 ? DType::uint8 : DType::other;
    case 'b':
      return DType::boolean;
    default:
      return DType::other;
  }
}

bool is_torch_object(py::handle source) {
  const py::object module = py::type::handle_of(source).attr("__module__");
  const std::string name = py::str(module);
  return name.compare(0, 5, "torch") == 0 && (name.size() == 5 || name[5] == '.');
}

std::string type_name(py::handle source) {
  return py::str(py::type::handle_of(source).attr("__name__"));
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::boolean:
      return "bool";
    case DType::uint8:
      return "uint8";
    case DType::int32:
      return "int32";
    case DType::int64:
      return "int64";
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
    case DType::other:
      break;
  }
  return "unsupported";
}

std::string Tensor::dtype_name() const {
  return dtype_ == DType::other ? other_dtype_ : std::string(python::dtype_name(dtype_));
}

Tensor Tensor::from(py::handle source) {
  Tensor tensor;
  tensor.keep_alive_ = py::reinterpret_borrow<py::object>(source);
  if (py::isinstance<py::array>(source)) {
    tensor.from_numpy(py::reinterpret_borrow<py::array>(source));
    return tensor;
  }
  if (is_torch_object(source)) {
    tensor.is_torch_ = true;
    const py::object device = source.attr("device");
    if (std::string(py::str(device.attr("type"))) != "cpu") {
      tensor.problem_ = Problem::not_on_cpu;
      tensor.problem_detail_ = py::str(device);
      return tensor;
    }
    py::object usable = tensor.keep_alive_;
    if (source.attr("requires_grad").cast<bool>()) {
      // Under torch.no_grad() no graph is recorded, so such a tensor is a plain input.
      if (py::module_::import("torch").attr("is_grad_enabled")().cast<bool>()) {
        tensor.problem_ = Problem::requires_grad;
        return tensor;
      }
      usable = source.attr("detach")();
    }
    tensor.from_dlpack(usable);
    return tensor;
  }
  if (py::hasattr(source, "__dlpack__")) {
    try {
      const auto device = source.attr("__dlpack_device__")().cast<std::pair<int, int>>();
      if (device.first != kDLCPU) {
        tensor.problem_ = Problem::not_on_cpu;
        tensor.problem_detail_ = "DLPack device type " + std::to_string(device.first);
        return tensor;
      }
    } catch (const py::error_already_set&) {
      // No __dlpack_device__: the capsule says where the memory is.
    }
    tensor.from_dlpack(tensor.keep_alive_);
    return tensor;
  }
  PyObject* memory = PyMemoryView_FromObject(source.ptr());
  if (memory == nullptr) {
    PyErr_Clear();
    tensor.problem_ = Problem::not_a_tensor;
    tensor.problem_detail_ = type_name(source);
    return tensor;
  }
  const auto view = py::reinterpret_steal<py::object>(memory);
  tensor.from_numpy(py::module_::import("numpy").attr("asarray")(view));
  tensor.keep_alive_ = py::make_tuple(source, tensor.keep_alive_);
  return tensor;
}

void Tensor::from_numpy(const py::array& array) {
  keep_alive_ = array;
  const py::dtype dtype = array.dtype();
  dtype_ = numpy_dtype(dtype);
  if (dtype_ == DType::other) other_dtype_ = py::str(dtype);
  rank_ = static_cast<int>(array.ndim());
  const auto bytes = static_cast<py::ssize_t>(dtype.itemsize());
  for (int dim = 0; dim < rank_ && dim < kMaxRank; ++dim) {
    shape_[dim] = array.shape(dim);
    if (bytes == 0 || array.strides(dim) % bytes != 0) {
      problem_ = Problem::rejected;
      problem_detail_ = ".strides[" + std::to_string(dim) +
                        "] = " + std::to_string(array.strides(dim)) +
                        " bytes is not a multiple of the element size " + std::to_string(bytes);
    } else {
      strides_[dim] = array.strides(dim) / bytes;
    }
  }
  data_ = const_cast<void*>(array.data());
  writable_ = array.writeable();
}

void Tensor::from_dlpack(const py::object& owner) {
  py::object capsule;
  try {
    capsule = owner.attr("__dlpack__")();
  } catch (const py::error_already_set& error) {
    problem_ = Problem::rejected;
    problem_detail_ = std::string(" cannot be read through DLPack: ") + error.what();
    return;
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    problem_ = Problem::rejected;
    problem_detail_ = " gave no DLPack \"dltensor\" capsule";
    return;
  }
  // The capsule owns the exporter's reference to the memory; it is not consumed (renamed), so
  // releasing it calls the exporter's deleter.
  keep_alive_ = capsule;
  const DLTensor& dl = managed->dl_tensor;
  if (dl.device.device_type != kDLCPU) {
    problem_ = Problem::not_on_cpu;
    problem_detail_ = "DLPack device type " + std::to_string(dl.device.device_type);
    return;
  }
  dtype_ = dlpack_dtype(dl.dtype);
  if (dtype_ == DType::other) other_dtype_ = dlpack_dtype_name(dl.dtype);
  rank_ = dl.ndim;
  Index compact = 1;
  for (int dim = std::min(rank_, kMaxRank) - 1; dim >= 0; --dim) {
    shape_[dim] = dl.shape[dim];
    strides_[dim] = dl.strides != nullptr ? dl.strides[dim] : compact;
    compact *= dl.shape[dim];
  }
  data_ = static_cast<char*>(dl.data) + dl.byte_offset;
  writable_ = true;  // DLPack's legacy capsule has no read-only flag
}

void Tensor::require_usable(const char* function, const char* name) const {
  switch (problem_) {
    case Problem::none:
      return;
    case Problem::not_a_tensor:
      type_error(function, ": ", name,
                 " must be a numpy array, a torch CPU tensor or an object with __dlpack__ or the "
                 "buffer protocol, got ",
                 problem_detail_);
    case Problem::not_on_cpu:
      value_error(function, ": ", name, " must be on the CPU, got device ", problem_detail_);
    case Problem::requires_grad:
      value_error(function, ": ", name, " requires grad; foveal.", function,
                  " computes the forward pass only: pass a tensor that does not require grad "
                  "(torch.no_grad() or .detach())");
    case Problem::rejected:
      value_error(function, ": ", name, problem_detail_);
  }
}

Tensor::Merge Tensor::merge_leading(const char* function, const char* name, int count) const {
  Merge merge;
  Index next_extent = -1;  // stride × size of the dimension after, among those of size > 1
  for (int dim = count - 1; dim >= 0; --dim) {
    if (__builtin_mul_overflow(merge.size, shape_[dim], &merge.size))
      value_error(function, ": ", name, " has more elements than a 64-bit count holds (shape ",
                  shape_string(), ")");
    if (shape_[dim] == 1) continue;
    if (next_extent == -1) {
      merge.stride = strides_[dim];
    } else if (strides_[dim] != next_extent) {
      merge.single_stride = false;
    }
    next_extent = strides_[dim] * shape_[dim];
  }
  if (merge.size == 0) merge.single_stride = true;
  return merge;
}

bool Tensor::same_shape(const Tensor& other) const {
  if (rank_ != other.rank_) return false;
  for (int dim = 0; dim < rank_ && dim < kMaxRank; ++dim)
    if (shape_[dim] != other.shape_[dim]) return false;
  return true;
}

std::string Tensor::shape_string() const {
  if (rank_ > kMaxRank) return "(" + std::to_string(rank_) + " dimensions)";
  std::string text = "(";
  for (int dim = 0; dim < rank_; ++dim) {
    if (dim > 0) text += ", ";
    text += std::to_string(shape_[dim]);
  }
  return text + (rank_ == 1 ? ",)" : ")");
}

void Tensor::reject_rank(const char* function, const char* name, int rank, const char* dims) const {
  value_error(function, ": ", name, " must have ", rank, " dimensions",
              dims ? std::string(" [") + dims + "]" : std::string(), ", got ", rank_, " (shape ",
              shape_string(), ")");
}

void Tensor::reject_rank_range(const char* function, const char* name, int min_rank, int max_rank,
                               const char* dims) const {
  std::string ranks = std::to_string(min_rank);
  for (int rank = min_rank + 1; rank <= max_rank; ++rank)
    ranks += (rank == max_rank ? " or " : ", ") + std::to_string(rank);
  value_error(function, ": ", name, " must have ", ranks, " dimensions (", dims, "), got ", rank_,
              " (shape ", shape_string(), ")");
}

void Tensor::reject_dtype(const char* function, const char* name, DType expected,
                          const char* dtype_note) const {
  type_error(function, ": ", name, " must have dtype ", python::dtype_name(expected),
             dtype_note ? std::string(" (") + dtype_note + ")" : std::string(), ", got ",
             dtype_name());
}

}  // namespace foveal::python
