#include "openvino_model.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <stdexcept>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string_view>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "openvino/core/model.hpp"
#include "openvino/runtime/properties.hpp"
#include "tensorflow/core/framework/graph.pb.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/platform/logging.h"
#include "tensorflow/core/public/version.h"

// zlib, as libtensorflow_framework exports it (no zlib headers in the TF wheel).
extern "C" unsigned long crc32_z(unsigned long crc, const unsigned char* buf, size_t len);

namespace fuseflow {
namespace {

using tensorflow::DataType;
using tensorflow::PartialTensorShape;

constexpr char kDevice[] = "CPU";
constexpr char kCallNode[] = "__fuseflow_call";

ov::Core& SharedCore() {
  // Never destroyed: OpenVINO's plugin threads must not be torn down by static
  // destructors racing interpreter shutdown.
  static ov::Core* core = new ov::Core();
  return *core;
}

// True if `shape` (static) fits the attribute's partial shape.
bool Fits(const ov::Shape& shape, const PartialTensorShape& attr) {
  if (attr.unknown_rank()) return true;
  if (attr.dims() != static_cast<int>(shape.size())) return false;
  for (int d = 0; d < attr.dims(); ++d) {
    if (attr.dim_size(d) >= 0 && attr.dim_size(d) != static_cast<int64_t>(shape[d])) return false;
  }
  return true;
}

// Checks one port against the op's dtype and shape attributes; returns its
// static shape and sets the TF dtype of its buffer.
absl::StatusOr<ov::Shape> CheckPort(const ov::Output<const ov::Node>& port, const std::string& what,
                                    DataType dtype, const PartialTensorShape& attr_shape,
                                    DataType* buffer_dtype) {
  auto type = ToOpenVinoType(dtype);
  if (!type.ok()) return type.status();
  *buffer_dtype = dtype;
  if (dtype == tensorflow::DT_BFLOAT16 && port.get_element_type() == ov::element::f32) {
    *buffer_dtype = tensorflow::DT_FLOAT;  // the TF frontend reads bfloat16 as f32
  } else if (port.get_element_type() != *type) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has element type ",
                                                   port.get_element_type().get_type_name(),
                                                   ", the op says ", tensorflow::DataTypeString(dtype)));
  }
  if (!port.get_partial_shape().is_static()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has dynamic shape ",
                                                   port.get_partial_shape().to_string()));
  }
  ov::Shape shape = port.get_shape();
  if (!Fits(shape, attr_shape)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has shape ",
                                                   ov::PartialShape(shape).to_string(),
                                                   ", the op says ", attr_shape.DebugString()));
  }
  return shape;
}

// Binds the compiled model's ports to the op's inputs and outputs: by name for an
// imported blob, by position for a model recompiled here (whose order we chose).
absl::Status BindPorts(const SegmentSpec& spec, bool by_position, CompiledSegment* segment) {
  const ov::CompiledModel& model = segment->compiled;
  const bool in_count_ok = model.inputs().size() == spec.input_names.size();
  const bool out_count_ok = model.outputs().size() == spec.output_names.size();
  if (by_position && (!in_count_ok || !out_count_ok)) {
    return absl::InternalError(absl::StrCat("the recompiled model has ", model.inputs().size(),
                                            " inputs and ", model.outputs().size(),
                                            " outputs, the op has ", spec.input_names.size(),
                                            " and ", spec.output_names.size()));
  }
  try {
    for (size_t i = 0; i < spec.input_names.size(); ++i) {
      const std::string& name = spec.input_names[i];
      ov::Output<const ov::Node> port = by_position ? model.input(i) : model.input(name);
      DataType dtype;
      auto shape = CheckPort(port, absl::StrCat("input port '", name, "'"), spec.input_types[i],
                             spec.input_shapes[i], &dtype);
      if (!shape.ok()) return shape.status();
      segment->input_dtypes.push_back(dtype);
      segment->inputs.push_back(port);
      segment->input_types.push_back(port.get_element_type());
      segment->input_shapes.push_back(*shape);
    }
    for (size_t o = 0; o < spec.output_names.size(); ++o) {
      const std::string& name = spec.output_names[o];
      ov::Output<const ov::Node> port = by_position ? model.output(o) : model.output(name);
      DataType dtype;
      auto shape = CheckPort(port, absl::StrCat("output port '", name, "'"), spec.output_types[o],
                             spec.output_shapes[o], &dtype);
      if (!shape.ok()) return shape.status();
      segment->output_dtypes.push_back(dtype);
      segment->outputs.push_back(port);
      segment->output_types.push_back(port.get_element_type());
      segment->output_shapes.push_back(*shape);
      tensorflow::TensorShape tf_shape;
      for (size_t d : *shape) tf_shape.AddDim(static_cast<int64_t>(d));
      segment->output_tf_shapes.push_back(tf_shape);
    }
  } catch (const std::exception& e) {  // model.input(name) throws for an unknown name
    return absl::InvalidArgumentError(e.what());
  }
  return absl::OkStatus();
}

