// Which path ran each FuseflowOp call, and what XLA compiled and launched in
// this process, so tests and users can tell the compiled path from a fallback.
#ifndef FUSEFLOW_NATIVE_RUNTIME_STATS_H_
#define FUSEFLOW_NATIVE_RUNTIME_STATS_H_

#include <cstdint>
#include <string>

namespace fuseflow {

enum class RunPath { kCompiled, kRecompiled, kFallback };

// Counts one call of the fused op `op` (its node name, the segment name).
// `reason_kind` and `reason` say why a call fell back, or why the op recompiled.
void RecordRun(const std::string& op, RunPath path, const std::string& reason_kind = "",
               const std::string& reason = "");

// Every op's counts, TF's XLA compilation and launch counters and the clusters
// XLA compiled, as one JSON object (see fuseflow/runtime.py for its fields).
std::string RuntimeStatsJson();

}  // namespace fuseflow

// For loaders without Python (tests/cpp/run_saved_model.cc): writes the JSON,
// NUL-terminated, into `buffer` when it fits and returns its length.
extern "C" int64_t fuseflow_runtime_stats_json(char* buffer, int64_t size);

#endif  // FUSEFLOW_NATIVE_RUNTIME_STATS_H_
