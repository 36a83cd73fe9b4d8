// Clients that behave as attackers do, below the project's own client: gRPC calls whose messages
// are arbitrary bytes (not necessarily valid protobuf), and HTTP/2 frames written by hand.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

namespace kvcompact::testing {

struct RawBytesResult {
  grpc::Status status;
  std::vector<std::string> responses;  // serialized response messages
};

// A streaming call to `method` (e.g. "/kvcompact.v1.KVCompact/Compact") that writes each entry
// of `messages` as one gRPC message, as is, half-closes and reads until the end.
RawBytesResult RawBytesCall(const std::string& address, const std::string& method, const std::vector<std::string>& messages,
                            double timeout_seconds = 30);

// HTTP/2 rapid reset (CVE-2023-44487) on one plaintext connection: `streams` times HEADERS for a
// POST to `path`, one DATA frame with a small gRPC message, RST_STREAM(CANCEL). Returns the
// number of streams written (fewer when the server closed the connection).
int RapidReset(int port, const std::string& path, int streams);

}  // namespace kvcompact::testing
