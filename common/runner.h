// The harness every mini-app shares: parse and validate, build the runtime (MPI world, process
// groups, backend, model), run the steps through the app's Strategy, and report (log lines, HDF5
// result file, PARABENCH_RESULT line, exit code). An app supplies only its options, its layout and
// its Strategy; the harness owns warm-up, timing, cross-rank reduction and reporting.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/groups.h"
#include "common/memory_model.h"
#include "common/model.h"
#include "common/options.h"
#include "common/results.h"
#include "common/trace.h"
#include "kernels/backend.h"

namespace pb {

struct Runtime;

struct Runtime {
  const Options& options;
  ProcessGroups& groups;
  Backend& backend;
  GptModel& model;
  TraceRecorder& trace;
  const ModelParallel& mp;  // the model-parallel groups of this rank (tp, ep; size 1 where unused)
  Precision precision;      // parameters and activations in precision.compute, gradients in precision.grads
};

// The precision of validated options: --dtype and --grad-dtype.
Precision precision_of(const Options& options);

// How a parallelism strategy takes part in a step. The model calls the UnitHooks during each
// micro-batch; the harness calls the rest around them.
// One step's micro-batches, as the harness hands them to a schedule.
struct StepBatches {
  int step = 0;             // 0-based
  int count = 1;            // micro-batches of this rank per step (grad accumulation)
  float loss_scale = 1.0f;  // 1 / (G·S): each micro-batch adds Σ CE · loss_scale
  // This rank's samples of micro-batch `micro` (SPEC 2.3): (b, S) tokens and targets.
  std::function<void(int micro, int32_t* tokens, int32_t* targets)> fill;
};

class Strategy : public UnitHooks {
 public:
  // Runs the step's micro-batches (ARCHITECTURE seam 6). The default runs them one after another,
  // forward then backward each, calling begin_micro_batch first; pipeline schedules replace it.
  virtual void run_micro_batches(Runtime& runtime, const StepBatches& batches);
  // The step's loss from this rank's part of it (the harness then sums over the dp group); a
  // pipeline sums over its stages, since only the last one computes the loss.
  virtual double reduce_loss(double local_loss) { return local_loss; }
  // The strategy's own results (collective; writer is null except on world rank 0), written after
  // the summary: /pipeline for pipelines.
  virtual void write_results(Communicator& /*world*/, ResultWriter* /*writer*/) {}
  // The strategy's own /summary attributes (numbers), also printed in rank 0's summary lines: the
  // experts' load imbalance for ep. Called on world rank 0 after write_results.
  virtual void summary_attributes(nlohmann::ordered_json& /*summary*/) {}
  // Start of a step: gradients (this rank's) to zero.
  virtual void zero_grads() = 0;
  // Before each micro-batch; `last` is the step's last micro-batch (when gradients are synced).
  virtual void begin_micro_batch(int /*micro*/, bool /*last*/) {}
  // After the last micro-batch's backward: every gradient this rank owns is final on return.
  virtual void finish_gradients() = 0;
  // Σ g² over all gradient elements of the model (across every rank's shard), before clipping.
  virtual double global_grad_sum_squares() = 0;
  // AdamW on what this rank owns, with the gradient multiplied by grad_scale; step t ≥ 1.
  virtual void optimizer_step(float grad_scale, int t) = 0;
  // The full gradient of every parameter, in the model's flat order, on rank 0 of the world
  // (for --dump-gradients); collective.
  virtual std::vector<float> gather_full_gradients() = 0;
  // Σ p² over all parameters of the model, across every rank's shard.
  virtual double global_param_sum_squares() = 0;
};

struct AppDefinition {
  std::string name;  // "dp"
  AppOptions options;
  // Degrees of the layout for validated options (dp derived by the options).
  std::function<Layout(const Options&)> layout;
  // The analytic memory of one rank (SPEC section 6, /memory/predicted), from the plan of the run
  // (model, dtype, micro-batch, recompute, the backend's attention) that the app completes.
  std::function<MemoryEstimate(const Options&, const MemoryPlan&, int rank)> predict_memory;
  std::function<std::unique_ptr<Strategy>(Runtime&)> make_strategy;
  // The block parts the app replaces (default: none, the dense MLP and the backend's attention), made
  // once the model-parallel groups exist and owned by the harness (the app may keep a pointer for its
  // strategy). Must not allocate backend memory (the memory check runs after it).
  std::function<OwnedBlockParts(const Options&, Backend&, const ModelParallel&)> block_parts;
};

// main() of every app: returns the process exit code (SPEC section 5).
int run_app(int argc, char** argv, const AppDefinition& app);

}  // namespace pb