// A Placeholder name for input `i`: the port name minus ":0", as OpenVINO's
// TensorFlow frontend names a Placeholder's port "<node>:0".
std::string PlaceholderName(const std::string& port_name, size_t i) {
  std::string name = port_name;
  if (name.size() > 2 && name.compare(name.size() - 2, 2, ":0") == 0) name.resize(name.size() - 2);
  if (name.empty() || name.find(':') != std::string::npos || name.rfind("__fuseflow_", 0) == 0) {
    name = absl::StrCat("__fuseflow_arg_", i);
  }
  return name;
}

std::string RetName(size_t o) { return absl::StrCat("__fuseflow_ret_", o); }

// A GraphDef that calls the segment function on Placeholders: the form OpenVINO's
// TensorFlow frontend reads (it inlines PartitionedCall bodies from the library).
tensorflow::GraphDef SegmentGraph(const tensorflow::FunctionLibraryDefinition& flib,
                                  const SegmentSpec& spec) {
  tensorflow::GraphDef graph;
  graph.mutable_versions()->set_producer(TF_GRAPH_DEF_VERSION);
  tensorflow::NodeDef call;
  call.set_name(kCallNode);
  call.set_op("PartitionedCall");
  for (size_t i = 0; i < spec.input_names.size(); ++i) {
    tensorflow::NodeDef* arg = graph.add_node();
    arg->set_name(PlaceholderName(spec.input_names[i], i));
    arg->set_op("Placeholder");
    (*arg->mutable_attr())["dtype"].set_type(spec.input_types[i]);
    spec.input_shapes[i].AsProto((*arg->mutable_attr())["shape"].mutable_shape());
    call.add_input(arg->name());
    (*call.mutable_attr())["Tin"].mutable_list()->add_type(spec.input_types[i]);
  }
  for (DataType dtype : spec.output_types) {
    (*call.mutable_attr())["Tout"].mutable_list()->add_type(dtype);
  }
  // Present even when empty: PartitionedCall requires both lists.
  (*call.mutable_attr())["Tin"].mutable_list();
  (*call.mutable_attr())["f"].mutable_func()->set_name(spec.function_name);
  *graph.add_node() = call;
  for (size_t o = 0; o < spec.output_types.size(); ++o) {
    tensorflow::NodeDef* ret = graph.add_node();
    ret->set_name(RetName(o));
    ret->set_op("Identity");
    ret->add_input(absl::StrCat(kCallNode, ":", o));
    (*ret->mutable_attr())["T"].set_type(spec.output_types[o]);
  }
  *graph.mutable_library() = flib.ReachableDefinitions(graph).ToProto();
  return graph;
}

