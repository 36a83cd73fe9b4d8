#pragma once

namespace kvcompact::server {
inline constexpr char kVersion[] = "0.1.0";
}  // namespace kvcompact::server
