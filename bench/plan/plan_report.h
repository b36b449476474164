// How parabench-plan prints plans: a table for people (one plan: category by category; a sweep: one
// row per plan), CSV and JSON (bytes, every resolved option) for scripts.
#pragma once

#include <string>
#include <vector>

#include "bench/plan/plan.h"
#include "bench/plan/search.h"

namespace pb::plan {

std::string render_table(const PlanRequest& request, const std::vector<PlanResult>& results);
std::string render_csv(const std::vector<PlanResult>& results);
std::string render_json(const PlanRequest& request, const std::vector<PlanResult>& results);

// --search: the layouts that fit, fastest first (the top `request.top`, all when 0), with their memory and
// time breakdown; in the request's format.
std::string render_search(const PlanRequest& request, const SearchResult& result);

// One line describing the model, e.g. "L126 h16384 a128 kv8 ffn53248 gated-mlp V128256 S8192 ...".
std::string describe_arch(const ArchSpec& arch);

}  // namespace pb::plan
