// Loads a SavedModel with tensorflow::LoadSavedModel (the loader TF Serving
// uses) and runs one signature, so tests can check that compiled models work
// outside Python. Inputs and outputs are .npy files. An op library that
// exports fuseflow_runtime_stats_json (fuseflow's) gets its run statistics
// written to DIR/runtime_stats.json after the run.
//
// run_saved_model --model DIR --tags serve[,tag2] --signature KEY
//                 [--op-lib PATH]... [--in KEY=FILE.npy]... --out-dir DIR

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"

namespace {

using tensorflow::DataType;
using tensorflow::Tensor;
using tensorflow::TensorShape;

struct Fail : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// numpy descr (without byte-order char) <-> TF dtype.
const std::vector<std::pair<std::string, DataType>> kDtypes = {
    {"f4", tensorflow::DT_FLOAT}, {"f8", tensorflow::DT_DOUBLE},
    {"i4", tensorflow::DT_INT32}, {"i8", tensorflow::DT_INT64},
    {"b1", tensorflow::DT_BOOL},  {"u1", tensorflow::DT_UINT8},
};

// Returns the text between `'key':` and the next `end` char in an npy header.
std::string HeaderField(const std::string& header, const std::string& key,
                        char end, const std::string& path) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw Fail(path + ": npy header lacks " + key);
  pos = header.find(':', pos) + 1;
  size_t stop = header.find(end, pos);
  if (stop == std::string::npos) throw Fail(path + ": bad npy header");
  return header.substr(pos, stop - pos);
}

Tensor ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail("cannot open " + path);
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Fail(path + ": not an .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else if (magic[6] == 2) {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    throw Fail(path + ": unsupported npy version " + std::to_string(magic[6]));
  }
  std::string header(header_len, '\0');
  if (!f.read(header.data(), header_len)) throw Fail(path + ": truncated");

  std::string descr = HeaderField(header, "descr", ',', path);
  size_t q1 = descr.find('\''), q2 = descr.rfind('\'');
  descr = q2 > q1 + 1 ? descr.substr(q1 + 1, q2 - q1 - 1) : "";
  if (descr.size() != 3 || descr[0] == '>')
    throw Fail(path + ": unsupported npy dtype " + descr);
  DataType dtype = tensorflow::DT_INVALID;
  for (const auto& [code, dt] : kDtypes)
    if (descr.substr(1) == code) dtype = dt;
  if (dtype == tensorflow::DT_INVALID)
    throw Fail(path + ": unsupported npy dtype " + descr);
  if (HeaderField(header, "fortran_order", ',', path).find("False") ==
      std::string::npos)
    throw Fail(path + ": Fortran-order arrays are not supported");

  std::string dims = HeaderField(header, "shape", ')', path);
  TensorShape shape;
  std::stringstream ss(dims.substr(dims.find('(') + 1));
  for (std::string d; std::getline(ss, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos)
      shape.AddDim(std::stoll(d));

  Tensor t(dtype, shape);
  if (!f.read(static_cast<char*>(t.data()), t.TotalBytes()))
    throw Fail(path + ": truncated data");
  return t;
}

void WriteNpy(const std::string& path, const Tensor& t) {
  std::string descr;
  for (const auto& [code, dt] : kDtypes)
    if (dt == t.dtype()) descr = (code[0] == 'f' || code[0] == 'i' ? "<" : "|") + code;
  if (descr.empty())
    throw Fail(path + ": cannot write dtype " + DataTypeString(t.dtype()));
  std::string shape;
  for (int i = 0; i < t.dims(); ++i)
    shape += (i ? ", " : "") + std::to_string(t.dim_size(i));
  shape = "(" + shape + (t.dims() == 1 ? ",)" : ")");
  std::string header = "{'descr': '" + descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');
  uint16_t len = header.size();
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  f.put(len & 0xff).put(len >> 8);
  f << header;
  f.write(static_cast<const char*>(t.data()), t.TotalBytes());
  if (!f) throw Fail("cannot write " + path);
}

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) throw Fail(what + ": " + s.ToString());
}

int Run(int argc, char** argv) {
  std::string model, signature, out_dir;
  std::unordered_set<std::string> tags;
  std::map<std::string, std::string> inputs;  // signature key -> npy path
  int64_t (*stats_json)(char*, int64_t) = nullptr;  // from an --op-lib that has it
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw Fail("missing value for " + flag);
    std::string value = argv[++i];
    if (flag == "--model") {
      model = value;
    } else if (flag == "--signature") {
      signature = value;
    } else if (flag == "--out-dir") {
      out_dir = value;
    } else if (flag == "--tags") {
      std::stringstream ss(value);
      for (std::string tag; std::getline(ss, tag, ',');) tags.insert(tag);
    } else if (flag == "--op-lib") {
      void* lib = dlopen(value.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (!lib) throw Fail("dlopen " + value + ": " + dlerror());
      if (void* f = dlsym(lib, "fuseflow_runtime_stats_json"))
        stats_json = reinterpret_cast<int64_t (*)(char*, int64_t)>(f);
    } else if (flag == "--in") {
      size_t eq = value.find('=');
      if (eq == std::string::npos) throw Fail("--in needs KEY=FILE.npy: " + value);
      inputs[value.substr(0, eq)] = value.substr(eq + 1);
    } else {
      throw Fail("unknown flag " + flag);
    }
  }
  if (model.empty() || signature.empty() || out_dir.empty() || tags.empty())
    throw Fail("--model, --tags, --signature and --out-dir are required");

  tensorflow::SavedModelBundle bundle;
  Check(tensorflow::LoadSavedModel(tensorflow::SessionOptions(),
                                   tensorflow::RunOptions(), model, tags,
                                   &bundle),
        "LoadSavedModel(" + model + ")");
  const auto& sigs = bundle.GetSignatures();
  auto sig_it = sigs.find(signature);
  if (sig_it == sigs.end()) {
    std::string known;
    for (const auto& [key, _] : sigs) known += " " + key;
    throw Fail("signature '" + signature + "' not found; have:" + known);
  }
  const tensorflow::SignatureDef& sig = sig_it->second;

  std::vector<std::pair<std::string, Tensor>> feeds;
  for (const auto& [key, path] : inputs) {
    auto in = sig.inputs().find(key);
    if (in == sig.inputs().end())
      throw Fail("signature '" + signature + "' has no input '" + key + "'");
    Tensor t = ReadNpy(path);
    if (t.dtype() != in->second.dtype())
      throw Fail("input '" + key + "': got " + DataTypeString(t.dtype()) +
                 ", signature wants " + DataTypeString(in->second.dtype()));
    feeds.emplace_back(in->second.name(), std::move(t));
  }
  for (const auto& [key, _] : sig.inputs())
    if (!inputs.count(key)) throw Fail("input '" + key + "' not fed");

  std::vector<std::string> out_keys, fetches;
  for (const auto& [key, info] : sig.outputs()) {
    out_keys.push_back(key);
    fetches.push_back(info.name());
  }
  std::vector<Tensor> outputs;
  Check(bundle.session->Run(feeds, fetches, {}, &outputs), "Session::Run");
  for (size_t i = 0; i < outputs.size(); ++i)
    WriteNpy(out_dir + "/" + out_keys[i] + ".npy", outputs[i]);
  if (stats_json) {
    std::string json(stats_json(nullptr, 0) + 256, '\0');
    json.resize(stats_json(json.data(), static_cast<int64_t>(json.size())));
    std::ofstream(out_dir + "/runtime_stats.json") << json;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "run_saved_model: error: " << e.what() << std::endl;
    return 1;
  }
}
