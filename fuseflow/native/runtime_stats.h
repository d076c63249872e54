// Which path ran each FuseflowOp call, and what XLA compiled and launched in
// this process, so tests and users can tell the compiled path from a fallback.
#ifndef FUSEFLOW_NATIVE_RUNTIME_STATS_H_
#define FUSEFLOW_NATIVE_RUNTIME_STATS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace fuseflow {

// The calls of one fused op (by node name, the segment name), shared by every
// instance of that name. Compiled calls cost one atomic increment.
class OpRunStats {
 public:
  void Compiled() { compiled_++; }
  void Recompiled() { recompiled_++; }
  // Why this op's executable was recompiled; the first reason is kept.
  void SetRecompileReason(const std::string& reason);
  // A call that TensorFlow ran; `kind` groups the reasons, the first text is kept.
  void Fallback(const std::string& kind, const std::string& reason);
  // The OpenVINO streams the executable runs (read back from OpenVINO).
  void SetStreams(int streams) { streams_ = streams; }
  // The most infer requests the op has had: how many of its calls OpenVINO ran at once.
  void SawInferRequests(int requests) {
    int seen = infer_requests_.load(std::memory_order_relaxed);
    while (requests > seen && !infer_requests_.compare_exchange_weak(seen, requests)) {
    }
  }
  int64_t Calls() const { return compiled_ + recompiled_ + fallback_; }
  std::string Json() const;

 private:
  struct Reason {
    int64_t calls = 0;
    std::string message;
  };
  std::atomic<int64_t> compiled_{0}, recompiled_{0}, fallback_{0};
  std::atomic<int> streams_{0}, infer_requests_{0};
  mutable std::mutex mu_;
  std::string recompile_reason_;
  std::map<std::string, Reason> fallback_reasons_;
};

// The process-wide stats of the op named `op`, created on first use.
std::shared_ptr<OpRunStats> RunStatsFor(const std::string& op);

// Every op's counts, TF's XLA compilation and launch counters and the clusters
// XLA compiled, as one JSON object (see fuseflow/runtime.py for its fields).
std::string RuntimeStatsJson();

}  // namespace fuseflow

// For loaders without Python (tests/cpp/run_saved_model.cc): writes the JSON,
// NUL-terminated, into `buffer` when it fits and returns its length.
extern "C" int64_t fuseflow_runtime_stats_json(char* buffer, int64_t size);

#endif  // FUSEFLOW_NATIVE_RUNTIME_STATS_H_
