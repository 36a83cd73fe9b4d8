// The CLI's commands; each returns the process exit code (0 ok, 1 failed call, 2 usage,
// 3 some layers failed).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "client/cache_files.h"
#include "client/client.h"

namespace kvcompact::cli {

struct Settings {
  std::string server, input, output, method, output_dtype, request_id, dtype;
  std::string allocation, profile, layout = "per_head";
  std::string tls_ca, tls_cert, tls_key, tls_server_name, token_file;  // connection security
  double timeout = 0;  // seconds per call / stream; 0: none
  // load: concurrent calls, how long, progress interval, and the server's /metrics (host:port).
  int concurrency = 8;
  double duration = 60, report_every = 10, faults = 0;
  std::string metrics;
  double head_cap = 0;
  double ratio = 20, holdout = 0.1, logit_scale = 0;
  uint32_t budget = 0, layers = 30, kv_heads = 3, head_dim = 64, context = 4096, queries = 2048;
  int streams = 1;
  uint64_t max_message_bytes = 4u << 20, seed = 0;
  uint64_t omp_candidates = 0;       // OMP's candidate pool (0: the server's default)
  double ridge = 0, mass_prior = 0;  // the fits' priors toward selection (0: the server's defaults)
  bool return_indices = true, quiet = false;
  bool json = false;  // compact, info, selftest: one JSON object on stdout
};

// Shared by the commands: connection security and deadlines, the stream header of a cache, and
// a generated cache of the --layers/--kv_heads/--context/--queries/--head_dim/--dtype geometry.
absl::StatusOr<client::ClientOptions> ConnectionOptions(const Settings& s);
absl::StatusOr<v1::StreamHeader> HeaderFor(const Settings& s, const client::CacheInput& cache);
absl::StatusOr<client::CacheInput> GeneratedCache(const Settings& s);

int RunCompact(const Settings& s);
int RunLoad(const Settings& s);
int RunGenerate(const Settings& s);
int RunInfo(const Settings& s);
int RunSelfTest(const Settings& s);
int RunHealth(const Settings& s);

}  // namespace kvcompact::cli
