// The OpenVINO side of FuseflowOp: one ov::Core per process, a process-wide
// cache of compiled models shared by every op instance and session, and a pool
// of infer requests per compiled model.
#ifndef FUSEFLOW_NATIVE_OPENVINO_MODEL_H_
#define FUSEFLOW_NATIVE_OPENVINO_MODEL_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "openvino/runtime/core.hpp"
#include "tensorflow/core/framework/function.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

namespace fuseflow {

// What the op's attributes say about its compiled segment.
struct SegmentSpec {
  std::string function_name;                 // native_segment
  std::vector<std::string> input_names;      // OpenVINO port names, op input order
  std::vector<std::string> output_names;     // OpenVINO port names, op output order
  tensorflow::DataTypeVector input_types;    // Tin
  tensorflow::DataTypeVector output_types;   // Tout
  std::vector<tensorflow::PartialTensorShape> input_shapes;
  std::vector<tensorflow::PartialTensorShape> output_shapes;
  std::vector<std::string> properties;       // "KEY=VALUE"
  std::string executable_crc32;              // zlib CRC-32 of the blob, 8 hex digits; "" = unchecked
};

// The bytes of an exported blob: the op attribute's copy, or a file mapped read-only
// (file pages are shared and can be dropped by the kernel, never copied).
class Blob {
 public:
  virtual ~Blob() = default;
  virtual const char* data() const = 0;
  virtual size_t size() const = 0;
};
std::shared_ptr<const Blob> OwnedBlob(std::string bytes);
absl::StatusOr<std::shared_ptr<const Blob>> MapBlob(const std::string& path);

// Asset files of loaded SavedModels, by the content key their ops name: the
// FuseflowAssets init op registers the path the loader resolved; a FuseflowOp
// looks its files up when it first needs them.
void RegisterAsset(const std::string& key, const std::string& path);
absl::StatusOr<std::string> AssetPath(const std::string& key);

// zlib's CRC-32 (Python: zlib.crc32) of `size` bytes.
uint32_t Crc32(const char* data, size_t size);

// Parses "KEY=VALUE" strings; OpenVINO converts string values to the typed ones.
absl::StatusOr<ov::AnyMap> ParseProperties(const std::vector<std::string>& properties);

// --neuroncore-pipeline-cores as OpenVINO streams: INFERENCE_NUM_THREADS=T (T
// threads per call) on C cores becomes C/T streams of T threads, so the cores one
// call leaves idle serve other calls in flight. Without INFERENCE_NUM_THREADS, or
// with NUM_STREAMS already set (auto_multicore), the properties stay as they are.
void SizeStreams(ov::AnyMap* properties, int cores);
// The streams the op's properties get on this machine (the infer-request pool's floor).
int StreamsFor(const std::vector<std::string>& properties);

// The OpenVINO element type holding the same bytes as `dtype`, if there is one.
absl::StatusOr<ov::element::Type> ToOpenVinoType(tensorflow::DataType dtype);

// An infer request and the buffers its ports point at, so a call that finds the
// same TF buffers bound again (TF's allocator often hands back the same ones)
// skips set_tensor and the plugin's rebinding work.
struct PooledRequest {
  ov::InferRequest request;
  std::vector<const void*> bound;  // per port: inputs, then outputs; null = not yet
};

// Hands out infer requests, creating them on demand up to a limit, so that
// concurrent Compute calls each get a request of their own.
class InferRequestPool {
 public:
  // Returns its request to the pool when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(InferRequestPool* pool, PooledRequest request)
        : pool_(pool), request_(std::move(request)) {}
    Lease(Lease&& other) noexcept { *this = std::move(other); }
    Lease& operator=(Lease&& other) noexcept;
    ~Lease();
    ov::InferRequest& operator*() { return request_.request; }
    ov::InferRequest* operator->() { return &request_.request; }
    // Points port `port` (inputs first, then outputs) at `data` unless it already is.
    void Bind(size_t port, const ov::Output<const ov::Node>& node, const ov::element::Type& type,
              const ov::Shape& shape, void* data);

   private:
    InferRequestPool* pool_ = nullptr;
    PooledRequest request_;
  };

  InferRequestPool(ov::CompiledModel model, int limit) : model_(std::move(model)), limit_(limit) {}

  // Blocks while `limit` requests are out.
  Lease Acquire();
  // Never blocks: a caller holding a lease may ask for more without deadlock.
  bool TryAcquire(Lease* lease);
  // Op instances sharing a model may ask for different limits: the largest wins.
  void RaiseLimit(int limit);
  // Requests created so far: the most calls that have been in flight at once.
  int Created() const { return created_.load(std::memory_order_relaxed); }

 private:
  Lease TakeLocked();  // requires mu_ held and a request available or creatable
  void Release(PooledRequest request);

  ov::CompiledModel model_;
  std::mutex mu_;
  std::condition_variable released_;
  std::vector<PooledRequest> idle_;
  std::atomic<int> created_{0};  // written under mu_
  int limit_;
};

// A compiled segment with its ports bound to the op's inputs and outputs.
struct CompiledSegment {
  CompiledSegment(std::shared_ptr<const Blob> blob_bytes, ov::CompiledModel model,
                  int max_requests)
      : blob(std::move(blob_bytes)), compiled(model), pool(model, max_requests) {}

  // Declared first so it is destroyed last: an imported model reads it in place.
  std::shared_ptr<const Blob> blob;
  ov::CompiledModel compiled;
  int streams = 1;  // as OpenVINO reports it
  bool recompiled = false;
  std::string recompile_reason;  // the import error, when recompiled
  std::vector<ov::Output<const ov::Node>> inputs;   // op input order
  std::vector<ov::Output<const ov::Node>> outputs;  // op output order
  std::vector<ov::element::Type> input_types, output_types;
  // The TF dtype of each port's buffer: Tin/Tout, except DT_FLOAT where OpenVINO's
  // TensorFlow frontend widened a bfloat16 tensor to f32.
  tensorflow::DataTypeVector input_dtypes, output_dtypes;
  std::vector<ov::Shape> input_shapes, output_shapes;  // always static
  std::vector<tensorflow::TensorShape> output_tf_shapes;  // output_shapes, made once
  InferRequestPool pool;
};

// Returns the compiled model for `blob` (the bytes of CompiledModel::export_model),
// importing it at most once per process while someone holds the result. If the
// blob can't be imported (other OpenVINO version or CPU), the segment function
// is read from the library `flib()` returns through OpenVINO's TensorFlow frontend
// and compiled (flib is asked only then: the library may have to be read from disk).
using LibraryGetter =
    std::function<absl::StatusOr<const tensorflow::FunctionLibraryDefinition*>()>;
absl::StatusOr<std::shared_ptr<CompiledSegment>> GetCompiledSegment(
    std::shared_ptr<const Blob> blob, const SegmentSpec& spec, int max_requests,
    const LibraryGetter& flib, const std::string& node_name);

// Process-wide counters, read by the FuseflowOpStats op.
struct Counters {
  std::atomic<int64_t> openvino_runs{0};
  std::atomic<int64_t> native_runs{0};
  std::atomic<int64_t> imports{0};
  std::atomic<int64_t> recompiles{0};
};
Counters& GlobalCounters();

}  // namespace fuseflow

#endif  // FUSEFLOW_NATIVE_OPENVINO_MODEL_H_