// Reads the segment through OpenVINO's TensorFlow frontend (which takes a file),
// with parameters and results in op order and inputs reshaped to input_shapes.
std::shared_ptr<ov::Model> ReadSegment(const tensorflow::FunctionLibraryDefinition& flib,
                                       const SegmentSpec& spec) {
  if (flib.Find(spec.function_name) == nullptr) {
    throw std::runtime_error(absl::StrCat("function '", spec.function_name,
                                          "' is not in the graph's function library"));
  }
  std::string path =
      (std::filesystem::temp_directory_path() / "fuseflow_segment_XXXXXX.pb").string();
  int fd = mkstemps(path.data(), 3);
  if (fd < 0) throw std::runtime_error("cannot create a temporary file for the segment graph");
  close(fd);
  std::shared_ptr<ov::Model> model;
  try {
    {
      std::ofstream file(path, std::ios::binary);
      if (!SegmentGraph(flib, spec).SerializeToOstream(&file)) {
        throw std::runtime_error(absl::StrCat("cannot write ", path));
      }
    }
    model = SharedCore().read_model(path);
  } catch (...) {
    std::remove(path.c_str());
    throw;
  }
  std::remove(path.c_str());

  auto find = [](const auto& nodes, const std::string& tensor_name) {
    for (const auto& node : nodes) {
      if (node->output(0).get_names().count(tensor_name)) return node;
    }
    throw std::runtime_error(absl::StrCat("the frontend produced no port '", tensor_name, "'"));
  };
  ov::ParameterVector parameters;
  std::map<ov::Output<ov::Node>, ov::PartialShape> shapes;
  for (size_t i = 0; i < spec.input_names.size(); ++i) {
    auto parameter =
        find(model->get_parameters(), PlaceholderName(spec.input_names[i], i) + ":0");
    parameters.push_back(parameter);
    const PartialTensorShape& attr = spec.input_shapes[i];
    if (!attr.unknown_rank()) {
      std::vector<ov::Dimension> dims;
      for (int64_t d : attr.dim_sizes()) dims.push_back(d < 0 ? ov::Dimension() : ov::Dimension(d));
      shapes[parameter->output(0)] = ov::PartialShape(dims);
    }
  }
  ov::ResultVector results;
  for (size_t o = 0; o < spec.output_names.size(); ++o) {
    results.push_back(find(model->get_results(), RetName(o) + ":0"));
  }
  auto ordered = std::make_shared<ov::Model>(results, parameters, spec.function_name);
  ordered->reshape(shapes);
  return ordered;
}

std::string CacheKey(const Blob& blob, const SegmentSpec& spec) {
  std::vector<std::string> shapes;
  for (const auto& s : spec.input_shapes) shapes.push_back(s.DebugString());
  // The CRC when the op carries one (checked before import), else a hash of the bytes.
  const std::string content =
      spec.executable_crc32.empty()
          ? absl::StrCat(std::hash<std::string_view>()(std::string_view(blob.data(), blob.size())))
          : spec.executable_crc32;
  return absl::StrCat(content, "/", blob.size(), "|",
                      absl::StrJoin(spec.properties, ","), "|", absl::StrJoin(spec.input_names, ","),
                      "|", absl::StrJoin(spec.output_names, ","), "|", absl::StrJoin(shapes, ","));
}

class StringBlob : public Blob {
 public:
  explicit StringBlob(std::string bytes) : bytes_(std::move(bytes)) {}
  const char* data() const override { return bytes_.data(); }
  size_t size() const override { return bytes_.size(); }

 private:
  std::string bytes_;
};

class MappedBlob : public Blob {
 public:
  MappedBlob(void* data, size_t size) : data_(data), size_(size) {}
  ~MappedBlob() override {
    if (size_ > 0) munmap(data_, size_);
  }
  const char* data() const override { return static_cast<const char*>(data_); }
  size_t size() const override { return size_; }

 private:
  void* data_;
  size_t size_;
};

std::mutex& AssetMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}

std::map<std::string, std::string>& Assets() {
  static auto* assets = new std::map<std::string, std::string>();
  return *assets;
}

// The cores this process may run on.
int UsableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

std::shared_ptr<const Blob> OwnedBlob(std::string bytes) {
  return std::make_shared<StringBlob>(std::move(bytes));
}

absl::StatusOr<std::shared_ptr<const Blob>> MapBlob(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", strerror(errno)));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* data = nullptr;
  if (size > 0) {
    data = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED) {
      close(fd);
      return absl::InternalError(absl::StrCat("cannot map ", path, ": ", strerror(errno)));
    }
    madvise(data, size, MADV_WILLNEED);  // it is read whole, at once
  }
  close(fd);
  return std::make_shared<MappedBlob>(data, size);
}

void RegisterAsset(const std::string& key, const std::string& path) {
  std::lock_guard<std::mutex> lock(AssetMutex());
  Assets()[key] = path;
}

