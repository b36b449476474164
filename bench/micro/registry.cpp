#include "bench/micro/registry.h"

#include <map>

namespace pb {
namespace {

std::map<std::string, MicroEntry>& entries() {
  static std::map<std::string, MicroEntry> registry;
  return registry;
}

}  // namespace

void add_micro_entry(const std::string& name, const MicroEntry& entry) { entries()[name] = entry; }

const MicroEntry* find_micro_entry(const std::string& name) {
  const auto it = entries().find(name);
  return it == entries().end() ? nullptr : &it->second;
}

void set_micro_wrong_elements(const std::string& name, int64_t wrong) { entries()[name].wrong = wrong; }

}  // namespace pb
