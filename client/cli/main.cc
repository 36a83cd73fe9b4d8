// kvcompact: command-line client of kvcompact-server.
//   kvcompact compact  --input cache.safetensors|dir --output out.safetensors [--server host:port] ...
//   kvcompact generate --output cache.safetensors [--layers 30 --kv_heads 3 ...]
//   kvcompact info | selftest [--server host:port]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "client/cache_files.h"
#include "client/cli/commands.h"

ABSL_FLAG(std::string, server, "localhost:50051", "kvcompact-server address");
ABSL_FLAG(std::string, tls_ca, "", "CA (PEM) to verify the server with; set: connect over TLS");
ABSL_FLAG(std::string, tls_cert, "", "client certificate (PEM) for mutual TLS");
ABSL_FLAG(std::string, tls_key, "", "private key (PEM) of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "", "name to verify in the server certificate (default: the host of --server)");
ABSL_FLAG(std::string, token_file, "", "file whose first line is the bearer token (else $KVCOMPACT_TOKEN)");
ABSL_FLAG(double, timeout, 0, "deadline in seconds of each call or stream; 0: none for streams");
ABSL_FLAG(std::string, input, "", "compact: input cache (.safetensors file or directory of .npy)");
ABSL_FLAG(std::string, output, "", "compact/generate: output .safetensors file");
ABSL_FLAG(std::string, method, "am", "am, am_omp, am_omp_fast, h2o, snapkv, recent, streaming_llm, random");
ABSL_FLAG(double, ratio, 20, "compaction ratio T/t (ignored when --budget is set)");
ABSL_FLAG(uint32_t, budget, 0, "absolute t per head (overrides --ratio)");
ABSL_FLAG(std::string, allocation, "",
          "split the --ratio total across heads: uniform, pyramid, profile, global_topk, sensitivity");
ABSL_FLAG(std::string, profile, "", "--allocation=profile: a budget profile the server loaded");
ABSL_FLAG(double, head_cap, 0, "--allocation: largest t per head as a fraction of T (0: 0.75)");
ABSL_FLAG(std::string, layout, "per_head", "output layout: per_head (a tensor per head) or packed (CSR offsets)");
ABSL_FLAG(double, holdout, 0.1, "share of queries held out for the error figures");
ABSL_FLAG(uint64_t, omp_candidates, 0, "am_omp, am_omp_fast: keys OMP chooses from (highest attention first; 0: the server's default min(T, max(10t, 2048)))");
ABSL_FLAG(double, ridge, 0, "value-fit ridge toward the selected values, relative to mean diag(X^T X) (0: the server's default)");
ABSL_FLAG(double, mass_prior, 0, "mass-fit prior toward beta = b[S], relative to mean diag(G) (0: the server's default; < 0: none)");
ABSL_FLAG(std::string, output_dtype, "f32", "dtype of returned keys/values: f32, f16, bf16");
ABSL_FLAG(int, streams, 1, "parallel streams (layers spread round-robin)");
ABSL_FLAG(uint64_t, max_message_bytes, 4u << 20, "largest message sent");
ABSL_FLAG(bool, return_indices, true, "also fetch and save the kept token indices");
ABSL_FLAG(double, logit_scale, 0, "override the logit scale (0: file metadata, else 1/sqrt(d))");
ABSL_FLAG(std::string, request_id, "", "request id for server logs");
ABSL_FLAG(bool, quiet, false, "no per-layer progress on stderr");
ABSL_FLAG(uint32_t, layers, 30, "generate: layers");
ABSL_FLAG(uint32_t, kv_heads, 3, "generate: KV heads");
ABSL_FLAG(uint32_t, head_dim, 64, "generate: head dim");
ABSL_FLAG(uint32_t, context, 4096, "generate: tokens T per layer");
ABSL_FLAG(uint32_t, queries, 2048, "generate: reference queries per KV head");
ABSL_FLAG(std::string, dtype, "f32", "generate: f32, f16, bf16");
ABSL_FLAG(uint64_t, seed, 0, "generate / random method seed");
ABSL_FLAG(int, concurrency, 8, "load: concurrent Compact calls");
ABSL_FLAG(double, duration, 60, "load: seconds to run");
ABSL_FLAG(double, report_every, 10, "load: seconds between progress lines");
ABSL_FLAG(double, faults, 0, "load: share of calls replaced by faults (cancel, deadline, malformed, oversize)");
ABSL_FLAG(std::string, metrics, "", "load: the server's metrics address host:port, to follow its resident memory");
ABSL_FLAG(bool, json, false, "compact, info, selftest: print one JSON object on stdout instead of tables");

namespace {

constexpr char kUsage[] =
    "kvcompact <compact|generate|info|selftest|health|load> [flags]\n"
    "  compact   stream a cache file to the server, write the compacted cache\n"
    "  generate  write a random cache of a given geometry (for demos and benchmarks)\n"
    "  info      print the server's version, backend and limits\n"
    "  selftest  ask the server to compact a generated problem\n"
    "  health    grpc.health.v1 check; exit 0 when SERVING\n"
    "  load      N concurrent compactions of a generated cache (--concurrency, --duration, geometry\n"
    "            as for generate); throughput, latency percentiles, failures by status\n"
    "exit status: 0 done; 1 the server or a file failed; 2 bad command line; 3 some layers failed\n"
    "            (compact), or the server is not SERVING (health)";

bool IsHelp(const char* arg) {
  return !strcmp(arg, "--help") || !strcmp(arg, "-help") || !strcmp(arg, "-h") || !strcmp(arg, "--helpfull") ||
         !strcmp(arg, "help");
}

// Every flag of this program, sorted by name, with its help text and default.
void PrintHelp() {
  printf("%s\n\nflags:\n", kUsage);
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->Filename().find("client/cli/") == std::string::npos) continue;
    rows.emplace_back(std::string(name), flag->Help() + " (default: " + flag->DefaultValue() + ")");
  }
  std::sort(rows.begin(), rows.end());
  for (const auto& [name, help] : rows) printf("  --%-20s %s\n", name.c_str(), help.c_str());
}

