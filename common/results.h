// The HDF5 result file of SPEC section 6 (schema version 1), written by rank 0.
//
// Created at start with status "running", extended and flushed after every step, and marked
// complete, failed (with error) or interrupted at the end, so a killed job keeps its finished steps.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/metadata.h"

namespace pb {

inline constexpr int kSchemaVersion = 1;

class ResultWriter {
 public:
  // Creates the file: `out` is a directory (a name <app>_<cluster>_<UTC time>_<job id>.h5 is made in it)
  // or a path ending in .h5. Throws RunError on failure.
  ResultWriter(const std::string& out, const std::string& app, const std::string& cluster, int ranks);
  ~ResultWriter();
  ResultWriter(const ResultWriter&) = delete;
  ResultWriter& operator=(const ResultWriter&) = delete;

  const std::string& path() const { return path_; }

  void write_config(const nlohmann::ordered_json& config, const std::vector<std::string>& argv);
  void write_system(const SystemInfo& system);
  // Appends one step: loss, grad_norm and each rank's wall time; flushes the file.
  void append_step(double loss, double grad_norm, const std::vector<double>& rank_times_s);
  // Attributes of a group ("/summary"): numbers and strings.
  void write_attributes(const std::string& group, const nlohmann::ordered_json& attrs);
  // A [ranks] dataset with units, creating parent groups ("/memory/measured/parameters").
  void write_i64(const std::string& path, const std::vector<int64_t>& values, const char* units);
  void write_f64(const std::string& path, const std::vector<double>& values, const char* units);
  // A numeric attribute on an existing dataset ("/pipeline/bubble_fraction", "theoretical").
  void set_dataset_attribute(const std::string& path, const std::string& name, double value);
  void set_status(const std::string& status, const std::string& error = "");
  void flush();

 private:
  long long file_ = -1;  // hid_t
  std::string path_;
  int ranks_;
  int64_t steps_ = 0;
};

// For the reference tests (tests/reference/check_against_torch.py): the run's configuration as
// root attributes, /losses and /grad_norms per step, and /grads/<name> with the full gradient of
// every parameter at step 0 (before clipping), in its spec shape.
struct GradientDump {
  nlohmann::ordered_json attributes;
  std::vector<double> losses, grad_norms;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;  // name, dims
  std::vector<std::vector<float>> grads;                              // same order as shapes
};
void write_gradient_dump(const std::string& path, const GradientDump& dump);

}  // namespace pb
