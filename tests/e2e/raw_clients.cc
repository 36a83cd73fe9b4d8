#include "tests/e2e/raw_clients.h"

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>

#include <grpcpp/generic/generic_stub.h>

#include "tests/e2e/server_process.h"

namespace kvcompact::testing {

RawBytesResult RawBytesCall(const std::string& address, const std::string& method, const std::vector<std::string>& messages,
                            double timeout_seconds) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  args.SetMaxReceiveMessageSize(-1);
  grpc::GenericStub stub(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  grpc::CompletionQueue cq;
  RawBytesResult result;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call = stub.PrepareCall(&ctx, method, &cq);
  void* tag = nullptr;
  bool ok = false;
  // One operation at a time, each awaited: a sequential client over the async API.
  auto await = [&](void* want) { return cq.Next(&tag, &ok) && tag == want && ok; };
  call->StartCall(reinterpret_cast<void*>(1));
  bool open = await(reinterpret_cast<void*>(1));
  for (const std::string& m : messages) {
    if (!open) break;
    grpc::Slice slice(m.data(), m.size());
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, reinterpret_cast<void*>(2));
    open = await(reinterpret_cast<void*>(2));
  }
  if (open) {
    call->WritesDone(reinterpret_cast<void*>(3));
    await(reinterpret_cast<void*>(3));
  }
  for (;;) {
    grpc::ByteBuffer buffer;
    call->Read(&buffer, reinterpret_cast<void*>(4));
    if (!await(reinterpret_cast<void*>(4))) break;
    std::vector<grpc::Slice> slices;
    (void)buffer.Dump(&slices);
    std::string bytes;
    for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    result.responses.push_back(std::move(bytes));
  }
  call->Finish(&result.status, reinterpret_cast<void*>(5));
  while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(5)) {}
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {}
  return result;
}

namespace {

std::string Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string f;
  const uint32_t n = static_cast<uint32_t>(payload.size());
  f += static_cast<char>(n >> 16);
  f += static_cast<char>(n >> 8);
  f += static_cast<char>(n);
  f += static_cast<char>(type);
  f += static_cast<char>(flags);
  f += static_cast<char>((stream >> 24) & 0x7f);
  f += static_cast<char>(stream >> 16);
  f += static_cast<char>(stream >> 8);
  f += static_cast<char>(stream);
  return f + payload;
}

// HPACK "literal without indexing" with an indexed name (4-bit prefix) or a new name; values < 127.
std::string LiteralIndexedName(int index, const std::string& value) {
  std::string out;
  if (index < 15) {
    out += static_cast<char>(index);
  } else {
    out += static_cast<char>(0x0f);
    out += static_cast<char>(index - 15);
  }
  out += static_cast<char>(value.size());
  return out + value;
}

std::string LiteralNewName(const std::string& name, const std::string& value) {
  std::string out(1, '\0');
  out += static_cast<char>(name.size());
  out += name;
  out += static_cast<char>(value.size());
  return out + value;
}

bool SendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

int RapidReset(int port, const std::string& path, int streams) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return 0;
  timeval timeout{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + Frame(0x4, 0, 0, "");  // empty SETTINGS
  preface += Frame(0x4, 0x1, 0, "");                                                  // ACK of the server's
  if (!SendAll(fd, preface)) {
    close(fd);
    return 0;
  }
  const std::string headers = std::string("\x83\x86", 2) + LiteralIndexedName(4, path) +
                              LiteralIndexedName(1, "127.0.0.1") + LiteralIndexedName(31, "application/grpc") +
                              LiteralNewName("te", "trailers");
  const std::string message("\x00\x00\x00\x00\x02\x0a\x00", 7);  // a gRPC frame: a 2-byte CompactRequest
  std::string rst("\x00\x00\x00\x08", 4);                          // error code CANCEL
  int written = 0;
  std::string batch;
  for (int i = 0; i < streams; ++i) {
    const uint32_t id = 1 + 2 * static_cast<uint32_t>(i);
    batch += Frame(0x1, 0x4, id, headers) + Frame(0x0, 0, id, message) + Frame(0x3, 0, id, rst);
    if (batch.size() > 16384 || i + 1 == streams) {
      if (!SendAll(fd, batch)) break;
      written = i + 1;
      batch.clear();
    }
    // Drain what the server sends (SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY) so it never blocks.
    char sink[65536];
    while (recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0) {}
  }
  close(fd);
  return written;
}

}  // namespace kvcompact::testing
