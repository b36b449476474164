// The apps the planner plans from their own definition: common/runner.h's AppDefinition, made by the
// app's library and run by its main.cpp. The planner puts the app's options on its command line, calls
// its validation on the plan, and takes its layout and each rank's memory from it, so a plan can only
// be what the app accepts and predicts. Every app the planner models is planned so (bench/<app>/*_app.cpp:
// dp, fsdp, tp, pp, ep, cp, hybrid); only the time model stays keyed by app (README.md, "Apps as definitions").
#pragma once

#include <string>
#include <vector>

#include "bench/plan/plan.h"
#include "common/runner.h"

namespace pb::plan {

struct RegisteredApp {
  const char* name;          // --app NAME
  const char* degree_option; // the option of its model-parallel degree ("--pp"), allowed at 1 elsewhere;
                             // null for an app without one (dp)
  const char* parallelism;   // what that degree is, for messages: "pipeline parallelism"
  AppDefinition (*make)();   // the app library's definition
  // Its options that the planner takes for other apps too, for their time model: dp's --no-overlap
  // (tp, pp, ep and cp all-reduce their gradients during or after backward as well).
  std::vector<std::string> shared_options = {};
  // An app whose options are the other apps' (hybrid): not put on the command line again; its definition
  // reads them from the arguments when it is the --app.
  bool composes = false;
};
const std::vector<RegisteredApp>& registered_apps();
const RegisteredApp* find_registered_app(const std::string& name);

// The app's view of a resolved plan: the Options its validate, layout and predict_memory read (the
// model's shape, batch, degrees, backend and precision; MPI as the communicator).
Options app_options_of(const PlanConfig& config);

// The memory of each distinct rank: one per coordinate of the app's layout but dp (the ranks of a dp
// group hold the same bytes), in rank order: pp's stages.
std::vector<MemoryEstimate> distinct_rank_memory(const AppDefinition& app, const Options& options,
                                                 const MemoryPlan& plan);

}  // namespace pb::plan
