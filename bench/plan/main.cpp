// parabench-plan: per-rank memory by category, cluster totals, a fit verdict and a step-time estimate
// for any model on a dp, fsdp, tp, pp, ep, cp or hybrid layout of any size, and with --search the fastest
// hybrid layouts that fit (SPEC section 8; README.md). No MPI, no
// device: every number is closed-form, from the device table's peaks or a parabench-micro calibration.
//
// Exit codes: 0 plans printed; 1 --require-fit and a plan does not fit --gpu-memory; 2 a bad command
// line or plan (SPEC section 5), with a message naming the option, the value and the rule.
#include <cstdio>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "bench/plan/plan.h"
#include "bench/plan/plan_report.h"
#include "bench/plan/search.h"
#include "common/errors.h"

namespace {
constexpr int kExitDoesNotFit = 1;
}

int main(int argc, char** argv) {
  using namespace pb::plan;
  const std::vector<std::string> args(argv + 1, argv + argc);
  PlanRequest request;
  const ParseOutcome parsed = parse_plan_request(args, &request);
  if (!parsed.run) {
    (parsed.is_error ? std::cerr : std::cout) << (parsed.is_error ? "parabench-plan: " : "") << parsed.message
                                              << (parsed.message.empty() || parsed.message.back() == '\n' ? "" : "\n");
    return parsed.exit_code;
  }

  if (request.search) {  // the base plan's layouts, fastest first
    const SearchResult found = search_layouts(request.plans.front());
    std::cout << render_search(request, found);
    return found.ranked.empty() && request.require_fit ? kExitDoesNotFit : pb::kExitComplete;
  }
  std::vector<PlanResult> results;
  results.reserve(request.plans.size());
  std::set<std::string> warnings;
  for (const PlanConfig& config : request.plans) {
    results.push_back(evaluate(config));  // a calibration that lacks a plan's needs was refused while parsing
    warnings.insert(results.back().warnings.begin(), results.back().warnings.end());
  }
  for (const std::string& warning : warnings) std::cerr << "parabench-plan: warning: " << warning << "\n";

  switch (request.format) {
    case Format::table: std::cout << render_table(request, results); break;
    case Format::csv: std::cout << render_csv(results); break;
    case Format::json: std::cout << render_json(request, results); break;
  }
  // Machine-readable output stays clean: the verdicts of plans that do not fit go to stderr there.
  bool all_fit = true;
  for (const PlanResult& r : results) {
    if (!r.fit_checked || r.fits) continue;
    all_fit = false;
    if (request.format != Format::table) {
      std::string where;
      for (const auto& [key, value] : r.config.swept) where += (where.empty() ? "" : ", ") + key + "=" + value;
      std::cerr << "parabench-plan: " << (where.empty() ? "" : where + ": ") << fit_message(r) << "\n";
    }
  }
  return request.require_fit && !all_fit ? kExitDoesNotFit : pb::kExitComplete;
}
