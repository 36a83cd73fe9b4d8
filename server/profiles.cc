#include "server/profiles.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"

namespace kvcompact::server {

absl::Status ProfileRegistry::Add(v1::BudgetProfile p) {
  if (p.name().empty()) return absl::InvalidArgumentError("profile without a name");
  const uint64_t want = static_cast<uint64_t>(p.num_layers()) * p.num_kv_heads();
  if (want == 0 || static_cast<uint64_t>(p.shares_size()) != want) {
    return absl::InvalidArgumentError(absl::StrCat("profile ", p.name(), ": ", p.shares_size(),
                                                   " shares for num_layers x num_kv_heads = ", want));
  }
  double sum = 0;
  for (float s : p.shares()) {
    if (!(s >= 0) || !std::isfinite(s)) return absl::InvalidArgumentError(absl::StrCat("profile ", p.name(), ": shares must be finite and >= 0"));
    sum += s;
  }
  if (!(sum > 0)) return absl::InvalidArgumentError(absl::StrCat("profile ", p.name(), ": shares sum to 0"));
  for (float& s : *p.mutable_shares()) s = static_cast<float>(s / sum);
  const std::string name = p.name();
  profiles_[name] = std::move(p);
  return absl::OkStatus();
}

absl::Status ProfileRegistry::LoadDir(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return absl::NotFoundError(absl::StrCat("no profiles directory ", dir));
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() != ".json") continue;
    std::ifstream in(entry.path());
    std::stringstream text;
    text << in.rdbuf();
    v1::BudgetProfile p;
    google::protobuf::util::JsonParseOptions options;
    options.ignore_unknown_fields = false;
    if (auto s = google::protobuf::util::JsonStringToMessage(text.str(), &p, options); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(entry.path().string(), ": ", std::string(s.message())));
    }
    if (auto s = Add(std::move(p)); !s.ok()) return absl::InvalidArgumentError(absl::StrCat(entry.path().string(), ": ", s.message()));
  }
  return absl::OkStatus();
}

const v1::BudgetProfile* ProfileRegistry::Find(const std::string& name) const {
  auto it = profiles_.find(name);
  return it == profiles_.end() ? nullptr : &it->second;
}

std::vector<std::string> ProfileRegistry::names() const {
  std::vector<std::string> out;
  for (const auto& [name, p] : profiles_) out.push_back(name);
  return out;
}

}  // namespace kvcompact::server
