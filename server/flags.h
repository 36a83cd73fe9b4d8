// Command-line flags of kvcompact-server. Each flag --name can also be set through the environment
// as KVCOMPACT_NAME (upper case); the command line wins.
#pragma once

#include <string>
#include <vector>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, metrics_listen);
ABSL_DECLARE_FLAG(std::string, health_listen);
ABSL_DECLARE_FLAG(std::string, tls_cert_file);
ABSL_DECLARE_FLAG(std::string, tls_key_file);
ABSL_DECLARE_FLAG(std::string, tls_client_ca_file);
ABSL_DECLARE_FLAG(std::string, tls_client_allowed_names);
ABSL_DECLARE_FLAG(std::string, auth_token_file);
ABSL_DECLARE_FLAG(double, keepalive_time_seconds);
ABSL_DECLARE_FLAG(double, keepalive_timeout_seconds);
ABSL_DECLARE_FLAG(double, keepalive_min_client_interval_seconds);
ABSL_DECLARE_FLAG(double, max_connection_idle_seconds);
ABSL_DECLARE_FLAG(double, max_connection_age_seconds);
ABSL_DECLARE_FLAG(double, max_connection_age_grace_seconds);
ABSL_DECLARE_FLAG(std::string, backend);
ABSL_DECLARE_FLAG(int, cuda_device);
ABSL_DECLARE_FLAG(bool, allow_tf32);
ABSL_DECLARE_FLAG(uint64_t, cuda_workspace_bytes);
ABSL_DECLARE_FLAG(uint64_t, cuda_memory_limit_bytes);
ABSL_DECLARE_FLAG(uint32_t, cuda_layers_in_flight);
ABSL_DECLARE_FLAG(uint32_t, cuda_head_lanes);
ABSL_DECLARE_FLAG(int, threads);
ABSL_DECLARE_FLAG(uint64_t, max_message_bytes);
ABSL_DECLARE_FLAG(uint64_t, max_tokens_per_block);
ABSL_DECLARE_FLAG(uint64_t, max_queries_per_layer);
ABSL_DECLARE_FLAG(uint64_t, max_host_memory_bytes);
ABSL_DECLARE_FLAG(uint64_t, host_buffer_pool_bytes);
ABSL_DECLARE_FLAG(uint32_t, max_concurrent_streams);
ABSL_DECLARE_FLAG(uint32_t, max_open_layers_per_stream);
ABSL_DECLARE_FLAG(double, idle_timeout_seconds);
ABSL_DECLARE_FLAG(double, layer_receive_timeout_seconds);
ABSL_DECLARE_FLAG(uint32_t, max_streams_per_connection);
ABSL_DECLARE_FLAG(uint32_t, queue_depth);
ABSL_DECLARE_FLAG(double, drain_delay_seconds);
ABSL_DECLARE_FLAG(double, shutdown_timeout_seconds);
ABSL_DECLARE_FLAG(bool, warmup);
ABSL_DECLARE_FLAG(std::string, profiles_dir);
ABSL_DECLARE_FLAG(std::string, log_level);

namespace kvcompact::server {

// Applies KVCOMPACT_* environment variables to the flags; returns "" or an error message.
std::string ApplyEnvironmentToFlags();
// "name=value" for every flag above, for the start-up log.
std::vector<std::string> EffectiveFlags();

}  // namespace kvcompact::server
