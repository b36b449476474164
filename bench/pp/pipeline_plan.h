// What parabench-pp and parabench-plan share (library pb_pp): the pipeline's options and their
// validation, which units each stage holds, and its memory per stage. The app's main.cpp and the
// planner's --app pp call these same functions, so a plan is what the app predicts and accepts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/memory_model.h"
#include "common/model.h"

namespace CLI {
class App;
}

namespace pb {

struct PipelineOptions {
  int stages = 1;
  std::string schedule = "1f1b";
  int chunks = 1;  // --virtual-stages
};

// --pp, --schedule and --virtual-stages, with their defaults and help.
void add_pipeline_options(CLI::App& cli, PipelineOptions& pp);

// The rules of parabench-pp's options (throws ConfigError, a message naming the option, the value
// and the rule): a known schedule, degrees of at least 1, --virtual-stages with interleaved only,
// at least one block per virtual stage, interleaved micro-batches in groups of pp, and message tags
// within MPI's smallest guaranteed MPI_TAG_UB.
void validate_pipeline_options(const PipelineOptions& pp, int64_t layers, int64_t grad_accum, int64_t global_batch);

// The blocks of virtual stage k of V: ceil(L / V), one fewer on as many stages as L falls short of V ·
// ceil(L / V), taken in the order 0, V − 1, 1, V − 2, ... (the stages with the embedding and the head
// first, as Llama 3's 126 layers on 16 stages: 7 on the first and last, 8 on the others). Equal stages
// when V divides L.
int pipeline_stage_blocks(int layers, int virtual_stages, int k);
// The units (embedding 0, blocks 1..L, head L+1) of virtual stage k of `virtual_stages`.
GptModel::Stage pipeline_stage_units(int layers, int virtual_stages, int k);

// The units of every chunk of pipeline rank `stage`, in increasing order.
std::vector<int> pipeline_held_units(int layers, const PipelineOptions& pp, int stage);

// Predicted memory of pipeline rank `stage`: its units' model state, the activations of the
// micro-batches its schedule holds at once, the backward scratch and the send/receive buffers.
MemoryEstimate predict_pipeline_memory(const MemoryPlan& plan, const PipelineOptions& pp, int stage, int micro_batches);

}  // namespace pb
