// FuseflowOp runs one graph segment that fuseflow compiled ahead of time into
// an OpenVINO executable. It always produces the segment's results: when the
// executable can't be used it recompiles the segment, and failing that (or for
// input shapes it can't take) runs the original TensorFlow function, the way
// TF-TRT's TRTEngineOp runs its native segment.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "openvino_model.h"
#include "runtime_stats.h"
#include "tensorflow/core/common_runtime/process_function_library_runtime.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/function.h"
#include "tensorflow/core/platform/env.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/logging.h"

namespace fuseflow {
namespace {

using tensorflow::AsyncOpKernel;
using tensorflow::FunctionLibraryRuntime;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Batch axis values of input_batch_axis / output_batch_axis.
constexpr int64_t kBatchAxis = 0;
constexpr int64_t kNoBatchAxis = -1;

REGISTER_OP("FuseflowOp")
    .Input("inputs: Tin")
    .Output("outputs: Tout")
    .Attr("Tin: list(type) >= 0")
    .Attr("Tout: list(type) >= 1")
    .Attr("backend: string")
    .Attr("executable: string = ''")
    .Attr("executable_crc32: string = ''")
    .Attr("executable_file: string = ''")
    .Attr("native_file: string = ''")
    .Attr("native_segment: func")
    .Attr("input_names: list(string)")
    .Attr("output_names: list(string)")
    .Attr("input_shapes: list(shape)")
    .Attr("output_shapes: list(shape)")
    .Attr("input_batch_axis: list(int)")
    .Attr("output_batch_axis: list(int)")
    .Attr("properties: list(string) = []")
    .Attr("max_infer_requests: int = 0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      std::vector<tensorflow::PartialTensorShape> shapes;
      std::vector<int64_t> axes;
      TF_RETURN_IF_ERROR(c->GetAttr("output_shapes", &shapes));
      TF_RETURN_IF_ERROR(c->GetAttr("output_batch_axis", &axes));
      if (static_cast<int>(shapes.size()) != c->num_outputs() ||
          static_cast<int>(axes.size()) != c->num_outputs()) {
        return absl::InvalidArgumentError(
            "FuseflowOp: output_shapes and output_batch_axis need one entry per output");
      }
      for (int o = 0; o < c->num_outputs(); ++o) {
        ShapeHandle shape;
        TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(shapes[o], &shape));
        if (axes[o] == kBatchAxis && c->RankKnown(shape) && c->Rank(shape) > 0) {
          TF_RETURN_IF_ERROR(c->ReplaceDim(shape, 0, c->UnknownDim(), &shape));
        }
        c->set_output(o, shape);
      }
      return absl::OkStatus();
    });

// Runs in the SavedModel's main_op, which loaders run with every asset tensor fed
// its file's path in the loaded model: records the path of each fused op's files
// (the blob, the fallback library) under the content key the ops name.
REGISTER_OP("FuseflowAssets")
    .Input("paths: N * string")
    .Attr("N: int >= 1")
    .Attr("keys: list(string)")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs);

// Process-wide counters, so tests and benchmarks can tell which path ran.
REGISTER_OP("FuseflowOpStats")
    .Output("openvino_runs: int64")
    .Output("native_runs: int64")
    .Output("imports: int64")
    .Output("recompiles: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      for (int o = 0; o < c->num_outputs(); ++o) c->set_output(o, c->Scalar());
      return absl::OkStatus();
    });

std::string ShapeList(const std::vector<TensorShape>& shapes) {
  return absl::StrJoin(shapes, ", ", [](std::string* out, const TensorShape& shape) {
    out->append(shape.DebugString());
  });
}

TensorShape ToTensorShape(const ov::Shape& shape) {
  TensorShape result;
  for (size_t d : shape) result.AddDim(static_cast<int64_t>(d));
  return result;
}

// Per-call tensor lists: on the stack for the usual few inputs and outputs.
using Tensors = absl::InlinedVector<Tensor, 4>;

