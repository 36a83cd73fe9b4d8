// Budget profiles (Allocation.profile): JSON files in the BudgetProfile format, loaded once at start.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcompact/v1/kvcompact.pb.h"

namespace kvcompact::server {

class ProfileRegistry {
 public:
  // Loads every *.json in `dir`; a file that does not parse or whose shares do not match its
  // dimensions is an error (a profile silently missing would change what requests get).
  absl::Status LoadDir(const std::string& dir);
  absl::Status Add(v1::BudgetProfile profile);
  const v1::BudgetProfile* Find(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::map<std::string, v1::BudgetProfile> profiles_;
};

}  // namespace kvcompact::server
