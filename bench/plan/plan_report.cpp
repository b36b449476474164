// Table, CSV and JSON output of parabench-plan. Tables show binary units (GiB = 2^30 bytes); CSV and
// JSON give bytes, so scripts never parse a unit.
#include "bench/plan/plan_report.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#ifndef PB_VERSION
#define PB_VERSION "0.0.0"
#endif

namespace pb::plan {
namespace {

struct Unit {
  const char* name;
  double bytes;
};
constexpr Unit kUnits[] = {{"B", 1.0},
                           {"KiB", 1024.0},
                           {"MiB", 1024.0 * 1024.0},
                           {"GiB", 1024.0 * 1024.0 * 1024.0},
                           {"TiB", 1024.0 * 1024.0 * 1024.0 * 1024.0},
                           {"PiB", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0}};

// The largest unit in which `bytes` is at least 1.
Unit unit_for(double bytes) {
  Unit chosen = kUnits[0];
  for (const Unit& u : kUnits) {
    if (bytes >= u.bytes) chosen = u;
  }
  return chosen;
}

std::string printf_string(const char* format, double value) {
  char text[64];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

std::string human_bytes(double bytes) {
  const Unit u = unit_for(bytes);
  return printf_string("%.2f ", bytes / u.bytes) + u.name;
}

std::string in_unit(double bytes, const Unit& u) { return printf_string("%.2f", bytes / u.bytes); }

std::string with_separators(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string short_count(double n) {
  if (n >= 1e12) return printf_string("%.2f T", n / 1e12);
  if (n >= 1e9) return printf_string("%.2f B", n / 1e9);
  if (n >= 1e6) return printf_string("%.2f M", n / 1e6);
  if (n >= 1e3) return printf_string("%.2f K", n / 1e3);
  return printf_string("%.0f", n);
}

std::string seconds(double s) { return printf_string("%.3g s", s); }

// Left-aligned first column, right-aligned others, two spaces apart.
std::string format_columns(const std::vector<std::vector<std::string>>& rows, std::size_t left_aligned = 1) {
  std::vector<std::size_t> width;
  auto text_width = [](const std::string& s) {  // UTF-8: count code points, not bytes
    std::size_t w = 0;
    for (unsigned char ch : s) w += (ch & 0xC0) != 0x80;
    return w;
  };
  for (const auto& row : rows) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (std::size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], text_width(row[i]));
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      const std::string pad(width[i] - text_width(row[i]), ' ');
      line += (i ? "  " : "") + (i < left_aligned ? row[i] + pad : pad + row[i]);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// A category over the cluster: every rank alike, or (pp) each stage's dp ranks.
int64_t cluster_bytes(const PlanResult& r, MemCategory cat) {
  if (r.per_stage.empty()) return r.per_rank[cat] * r.config.ranks;
  int64_t total = 0;
  for (const MemoryEstimate& e : r.per_stage) total += e[cat] * (r.config.ranks / r.config.pp.stages);
  return total;
}

std::string precision_text(const PlanConfig& c) {
  if (c.dtype == "fp32") return "fp32 weights, gradients and AdamW (16 bytes per parameter)";
  return std::string("bf16 weights, ") + (c.grad_dtype == "bf16" ? "bf16" : "fp32") +
         " gradients, fp32 master weights and AdamW (" + (c.grad_dtype == "bf16" ? "16" : "18") +
         " bytes per parameter unsharded)";
}

std::string layout_text(const PlanConfig& c) {
  std::string out = "--app " + c.app;
  if (c.is_hybrid()) {
    out += ": tp " + std::to_string(c.tp()) + (c.sequence_parallel() ? " with sequence parallelism" : "") + ", pp " +
           std::to_string(c.pp.stages) + (c.pp.stages > 1 ? " (" + c.pp.schedule +
                                                                (c.pp.chunks > 1 ? ", " + std::to_string(c.pp.chunks) +
                                                                                       " virtual stages" : "") + ")"
                                                          : "") +
           ", cp " + std::to_string(c.cp) + (c.cp > 1 ? " (" + std::string(cp_algo_name(c.cp_algo)) + ")" : "") +
           ", " + shard_strategy_name(c.memory.shard) + " over the data ranks (dp × cp = " +
           std::to_string(c.dp * c.cp) + ")";
    if (c.memory.shard == ShardStrategy::hybrid_shard) out += " in groups of " + std::to_string(c.memory.shard_ranks);
    out += "; " + std::to_string(c.ranks) + " ranks = " + std::to_string(c.nodes()) + " node" + (c.nodes() > 1 ? "s" : "") +
           " × " + std::to_string(c.gpus_per_node) + " GPUs, pp " + std::to_string(c.pp.stages) + " × dp " +
           std::to_string(c.dp) + " × cp " + std::to_string(c.cp) + " × tp " + std::to_string(c.tp());
    return out;
  }
  if (c.app == "fsdp") {
    out += " " + std::string(shard_strategy_name(c.memory.shard));
    if (c.memory.shard == ShardStrategy::hybrid_shard) {
      out += " (sharded over groups of " + std::to_string(c.memory.shard_ranks) + ", " +
             std::to_string(c.dp / c.memory.shard_ranks) + " replicas)";
    }
    if (c.memory.shard == ShardStrategy::full_shard || c.memory.shard == ShardStrategy::hybrid_shard) {
      out += c.memory.prefetch ? ", prefetch" : ", no prefetch";
    }
  } else if (c.app == "tp") {
    out += ", tp " + std::to_string(c.tp()) +
           (c.tp() == 1 ? " (no tensor parallelism)"
                        : c.sequence_parallel() ? " with sequence parallelism" : " without sequence parallelism") +
           (c.overlap ? ", dp all-reduce overlapped with backward" : ", dp all-reduce after backward");
  } else if (c.is_moe()) {
    const MoeOptions& moe = c.moe;
    out += ", ep " + std::to_string(c.ep) + ": " + std::to_string(moe.experts) + " experts, top-" +
           std::to_string(moe.top_k) + ", " + std::to_string(moe.experts / c.ep) + " per rank; capacity factor " +
           printf_string("%g", moe.capacity_factor) +
           (moe.capacity_factor > 0 ? "" : " (no limit)") + ": " + std::to_string(c.capacity()) +
           " slots per expert and micro-batch; aux-loss " + printf_string("%g", moe.aux_loss) +
           (c.overlap ? "; all-reduces overlapped with backward" : "; all-reduces after backward");
  } else if (c.is_pp()) {
    out += ", pp " + std::to_string(c.pp.stages) + " (" + c.pp.schedule +
           (c.pp.chunks > 1 ? ", " + std::to_string(c.pp.chunks) + " virtual stages per rank" : "") + "): " +
           [&] {  // equal stages, or (bench/pp/pipeline_plan.h) one block fewer on the first and last ones
             const int V = c.pp.stages * c.pp.chunks, L = static_cast<int>(c.memory.arch.layers);
             const int most = pipeline_stage_blocks(L, V, V / 2), least = pipeline_stage_blocks(L, V, 0);
             return (least == most ? std::to_string(most) : std::to_string(least) + " to " + std::to_string(most)) +
                    (most == 1 ? " block per " : " blocks per ");
           }() +
           (c.pp.chunks > 1 ? "virtual stage" : "stage") +
           (c.overlap ? "; dp all-reduce overlapped with the pipeline" : "; dp all-reduce after the pipeline drains");
  } else if (c.is_cp()) {
    out += ", cp " + std::to_string(c.cp) + " (" + cp_algo_name(c.cp_algo) + ", " + c.cp_layout() + "): " +
           std::to_string(c.memory.arch.seq / c.cp) + " tokens of each sequence per rank" +
           (c.overlap ? "; all-reduce overlapped with backward" : "; all-reduce after backward");
  } else {
    out += c.overlap ? ", all-reduce overlapped with backward" : ", all-reduce after backward";
  }
  out += "; " + std::to_string(c.ranks) + " ranks = " + std::to_string(c.nodes()) + " node" +
         (c.nodes() > 1 ? "s" : "") + " × " + std::to_string(c.gpus_per_node) + " GPUs, ";
  if (c.app == "tp") {
    out += "tp " + std::to_string(c.tp()) + " × dp " + std::to_string(c.dp);
  } else if (c.is_moe()) {
    out += "dp " + std::to_string(c.dp) + " in " + std::to_string(c.dp / c.ep) + " ep group" +
           (c.dp / c.ep > 1 ? "s" : "") + " of " + std::to_string(c.ep);
  } else if (c.is_cp()) {
    out += "cp " + std::to_string(c.cp) + " × dp " + std::to_string(c.dp);
  } else if (c.is_pp()) {
    out += "pp " + std::to_string(c.pp.stages) + " × dp " + std::to_string(c.dp);
  } else {
    out += "dp " + std::to_string(c.dp);
  }
  return out;
}

std::string header(const PlanResult& r) {
  const PlanConfig& c = r.config;
  std::string out;
  if (c.model_states_only()) {
    out += "parabench-plan: " + with_separators(r.parameters) + " parameters (" + short_count(r.parameters) +
           "), --params: model states only, ZeRO's accounting (no activations, buffers or step time)\n";
  } else {
    out += "parabench-plan: " + c.model + ", " + with_separators(r.parameters) + " parameters (" +
           short_count(r.parameters) + ")";
    if (r.stored_parameters != r.parameters) {
      out += ", " + with_separators(r.stored_parameters) + " stored (the vocabulary padded to " +
             std::to_string(c.memory.arch.padded_vocab(c.memory.tp)) + ")";
    }
    if (r.rank_parameters != r.stored_parameters) {
      out += ", " + with_separators(r.rank_parameters) + " (" + short_count(r.rank_parameters) + ") per " +
             (c.is_moe() ? "rank (replicated + its experts)"
              : c.is_pp() ? "rank of stage " + std::to_string(r.peak_stage) + " (the largest peak)"
                          : std::string("tp rank"));
    }
    out += "\n";
    out += "model:     " + describe_arch(c.memory.arch) + "\n";
  }
  out += "layout:    " + layout_text(c) + "\n";
  if (!c.model_states_only()) {
    out += "batch:     micro-batch " + std::to_string(c.memory.micro_batch) + ", global batch " +
           std::to_string(c.global_batch) + " (grad accum " + std::to_string(c.grad_accum) + "), " +
           with_separators(c.global_batch * c.memory.arch.seq) + " tokens per step, recompute " + c.memory.recompute + "\n";
  }
  out += "precision: " + precision_text(c);
  if (!c.model_states_only()) {
    out += "; backend " + c.backend;
    if (c.is_cp() && c.cp > 1 && c.cp_algo != CpAlgo::alltoall) {
      out += std::string(" (the ") + cp_algo_name(c.cp_algo) + " core keeps log-sum-exp statistics only)";
    } else {
      out += c.memory.attention_keeps_probabilities ? " (attention keeps its probabilities)"
                                                    : " (fused attention keeps softmax statistics only)";
    }
  }
  return out + "\n";
}

std::string mfu_text(double mfu) { return std::isfinite(mfu) ? printf_string("%.3g", mfu) : "nan (peak unknown)"; }

// What the estimate rests on: the device table's peaks, or a calibration's measured rates.
std::string time_source_text(const PlanConfig& c) {
  if (!c.calibration) {
    return "step-time estimate from the device table's peaks (--gpu " + c.gpu.name + ": " +
           printf_string("%g", c.peak_tflops) + " TFLOP/s " + c.dtype + " at --mfu " + printf_string("%g", c.mfu) + ", " +
           (c.link_gbps > 0 ? printf_string("%g Gb/s links", c.link_gbps) : std::string("nominal links")) +
           "; closed-form, not a measurement; see bench/plan/README.md):\n";
  }
  const Calibration& cal = *c.calibration;
  std::string where = cal.cluster.empty() ? "" : cal.cluster + ", ";
  where += cal.gpu_model.empty() || c.backend == "cpu" ? cal.cpu_model : cal.gpu_model;
  return "step-time estimate from the calibration " + cal.path + " (parabench-micro on " + where + ", " +
         std::to_string(cal.world_size) + " ranks of " + std::to_string(cal.threads) + " threads, " + cal.comm +
         "): each kernel and collective at its measured rate; a prediction, not a measurement; see bench/plan/README.md\n";
}

std::string calibrated_compute_text(const PlanResult& r) {
  double matmul = 0, attention = 0, other = 0, fallback = 0;
  int matmul_calls = 0, exact = 0;
  bool cold = false;
  for (const KernelTime& k : r.kernels) {
    if (k.call.kernel == "matmul") {
      matmul += k.seconds;
      ++matmul_calls;
      exact += k.source.exact;
      cold = cold || k.source.cold;
    } else if (k.call.kernel.rfind("attention", 0) == 0) {
      attention += k.seconds;
    } else {
      other += k.seconds;
    }
    if (k.source.fallback) fallback += k.seconds;
  }
  const PlanConfig& c = r.config;
  std::string out = "  compute        " + seconds(r.compute_s) + " per step" +
                    (c.is_pp() ? " on the busiest stage" : " on each rank") + ": matrix products " + seconds(matmul) +
                    " (" + std::to_string(exact) + " of " + std::to_string(matmul_calls) +
                    " shapes measured exactly, the rest at the nearest measured" +
                    (cold ? "; operands out of cache" : "") + "), attention " + seconds(attention) +
                    ", other kernels " + seconds(other);
  if (fallback > 0) out += " (" + seconds(fallback) + " at the default rate: see the warnings)";
  return out + "\n";
}

std::string time_text(const PlanResult& r) {
  const PlanConfig& c = r.config;
  std::string out = time_source_text(c);
  if (c.calibration) {
    out += calibrated_compute_text(r);
  } else {
    const bool recomputes = r.hardware_flops_per_step > r.model_flops_per_step;
    std::string flops_note;
    if (c.is_moe()) {  // hardware: the experts over their E·C slots; model: k experts per token
      flops_note = " (executed: experts over " + std::to_string(c.moe.experts) + " × " + std::to_string(c.capacity()) +
                   " slots per micro-batch" + (c.memory.recompute != "none" ? ", + recomputation" : "") +
                   "; model FLOPs " + printf_string("%.3g", r.model_flops_per_step) +
                   ", k experts per token and the router)";
    } else {
      flops_note = recomputes ? " (" + printf_string("%.3g", r.model_flops_per_step) + " model + recomputation"
                              : " (model FLOPs";
      if (c.is_cp() && c.cp > 1) flops_note += "; each sequence's attention split over cp " + std::to_string(c.cp);
      flops_note += ")";
    }
    if (c.is_pp()) {
      out += "  compute        " + seconds(r.compute_s) + " per step on the busiest stage: its blocks (and head) over " +
             std::to_string(c.grad_accum) + " micro-batches at " + printf_string("%g", c.peak_tflops) +
             " TFLOP/s × MFU " + printf_string("%g", c.mfu) + " (" + printf_string("%.3g", r.hardware_flops_per_step) +
             " FLOPs per step over all ranks" + (recomputes ? ", recomputation included" : "") + ")\n";
    } else {
      out += "  compute        " + printf_string("%.3g", r.hardware_flops_per_step) + " FLOPs per step" + flops_note +
             " / (" + std::to_string(c.ranks) + " ranks × " + printf_string("%g", c.peak_tflops) + " TFLOP/s × MFU " +
             printf_string("%g", c.mfu) + ") = " + seconds(r.compute_s) + "\n";
    }
  }
  if (c.is_pp()) {
    out += "  bubble         " + printf_string("%.3g", r.bubble_fraction) + " of the pipeline's time idle (bench/pp's " +
           "theoretical fraction: " + c.pp.schedule + ", " + std::to_string(c.pp.stages) + " stages, " +
           std::to_string(c.grad_accum) + " micro-batches" +
           (c.pp.chunks > 1 ? ", " + std::to_string(c.pp.chunks) + " virtual stages" : "") + ") = " + seconds(r.bubble_s) +
           "\n";
  }
  for (const CommEstimate& e : r.comm) {
    const std::string rate = e.measured ? printf_string("%.3g GB/s", e.link_gbps / 8.0) + " bus bandwidth (measured, " +
                                              (e.inside_node ? "inside a node" : "across nodes") + ")"
                                        : printf_string("%g Gb/s", e.link_gbps);
    out += "  " + e.op + " " + e.what + ": " + human_bytes(static_cast<double>(e.bytes)) + " × " +
           std::to_string(e.calls) + " per step over " + std::to_string(e.ranks) + " ranks at " + rate + " = " +
           seconds(e.seconds) + (e.blocking ? ", blocking" : "") +
           (e.hidden_s > 0 ? " (" + seconds(e.hidden_s) + " of it hidden " +
                                 (c.is_pp() ? "behind other micro-batches" : "beside block attention") + ")"
                           : "") +
           (e.exposed_s > 0 ? " (" + seconds(e.exposed_s) + " of it not hidden: " +
                                  (c.app == "dp" ? "the last bucket's, after backward)" : "the first unit's, not prefetched)")
                            : "") +
           "\n";
  }
  double tail = 0;
  for (const CommEstimate& e : r.comm) tail += e.exposed_s;
  // plan.cpp's rule: with a calibration, gradient collectives hide behind backward only (fsdp's
  // prefetched gathers behind the whole step).
  const std::string overlapped = c.calibration && c.app != "fsdp"
                                     ? "compute + the overlapped communication that backward does not hide"
                                     : "the larger of compute and the overlapped communication";
  const std::string blocking_kind = c.is_moe()  ? "all-to-alls "
                                    : c.is_cp() ? "cp exchanges "
                                    : c.is_pp() ? "pipeline messages "
                                    : c.app == "tp" ? "tp collectives "
                                                    : "collectives ";
  const bool any_overlapped = std::any_of(r.comm.begin(), r.comm.end(),
                                          [](const CommEstimate& e) { return !e.blocking && e.seconds > 0; });
  std::string how;
  if (!c.overlap) {
    how = " (compute + communication, no overlap)";
  } else if (!any_overlapped && r.blocking_comm_s > 0) {
    how = " (compute + the blocking " + blocking_kind + seconds(r.blocking_comm_s) + ")";
  } else if (tail > 0) {
    how = " (" + overlapped + ", + what of it cannot overlap " + seconds(tail) +
          (r.blocking_comm_s > 0 ? " and the blocking collectives " + seconds(r.blocking_comm_s) : "") + ")";
  } else if (r.blocking_comm_s > 0) {
    how = " (" + overlapped + ", + the blocking " + blocking_kind + seconds(r.blocking_comm_s) + ")";
  } else {
    how = c.calibration && c.app != "fsdp" ? " (" + overlapped + ")"
                                           : " (communication overlapped with compute: the larger of the two)";
  }
  out += "  step           " + seconds(r.step_s) + how + ", " + printf_string("%.4g", r.tokens_per_s) + " tokens/s\n";
  out += "  breakdown      compute " + seconds(r.compute_s) + " + exposed communication " + seconds(r.exposed_comm_s) +
         " + bubble " + seconds(r.bubble_s) + " = step " + seconds(r.step_s) + "; " +
         printf_string("%.4g", r.tokens_per_s) + " tokens/s; MFU " + mfu_text(r.mfu) + "\n";
  if (c.power_w > 0) {
    out += "  energy         " + printf_string("%.4g", r.energy_j_per_step) + " J per step (" +
           printf_string("%g", c.power_w) + " W × " + std::to_string(c.ranks) + " devices × step " + seconds(r.step_s) +
           "), " + printf_string("%.4g", r.joules_per_token) + " J per token, " +
           printf_string("%.4g", 1.0 / r.joules_per_token) + " tokens per joule\n";
  }
  return out;
}

std::string fit_text(const PlanResult& r) {
  if (!r.fit_checked) return "";
  if (r.fits) {
    return "fit: fits --gpu-memory " + printf_string("%g", r.config.gpu_memory_gib) + " (peak " +
           human_bytes(static_cast<double>(r.per_rank.peak_total)) + " per rank, " +
           human_bytes(static_cast<double>(-r.excess_bytes)) + " to spare)\n";
  }
  return "fit: " + fit_message(r) + "\n";
}

// --app pp: every stage's memory (each of its dp ranks alike), the stage of largest peak marked.
std::string stage_table(const PlanResult& r) {
  const PlanConfig& c = r.config;
  double largest = 1;
  for (const MemoryEstimate& e : r.per_stage) largest = std::max(largest, static_cast<double>(e.peak_total));
  const Unit unit = unit_for(std::min(largest, kUnits[3].bytes));
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head = {"stage", "ranks"};
  for (MemCategory cat : all_mem_categories()) head.push_back(mem_category_name(cat));
  head.push_back("peak_total");
  rows.push_back(head);
  for (std::size_t s = 0; s < r.per_stage.size(); ++s) {
    const int per_stage = c.ranks / c.pp.stages;  // dp (hybrid: tp · cp · dp) ranks per stage
    const int first = static_cast<int>(s) * per_stage;
    std::vector<std::string> row = {std::to_string(s) + (static_cast<int>(s) == r.peak_stage ? "*" : ""),
                                    per_stage > 1 ? std::to_string(first) + "-" + std::to_string(first + per_stage - 1)
                                             : std::to_string(first)};
    for (MemCategory cat : all_mem_categories()) row.push_back(in_unit(static_cast<double>(r.per_stage[s][cat]), unit));
    row.push_back(in_unit(static_cast<double>(r.per_stage[s].peak_total), unit));
    rows.push_back(row);
  }
  return "\nper pipeline stage (bench/pp's predict_pipeline_memory), " + std::string(unit.name) +
         " per rank; * the stage of largest peak, shown above:\n" + format_columns(rows, 2);
}

std::string single_plan_table(const PlanResult& r) {
  const PlanConfig& c = r.config;
  std::string out = header(r) + "\n";
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"category", "per rank", "cluster (" + std::to_string(c.ranks) + " ranks)"});
  for (MemCategory cat : all_mem_categories()) {
    const double bytes = static_cast<double>(r.per_rank[cat]);
    rows.push_back({mem_category_name(cat), human_bytes(bytes), human_bytes(static_cast<double>(cluster_bytes(r, cat)))});
  }
  rows.push_back({"peak_total", human_bytes(static_cast<double>(r.per_rank.peak_total)),
                  human_bytes(static_cast<double>(r.cluster_peak_total))});
  out += format_columns(rows);
  if (c.is_pp()) out += stage_table(r);
  out += "model state: " + printf_string("%.4g", r.model_state_bytes_per_param) +
         " bytes per parameter on each rank (" + human_bytes(static_cast<double>(r.model_state_bytes)) + ")\n";
  if (r.has_time) out += "\n" + time_text(r);
  const std::string fit = fit_text(r);
  if (!fit.empty()) out += "\n" + fit;
  return out;
}

std::string sweep_table(const PlanRequest& request, const std::vector<PlanResult>& results) {
  std::string out = header(results.front());
  std::string swept;
  for (const Sweep& s : request.sweeps) {
    std::string values;
    for (const std::string& v : s.values) values += (values.empty() ? "" : ",") + v;
    swept += (swept.empty() ? "" : " × ") + s.key + "=" + values;
  }
  out += "sweep:     " + swept + " (" + std::to_string(results.size()) +
         " plans; the lines above describe the first)\n\n";

  double largest = 1;
  for (const PlanResult& r : results) largest = std::max(largest, static_cast<double>(r.per_rank.peak_total));
  // GiB unless every peak is smaller: a sweep's small categories stay readable beside its largest.
  const Unit unit = unit_for(std::min(largest, kUnits[3].bytes));
  const bool any_time = std::any_of(results.begin(), results.end(), [](const PlanResult& r) { return r.has_time; });
  const bool any_fit = std::any_of(results.begin(), results.end(), [](const PlanResult& r) { return r.fit_checked; });

  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head;
  for (const Sweep& s : request.sweeps) head.push_back(s.key);
  for (const char* name : {"parameters", "master", "gradients", "optimizer", "activations", "comm", "workspace",
                           "peak_total"}) {
    head.push_back(name);
  }
  head.push_back("B/param");
  head.push_back("cluster");
  if (any_time) {
    head.push_back("step");
    head.push_back("tokens/s");
  }
  if (any_fit) head.push_back("fits");
  rows.push_back(head);
  for (const PlanResult& r : results) {
    std::vector<std::string> row;
    for (const auto& kv : r.config.swept) row.push_back(kv.second);
    for (MemCategory cat : all_mem_categories()) row.push_back(in_unit(static_cast<double>(r.per_rank[cat]), unit));
    row.push_back(in_unit(static_cast<double>(r.per_rank.peak_total), unit));
    row.push_back(printf_string("%.4g", r.model_state_bytes_per_param));
    row.push_back(human_bytes(static_cast<double>(r.cluster_peak_total)));
    if (any_time) {
      row.push_back(r.has_time ? seconds(r.step_s) : "-");
      row.push_back(r.has_time ? printf_string("%.4g", r.tokens_per_s) : "-");
    }
    if (any_fit) row.push_back(r.fits ? "yes" : "no");
    rows.push_back(row);
  }
  out += "per rank, " + std::string(unit.name) + "; B/param: model-state bytes per parameter on each rank; "
         "cluster: peak_total summed over the ranks\n";
  out += format_columns(rows, request.sweeps.size());
  std::string notes;
  for (std::size_t i = 0; i < results.size(); ++i) {
    const std::string message = fit_message(results[i]);
    if (message.empty()) continue;
    std::string where;
    for (const auto& [key, value] : results[i].config.swept) where += (where.empty() ? "" : ", ") + key + "=" + value;
    notes += "  " + where + ": " + message + "\n";
  }
  if (!notes.empty()) out += "\n" + notes;
  if (any_time) {
    const PlanConfig& first = results.front().config;
    if (first.calibration) {
      out += "\nstep and tokens/s: predicted from the measured kernel and collective rates of the calibration " +
             first.calibration->path + ", not a measurement; see bench/plan/README.md\n";
    } else {
      out += "\nstep and tokens/s: a closed-form estimate from the device table's peaks (FLOPs at --mfu " +
             printf_string("%g", first.mfu) + " of peak, ring collectives at " +
             (first.link_gbps > 0 ? printf_string("%g Gb/s", first.link_gbps) : std::string("nominal link rates")) +
             "), not a measurement; see bench/plan/README.md\n";
    }
  }
  return out;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string quoted = "\"";
  for (char ch : s) quoted += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return quoted + "\"";
}

std::string number(double v) {
  if (!std::isfinite(v)) return "nan";
  return printf_string("%.6g", v);
}

nlohmann::ordered_json config_json(const PlanConfig& c) {
  nlohmann::ordered_json j;
  j["model"] = c.model;
  if (c.model_states_only()) {
    j["params"] = c.params_override;
  } else {
    const ArchSpec& a = c.memory.arch;
    j["layers"] = a.layers;
    j["hidden"] = a.hidden;
    j["heads"] = a.heads;
    j["kv_heads"] = a.kv_heads;
    j["ffn"] = a.ffn;
    j["vocab"] = a.vocab;
    j["make_vocab_size_divisible_by"] = a.vocab_divisor;
    j["padded_vocab"] = a.padded_vocab(c.memory.tp);
    j["seq"] = a.seq;
    j["gated_mlp"] = a.gated_mlp;
    j["tied_embeddings"] = a.tied_embeddings;
    j["learned_positions"] = a.learned_positions;
    j["biases"] = a.biases;
    j["rms_norm"] = a.rms_norm;
  }
  j["app"] = c.app;
  j["shard"] = shard_strategy_name(c.memory.shard);
  j["shard_ranks"] = c.memory.shard_ranks;
  j["prefetch"] = c.memory.prefetch;
  j["ranks"] = c.ranks;
  j["nodes"] = c.nodes();
  j["gpus_per_node"] = c.gpus_per_node;
  j["dp"] = c.dp;
  j["tp"] = c.tp();
  j["sequence_parallel"] = c.sequence_parallel();
  j["ep"] = c.ep;
  j["cp"] = c.cp;
  j["cp_algo"] = c.is_cp() ? nlohmann::ordered_json(cp_algo_name(c.cp_algo)) : nlohmann::ordered_json(nullptr);
  j["cp_layout"] = c.is_cp() ? nlohmann::ordered_json(c.cp_layout()) : nlohmann::ordered_json(nullptr);
  j["pp"] = c.pp.stages;
  j["schedule"] = c.is_pp() ? nlohmann::ordered_json(c.pp.schedule) : nlohmann::ordered_json(nullptr);
  j["virtual_stages"] = c.is_pp() ? nlohmann::ordered_json(c.pp.chunks) : nlohmann::ordered_json(nullptr);
  if (c.is_moe()) {
    j["moe"] = {{"experts", c.moe.experts}, {"top_k", c.moe.top_k}, {"capacity_factor", c.moe.capacity_factor},
                {"capacity", c.capacity()}, {"aux_loss", c.moe.aux_loss}};
  } else {
    j["moe"] = nullptr;
  }
  j["micro_batch"] = c.memory.micro_batch;
  j["global_batch"] = c.global_batch;
  j["grad_accum"] = c.grad_accum;
  j["recompute"] = c.memory.recompute;
  j["dtype"] = c.dtype;
  j["grad_dtype"] = c.grad_dtype;
  j["backend"] = c.backend;
  j["attention_keeps_probabilities"] = c.memory.attention_keeps_probabilities;
  j["gpu"] = c.gpu.name;
  j["peak_tflops"] = c.peak_tflops;
  j["mfu"] = c.mfu;
  j["link_gbps"] = c.link_gbps;
  j["gpu_memory_gib"] = c.gpu_memory_gib;
  j["calibration"] = c.calibration ? nlohmann::ordered_json(c.calibration->path) : nlohmann::ordered_json(nullptr);
  return j;
}

}  // namespace

std::string describe_arch(const ArchSpec& a) {
  std::string out = "L" + std::to_string(a.layers) + " h" + std::to_string(a.hidden) + " a" + std::to_string(a.heads);
  if (a.kv_heads != a.heads) out += " kv" + std::to_string(a.kv_heads);
  out += " ffn" + std::to_string(a.ffn) + " V" + std::to_string(a.vocab) + " S" + std::to_string(a.seq);
  out += a.gated_mlp ? ", gated MLP" : ", GELU MLP";
  out += a.tied_embeddings ? ", tied embeddings" : ", untied head";
  out += a.learned_positions ? ", learned positions" : ", rotary positions";
  out += a.biases ? ", biases" : ", no biases";
  out += a.rms_norm ? ", RMSNorm" : ", LayerNorm";
  return out;
}

std::string render_table(const PlanRequest& request, const std::vector<PlanResult>& results) {
  if (results.size() == 1 && request.sweeps.empty()) return single_plan_table(results.front());
  return sweep_table(request, results);
}

std::string render_csv(const std::vector<PlanResult>& results) {
  std::vector<std::string> head = {"model", "num_parameters", "rank_parameters", "layers", "hidden", "heads",
                                   "kv_heads", "ffn", "vocab", "seq", "gated_mlp", "tied_embeddings", "app", "shard",
                                   "shard_ranks", "ranks", "nodes", "gpus_per_node", "dp", "tp", "sequence_parallel",
                                   "ep", "experts", "top_k", "capacity_factor", "capacity", "aux_loss", "cp", "cp_algo",
                                   "cp_layout", "pp", "schedule", "virtual_stages", "micro_batch", "global_batch", "grad_accum", "recompute", "dtype", "grad_dtype",
                                   "backend"};
  for (MemCategory cat : all_mem_categories()) head.push_back(std::string(mem_category_name(cat)) + "_bytes");
  for (const char* name : {"peak_total_bytes", "model_state_bytes_per_param", "cluster_peak_total_bytes",
                           "gpu_memory_bytes", "fits", "excess_bytes", "model_flops_per_step", "hardware_flops_per_step",
                           "peak_tflops", "mfu",
                           "compute_s", "comm_s", "blocking_comm_s", "step_s", "tokens_per_s", "time_source",
                           "bubble_fraction", "bubble_s", "exposed_comm_s", "model_flops_utilization", "power_w",
                           "energy_j_per_step", "joules_per_token"}) {
    head.push_back(name);
  }
  std::ostringstream out;
  for (std::size_t i = 0; i < head.size(); ++i) out << (i ? "," : "") << head[i];
  out << "\n";
  for (const PlanResult& r : results) {
    const PlanConfig& c = r.config;
    const ArchSpec& a = c.memory.arch;
    const bool shape = !c.model_states_only();
    auto shape_field = [&](int64_t v) { return shape ? std::to_string(v) : std::string(); };
    std::vector<std::string> row = {
        csv_field(c.model), std::to_string(r.parameters), std::to_string(r.rank_parameters), shape_field(a.layers),
        shape_field(a.hidden), shape_field(a.heads), shape_field(a.kv_heads), shape_field(a.ffn), shape_field(a.vocab),
        shape_field(a.seq), shape ? (a.gated_mlp ? "true" : "false") : "",
        shape ? (a.tied_embeddings ? "true" : "false") : "", c.app, shard_strategy_name(c.memory.shard),
        std::to_string(c.memory.shard_ranks), std::to_string(c.ranks), std::to_string(c.nodes()),
        std::to_string(c.gpus_per_node), std::to_string(c.dp), std::to_string(c.tp()),
        c.sequence_parallel() ? "true" : "false", std::to_string(c.ep),
        c.is_moe() ? std::to_string(c.moe.experts) : "", c.is_moe() ? std::to_string(c.moe.top_k) : "",
        c.is_moe() ? number(c.moe.capacity_factor) : "", c.is_moe() ? std::to_string(c.capacity()) : "",
        c.is_moe() ? number(c.moe.aux_loss) : "", std::to_string(c.cp), c.is_cp() ? cp_algo_name(c.cp_algo) : "",
        c.is_cp() ? c.cp_layout() : "", std::to_string(c.pp.stages), c.is_pp() ? c.pp.schedule : "",
        c.is_pp() ? std::to_string(c.pp.chunks) : "", std::to_string(c.memory.micro_batch), std::to_string(c.global_batch),
        std::to_string(c.grad_accum), c.memory.recompute, c.dtype, c.grad_dtype, c.backend};
    for (MemCategory cat : all_mem_categories()) row.push_back(std::to_string(r.per_rank[cat]));
    row.push_back(std::to_string(r.per_rank.peak_total));
    row.push_back(number(r.model_state_bytes_per_param));
    row.push_back(std::to_string(r.cluster_peak_total));
    row.push_back(r.fit_checked ? std::to_string(r.capacity_bytes) : "");
    row.push_back(r.fit_checked ? (r.fits ? "true" : "false") : "");
    row.push_back(r.fit_checked ? std::to_string(std::max<int64_t>(0, r.excess_bytes)) : "");
    const double nan = std::nan("");
    row.push_back(number(r.has_time ? r.model_flops_per_step : nan));
    row.push_back(number(r.has_time ? r.hardware_flops_per_step : nan));
    row.push_back(number(c.peak_tflops));
    row.push_back(number(c.mfu));
    row.push_back(number(r.has_time ? r.compute_s : nan));
    row.push_back(number(r.has_time ? r.comm_s : nan));
    row.push_back(number(r.has_time ? r.blocking_comm_s : nan));
    row.push_back(number(r.has_time ? r.step_s : nan));
    row.push_back(number(r.has_time ? r.tokens_per_s : nan));
    row.push_back(r.has_time ? (c.calibration ? "calibration" : "peaks") : "");
    row.push_back(number(r.has_time ? r.bubble_fraction : nan));
    row.push_back(number(r.has_time ? r.bubble_s : nan));
    row.push_back(number(r.has_time ? r.exposed_comm_s : nan));
    row.push_back(number(r.has_time ? r.mfu : nan));
    row.push_back(number(c.power_w > 0 ? c.power_w : nan));
    row.push_back(number(r.has_time ? r.energy_j_per_step : nan));
    row.push_back(number(r.has_time ? r.joules_per_token : nan));
    for (std::size_t i = 0; i < row.size(); ++i) out << (i ? "," : "") << row[i];
    out << "\n";
  }
  return out.str();
}

std::string render_json(const PlanRequest& request, const std::vector<PlanResult>& results) {
  nlohmann::ordered_json doc;
  doc["tool"] = "parabench-plan";
  doc["version"] = PB_VERSION;
  doc["units"] = {{"memory", "bytes"}, {"time", "s"}, {"link", "Gbit/s"}};
  nlohmann::ordered_json sweeps = nlohmann::ordered_json::array();
  for (const Sweep& s : request.sweeps) sweeps.push_back({{"key", s.key}, {"values", s.values}});
  doc["sweeps"] = sweeps;
  nlohmann::ordered_json plans = nlohmann::ordered_json::array();
  for (const PlanResult& r : results) {
    const PlanConfig& c = r.config;
    nlohmann::ordered_json p;
    nlohmann::ordered_json swept = nlohmann::ordered_json::object();
    for (const auto& [key, value] : c.swept) swept[key] = value;
    p["swept"] = swept;
    p["config"] = config_json(c);
    p["num_parameters"] = r.parameters;
    p["num_stored_parameters"] = r.stored_parameters;
    p["rank_parameters"] = r.rank_parameters;
    nlohmann::ordered_json per_rank, cluster;
    for (MemCategory cat : all_mem_categories()) {
      per_rank[mem_category_name(cat)] = r.per_rank[cat];
      cluster[mem_category_name(cat)] = cluster_bytes(r, cat);
    }
    per_rank["peak_total"] = r.per_rank.peak_total;
    cluster["peak_total"] = r.cluster_peak_total;
    p["memory_per_rank"] = per_rank;
    p["memory_cluster"] = cluster;
    if (c.is_pp()) {  // bench/pp's memory of each stage; memory_per_rank is peak_stage's
      nlohmann::ordered_json stages = nlohmann::ordered_json::array();
      for (const MemoryEstimate& e : r.per_stage) {
        nlohmann::ordered_json stage;
        for (MemCategory cat : all_mem_categories()) stage[mem_category_name(cat)] = e[cat];
        stage["peak_total"] = e.peak_total;
        stages.push_back(stage);
      }
      p["memory_per_stage"] = stages;
      p["peak_stage"] = r.peak_stage;
    } else {
      p["memory_per_stage"] = nullptr;
      p["peak_stage"] = nullptr;
    }
    p["model_state_bytes"] = r.model_state_bytes;
    p["model_state_bytes_per_param"] = r.model_state_bytes_per_param;
    if (r.fit_checked) {
      p["fit"] = {{"gpu_memory_bytes", r.capacity_bytes},
                  {"fits", r.fits},
                  {"excess_bytes", std::max<int64_t>(0, r.excess_bytes)},
                  {"message", fit_message(r)}};
    } else {
      p["fit"] = nullptr;
    }
    if (r.has_time) {
      nlohmann::ordered_json comm = nlohmann::ordered_json::array();
      for (const CommEstimate& e : r.comm) {
        comm.push_back({{"op", e.op}, {"what", e.what}, {"bytes", e.bytes}, {"ranks", e.ranks},
                        {"calls_per_step", e.calls}, {"inside_node", e.inside_node}, {"link_gbps", e.link_gbps},
                        {"measured", e.measured}, {"seconds", e.seconds}, {"blocking", e.blocking},
                        {"hidden_s", e.hidden_s}, {"exposed_s", e.exposed_s}, {"in_place", e.in_place}});
      }
      nlohmann::ordered_json kernels = nlohmann::ordered_json::array();
      for (const KernelTime& k : r.kernels) {
        nlohmann::ordered_json kj = {{"kernel", k.call.kernel}, {"what", k.call.what}};
        if (k.call.kernel == "matmul") {
          kj.update({{"N", k.call.N}, {"C", k.call.C}, {"OC", k.call.OC}, {"operands_cold", k.source.cold}});
        }
        kj.update({{"work", k.call.work}, {"calls_per_step", k.call.calls}, {"backward", k.call.backward},
                   {"seconds", k.seconds}, {"measured_row", k.source.row}, {"exact", k.source.exact},
                   {"default_rate", k.source.fallback}});
        kernels.push_back(kj);
      }
      p["time_estimate"] = {{"source", c.calibration ? "calibration" : "peaks"},
                            {"model_flops_per_step", r.model_flops_per_step},
                            {"hardware_flops_per_step", r.hardware_flops_per_step},
                            {"compute_s", r.compute_s},
                            {"comm_s", r.comm_s},
                            {"blocking_comm_s", r.blocking_comm_s},
                            {"exposed_comm_s", r.exposed_comm_s},
                            {"bubble_fraction", r.bubble_fraction},
                            {"bubble_s", r.bubble_s},
                            {"overlap", c.overlap},
                            {"step_s", r.step_s},
                            {"tokens_per_s", r.tokens_per_s},
                            {"power_w", c.power_w > 0 ? nlohmann::ordered_json(c.power_w) : nlohmann::ordered_json(nullptr)},
                            {"energy_j_per_step", std::isfinite(r.energy_j_per_step)
                                                      ? nlohmann::ordered_json(r.energy_j_per_step)
                                                      : nlohmann::ordered_json(nullptr)},
                            {"joules_per_token", std::isfinite(r.joules_per_token)
                                                     ? nlohmann::ordered_json(r.joules_per_token)
                                                     : nlohmann::ordered_json(nullptr)},
                            {"model_flops_utilization", std::isfinite(r.mfu) ? nlohmann::ordered_json(r.mfu)
                                                                             : nlohmann::ordered_json(nullptr)},
                            {"collectives", comm},
                            {"kernels", kernels},
                            {"warnings", r.warnings}};
    } else {
      p["time_estimate"] = nullptr;
    }
    plans.push_back(p);
  }
  doc["plans"] = plans;
  return doc.dump(2) + "\n";
}

namespace {

// A searched layout as parabench-hybrid's options (what jobs/lib/sweep.sh's layout sweep runs).
std::string search_args(const PlanConfig& c) {
  std::string out = "--tp " + std::to_string(c.tp()) + (c.sequence_parallel() ? " --sequence-parallel" : "") + " --pp " +
                    std::to_string(c.pp.stages);
  if (c.pp.stages > 1) {
    out += " --schedule " + c.pp.schedule;
    if (c.pp.chunks > 1) out += " --virtual-stages " + std::to_string(c.pp.chunks);
  }
  out += " --cp " + std::to_string(c.cp) + " --shard " + shard_strategy_name(c.memory.shard);
  if (c.memory.shard == ShardStrategy::hybrid_shard) out += " --shard-group " + std::to_string(c.memory.shard_ranks);
  return out + " --recompute " + c.memory.recompute + " --micro-batch " + std::to_string(c.memory.micro_batch);
}

// One searched layout as the columns of the table and the CSV.
std::vector<std::string> search_row(std::size_t rank, const PlanResult& r) {
  const PlanConfig& c = r.config;
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const std::string schedule = c.pp.stages == 1 ? "-" : c.pp.chunks > 1 ? c.pp.schedule + " v" + std::to_string(c.pp.chunks)
                                                                         : c.pp.schedule;
  std::string shard = shard_strategy_name(c.memory.shard);
  if (c.memory.shard == ShardStrategy::hybrid_shard) shard += "/" + std::to_string(c.memory.shard_ranks);
  return {std::to_string(rank),
          std::to_string(c.tp()) + (c.sequence_parallel() ? "+sp" : ""),
          std::to_string(c.pp.stages),
          schedule,
          std::to_string(c.cp),
          std::to_string(c.dp),
          shard,
          c.memory.recompute,
          std::to_string(c.memory.micro_batch),
          printf_string("%.1f", static_cast<double>(r.per_rank.peak_total) / gib),
          printf_string("%.3g", r.step_s),
          printf_string("%.3g", r.compute_s),
          printf_string("%.3g", r.bubble_s),
          printf_string("%.3g", r.exposed_comm_s),
          printf_string("%.4g", r.tokens_per_s / c.ranks),
          mfu_text(r.mfu),
          search_args(c)};
}

const std::vector<std::string> kSearchColumns = {"rank", "tp", "pp", "schedule", "cp", "dp", "shard", "recompute",
                                                 "micro_batch", "peak_gib", "step_s", "compute_s", "bubble_s",
                                                 "exposed_comm_s", "tokens_per_s_per_gpu", "mfu", "args"};

}  // namespace

std::string render_search(const PlanRequest& request, const SearchResult& result) {
  const std::size_t shown =
      request.top > 0 ? std::min<std::size_t>(static_cast<std::size_t>(request.top), result.ranked.size())
                      : result.ranked.size();
  if (request.format == Format::csv) {
    std::string out;
    for (std::size_t i = 0; i < kSearchColumns.size(); ++i) out += (i ? "," : "") + kSearchColumns[i];
    out += "\n";
    for (std::size_t i = 0; i < shown; ++i) {
      const std::vector<std::string> row = search_row(i + 1, result.ranked[i]);
      for (std::size_t k = 0; k < row.size(); ++k) out += (k ? "," : "") + csv_field(row[k]);
      out += "\n";
    }
    return out;
  }
  if (request.format == Format::json) {
    nlohmann::ordered_json j;
    j["candidates"] = result.candidates;
    j["accepted"] = result.accepted;
    j["unplanned"] = result.unplanned;
    j["unplanned_reason"] = result.unplanned_reason;
    j["fitting"] = result.ranked.size();
    j["seconds"] = result.seconds;
    j["layouts"] = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < shown; ++i) {
      const PlanResult& r = result.ranked[i];
      nlohmann::ordered_json one;
      one["rank"] = i + 1;
      one["config"] = config_json(r.config);
      nlohmann::ordered_json memory;
      for (MemCategory cat : all_mem_categories()) memory[mem_category_name(cat)] = r.per_rank[cat];
      memory["peak_total"] = r.per_rank.peak_total;
      one["memory_bytes_per_rank"] = memory;
      one["peak_stage"] = r.peak_stage;
      one["step_s"] = r.step_s;
      one["compute_s"] = r.compute_s;
      one["bubble_s"] = r.bubble_s;
      one["exposed_comm_s"] = r.exposed_comm_s;
      one["tokens_per_s"] = r.tokens_per_s;
      one["tokens_per_s_per_gpu"] = r.tokens_per_s / r.config.ranks;
      one["mfu"] = std::isfinite(r.mfu) ? nlohmann::ordered_json(r.mfu) : nlohmann::ordered_json(nullptr);
      one["args"] = search_args(r.config);
      j["layouts"].push_back(one);
    }
    return j.dump(2) + "\n";
  }
  if (request.plans.empty()) return "";
  const PlanConfig& base = request.plans.front();
  std::string out = "parabench-plan --search: " + base.model + " (" + describe_arch(base.memory.arch) + ") on " +
                    std::to_string(base.ranks) + " GPUs (" + std::to_string(base.nodes()) + " nodes × " +
                    std::to_string(base.gpus_per_node) + ") of " + printf_string("%g", base.gpu_memory_gib) +
                    " GiB, global batch " + std::to_string(base.global_batch) + " (" +
                    with_separators(base.global_batch * base.memory.arch.seq) + " tokens), " + precision_text(base) + "\n";
  out += "time: " + time_source_text(base) + "\n";
  out += std::to_string(result.candidates) + " layouts enumerated, " + std::to_string(result.accepted) +
         " accepted by parabench-hybrid's rules, " + std::to_string(result.ranked.size()) + " fit; searched in " +
         printf_string("%.2f", result.seconds) + " s\n";
  if (result.unplanned > 0) {
    out += std::to_string(result.unplanned) + " accepted layouts left out, untimeable from the calibration; the first: " +
           result.unplanned_reason + "\n";
  }
  if (result.ranked.empty()) return out + "no layout fits\n";
  out += "fastest first (step time; tokens/s per GPU in the same order); peak: the largest stage's, GiB per rank:\n";
  auto without_args = [](std::vector<std::string> row) {  // the table leaves out the options (CSV, JSON have them)
    row.pop_back();
    return row;
  };
  std::vector<std::vector<std::string>> rows = {without_args(kSearchColumns)};
  for (std::size_t i = 0; i < shown; ++i) rows.push_back(without_args(search_row(i + 1, result.ranked[i])));
  out += format_columns(rows);
  const PlanResult& best = result.ranked.front();
  out += "\nthe fastest layout in full:\n" + single_plan_table(best);
  return out;
}

}  // namespace pb::plan
