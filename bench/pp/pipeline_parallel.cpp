#include "bench/pp/pipeline_parallel.h"

#include <algorithm>
#include <stdexcept>

#include "common/timer.h"

namespace pb {
namespace {

std::string span_args(int step, int micro, int chunk, int virtual_stage) {
  return "{\"step\": " + std::to_string(step + 1) + ", \"micro_batch\": " + std::to_string(micro) +
         ", \"chunk\": " + std::to_string(chunk) + ", \"virtual_stage\": " + std::to_string(virtual_stage) + "}";
}

}  // namespace

PipelineSchedule::PipelineSchedule(Runtime& runtime, const PipelineOptions& options)
    : options_(options), grad_accum_(runtime.options.grad_accum), warmup_(runtime.options.warmup),
      pp_(*runtime.groups.pp), stages_(options.stages), stage_(pp_.rank()),
      virtual_stages_(options.stages * options.chunks) {}

PipelineParallel::PipelineParallel(Runtime& runtime, const PipelineOptions& options)
    : rt_(runtime), schedule_(runtime, options),
      state_(runtime.model, runtime.backend, runtime.options.seed, runtime.precision.grads,
             pipeline_held_units(runtime.options.model.layers, options, runtime.groups.pp->rank())) {}

int PipelineSchedule::tag(int micro, int virtual_stage, bool forward) const {
  return ((micro * virtual_stages_ + virtual_stage) << 1) | (forward ? 0 : 1);
}

void PipelineSchedule::run(Runtime& rt, const StepBatches& batches, Strategy& hooks) {
  Backend& be = rt.backend;
  GptModel& model = rt.model;
  const int m = batches.count, L = rt.options.model.layers;
  const std::size_t n = model.boundary_elements();
  const int b = rt.options.micro_batch, S = rt.options.model.seq;
  const std::size_t tokens_per_micro = static_cast<std::size_t>(b) * S;
  std::vector<int32_t> full_tokens(tokens_per_micro), full_targets(tokens_per_micro);
  const ContextParallel& cp = rt.mp.cp;  // the model takes each sequence's tokens at this rank's positions
  std::vector<std::vector<int32_t>> tokens(m), targets(m);  // made on first use
  std::map<std::pair<int, int>, std::unique_ptr<GptModel::MicroBatch>> held;  // (micro, chunk)
  // The gradient of each forward's output is received into a buffer posted right after that forward,
  // so a downstream stage's send never waits for this rank to reach the backward.
  auto& output_sends = output_sends_;
  auto& output_grads = output_grads_;
  Request& input_grad_send = input_grad_send_;
  TensorPtr input_grad_buffer;  // activations and their gradients travel in the model's dtype
  auto boundary = [&] { return be.alloc_tensor(n, model.dtype(), MemCategory::comm_buffers); };
  auto finish_input_grad_send = [&] {
    if (input_grad_send) input_grad_send->wait();
    input_grad_send.reset();
    be.free(input_grad_buffer);
    input_grad_buffer = nullptr;
  };

  double busy = 0.0;
  const double start = wall_time_s();
  for (const PipelineStep& step : pipeline_schedule(options_.schedule, stages_, stage_, m, options_.chunks)) {
    const int k = virtual_stage(step.chunk);
    const bool first = k == 0, last = k == virtual_stages_ - 1;
    const auto key = std::make_pair(step.micro, step.chunk);
    if ((first || last) && tokens[step.micro].empty()) {
      tokens[step.micro].resize(tokens_per_micro / cp.size);
      targets[step.micro].resize(tokens_per_micro / cp.size);
      batches.fill(step.micro, full_tokens.data(), full_targets.data());
      cp.select_local(full_tokens.data(), tokens[step.micro].data(), b, S);
      cp.select_local(full_targets.data(), targets[step.micro].data(), b, S);
    }
    const std::string args = span_args(batches.step, step.micro, step.chunk, k);
    if (step.forward) {
      TensorPtr input;
      if (!first) {  // the previous virtual stage's output
        input = boundary();
        const double t0 = wall_time_s();
        pp_.recv(input, n, rank_of(k - 1), tag(step.micro, k, true));
        rt.trace.span(TraceTrack::idle, "recv activation", t0, wall_time_s(), args);
      }
      const double t0 = wall_time_s();
      held[key] = model.forward(pipeline_stage_units(L, virtual_stages_, k), tokens[step.micro].data(),
                                targets[step.micro].data(), input, batches.loss_scale, hooks);
      const double t1 = wall_time_s();
      busy += t1 - t0;
      rt.trace.span(TraceTrack::compute, "F" + std::to_string(step.micro), t0, t1, args);
      be.free(input);
      if (!last) {
        output_sends[key] = pp_.send_async(held[key]->output(), n, rank_of(k + 1), tag(step.micro, k + 1, true));
        TensorPtr grad = boundary();
        output_grads[key] = {grad, pp_.recv_async(grad, n, rank_of(k + 1), tag(step.micro, k, false))};
      }
    } else {
      finish_input_grad_send();
      TensorPtr output_grad;
      if (!last) {  // the next virtual stage's input gradient
        auto posted = output_grads.find(key);
        output_grad = posted->second.first;
        const double t0 = wall_time_s();
        posted->second.second->wait();
        rt.trace.span(TraceTrack::idle, "recv gradient", t0, wall_time_s(), args);
        output_grads.erase(posted);
      }
      if (!first) input_grad_buffer = boundary();
      auto send = output_sends.find(key);
      if (send != output_sends.end()) {  // the output's memory is freed by backward
        send->second->wait();
        output_sends.erase(send);
      }
      // A unit's last backward of the step is that of the last micro-batch (each chunk runs its backwards
      // in micro-batch order): where a sharded strategy reduces its gradients.
      hooks.begin_micro_batch(step.micro, step.micro == m - 1);
      const double t0 = wall_time_s();
      model.backward(*held[key], output_grad, input_grad_buffer, hooks);
      const double t1 = wall_time_s();
      busy += t1 - t0;
      rt.trace.span(TraceTrack::compute, "B" + std::to_string(step.micro), t0, t1, args);
      held.erase(key);
      be.free(output_grad);
      if (!first) input_grad_send = pp_.send_async(input_grad_buffer, n, rank_of(k - 1), tag(step.micro, k - 1, false));
    }
  }
  finish_input_grad_send();
  for (auto& [key, request] : output_sends) request->wait();
  output_sends.clear();
  // The schedule ends when the last stage has drained: every stage's window runs to the pipeline's
  // end (the wait counts as this stage's idle time), so each rank's bubble is measured over the same
  // span as the theory's.
  const double t_drained = wall_time_s();
  pp_.barrier();
  rt.trace.span(TraceTrack::idle, "pipeline drain", t_drained, wall_time_s());
  const double elapsed = wall_time_s() - start;
  if (batches.step >= warmup_) bubble_.push_back(elapsed > 0.0 ? 1.0 - busy / elapsed : 0.0);
}

void PipelineSchedule::progress() {
  for (auto& [key, request] : output_sends_) request->test();
  for (auto& [key, posted] : output_grads_) posted.second->test();
  if (input_grad_send_) input_grad_send_->test();
}

double PipelineSchedule::sum_over_stages(double local) {
  if (stages_ > 1) pp_.all_reduce_host(&local, 1, HostReduce::sum);
  return local;
}

void PipelineParallel::finish_gradients() {
  if (rt_.groups.dp->size() > 1) rt_.groups.dp->all_reduce(state_.grads(), state_.size());
}

double PipelineParallel::global_grad_sum_squares() {
  // The stages hold disjoint units.
  return schedule_.sum_over_stages(rt_.backend.sum_squares(state_.grads(), state_.size()));
}

double PipelineParallel::global_param_sum_squares() {
  return schedule_.sum_over_stages(rt_.backend.sum_squares(state_.master(), state_.size()));
}

std::vector<float> PipelineParallel::gather_full_gradients() {
  if (schedule_.stages() > 1) throw std::logic_error("--dump-gradients needs --pp 1");  // rejected by validation
  return download_fp32(rt_.backend, state_.grads(), state_.size());
}

void PipelineSchedule::write_results(Communicator& world, ResultWriter* writer) {
  double mine = 0.0;
  for (double b : bubble_) mine += b;
  mine = bubble_.empty() ? 0.0 : mine / static_cast<double>(bubble_.size());
  std::vector<double> all(world.size());
  world.all_gather_host(&mine, all.data(), sizeof(double));
  if (writer == nullptr) return;
  writer->write_f64("/pipeline/bubble_fraction", all, "1");
  writer->set_dataset_attribute("/pipeline/bubble_fraction", "theoretical",
                                theoretical_bubble_fraction(options_.schedule, stages_, grad_accum_,
                                                            options_.chunks));
}

}  // namespace pb