bool SameShape(const TensorShape& got, const ov::Shape& want) {
  if (got.dims() != static_cast<int>(want.size())) return false;
  for (int d = 0; d < got.dims(); ++d) {
    if (got.dim_size(d) != static_cast<int64_t>(want[d])) return false;
  }
  return true;
}

char* Data(const Tensor& tensor) { return const_cast<char*>(tensor.tensor_data().data()); }

// Bytes of one dim-0 slice of a tensor of `shape`.
size_t RowBytes(tensorflow::DataType dtype, const ov::Shape& shape) {
  size_t bytes = tensorflow::DataTypeSize(dtype);
  for (size_t d = 1; d < shape.size(); ++d) bytes *= shape[d];
  return bytes;
}

// `from` as `dtype`: shares the buffer when it has that dtype already, else
// converts (only bfloat16 <-> float32 is ever needed).
absl::Status Cast(OpKernelContext* ctx, const Tensor& from, tensorflow::DataType dtype, Tensor* to) {
  if (from.dtype() == dtype) {
    *to = from;
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(ctx->allocate_temp(dtype, from.shape(), to));
  if (from.dtype() == tensorflow::DT_BFLOAT16 && dtype == tensorflow::DT_FLOAT) {
    to->flat<float>() = from.flat<tensorflow::bfloat16>().cast<float>();
  } else if (from.dtype() == tensorflow::DT_FLOAT && dtype == tensorflow::DT_BFLOAT16) {
    to->flat<tensorflow::bfloat16>() = from.flat<float>().cast<tensorflow::bfloat16>();
  } else {
    return absl::InternalError(absl::StrCat("no conversion from ",
                                            tensorflow::DataTypeString(from.dtype()), " to ",
                                            tensorflow::DataTypeString(dtype)));
  }
  return absl::OkStatus();
}

class FuseflowOp : public AsyncOpKernel {
 public:
  explicit FuseflowOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    std::string executable;
    int64_t max_requests;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tin", &spec_.input_types));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tout", &spec_.output_types));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("backend", &backend_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("executable", &executable));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("executable_crc32", &spec_.executable_crc32));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("executable_file", &executable_file_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("native_file", &native_file_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("native_segment", &native_segment_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_names", &spec_.input_names));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_names", &spec_.output_names));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_shapes", &spec_.input_shapes));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_shapes", &spec_.output_shapes));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_batch_axis", &input_batch_axis_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_batch_axis", &output_batch_axis_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("properties", &spec_.properties));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_infer_requests", &max_requests));
    spec_.function_name = native_segment_.name();

    // Malformed attributes are a bug in whoever wrote the graph: fail loudly.
    const size_t n_in = spec_.input_types.size(), n_out = spec_.output_types.size();
    OP_REQUIRES(ctx,
                spec_.input_names.size() == n_in && spec_.input_shapes.size() == n_in &&
                    input_batch_axis_.size() == n_in,
                absl::InvalidArgumentError(absl::StrCat(
                    "FuseflowOp ", name(),
                    ": input_names, input_shapes and input_batch_axis need one entry per input (",
                    n_in, ")")));
    OP_REQUIRES(ctx,
                spec_.output_names.size() == n_out && spec_.output_shapes.size() == n_out &&
                    output_batch_axis_.size() == n_out,
                absl::InvalidArgumentError(absl::StrCat(
                    "FuseflowOp ", name(),
                    ": output_names, output_shapes and output_batch_axis need one entry per "
                    "output (", n_out, ")")));
    for (int64_t axis : input_batch_axis_) {
      OP_REQUIRES(ctx, axis == kBatchAxis || axis == kNoBatchAxis,
                  absl::InvalidArgumentError("FuseflowOp: batch axes must be 0 or -1"));
    }
    for (int64_t axis : output_batch_axis_) {
      OP_REQUIRES(ctx, axis == kBatchAxis || axis == kNoBatchAxis,
                  absl::InvalidArgumentError("FuseflowOp: batch axes must be 0 or -1"));
    }
    OP_REQUIRES_OK(ctx, ParseProperties(spec_.properties).status());
    // Every stream busy and as many calls again ready to start when one finishes.
    max_requests_ = max_requests > 0
                        ? static_cast<int>(max_requests)
                        : std::max<int>({1, static_cast<int>(std::thread::hardware_concurrency()),
                                         2 * StreamsFor(spec_.properties)});
    if (!executable.empty()) executable_ = OwnedBlob(std::move(executable));
    stats_ = RunStatsFor(name());
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    std::string kind, reason;
    if (CompiledSegment* segment = Segment(ctx, &kind, &reason)) {
      Tensors outputs;
      absl::Status status = RunOpenVino(ctx, *segment, &outputs);
      if (status.ok()) {
        for (size_t o = 0; o < outputs.size(); ++o) ctx->set_output(o, outputs[o]);
        GlobalCounters().openvino_runs++;
        if (segment->recompiled) {
          stats_->Recompiled();
        } else {
          stats_->Compiled();
        }
        done();
        return;
      }
      kind = status.code() == absl::StatusCode::kFailedPrecondition ? "shape" : "infer";
      reason = std::string(status.message());
      WarnOnce(kind, absl::StrCat(reason, "; running this call with TensorFlow"));
    }
    stats_->Fallback(kind, reason);
    RunNative(ctx, std::move(done));
  }

 private:
  // The compiled segment, loaded on first use; null when TensorFlow must run it,
  // with the reason's kind and text.
  // After the first call it takes no lock: every call reads what that call wrote.
  CompiledSegment* Segment(OpKernelContext* ctx, std::string* kind, std::string* why) {
    if (!loaded_.load(std::memory_order_acquire)) Load(ctx);
    if (!segment_) {
      *kind = load_failure_kind_;
      *why = load_failure_;
    }
    return segment_.get();
  }

  void Load(OpKernelContext* ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (loaded_.load(std::memory_order_relaxed)) return;
    std::string reason;
    if (!executable_ && !executable_file_.empty()) {  // the blob is an asset file: map it
      auto path = AssetPath(executable_file_);
      auto mapped = path.ok() ? MapBlob(*path)
                              : absl::StatusOr<std::shared_ptr<const Blob>>(path.status());
      if (mapped.ok()) {
        executable_ = *mapped;
      } else {
        load_failure_kind_ = "load_failed";
        reason = std::string(mapped.status().message());
      }
    }
    if (!reason.empty()) {
    } else if (backend_ != "openvino") {
      load_failure_kind_ = "unknown_backend";
      reason = absl::StrCat("unknown backend '", backend_, "'");
    } else if (!executable_ || executable_->size() == 0) {
      load_failure_kind_ = "not_compiled";
      reason = "the segment was not compiled (empty executable)";
    } else {
      FunctionLibraryRuntime* lib = ctx->function_library();
      LibraryGetter flib =
          [this, lib]() -> absl::StatusOr<const tensorflow::FunctionLibraryDefinition*> {
        if (!native_file_.empty()) return FileLibrary();
        return lib ? lib->GetFunctionLibraryDefinition() : nullptr;
      };
      auto segment = GetCompiledSegment(executable_, spec_, max_requests_, flib, name());
      if (segment.ok()) {
        segment_ = *segment;
        batch_rows_ = BatchRows(*segment_);
        stats_->SetStreams(segment_->streams);
        if (segment_->recompiled) stats_->SetRecompileReason(segment_->recompile_reason);
      } else {
        load_failure_kind_ = "load_failed";
        reason = std::string(segment.status().message());
      }
    }
    if (!reason.empty()) {
      LOG(WARNING) << "FuseflowOp '" << name() << "' runs its segment with TensorFlow: " << reason;
    }
    load_failure_ = reason;
    executable_.reset();  // the cache holds the bytes an imported model needs
    loaded_.store(true, std::memory_order_release);
  }

  // The fallback's FunctionDefLibrary, read from its asset file on first use: it stays
  // out of the graph so that it costs no load time or memory until it is needed.
  absl::StatusOr<const tensorflow::FunctionLibraryDefinition*> FileLibrary() {
    std::lock_guard<std::mutex> lock(file_mu_);
    if (!file_lib_) {
      auto path = AssetPath(native_file_);
      if (!path.ok()) return path.status();
      std::string bytes;
      TF_RETURN_IF_ERROR(
          tensorflow::ReadFileToString(tensorflow::Env::Default(), *path, &bytes));
      auto proto = std::make_unique<tensorflow::FunctionDefLibrary>();
      if (!proto->ParseFromString(bytes) || proto->function_size() == 0) {
        return absl::DataLossError(absl::StrCat("FuseflowOp ", name(), ": ", *path,
                                                " is not a fallback FunctionDefLibrary"));
      }
      // Its first function is the segment; the graph holds a stub under the name the
      // loader gave it (TF2's loader renames functions): the segment takes that name.
      if (proto->function(0).signature().name() != spec_.function_name) {
        tensorflow::FunctionDef renamed = proto->function(0);
        renamed.mutable_signature()->set_name(spec_.function_name);
        *proto->add_function() = std::move(renamed);
      }
      file_lib_ = std::make_unique<tensorflow::FunctionLibraryDefinition>(
          tensorflow::OpRegistry::Global(), *proto);
      file_lib_proto_ = std::move(proto);
    }
    return file_lib_.get();
  }

  // The compiled dim-0 size k when calls may be split into chunks of k rows, else -1.
  int64_t BatchRows(const CompiledSegment& segment) const {
    int64_t rows = -1;
    for (size_t i = 0; i < segment.input_shapes.size(); ++i) {
      if (input_batch_axis_[i] != kBatchAxis) continue;
      const ov::Shape& shape = segment.input_shapes[i];
      if (shape.empty() || (rows >= 0 && static_cast<int64_t>(shape[0]) != rows)) return -1;
      rows = static_cast<int64_t>(shape[0]);
    }
    for (size_t o = 0; o < segment.output_shapes.size(); ++o) {
      const ov::Shape& shape = segment.output_shapes[o];
      if (output_batch_axis_[o] != kBatchAxis || shape.empty() ||
          static_cast<int64_t>(shape[0]) != rows) {
        return -1;
      }
    }
    return rows > 0 ? rows : -1;
  }

  // The number of rows this call feeds along the batch axis (k for an exact
  // match), or -1 for an exact match of a segment that can't be split.
  // FailedPrecondition when the inputs fit neither way.
  absl::StatusOr<int64_t> CallRows(OpKernelContext* ctx, const CompiledSegment& segment) const {
    bool exact = true;
    for (int i = 0; exact && i < ctx->num_inputs(); ++i) {
      exact = SameShape(ctx->input(i).shape(), segment.input_shapes[i]);
    }
    if (exact) return batch_rows_;
    std::vector<TensorShape> got, want;
    for (int i = 0; i < ctx->num_inputs(); ++i) {
      got.push_back(ctx->input(i).shape());
      want.push_back(ToTensorShape(segment.input_shapes[i]));
    }
    bool fits = batch_rows_ > 0;
    int64_t rows = -1;
    for (size_t i = 0; fits && i < got.size(); ++i) {
      if (input_batch_axis_[i] != kBatchAxis) {
        fits = got[i] == want[i];
        continue;
      }
      TensorShape rest = got[i];
      if (rest.dims() != want[i].dims()) {
        fits = false;
        continue;
      }
      if (rows < 0) rows = rest.dim_size(0);
      rest.set_dim(0, want[i].dim_size(0));
      fits = rest == want[i] && got[i].dim_size(0) == rows;
    }
    if (!fits) {
      return absl::FailedPreconditionError(absl::StrCat(
          "input shapes [", ShapeList(got), "] fit neither the compiled shapes [", ShapeList(want),
          "] nor a split along the batch axis"));
    }
    return rows;
  }

  // Runs the compiled model. A call with B rows runs as ceil(B/k) chunks of the
  // compiled k rows on as many infer requests as the pool spares, the last chunk
  // zero-padded. TF buffers are handed to OpenVINO in place except for that chunk.
  absl::Status RunOpenVino(OpKernelContext* ctx, CompiledSegment& segment, Tensors* outputs) {
    auto call_rows = CallRows(ctx, segment);
    if (!call_rows.ok()) return call_rows.status();
    const bool split = *call_rows >= 0;
    const int64_t rows = split ? *call_rows : 0, k = batch_rows_;
    const int64_t chunks = split ? (rows + k - 1) / k : 1;
    const bool padded = split && rows % k != 0;
    const int n_in = ctx->num_inputs(), n_out = static_cast<int>(segment.outputs.size());

    // From here on every buffer has its port's dtype (see CompiledSegment::input_dtypes).
    Tensors inputs(n_in);
    for (int i = 0; i < n_in; ++i) {
      TF_RETURN_IF_ERROR(Cast(ctx, ctx->input(i), segment.input_dtypes[i], &inputs[i]));
    }
    // Temps, not allocate_output: a call that fails here falls back to TensorFlow,
    // which sets the outputs. OpenVINO writes into them in place all the same.
    outputs->resize(n_out);
    Tensors pad_in(padded ? n_in : 0), pad_out(padded ? n_out : 0);
    for (int o = 0; o < n_out; ++o) {
      TensorShape shape = segment.output_tf_shapes[o];
      if (split) shape.set_dim(0, rows);
      TF_RETURN_IF_ERROR(ctx->allocate_temp(segment.output_dtypes[o], shape, &(*outputs)[o]));
      if (padded) {
        TF_RETURN_IF_ERROR(ctx->allocate_temp(
            segment.output_dtypes[o], ToTensorShape(segment.output_shapes[o]), &pad_out[o]));
      }
    }
    const int64_t last = (chunks - 1) * k;  // first row of the last chunk
    for (int i = 0; padded && i < n_in; ++i) {
      if (input_batch_axis_[i] != kBatchAxis) continue;
      TF_RETURN_IF_ERROR(ctx->allocate_temp(
          segment.input_dtypes[i], ToTensorShape(segment.input_shapes[i]), &pad_in[i]));
      const size_t row_bytes = RowBytes(segment.input_dtypes[i], segment.input_shapes[i]);
      std::memset(Data(pad_in[i]), 0, pad_in[i].TotalBytes());
      std::memcpy(Data(pad_in[i]), Data(inputs[i]) + last * row_bytes,
                  (rows - last) * row_bytes);
    }
    if (chunks == 0) return absl::OkStatus();  // an empty batch

    // Points a request at chunk `c`'s rows of every input and output.
    auto bind = [&](InferRequestPool::Lease& lease, int64_t c) {
      const bool pad = padded && c == chunks - 1;
      for (int i = 0; i < n_in; ++i) {
        char* data = Data(inputs[i]);
        if (split && input_batch_axis_[i] == kBatchAxis) {
          data = pad ? Data(pad_in[i])
                     : data + c * k * RowBytes(segment.input_dtypes[i], segment.input_shapes[i]);
        }
        lease.Bind(i, segment.inputs[i], segment.input_types[i], segment.input_shapes[i], data);
      }
      for (int o = 0; o < n_out; ++o) {
        char* data = Data((*outputs)[o]);
        if (split) {
          data = pad ? Data(pad_out[o])
                     : data + c * k * RowBytes(segment.output_dtypes[o], segment.output_shapes[o]);
        }
        lease.Bind(n_in + o, segment.outputs[o], segment.output_types[o],
                   segment.output_shapes[o], data);
      }
    };

    absl::InlinedVector<InferRequestPool::Lease, 4> leases;
    absl::InlinedVector<bool, 4> running;  // per lease: started and not yet waited for
    try {
      // One blocking Acquire, the rest only if idle: no call waits while holding requests.
      leases.push_back(segment.pool.Acquire());
      for (InferRequestPool::Lease extra;
           static_cast<int64_t>(leases.size()) < chunks && segment.pool.TryAcquire(&extra);) {
        leases.push_back(std::move(extra));
      }
      running.assign(leases.size(), false);
      stats_->SawInferRequests(segment.pool.Created());
      if (chunks == 1 && segment.streams == 1) {
        bind(leases[0], 0);
        leases[0]->infer();  // on this thread: no hand-over to OpenVINO's
      } else {
        // OpenVINO's executor hands each request to a free stream (infer() on this
        // thread would pick the stream by thread, and two calls could share one).
        for (int64_t c = 0; c < chunks; ++c) {
          const size_t j = c % leases.size();
          if (running[j]) {
            running[j] = false;
            leases[j]->wait();
          }
          bind(leases[j], c);
          leases[j]->start_async();
          running[j] = true;
        }
        for (size_t j = 0; j < leases.size(); ++j) {
          if (running[j]) {
            running[j] = false;
            leases[j]->wait();
          }
        }
      }
    } catch (const std::exception& e) {
      // Requests still running write into our buffers: let them finish first.
      for (size_t j = 0; j < running.size(); ++j) {
        if (!running[j]) continue;
        try {
          leases[j]->wait();
        } catch (const std::exception&) {
        }
      }
      return absl::InternalError(absl::StrCat("OpenVINO inference failed: ", e.what()));
    }
    for (int o = 0; padded && o < n_out; ++o) {
      const size_t row_bytes = RowBytes(segment.output_dtypes[o], segment.output_shapes[o]);
      std::memcpy(Data((*outputs)[o]) + last * row_bytes, Data(pad_out[o]),
                  (rows - last) * row_bytes);
    }
    for (int o = 0; o < n_out; ++o) {
      const Tensor port_buffer = (*outputs)[o];
      TF_RETURN_IF_ERROR(Cast(ctx, port_buffer, spec_.output_types[o], &(*outputs)[o]));
    }
    return absl::OkStatus();
  }

  // Runs native_segment with TensorFlow's function runtime.
  void RunNative(OpKernelContext* ctx, DoneCallback done) {
    FunctionLibraryRuntime* lib = ctx->function_library();
    OP_REQUIRES_ASYNC(ctx, lib != nullptr,
                      absl::InternalError(absl::StrCat("FuseflowOp ", name(),
                                                       ": no function library to run the "
                                                       "native segment")),
                      done);
    FunctionLibraryRuntime::Handle handle;
    OP_REQUIRES_OK_ASYNC(ctx, NativeHandle(ctx, &lib, &handle), done);
    FunctionLibraryRuntime::Options options(ctx->step_id());
    options.rendezvous = ctx->rendezvous();
    options.cancellation_manager = ctx->cancellation_manager();
    options.step_container = ctx->step_container();
    options.collective_executor = ctx->collective_executor();
    options.runner = ctx->runner();
    options.run_all_kernels_inline = ctx->run_all_kernels_inline();
    std::vector<Tensor> args;
    args.reserve(ctx->num_inputs());
    for (int i = 0; i < ctx->num_inputs(); ++i) args.push_back(ctx->input(i));
    auto rets = std::make_shared<std::vector<Tensor>>();
    GlobalCounters().native_runs++;
    lib->Run(options, handle, args, rets.get(),
             [ctx, rets, done = std::move(done)](const absl::Status& status) {
               if (status.ok()) {
                 for (size_t o = 0; o < rets->size(); ++o) ctx->set_output(o, (*rets)[o]);
               } else {
                 ctx->SetStatus(status);
               }
               done();
             });
  }

  // The handle of native_segment and the runtime to run it with: the graph's own, or,
  // when the function is in an asset file, a clone of it with the file's functions added.
  absl::Status NativeHandle(OpKernelContext* ctx, FunctionLibraryRuntime** lib,
                            FunctionLibraryRuntime::Handle* handle) {
    std::lock_guard<std::mutex> lock(native_mu_);
    if (native_handle_ == tensorflow::kInvalidHandle) {
      native_lib_ = *lib;
      if (!native_file_.empty()) {  // the graph's native_segment is a stub
        auto file = FileLibrary();
        if (!file.ok()) return file.status();
        TF_RETURN_IF_ERROR((*lib)->Clone(&clone_lib_def_, &clone_pflr_, &native_lib_));
        for (const tensorflow::FunctionDef& fdef : file_lib_proto_->function()) {
          const std::string& fname = fdef.signature().name();
          TF_RETURN_IF_ERROR(clone_lib_def_->Find(fname) == nullptr
                                 ? clone_lib_def_->AddFunctionDef(fdef)
                                 : clone_lib_def_->ReplaceFunction(fname, fdef));
        }
      }
      FunctionLibraryRuntime::InstantiateOptions options;
      options.target = ctx->device()->name();
      TF_RETURN_IF_ERROR(native_lib_->Instantiate(native_segment_.name(),
                                                  tensorflow::AttrSlice(&native_segment_.attr()),
                                                  options, &native_handle_));
    }
    *lib = native_lib_;
    *handle = native_handle_;
    return absl::OkStatus();
  }

  void WarnOnce(const std::string& reason_kind, const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!warned_.insert(reason_kind).second) return;
    }
    LOG(WARNING) << "FuseflowOp '" << name() << "': " << message;
  }

  // Immutable after construction.
  SegmentSpec spec_;
  std::string backend_;
  tensorflow::NameAttrList native_segment_;
  std::vector<int64_t> input_batch_axis_, output_batch_axis_;
  int max_requests_;
  std::shared_ptr<OpRunStats> stats_;
  std::string executable_file_, native_file_;  // asset keys; "" = in the graph

  // Written once, by the first call, under mu_; loaded_ then publishes them.
  std::mutex mu_;
  std::atomic<bool> loaded_{false};
  std::shared_ptr<const Blob> executable_;  // reset once loading was tried
  std::shared_ptr<CompiledSegment> segment_;
  int64_t batch_rows_ = -1;
  std::string load_failure_kind_, load_failure_;  // why segment_ is null
  std::set<std::string> warned_;

  std::mutex file_mu_;
  std::unique_ptr<tensorflow::FunctionDefLibrary> file_lib_proto_;
  std::unique_ptr<tensorflow::FunctionLibraryDefinition> file_lib_;

  std::mutex native_mu_;
  FunctionLibraryRuntime::Handle native_handle_ = tensorflow::kInvalidHandle;
  FunctionLibraryRuntime* native_lib_ = nullptr;  // the runtime native_handle_ belongs to
  std::unique_ptr<tensorflow::FunctionLibraryDefinition> clone_lib_def_;
  std::unique_ptr<tensorflow::ProcessFunctionLibraryRuntime> clone_pflr_;
};

