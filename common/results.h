// The HDF5 result file of SPEC section 6 (schema version 1), written by rank 0.
//
// Created exclusively at start with status "running" (never over a file that exists unless the run
// says --overwrite, never over the file of a run still in progress), with the per-step datasets
// allocated in full, so that a full disk is found before step 1 and no later step needs new space.
// Written and flushed after every step, and marked complete, failed (with error) or interrupted at
// the end, so a killed job keeps its finished steps. Every write and flush is checked: a failure
// throws RunError naming the file and the operating system's reason ("No space left on device").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/metadata.h"

namespace pb {

inline constexpr int kSchemaVersion = 1;

// The most per-step time entries (steps × ranks) a result file holds: /steps/time_s is one chunk,
// allocated at creation, and HDF5 chunks stay below 4 GiB.
inline constexpr int64_t kMaxStepEntries = int64_t{1} << 27;

// A per-step dataset beyond /steps: [steps, columns] of doubles at `path` ("/energy/nvml/joules"),
// allocated with the others and written row by row by append_step.
struct StepSeries {
  std::string path;
  int64_t columns = 1;
  std::string units;
};

// Where a run writes its result file and how.
struct ResultFileRequest {
  std::string out;       // a directory (a name <app>_<cluster>_<UTC time>_<job id>.h5 is made in it) or a .h5 path
  std::string app, cluster;
  int ranks = 1;
  int64_t steps = 1;     // per-step datasets are allocated for this many steps (0: no per-step datasets)
  bool overwrite = false;  // an explicit .h5 path that exists may be replaced (not one a running run holds)
  std::vector<StepSeries> step_series;  // more per-step datasets (only with steps > 0)
};

class ResultWriter {
 public:
  // Creates the file and its per-step datasets (none when request.steps is 0: a file of tables, as
  // parabench-micro writes). Throws RunError: kExitConfig when `out` names a file
  // that exists (without overwrite) or a directory, kExitRuntime for the rest (I/O, a running run's file).
  explicit ResultWriter(const ResultFileRequest& request);
  ~ResultWriter();
  ResultWriter(const ResultWriter&) = delete;
  ResultWriter& operator=(const ResultWriter&) = delete;

  // The file's name (during an --overwrite run, the name it takes at publish()).
  const std::string& path() const { return path_; }
  // A write has failed: the file keeps what was flushed before, and is not written again.
  bool broken() const { return broken_; }

  void write_config(const nlohmann::ordered_json& config, const std::vector<std::string>& argv);
  void write_system(const SystemInfo& system);
  // After config and system: flushes, and reserves room on the file system for what the end of the
  // run writes (summary, memory, communication), so that a disk that fills during the run still takes
  // them. Throws RunError (disk full) before step 1.
  void commit_header();
  // Appends one step: loss, grad_norm, each rank's wall time and a row of each of the request's
  // step_series (in its order, `columns` values each); flushes the file.
  void append_step(double loss, double grad_norm, const std::vector<double>& rank_times_s,
                   const std::vector<std::vector<double>>& series_rows = {});
  // Attributes of a group ("/summary"): numbers and strings.
  void write_attributes(const std::string& group, const nlohmann::ordered_json& attrs);
  // A [ranks] dataset with units, creating parent groups ("/memory/measured/parameters"); or of the
  // given shape (row-major values, e.g. [steps, layers, experts]).
  void write_i64(const std::string& path, const std::vector<int64_t>& values, const char* units,
                 const std::vector<int64_t>& shape = {});
  void write_f64(const std::string& path, const std::vector<double>& values, const char* units,
                 const std::vector<int64_t>& shape = {});
  // A [n] dataset of UTF-8 strings (units "1"), creating parent groups ("/micro/gemm/name").
  void write_strings(const std::string& path, const std::vector<std::string>& values);
  // A numeric attribute on an existing dataset ("/pipeline/bubble_fraction", "theoretical").
  void set_dataset_attribute(const std::string& path, const std::string& name, double value);
  // The end of the run: the per-step datasets cut to the finished steps, status and error set, flushed.
  void set_status(const std::string& status, const std::string& error = "");
  // For the failure path: set_status("failed", error) that never throws; nothing on a broken file.
  void mark_failed(const std::string& error) noexcept;
  // After the outputs are checked, before step 1: with --overwrite, the new file takes the old one's
  // name (until then the old file is untouched). Throws RunError.
  void publish();
  // Closes the file, synced to the file system, and returns the unused reservation; throws RunError
  // when the close or the sync fails (write-back errors of network file systems show up here).
  void close();
  // Closes and removes the file (creation failed before any step).
  void discard() noexcept;

 private:
  template <typename Fn>
  void guarded(const std::string& what, Fn&& fn);

  long long file_ = -1;  // hid_t
  int lock_fd_ = -1;     // this run's descriptor: the in-use lock, fsync and the reservation
  std::string path_;
  std::string open_path_;  // path_, or the name beside it that an --overwrite run writes until publish()
  bool created_ = false;   // open_path_ was created by this writer (discard removes it)
  bool reserved_ = false;  // room past the end was reserved
  int ranks_;
  int64_t capacity_;     // steps the per-step datasets were allocated for
  std::vector<StepSeries> series_;
  int64_t steps_ = 0;
  bool broken_ = false;
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

// True when `path` is the result file of a run in progress (it holds the writer's lock).
bool result_file_in_use(const std::string& path);

// First thing in main: HDF5 closes open files at exit, and on the abort path (MPI_Abort calls exit)
// that would touch a file in an error state and crash. The result writer closes its file itself.
void disable_hdf5_exit_handler();

// The reason of the last failed HDF5 call: the operating system's message where the HDF5 error stack
// has one ("No space left on device"), else HDF5's innermost description. Clears the stack.
std::string hdf5_error_reason();

}  // namespace pb
