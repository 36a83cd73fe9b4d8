#include "client/cli/commands.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/cache_files.h"
#include "client/client.h"
#include "core/method.h"
#include "core/synthetic.h"
#include "proto/wire.h"

namespace kvcompact::cli {
namespace {

using client::CacheInput;
using client::Client;
using client::ClientOptions;
using client::CompactedLayer;

bool ParseDType(const std::string& name, DType* out) {
  if (name == "f32" || name == "fp32") { *out = DType::kFloat32; return true; }
  if (name == "f16" || name == "fp16") { *out = DType::kFloat16; return true; }
  if (name == "bf16") { *out = DType::kBFloat16; return true; }
  return false;
}

int Fail(const absl::Status& s) {
  fprintf(stderr, "error: %s\n", s.ToString().c_str());
  return 1;
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(m, &out, options).ok()) return "null";
  return out;
}

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// Fails early (before any compaction) when the file could not be written: its folder is missing.
bool OutputFolderExists(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (parent.empty() || std::filesystem::is_directory(parent, ec)) return true;
  fprintf(stderr, "the folder of --output does not exist: %s\n", parent.string().c_str());
  return false;
}

struct LayerRow {
  double t_avg = 0, out_err = 0, mass_err = 0;
  bool quality = false;
};

LayerRow Summarise(const CompactedLayer& layer) {
  LayerRow row;
  const int heads = layer.done.heads_size();
  for (const v1::HeadMetrics& h : layer.done.heads()) {
    row.t_avg += static_cast<double>(h.tokens_out()) / heads;
    row.out_err += h.output_rel_error() / heads;
    row.mass_err += h.mass_rel_error() / heads;
    row.quality = h.has_quality();
  }
  return row;
}

}  // namespace

absl::StatusOr<ClientOptions> ConnectionOptions(const Settings& s) {
  auto security = client::LoadChannelSecurity(s.tls_ca, s.tls_cert, s.tls_key, s.token_file);
  if (!security.ok()) return security.status();
  ClientOptions options;
  options.security = *std::move(security);
  options.security.server_name = s.tls_server_name;
  if (const char* env = std::getenv("KVCOMPACT_TOKEN"); s.token_file.empty() && env != nullptr) {
    options.security.token = env;
  }
  options.stream_timeout_seconds = s.timeout;
  return options;
}

namespace {

double Timeout(const Settings& s, double fallback) { return s.timeout > 0 ? s.timeout : fallback; }

}  // namespace

absl::StatusOr<v1::StreamHeader> HeaderFor(const Settings& s, const CacheInput& cache) {
  const auto method = MethodFromName(s.method);
  DType out_dtype;
  if (!method || !ParseDType(s.output_dtype, &out_dtype)) return absl::InvalidArgumentError("unknown --method or --output_dtype");
  v1::StreamHeader header;
  header.set_request_id(s.request_id.empty() ? s.input : s.request_id);
  v1::Geometry* g = header.mutable_geometry();
  g->set_num_layers(cache.num_layers);
  g->set_num_kv_heads(cache.num_kv_heads);
  g->set_query_heads_per_kv_head(cache.query_heads_per_kv_head);
  g->set_head_dim(cache.head_dim);
  g->set_value_dim(cache.value_dim);
  g->set_logit_scale(s.logit_scale > 0 ? static_cast<float>(s.logit_scale) : cache.logit_scale);
  v1::Options* o = header.mutable_options();
  o->set_method(static_cast<v1::Method>(*method));
  if (!s.allocation.empty()) {
    static const std::map<std::string, v1::Allocation::Rule> kRules = {
        {"uniform", v1::Allocation::RULE_UNIFORM}, {"pyramid", v1::Allocation::RULE_PYRAMID},
        {"profile", v1::Allocation::RULE_PROFILE}, {"global_topk", v1::Allocation::RULE_GLOBAL_TOPK},
        {"sensitivity", v1::Allocation::RULE_SENSITIVITY}};
    auto rule = kRules.find(s.allocation);
    if (rule == kRules.end()) {
      return absl::InvalidArgumentError("unknown --allocation (uniform, pyramid, profile, global_topk, sensitivity)");
    }
    v1::Allocation* a = o->mutable_budget()->mutable_allocation();
    a->set_rule(rule->second);
    a->set_ratio(s.ratio);
    a->set_profile(s.profile);
    a->set_head_cap(static_cast<float>(s.head_cap));
  } else if (s.budget > 0) {
    o->mutable_budget()->set_tokens(s.budget);
  } else {
    o->mutable_budget()->set_ratio(s.ratio);
  }
  o->set_holdout_fraction(static_cast<float>(s.holdout));
  o->set_output_dtype(DTypeToProto(out_dtype));
  o->set_return_indices(s.return_indices);
  o->set_seed(s.seed);
  o->mutable_omp()->set_candidates(s.omp_candidates);
  o->set_ridge(static_cast<float>(s.ridge));
  o->set_mass_prior(static_cast<float>(s.mass_prior));
  return header;
}

