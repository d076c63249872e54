#include "runtime_stats.h"

#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "tensorflow/compiler/jit/xla_activity_listener.h"
#include "tensorflow/core/lib/monitoring/collection_registry.h"

namespace fuseflow {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<OpRunStats>> ops;
  std::map<std::string, int64_t> xla_cluster_compilations;  // from TF's activity broadcast
};

Registry& GlobalRegistry() {
  static Registry* registry = new Registry();
  return *registry;
}

// XLA broadcasts one XlaJitCompilationActivity per cluster compiled: the only
// per-cluster signal TF gives (its counters are process-wide).
class ClusterListener : public tensorflow::XlaActivityListener {
 public:
  absl::Status Listen(const tensorflow::XlaAutoClusteringActivity&) override {
    return absl::OkStatus();
  }
  absl::Status Listen(const tensorflow::XlaJitCompilationActivity& activity) override {
    Registry& registry = GlobalRegistry();
    std::lock_guard<std::mutex> lock(registry.mu);
    registry.xla_cluster_compilations[activity.cluster_name()]++;
    return absl::OkStatus();
  }
  absl::Status Listen(const tensorflow::XlaOptimizationRemark&) override {
    return absl::OkStatus();
  }
};

const bool kListening = [] {
  tensorflow::RegisterXlaActivityListener(std::make_unique<ClusterListener>());
  return true;
}();

std::string Quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// The sum over all label values of one of TF's int64 counters; 0 if not registered.
int64_t CounterTotal(const tsl::monitoring::CollectedMetrics& metrics,
                     const std::string& name) {
  auto it = metrics.point_set_map.find(name);
  if (it == metrics.point_set_map.end()) return 0;
  int64_t total = 0;
  for (const auto& point : it->second->points) {
    if (point->value_type == tsl::monitoring::ValueType::kInt64) {
      total += point->int64_value;
    }
  }
  return total;
}

}  // namespace

void OpRunStats::SetRecompileReason(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (recompile_reason_.empty()) recompile_reason_ = reason;
}

void OpRunStats::Fallback(const std::string& kind, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  fallback_++;
  Reason& why = fallback_reasons_[kind];
  if (why.calls++ == 0) why.message = reason;
}

std::string OpRunStats::Json() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string json = absl::StrCat("{\"compiled\": ", compiled_.load(), ", \"recompiled\": ",
                                  recompiled_.load(), ", \"fallback\": ", fallback_.load(),
                                  ", \"streams\": ", streams_.load(),
                                  ", \"infer_requests\": ", infer_requests_.load(),
                                  ", \"recompile_reason\": ", Quote(recompile_reason_),
                                  ", \"fallback_reasons\": {");
  const char* sep = "";
  for (const auto& [kind, why] : fallback_reasons_) {
    absl::StrAppend(&json, sep, Quote(kind), ": {\"calls\": ", why.calls,
                    ", \"message\": ", Quote(why.message), "}");
    sep = ", ";
  }
  return json + "}}";
}

std::shared_ptr<OpRunStats> RunStatsFor(const std::string& op) {
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mu);
  std::shared_ptr<OpRunStats>& stats = registry.ops[op];
  if (!stats) stats = std::make_shared<OpRunStats>();
  return stats;
}

std::string RuntimeStatsJson() {
  tsl::monitoring::CollectionRegistry::CollectMetricsOptions options;
  options.collect_metric_descriptors = false;
  auto metrics = tsl::monitoring::CollectionRegistry::Default()->CollectMetrics(options);
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mu);
  std::string json = "{\"ops\": {";
  const char* sep = "";
  for (const auto& [name, stats] : registry.ops) {
    if (stats->Calls() == 0) continue;  // built, never called
    absl::StrAppend(&json, sep, Quote(name), ": ", stats->Json());
    sep = ", ";
  }
  // A cluster whose executable came from the persistent cache is still counted as a
  // compilation (it was lowered to HLO); persistent_cache_load_count tells them apart.
  absl::StrAppend(&json, "}, \"xla\": {\"compilations\": ",
                  CounterTotal(*metrics, "/tensorflow/core/xla_compilations"),
                  ", \"launches\": ", CounterTotal(*metrics, "/tensorflow/core/xla_launch_counter"),
                  ", \"cache_loads\": ",
                  CounterTotal(*metrics, "/tensorflow/core/persistent_cache_load_count"),
                  ", \"clusters\": {");
  sep = "";
  for (const auto& [cluster, compilations] : registry.xla_cluster_compilations) {
    absl::StrAppend(&json, sep, Quote(cluster), ": ", compilations);
    sep = ", ";
  }
  return json + "}}}";
}

}  // namespace fuseflow

extern "C" int64_t fuseflow_runtime_stats_json(char* buffer, int64_t size) {
  const std::string json = fuseflow::RuntimeStatsJson();
  const int64_t length = static_cast<int64_t>(json.size());
  if (buffer != nullptr && length < size) std::memcpy(buffer, json.c_str(), length + 1);
  return length;
}