// absl's parser exits 1 on an unknown flag or a bad value; this program's usage errors exit 2.
bool FlagsValid(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    arg = arg.substr(arg[1] == '-' ? 2 : 1);
    const size_t eq = arg.find('=');
    std::string name = arg.substr(0, eq);
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && name.rfind("no", 0) == 0) {
      flag = absl::FindCommandLineFlag(name.substr(2));
      if (flag != nullptr && !flag->IsOfType<bool>()) flag = nullptr;
      if (flag != nullptr) continue;
    }
    if (flag == nullptr) {
      fprintf(stderr, "unknown flag --%s (kvcompact --help lists them)\n", name.c_str());
      return false;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      fprintf(stderr, "flag --%s needs a value\n", name.c_str());
      return false;
    }
    std::string error;
    const std::string current = flag->CurrentValue();
    if (!flag->ParseFrom(value, &error)) {
      fprintf(stderr, "bad value for --%s: %s\n", name.c_str(), error.c_str());
      return false;
    }
    flag->ParseFrom(current, &error);  // absl's parser sets it again below
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--")) break;
    if (IsHelp(argv[i])) {
      PrintHelp();
      return 0;
    }
  }
  if (!FlagsValid(argc, argv)) return 2;
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = args[1];
  kvcompact::cli::Settings s;
  s.server = absl::GetFlag(FLAGS_server);
  s.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  s.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  s.tls_key = absl::GetFlag(FLAGS_tls_key);
  s.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  s.token_file = absl::GetFlag(FLAGS_token_file);
  s.timeout = absl::GetFlag(FLAGS_timeout);
  s.input = absl::GetFlag(FLAGS_input);
  s.output = absl::GetFlag(FLAGS_output);
  s.method = absl::GetFlag(FLAGS_method);
  s.ratio = absl::GetFlag(FLAGS_ratio);
  s.budget = absl::GetFlag(FLAGS_budget);
  s.holdout = absl::GetFlag(FLAGS_holdout);
  s.omp_candidates = absl::GetFlag(FLAGS_omp_candidates);
  s.ridge = absl::GetFlag(FLAGS_ridge);
  s.mass_prior = absl::GetFlag(FLAGS_mass_prior);
  s.allocation = absl::GetFlag(FLAGS_allocation);
  s.profile = absl::GetFlag(FLAGS_profile);
  s.head_cap = absl::GetFlag(FLAGS_head_cap);
  s.layout = absl::GetFlag(FLAGS_layout);
  s.output_dtype = absl::GetFlag(FLAGS_output_dtype);
  s.streams = absl::GetFlag(FLAGS_streams);
  s.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  s.return_indices = absl::GetFlag(FLAGS_return_indices);
  s.logit_scale = absl::GetFlag(FLAGS_logit_scale);
  s.request_id = absl::GetFlag(FLAGS_request_id);
  s.quiet = absl::GetFlag(FLAGS_quiet);
  s.layers = absl::GetFlag(FLAGS_layers);
  s.kv_heads = absl::GetFlag(FLAGS_kv_heads);
  s.head_dim = absl::GetFlag(FLAGS_head_dim);
  s.context = absl::GetFlag(FLAGS_context);
  s.queries = absl::GetFlag(FLAGS_queries);
  s.dtype = absl::GetFlag(FLAGS_dtype);
  s.seed = absl::GetFlag(FLAGS_seed);
  s.concurrency = absl::GetFlag(FLAGS_concurrency);
  s.duration = absl::GetFlag(FLAGS_duration);
  s.report_every = absl::GetFlag(FLAGS_report_every);
  s.metrics = absl::GetFlag(FLAGS_metrics);
  s.faults = absl::GetFlag(FLAGS_faults);
  s.json = absl::GetFlag(FLAGS_json);
  if (command == "compact") return kvcompact::cli::RunCompact(s);
  if (command == "generate") return kvcompact::cli::RunGenerate(s);
  if (command == "info") return kvcompact::cli::RunInfo(s);
  if (command == "selftest") return kvcompact::cli::RunSelfTest(s);
  if (command == "health") return kvcompact::cli::RunHealth(s);
  if (command == "load") return kvcompact::cli::RunLoad(s);
  fprintf(stderr, "unknown command '%s'\n%s\n", command.c_str(), absl::ProgramUsageMessage().data());
  return 2;
}