class FuseflowAssets : public tensorflow::OpKernel {
 public:
  explicit FuseflowAssets(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keys", &keys_));
    OP_REQUIRES(ctx, static_cast<int>(keys_.size()) == ctx->num_inputs(),
                absl::InvalidArgumentError("FuseflowAssets: one key per path"));
  }
  void Compute(OpKernelContext* ctx) override {
    for (int i = 0; i < ctx->num_inputs(); ++i) {
      RegisterAsset(keys_[i], std::string(ctx->input(i).scalar<tensorflow::tstring>()()));
    }
  }

 private:
  std::vector<std::string> keys_;
};

class FuseflowOpStats : public tensorflow::OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Counters& counters = GlobalCounters();
    const int64_t values[] = {counters.openvino_runs, counters.native_runs, counters.imports,
                              counters.recompiles};
    for (int o = 0; o < 4; ++o) {
      Tensor* out;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(o, TensorShape({}), &out));
      out->scalar<int64_t>()() = values[o];
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("FuseflowOp").Device(tensorflow::DEVICE_CPU), FuseflowOp);
REGISTER_KERNEL_BUILDER(Name("FuseflowOpStats").Device(tensorflow::DEVICE_CPU), FuseflowOpStats);
REGISTER_KERNEL_BUILDER(Name("FuseflowAssets").Device(tensorflow::DEVICE_CPU), FuseflowAssets);

}  // namespace
}  // namespace fuseflow