absl::StatusOr<CacheInput> GeneratedCache(const Settings& s) {
  DType dtype;
  if (!ParseDType(s.dtype, &dtype)) return absl::InvalidArgumentError("unknown --dtype (f32, f16, bf16)");
  CacheInput cache;
  cache.query_heads_per_kv_head = 1;
  cache.num_layers = s.layers;
  cache.num_kv_heads = s.kv_heads;
  cache.head_dim = cache.value_dim = s.head_dim;
  SyntheticShape shape;
  shape.heads = s.kv_heads;
  shape.tokens = s.context;
  shape.queries = s.queries;
  shape.head_dim = shape.value_dim = s.head_dim;
  for (uint32_t l = 0; l < s.layers; ++l) {
    cache.layers.push_back(client::ToLayerInput(MakeSyntheticLayer(shape, s.seed, static_cast<int32_t>(l)), dtype));
  }
  return cache;
}

int RunCompact(const Settings& s) {
  if (s.input.empty() || s.output.empty()) {
    fprintf(stderr, "compact needs --input and --output\n");
    return 2;
  }
  if (!OutputFolderExists(s.output)) return 2;
  absl::StatusOr<CacheInput> cache = client::LoadCache(s.input);
  if (!cache.ok()) return Fail(cache.status());

  if (s.layout != "per_head" && s.layout != "packed") {
    fprintf(stderr, "unknown --layout (per_head, packed)\n");
    return 2;
  }
  absl::StatusOr<v1::StreamHeader> made = HeaderFor(s, *cache);
  if (!made.ok()) {
    fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
    return 2;
  }
  const v1::StreamHeader& header = *made;
  const float scale = header.geometry().logit_scale();
  auto options = ConnectionOptions(s);
  if (!options.ok()) return Fail(options.status());
  options->streams = s.streams;
  options->max_message_bytes = s.max_message_bytes;
  Client client(s.server, *options);
  size_t done = 0;
  const size_t total = cache->layers.size();
  auto outcome = client.Compact(header, cache->layers, [&](const CompactedLayer& layer) {
    ++done;
    if (s.quiet) return;
    const LayerRow row = Summarise(layer);
    fprintf(stderr, "[%zu/%zu] layer %u: t=%.0f held-out output error %.4f (%.2f s)\n", done, total, layer.layer,
            row.t_avg, row.out_err, layer.done.times().total_seconds());
  });
  if (!outcome.ok()) return Fail(outcome.status());

  client::CompactedFileInfo info;
  info.method = s.method;
  info.logit_scale = scale > 0 ? scale : 1.0f / std::sqrt(static_cast<float>(cache->head_dim));
  info.num_layers = cache->num_layers;
  info.num_kv_heads = cache->num_kv_heads;
  info.head_dim = cache->head_dim;
  info.value_dim = cache->value_dim;
  info.tokens_in.assign(cache->num_layers, 0);
  for (const auto& l : cache->layers) info.tokens_in[l.layer] = static_cast<uint64_t>(l.keys.shape[1]);
  info.packed = s.layout == "packed";
  if (absl::Status st = client::SaveCompacted(s.output, *outcome, info); !st.ok()) return Fail(st);

  std::error_code size_ec;
  const uint64_t written = std::filesystem::file_size(s.output, size_ec);
  if (s.json) {
    std::vector<std::string> layers, errors;
    for (const CompactedLayer& layer : outcome->layers) {
      layers.push_back(absl::StrCat("{\"layer\":", layer.layer, ",\"tokens_in\":", info.tokens_in[layer.layer],
                                    ",\"done\":", Json(layer.done), "}"));
    }
    for (const v1::LayerError& e : outcome->errors) errors.push_back(Json(e));
    printf("{\"output\":%s,\"file_bytes\":%lu,\"payload_bytes\":%lu,\"client_wall_seconds\":%.6f,"
           "\"summary\":%s,\"layers\":[%s],\"errors\":[%s]}\n",
           JsonString(s.output).c_str(),
           size_ec ? 0 : written, client::CompactedPayloadBytes(*outcome), outcome->wall_seconds,
           Json(outcome->summary).c_str(), absl::StrJoin(layers, ",").c_str(), absl::StrJoin(errors, ",").c_str());
    return outcome->errors.empty() ? 0 : 3;
  }
  printf("%-6s %-6s %-8s %-8s %-14s %-10s %-8s\n", "layer", "heads", "T", "t(avg)", "out_err(held)", "mass_err", "time_s");
  for (const CompactedLayer& layer : outcome->layers) {
    const LayerRow row = Summarise(layer);
    const uint64_t T = info.tokens_in[layer.layer];
    if (row.quality) {
      printf("%-6u %-6d %-8lu %-8.1f %-14.4f %-10.4f %-8.3f\n", layer.layer, layer.done.heads_size(), T, row.t_avg,
             row.out_err, row.mass_err, layer.done.times().total_seconds());
    } else {
      printf("%-6u %-6d %-8lu %-8.1f %-14s %-10s %-8.3f\n", layer.layer, layer.done.heads_size(), T, row.t_avg, "-",
             "-", layer.done.times().total_seconds());
    }
  }
  for (const v1::LayerError& e : outcome->errors) printf("error  %s (code %d)\n", e.message().c_str(), e.code());
  const v1::StreamSummary& sum = outcome->summary;
  double err = 0;
  int heads = 0;
  for (const CompactedLayer& layer : outcome->layers) {
    for (const v1::HeadMetrics& h : layer.done.heads()) {
      if (h.has_quality()) err += h.output_rel_error(), ++heads;
    }
  }
  if (heads > 0) printf("mean held-out output error over %d heads: %.4f\n", heads, err / heads);
  printf("total: %u layers ok, %u failed; %lu -> %lu entries (%.1fx); %.1f MB in, %.1f MB out; "
         "server wall %.2f s, client wall %.2f s; wrote %s\n",
         sum.layers_done(), sum.layers_failed(), sum.tokens_in(), sum.tokens_out(),
         sum.tokens_out() ? static_cast<double>(sum.tokens_in()) / sum.tokens_out() : 0.0, sum.bytes_in() / 1e6,
         sum.bytes_out() / 1e6, sum.wall_seconds(), outcome->wall_seconds, s.output.c_str());
  // Honest memory: the file against the blocks' own bytes (sum over heads of t_h, nothing padded).
  std::error_code ec;
  const uint64_t file_bytes = std::filesystem::file_size(s.output, ec);
  const uint64_t payload = client::CompactedPayloadBytes(*outcome);
  if (!ec && payload > 0) {
    printf("compacted blocks: %lu bytes; file %lu bytes (%.3fx, %s layout)\n", payload, file_bytes,
           static_cast<double>(file_bytes) / payload, s.layout.c_str());
  }
  return outcome->errors.empty() ? 0 : 3;
}