absl::StatusOr<std::string> AssetPath(const std::string& key) {
  std::lock_guard<std::mutex> lock(AssetMutex());
  auto it = Assets().find(key);
  if (it == Assets().end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "asset '", key, "' was never registered: the SavedModel's main_op (which runs "
        "FuseflowAssets) did not run; load the model with a SavedModel loader"));
  }
  return it->second;
}

uint32_t Crc32(const char* data, size_t size) {
  // zlib's, as TensorFlow's framework library exports it.
  return static_cast<uint32_t>(
      crc32_z(0, reinterpret_cast<const unsigned char*>(data), size));
}

void SizeStreams(ov::AnyMap* properties, int cores) {
  if (properties->count(ov::num_streams.name())) return;  // auto_multicore or the user chose
  auto threads = properties->find(ov::inference_num_threads.name());
  if (threads == properties->end()) return;  // one stream on all cores: lowest latency
  int per_stream = 0;
  try {
    per_stream = std::stoi(threads->second.as<std::string>());
  } catch (const std::exception&) {
    return;  // not a number: OpenVINO will say so
  }
  if (per_stream <= 0 || per_stream * 2 > cores) return;
  const int streams = cores / per_stream;
  (*properties)[ov::hint::performance_mode.name()] = "THROUGHPUT";
  (*properties)[ov::num_streams.name()] = std::to_string(streams);
  threads->second = std::to_string(streams * per_stream);
}

int StreamsFor(const std::vector<std::string>& properties) {
  auto map = ParseProperties(properties);
  if (!map.ok()) return 1;
  SizeStreams(&*map, UsableCores());
  auto it = map->find(ov::num_streams.name());
  if (it == map->end()) return 1;
  try {
    return std::max(1, std::stoi(it->second.as<std::string>()));
  } catch (const std::exception&) {
    return 1;
  }
}

absl::StatusOr<ov::AnyMap> ParseProperties(const std::vector<std::string>& properties) {
  ov::AnyMap map;
  for (const std::string& property : properties) {
    size_t eq = property.find('=');
    if (eq == 0 || eq == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("property '", property, "' is not of the form KEY=VALUE"));
    }
    map[property.substr(0, eq)] = property.substr(eq + 1);
  }
  return map;
}

absl::StatusOr<ov::element::Type> ToOpenVinoType(DataType dtype) {
  switch (dtype) {
    case tensorflow::DT_FLOAT: return ov::element::f32;
    case tensorflow::DT_HALF: return ov::element::f16;
    case tensorflow::DT_BFLOAT16: return ov::element::bf16;
    case tensorflow::DT_DOUBLE: return ov::element::f64;
    case tensorflow::DT_INT8: return ov::element::i8;
    case tensorflow::DT_INT16: return ov::element::i16;
    case tensorflow::DT_INT32: return ov::element::i32;
    case tensorflow::DT_INT64: return ov::element::i64;
    case tensorflow::DT_UINT8: return ov::element::u8;
    case tensorflow::DT_UINT16: return ov::element::u16;
    case tensorflow::DT_UINT32: return ov::element::u32;
    case tensorflow::DT_UINT64: return ov::element::u64;
    case tensorflow::DT_BOOL: return ov::element::boolean;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", tensorflow::DataTypeString(dtype), " has no OpenVINO equivalent"));
  }
}

InferRequestPool::Lease& InferRequestPool::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    if (pool_ != nullptr) pool_->Release(std::move(request_));
    pool_ = other.pool_;
    request_ = std::move(other.request_);
    other.pool_ = nullptr;
  }
  return *this;
}

InferRequestPool::Lease::~Lease() {
  if (pool_ != nullptr) pool_->Release(std::move(request_));
}

void InferRequestPool::Lease::Bind(size_t port, const ov::Output<const ov::Node>& node,
                                   const ov::element::Type& type, const ov::Shape& shape,
                                   void* data) {
  if (request_.bound.size() <= port) request_.bound.resize(port + 1, nullptr);
  if (request_.bound[port] == data) return;
  request_.bound[port] = nullptr;  // unknown if set_tensor throws
  request_.request.set_tensor(node, ov::Tensor(type, shape, data));
  request_.bound[port] = data;
}