int RunGenerate(const Settings& s) {
  if (s.output.empty()) {
    fprintf(stderr, "generate needs --output\n");
    return 2;
  }
  if (!OutputFolderExists(s.output)) return 2;
  absl::StatusOr<CacheInput> generated = GeneratedCache(s);
  if (!generated.ok()) return Fail(generated.status());
  const CacheInput& cache = *generated;
  if (absl::Status st = client::SaveCache(s.output, cache); !st.ok()) return Fail(st);
  printf("wrote %s: %u layers x %u KV heads x %u tokens x d=%u, %u queries per KV head (%s)\n", s.output.c_str(),
         s.layers, s.kv_heads, s.context, s.head_dim, s.queries, s.dtype.c_str());
  return 0;
}

int RunInfo(const Settings& s) {
  auto options = ConnectionOptions(s);
  if (!options.ok()) return Fail(options.status());
  auto info = Client(s.server, *options).GetServerInfo(Timeout(s, 10));
  if (!info.ok()) return Fail(info.status());
  printf("%s\n", s.json ? Json(*info).c_str() : info->DebugString().c_str());
  return 0;
}

int RunHealth(const Settings& s) {
  auto options = ConnectionOptions(s);
  if (!options.ok()) return Fail(options.status());
  auto serving = Client(s.server, *options).IsServing("", Timeout(s, 5));
  if (!serving.ok()) return Fail(serving.status());
  printf("%s\n", *serving ? "SERVING" : "NOT_SERVING");
  return *serving ? 0 : 1;
}

int RunSelfTest(const Settings& s) {
  auto options = ConnectionOptions(s);
  if (!options.ok()) return Fail(options.status());
  v1::SelfTestRequest request;
  request.set_seed(s.seed);
  auto result = Client(s.server, *options).SelfTest(request, Timeout(s, 120));
  if (!result.ok()) return Fail(result.status());
  if (s.json) {
    printf("%s\n", Json(*result).c_str());
    return 0;
  }
  printf("backend %s\n%-14s %-14s %-10s %-8s\n", result->backend().c_str(), "method", "out_err(held)", "mass_err", "time_s");
  for (const v1::SelfTestResult& r : result->results()) {
    printf("%-14s %-14.4f %-10.4f %-8.3f\n", r.method_name().c_str(), r.output_rel_error(), r.mass_rel_error(), r.seconds());
  }
  return 0;
}

}  // namespace kvcompact::cli