InferRequestPool::Lease InferRequestPool::TakeLocked() {
  if (!idle_.empty()) {
    PooledRequest request = std::move(idle_.back());
    idle_.pop_back();
    return Lease(this, std::move(request));
  }
  ++created_;
  return Lease(this, PooledRequest{model_.create_infer_request(), {}});
}

InferRequestPool::Lease InferRequestPool::Acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  released_.wait(lock, [this] { return !idle_.empty() || created_ < limit_; });
  return TakeLocked();
}

bool InferRequestPool::TryAcquire(Lease* lease) {
  Lease taken;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.empty() && created_ >= limit_) return false;
    taken = TakeLocked();
  }
  *lease = std::move(taken);  // outside the lock: this may release what *lease held
  return true;
}

void InferRequestPool::RaiseLimit(int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  if (limit > limit_) {
    limit_ = limit;
    released_.notify_all();
  }
}

void InferRequestPool::Release(PooledRequest request) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(std::move(request));
  }
  released_.notify_one();
}

absl::StatusOr<std::shared_ptr<CompiledSegment>> GetCompiledSegment(
    std::shared_ptr<const Blob> blob, const SegmentSpec& spec, int max_requests,
    const LibraryGetter& flib, const std::string& node_name) {
  auto properties = ParseProperties(spec.properties);
  if (!properties.ok()) return properties.status();
  SizeStreams(&*properties, UsableCores());

  // Weak entries: a model lives while some op instance uses it. Loading under
  // the one lock keeps two sessions from importing the same blob twice.
  static std::mutex mu;
  static auto* cache = new std::map<std::string, std::weak_ptr<CompiledSegment>>();
  const std::string key = CacheKey(*blob, spec);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache->find(key); it != cache->end()) {
    if (auto cached = it->second.lock()) {
      cached->pool.RaiseLimit(max_requests);
      return cached;
    }
  }

  std::shared_ptr<CompiledSegment> segment;
  try {
    if (!spec.executable_crc32.empty()) {
      char hex[9];
      std::snprintf(hex, sizeof(hex), "%08x", Crc32(blob->data(), blob->size()));
      if (spec.executable_crc32 != hex) {
        throw std::runtime_error(absl::StrCat("the executable is corrupted (CRC-32 ", hex,
                                              ", expected ", spec.executable_crc32, ")"));
      }
    }
    ov::Tensor bytes(ov::element::u8, {blob->size()}, const_cast<char*>(blob->data()));
    segment = std::make_shared<CompiledSegment>(
        blob, SharedCore().import_model(bytes, kDevice, *properties), max_requests);
    GlobalCounters().imports++;
  } catch (const std::exception& import_error) {
    auto library = flib();
    if (!library.ok() || *library == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "import failed and there is no function library to recompile from (",
          library.ok() ? "none" : library.status().message(), "): ", import_error.what()));
    }
    LOG(WARNING) << "FuseflowOp '" << node_name
                 << "': the compiled OpenVINO executable can't be imported here (built by another "
                    "OpenVINO version or for another CPU?); recompiling it from the embedded "
                    "segment, which takes a while. Import error: "
                 << import_error.what();
    try {
      ov::CompiledModel compiled = SharedCore().compile_model(ReadSegment(**library, spec), kDevice,
                                                              *properties);
      segment = std::make_shared<CompiledSegment>(nullptr, compiled, max_requests);
      segment->recompiled = true;
      segment->recompile_reason = import_error.what();
      GlobalCounters().recompiles++;
    } catch (const std::exception& compile_error) {
      return absl::InternalError(absl::StrCat("import failed (", import_error.what(),
                                              ") and recompiling failed (", compile_error.what(),
                                              ")"));
    }
  }
  absl::Status bound = BindPorts(spec, segment->recompiled, segment.get());
  if (!bound.ok()) return bound;
  try {
    segment->streams = segment->compiled.get_property(ov::num_streams).num;
  } catch (const std::exception&) {
    segment->streams = 1;  // unreported: we only lose the stat
  }
  for (auto it = cache->begin(); it != cache->end();) {
    it = it->second.expired() ? cache->erase(it) : std::next(it);
  }
  (*cache)[key] = segment;
  return segment;
}

Counters& GlobalCounters() {
  static Counters* counters = new Counters();
  return *counters;
}

}  // namespace fuseflow
