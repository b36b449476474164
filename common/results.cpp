#include "common/results.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <cstring>
#include <ctime>

#include "common/errors.h"

#ifndef PB_VERSION
#define PB_VERSION "0.0.0"
#endif
#ifndef PB_GIT_COMMIT
#define PB_GIT_COMMIT "unknown"
#endif

namespace pb {

void disable_hdf5_exit_handler() { H5dont_atexit(); }

std::string hdf5_error_reason() {
  const int saved_errno = errno;
  std::vector<std::string> descriptions;  // innermost first
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
        if (e->desc) static_cast<std::vector<std::string>*>(data)->push_back(e->desc);
        return 0;
      },
      &descriptions);
  H5Eclear2(H5E_DEFAULT);
  // The sec2 driver says "..., errno = 28, error message = 'No space left on device', ...".
  const std::string marker = "error message = '";
  for (const std::string& d : descriptions) {
    const std::size_t at = d.find(marker);
    if (at == std::string::npos) continue;
    const std::size_t begin = at + marker.size();
    return d.substr(begin, d.find('\'', begin) - begin);
  }
  if (!descriptions.empty()) return descriptions.front();
  return saved_errno != 0 ? std::strerror(saved_errno) : "HDF5 error";
}

namespace {

// HDF5 calls return a negative value (or id) on failure; here that throws, so that the writer can
// mark its file failed and the runner can stop every rank together.
#define PB_H5(call)                                                                                \
  ([&]() {                                                                                         \
    auto pb_h5_rc_ = (call);                                                                       \
    if (pb_h5_rc_ < 0) throw RunError(kExitRuntime, hdf5_error_reason() + " (in " #call ")");           \
    return pb_h5_rc_;                                                                              \
  }())

// The byte range a running writer locks (an open-file-description lock, released by the kernel
// when the process ends however it ends). Far past any data, so HDF5's own locking is not disturbed.
constexpr off_t kLockOffset = off_t{1} << 62;

// Room reserved past the file's end after the header, for what the end of a run writes.
int64_t end_of_run_reserve_bytes(int ranks) { return (int64_t{256} << 10) + int64_t{64} * 8 * ranks; }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// mkdir -p
void make_directories(const std::string& dir) {
  std::string partial;
  for (std::size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!partial.empty() && mkdir(partial.c_str(), 0775) != 0 && errno != EEXIST) {
        throw RunError(kExitRuntime, "cannot create directory " + partial + ": " + std::strerror(errno));
      }
    }
    if (i < dir.size()) partial += dir[i];
  }
}

std::string sanitize(std::string s) {
  for (char& c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.')) c = '-';
  }
  return s;
}

// The in-use lock: a write lock on one byte at kLockOffset, on the open file description of `fd`.
// False (errno set) when another process holds it, or where the file system has no such locks.
bool take_in_use_lock(int fd) {
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = kLockOffset;
  lock.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &lock) == 0;
}

hid_t ensure_group(hid_t file, const std::string& path) {
  // Opens or creates each group along path ("/a/b/c").
  hid_t group = PB_H5(H5Gopen2(file, "/", H5P_DEFAULT));
  std::size_t begin = 1;
  while (begin < path.size()) {
    const std::size_t end = std::min(path.find('/', begin), path.size());
    const std::string name = path.substr(begin, end - begin);
    const htri_t exists = H5Lexists(group, name.c_str(), H5P_DEFAULT);
    const hid_t next = exists > 0 ? H5Gopen2(group, name.c_str(), H5P_DEFAULT)
                                  : H5Gcreate2(group, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Gclose(group);
    group = PB_H5(next);
    begin = end + 1;
  }
  return group;
}

void set_string_attr(hid_t obj, const char* name, const std::string& value) {
  if (PB_H5(H5Aexists(obj, name)) > 0) PB_H5(H5Adelete(obj, name));
  hid_t type = PB_H5(H5Tcopy(H5T_C_S1));
  PB_H5(H5Tset_size(type, H5T_VARIABLE));
  PB_H5(H5Tset_cset(type, H5T_CSET_UTF8));
  hid_t space = PB_H5(H5Screate(H5S_SCALAR));
  hid_t attr = PB_H5(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
  const char* data = value.c_str();
  PB_H5(H5Awrite(attr, type, &data));
  PB_H5(H5Aclose(attr));
  H5Sclose(space);
  H5Tclose(type);
}

// Writes a scalar in place when the attribute exists with this type (no new space), else creates it.
template <typename T>
void set_scalar_attr(hid_t obj, const char* name, hid_t type, T value) {
  if (PB_H5(H5Aexists(obj, name)) > 0) {
    hid_t attr = PB_H5(H5Aopen(obj, name, H5P_DEFAULT));
    hid_t existing = H5Aget_type(attr);
    const bool same = existing >= 0 && H5Tequal(existing, type) > 0;
    if (existing >= 0) H5Tclose(existing);
    if (same) {
      const herr_t rc = H5Awrite(attr, type, &value);
      H5Aclose(attr);
      PB_H5(rc);
      return;
    }
    H5Aclose(attr);
    PB_H5(H5Adelete(obj, name));
  }
  hid_t space = PB_H5(H5Screate(H5S_SCALAR));
  hid_t attr = PB_H5(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
  PB_H5(H5Awrite(attr, type, &value));
  PB_H5(H5Aclose(attr));
  H5Sclose(space);
}

void set_json_attr(hid_t obj, const std::string& name, const nlohmann::ordered_json& v) {
  if (v.is_string()) set_string_attr(obj, name.c_str(), v.get<std::string>());
  else if (v.is_boolean()) set_scalar_attr<int64_t>(obj, name.c_str(), H5T_NATIVE_INT64, v.get<bool>() ? 1 : 0);
  else if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    set_scalar_attr<uint64_t>(obj, name.c_str(), H5T_NATIVE_UINT64, v.get<uint64_t>());
  } else if (v.is_number_integer()) set_scalar_attr<int64_t>(obj, name.c_str(), H5T_NATIVE_INT64, v.get<int64_t>());
  else if (v.is_number()) set_scalar_attr<double>(obj, name.c_str(), H5T_NATIVE_DOUBLE, v.get<double>());
  else set_string_attr(obj, name.c_str(), v.dump());
}

void write_string_dataset(hid_t parent, const char* name, const std::vector<std::string>& values) {
  hid_t type = PB_H5(H5Tcopy(H5T_C_S1));
  PB_H5(H5Tset_size(type, H5T_VARIABLE));
  PB_H5(H5Tset_cset(type, H5T_CSET_UTF8));
  hsize_t dims[1] = {values.size()};
  hid_t space = PB_H5(H5Screate_simple(1, dims, nullptr));
  hid_t ds = PB_H5(H5Dcreate2(parent, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  std::vector<const char*> ptrs;
  for (const auto& s : values) ptrs.push_back(s.c_str());
  if (!values.empty()) PB_H5(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()));
  set_string_attr(ds, "units", "1");
  PB_H5(H5Dclose(ds));
  H5Sclose(space);
  H5Tclose(type);
}

// A per-step dataset [steps, cols...] of doubles, allocated in full now (filled with NaN) in chunks of
// at most 1 MiB (HDF5's default chunk cache). It spans every step while the run goes on (the
// attribute /steps/finished says how many rows hold data) and is cut to the finished steps at the end.
void create_step_dataset(hid_t parent, const char* name, int rank, hsize_t steps, hsize_t cols, const char* units) {
  hsize_t dims[2] = {steps, cols};
  const hsize_t chunk_rows = std::max<hsize_t>(1, std::min<hsize_t>(steps, (hsize_t{1} << 17) / cols));
  hsize_t chunk[2] = {chunk_rows, cols};
  hid_t space = PB_H5(H5Screate_simple(rank, dims, dims));
  hid_t dcpl = PB_H5(H5Pcreate(H5P_DATASET_CREATE));
  PB_H5(H5Pset_chunk(dcpl, rank, chunk));
  PB_H5(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY));
  PB_H5(H5Pset_fill_time(dcpl, H5D_FILL_TIME_ALLOC));
  const double nan = std::nan("");
  PB_H5(H5Pset_fill_value(dcpl, H5T_NATIVE_DOUBLE, &nan));
  hid_t ds = PB_H5(H5Dcreate2(parent, name, H5T_NATIVE_DOUBLE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT));
  set_string_attr(ds, "units", units);
  PB_H5(H5Dclose(ds));
  H5Pclose(dcpl);
  H5Sclose(space);
}

void set_row_count(hid_t file, const char* path, hsize_t rows, hsize_t cols) {
  hid_t ds = PB_H5(H5Dopen2(file, path, H5P_DEFAULT));
  hsize_t dims[2] = {rows, cols};
  const herr_t rc = H5Dset_extent(ds, dims);
  H5Dclose(ds);
  PB_H5(rc);
}

void write_row(hid_t file, const char* path, int64_t row, const double* values, hsize_t cols, int rank) {
  hid_t ds = PB_H5(H5Dopen2(file, path, H5P_DEFAULT));
  hid_t fspace = PB_H5(H5Dget_space(ds));
  hsize_t start[2] = {static_cast<hsize_t>(row), 0};
  hsize_t count[2] = {1, cols};
  PB_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr));
  hid_t mspace = PB_H5(H5Screate_simple(rank, count, nullptr));
  PB_H5(H5Dwrite(ds, H5T_NATIVE_DOUBLE, mspace, fspace, H5P_DEFAULT, values));
  H5Sclose(mspace);
  H5Sclose(fspace);
  PB_H5(H5Dclose(ds));
}

template <typename T>
void write_vector(hid_t file, const std::string& path, const std::vector<T>& values, hid_t type, const char* units,
                  const std::vector<int64_t>& shape) {
  const std::size_t slash = path.rfind('/');
  hid_t parent = slash == 0 ? PB_H5(H5Gopen2(file, "/", H5P_DEFAULT)) : ensure_group(file, path.substr(0, slash));
  const std::string name = path.substr(slash + 1);
  if (PB_H5(H5Lexists(parent, name.c_str(), H5P_DEFAULT)) > 0) PB_H5(H5Ldelete(parent, name.c_str(), H5P_DEFAULT));
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  if (dims.empty()) dims.push_back(values.size());
  hid_t space = PB_H5(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
  hid_t ds = PB_H5(H5Dcreate2(parent, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  PB_H5(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()));
  set_string_attr(ds, "units", units);
  PB_H5(H5Dclose(ds));
  H5Sclose(space);
  H5Gclose(parent);
}

void check_shape(const std::string& path, std::size_t count, const std::vector<int64_t>& shape) {
  if (shape.empty()) return;
  std::size_t n = 1;
  for (int64_t d : shape) n *= static_cast<std::size_t>(d);
  if (n != count) throw std::logic_error(path + ": " + std::to_string(count) + " values for its shape");
}

}  // namespace

bool result_file_in_use(const std::string& path) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const bool held = !take_in_use_lock(fd) && (errno == EAGAIN || errno == EACCES);
  ::close(fd);  // releases the lock this probe took
  return held;
}

template <typename Fn>
void ResultWriter::guarded(const std::string& what, Fn&& fn) {
  if (broken_) return;
  try {
    fn(static_cast<hid_t>(file_));
    PB_H5(H5Fflush(static_cast<hid_t>(file_), H5F_SCOPE_GLOBAL));
  } catch (const RunError& e) {
    broken_ = true;
    throw RunError(kExitRuntime, "result file " + path_ + ": " + what + " failed: " + e.what());
  }
}

ResultWriter::ResultWriter(const ResultFileRequest& request)
    : ranks_(request.ranks), capacity_(request.steps), series_(request.step_series) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors are reported by the writer's checks
  const std::string& out = request.out;
  std::string base;
  if (ends_with(out, ".h5")) {
    path_ = out;
    const std::size_t slash = out.rfind('/');
    if (slash != std::string::npos && slash > 0) make_directories(out.substr(0, slash));
    struct stat st {};
    if (stat(path_.c_str(), &st) == 0) {
      if (S_ISDIR(st.st_mode)) throw RunError(kExitConfig, "--out " + path_ + " is a directory, not a .h5 file");
      if (!request.overwrite) {
        throw RunError(kExitConfig, "--out " + path_ + " exists; choose another path, or add --overwrite to replace it");
      }
      if (result_file_in_use(path_)) {
        throw RunError(kExitRuntime, "--out " + path_ + " is the result file of a run still in progress; not replaced");
      }
      // The new file is made beside it and renamed over it by publish(): a run that fails before its
      // first step leaves the old file as it was.
      open_path_ = path_ + ".partial-" + std::to_string(getpid());
    }
  } else {
    make_directories(out);
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
    const std::string job = env_or("SLURM_JOB_ID", "local");
    base = (ends_with(out, "/") ? out : out + "/") + request.app + "_" + sanitize(request.cluster) + "_" + stamp + "_" +
           sanitize(job);
    path_ = base + ".h5";
  }
  if (open_path_.empty()) open_path_ = path_;

  // Exclusive creation (O_EXCL) by this process, so that an existing file, another run's included, is
  // never truncated, and the file this run removes on failure is its own. A directory gets the first
  // name not taken; an explicit path that appeared since the check above is an error. The in-use lock
  // is taken on the new file before HDF5 opens it.
  for (int attempt = 1;; ++attempt) {
    lock_fd_ = open(open_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (lock_fd_ >= 0) break;
    const int err = errno;
    if (err == EEXIST && !base.empty() && attempt < 100) {
      path_ = open_path_ = base + "-" + std::to_string(attempt) + ".h5";
      continue;
    }
    if (err == EEXIST && base.empty() && open_path_ == path_) {
      throw RunError(kExitConfig, "--out " + path_ + " was created by another process just now; not replaced");
    }
    throw RunError(kExitRuntime, "cannot create the result file " + open_path_ + ": " + std::strerror(err));
  }
  created_ = true;
  if (!take_in_use_lock(lock_fd_)) {
    std::fprintf(stderr, "parabench: warning: %s: cannot take the in-use lock (%s): other runs will not see that "
                         "this file is in use\n", path_.c_str(), std::strerror(errno));
  }
  file_ = H5Fcreate(open_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file_ < 0) {
    const std::string reason = hdf5_error_reason();
    discard();
    throw RunError(kExitRuntime, "cannot create the result file " + open_path_ + ": " + reason);
  }

  try {
    guarded("creating it", [&](hid_t root) {
      set_string_attr(root, "schema", "parabench");
      set_scalar_attr<int64_t>(root, "schema_version", H5T_NATIVE_INT64, kSchemaVersion);
      set_string_attr(root, "software_version", PB_VERSION);
      set_string_attr(root, "git_commit", PB_GIT_COMMIT);
      set_string_attr(root, "created", utc_now_iso8601());
      set_string_attr(root, "status", "running");
      set_string_attr(root, "error", "");
      if (capacity_ > 0) {  // a run of no steps (parabench-micro) has no per-step datasets
        hid_t steps = ensure_group(root, "/steps");
        const hsize_t capacity = static_cast<hsize_t>(capacity_);
        create_step_dataset(steps, "loss", 1, capacity, 1, "1");
        create_step_dataset(steps, "grad_norm", 1, capacity, 1, "1");
        create_step_dataset(steps, "time_s", 2, capacity, static_cast<hsize_t>(ranks_), "s");
        set_scalar_attr<int64_t>(steps, "finished", H5T_NATIVE_INT64, 0);
        H5Gclose(steps);
        for (const StepSeries& series : series_) {
          const std::size_t slash = series.path.rfind('/');
          hid_t parent = ensure_group(root, series.path.substr(0, slash));
          create_step_dataset(parent, series.path.substr(slash + 1).c_str(), 2, capacity,
                              static_cast<hsize_t>(series.columns), series.units.c_str());
          H5Gclose(parent);
        }
      }
    });
  } catch (...) {
    discard();
    throw;
  }
}

ResultWriter::~ResultWriter() {
  if (open_path_ != path_) {  // an --overwrite run that never reached publish(): the old file stays
    discard();
    return;
  }
  try {
    close();
  } catch (const RunError&) {
    // reported by an explicit close(); a destructor has no one to tell
  }
}

void ResultWriter::close() {
  if (file_ < 0 && lock_fd_ < 0) return;
  std::string failure;
  // After a failed write the file is left as its last good flush made it: closing would write the
  // failed metadata again, and a partial write of it can make the file unreadable.
  if (file_ >= 0 && !broken_) {
    if (H5Fclose(static_cast<hid_t>(file_)) < 0) failure = "closing it failed: " + hdf5_error_reason();
  }
  file_ = -1;
  if (lock_fd_ >= 0) {
    struct stat st {};
    if (failure.empty() && !broken_ && fsync(lock_fd_) != 0) failure = std::string("fsync failed: ") + std::strerror(errno);
    // The room reserved past the end that the summary did not use goes back to the file system.
    if (reserved_ && fstat(lock_fd_, &st) == 0) {
      fallocate(lock_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st.st_size, end_of_run_reserve_bytes(ranks_));
    }
    ::close(lock_fd_);
  }
  lock_fd_ = -1;
  if (!failure.empty()) throw RunError(kExitRuntime, "result file " + path_ + ": " + failure);
}

void ResultWriter::discard() noexcept {
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
  file_ = -1;
  if (lock_fd_ >= 0) ::close(lock_fd_);
  lock_fd_ = -1;
  if (created_) unlink(open_path_.c_str());
  created_ = false;
}

void ResultWriter::publish() {
  if (open_path_ == path_) return;
  if (rename(open_path_.c_str(), path_.c_str()) != 0) {
    broken_ = true;
    throw RunError(kExitRuntime, "--overwrite: cannot replace " + path_ + ": " + std::strerror(errno));
  }
  open_path_ = path_;
}

void ResultWriter::write_config(const nlohmann::ordered_json& config, const std::vector<std::string>& argv) {
  guarded("writing /config", [&](hid_t f) {
    hid_t g = ensure_group(f, "/config");
    for (const auto& [key, value] : config.items()) set_json_attr(g, key, value);
    write_string_dataset(g, "argv", argv);
    H5Gclose(g);
  });
}

void ResultWriter::write_system(const SystemInfo& s) {
  nlohmann::ordered_json a;
  a["cluster"] = s.cluster;
  a["nodes"] = s.nodes;
  a["ranks"] = s.ranks;
  a["ranks_per_node"] = s.ranks_per_node;
  a["cpu_model"] = s.cpu_model;
  a["gpu_model"] = s.gpu_model;
  a["gpu_memory_bytes"] = s.gpu_memory_bytes;
  a["gpus_per_node"] = s.gpus_per_node;
  a["driver_version"] = s.driver_version;
  a["cuda_version"] = s.cuda_version;
  a["nccl_version"] = s.nccl_version;
  a["mpi_library"] = s.mpi_library;
  a["blas_library"] = s.blas_library;
  a["hdf5_version"] = s.hdf5_version;
  a["compiler"] = s.compiler;
  a["slurm_job_id"] = s.slurm_job_id;
  a["slurm_partition"] = s.slurm_partition;
  a["price_per_gpu_hour"] = s.price_per_gpu_hour;
  a["price_per_node_hour"] = s.price_per_node_hour;
  a["electricity_price_per_kwh"] = s.electricity_price_per_kwh;
  a["currency"] = s.currency;
  guarded("writing /system", [&](hid_t f) {
    hid_t g = ensure_group(f, "/system");
    for (const auto& [key, value] : a.items()) set_json_attr(g, key, value);
    write_string_dataset(g, "hostnames", s.hostnames);
    write_string_dataset(g, "environment", s.environment);
    H5Gclose(g);
    if (!s.local_ranks.empty()) write_vector(f, "/system/local_ranks", s.local_ranks, H5T_NATIVE_INT, "1", {});
    if (!s.device_indices.empty()) {
      write_vector(f, "/system/device_indices", s.device_indices, H5T_NATIVE_INT, "1", {});
    }
  });
}

void ResultWriter::commit_header() {
  guarded("creating it", [](hid_t) {});  // the flush
  if (broken_) return;
  if (fsync(lock_fd_) != 0) {
    broken_ = true;
    throw RunError(kExitRuntime, "result file " + path_ + ": fsync failed: " + std::strerror(errno));
  }
  // Blocks past the end of the file, allocated without changing its size: HDF5 grows the file into
  // them at the end of the run.
  struct stat st {};
  if (fstat(lock_fd_, &st) != 0) return;
  if (fallocate(lock_fd_, FALLOC_FL_KEEP_SIZE, st.st_size, end_of_run_reserve_bytes(ranks_)) == 0) {
    reserved_ = true;
    return;
  }
  if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
    std::fprintf(stderr, "parabench: warning: %s: this file system reserves no room for the summary (%s): a disk "
                         "that fills during the run keeps the steps, not the summary\n", path_.c_str(),
                 std::strerror(errno));
    return;
  }
  broken_ = true;
  throw RunError(kExitRuntime, "result file " + path_ + ": reserving room for the summary failed: " +
                                   std::strerror(errno));
}

void ResultWriter::append_step(double loss, double grad_norm, const std::vector<double>& rank_times_s,
                               const std::vector<std::vector<double>>& series_rows) {
  if (steps_ >= capacity_) throw RunError(kExitRuntime, "result file " + path_ + ": more steps than allocated");
  if (series_rows.size() != series_.size()) {
    throw std::invalid_argument("append_step: " + std::to_string(series_rows.size()) + " series rows for " +
                                std::to_string(series_.size()) + " series");
  }
  for (std::size_t i = 0; i < series_.size(); ++i) {
    if (static_cast<int64_t>(series_rows[i].size()) != series_[i].columns) {
      throw std::invalid_argument("append_step: a row of " + std::to_string(series_rows[i].size()) + " values for " +
                                  series_[i].path);
    }
  }
  guarded("writing step " + std::to_string(steps_ + 1), [&](hid_t f) {
    write_row(f, "/steps/loss", steps_, &loss, 1, 1);
    write_row(f, "/steps/grad_norm", steps_, &grad_norm, 1, 1);
    write_row(f, "/steps/time_s", steps_, rank_times_s.data(), static_cast<hsize_t>(ranks_), 2);
    for (std::size_t i = 0; i < series_.size(); ++i) {
      write_row(f, series_[i].path.c_str(), steps_, series_rows[i].data(), static_cast<hsize_t>(series_[i].columns),
                2);
    }
    hid_t g = PB_H5(H5Gopen2(f, "/steps", H5P_DEFAULT));
    set_scalar_attr<int64_t>(g, "finished", H5T_NATIVE_INT64, steps_ + 1);
    H5Gclose(g);
  });
  ++steps_;
}

void ResultWriter::write_attributes(const std::string& group, const nlohmann::ordered_json& attrs) {
  guarded("writing " + group, [&](hid_t f) {
    hid_t g = ensure_group(f, group);
    for (const auto& [key, value] : attrs.items()) set_json_attr(g, key, value);
    H5Gclose(g);
  });
}

void ResultWriter::write_i64(const std::string& path, const std::vector<int64_t>& values, const char* units,
                             const std::vector<int64_t>& shape) {
  check_shape(path, values.size(), shape);
  guarded("writing " + path, [&](hid_t f) { write_vector(f, path, values, H5T_NATIVE_INT64, units, shape); });
}

void ResultWriter::write_strings(const std::string& path, const std::vector<std::string>& values) {
  guarded("writing " + path, [&](hid_t f) {
    const std::size_t slash = path.rfind('/');
    hid_t parent = slash == 0 ? PB_H5(H5Gopen2(f, "/", H5P_DEFAULT)) : ensure_group(f, path.substr(0, slash));
    const std::string name = path.substr(slash + 1);
    if (PB_H5(H5Lexists(parent, name.c_str(), H5P_DEFAULT)) > 0) PB_H5(H5Ldelete(parent, name.c_str(), H5P_DEFAULT));
    write_string_dataset(parent, name.c_str(), values);
    H5Gclose(parent);
  });
}

void ResultWriter::write_f64(const std::string& path, const std::vector<double>& values, const char* units,
                             const std::vector<int64_t>& shape) {
  check_shape(path, values.size(), shape);
  guarded("writing " + path, [&](hid_t f) { write_vector(f, path, values, H5T_NATIVE_DOUBLE, units, shape); });
}

void ResultWriter::set_dataset_attribute(const std::string& path, const std::string& name, double value) {
  guarded("writing " + path, [&](hid_t f) {
    hid_t ds = PB_H5(H5Dopen2(f, path.c_str(), H5P_DEFAULT));
    set_scalar_attr<double>(ds, name.c_str(), H5T_NATIVE_DOUBLE, value);
    H5Dclose(ds);
  });
}

void ResultWriter::set_status(const std::string& status, const std::string& error) {
  guarded("setting its status to " + status, [&](hid_t f) {
    // During the run the per-step datasets span every step; now they hold the finished ones.
    if (capacity_ > 0) {
      const hsize_t rows = static_cast<hsize_t>(steps_);
      set_row_count(f, "/steps/loss", rows, 1);
      set_row_count(f, "/steps/grad_norm", rows, 1);
      set_row_count(f, "/steps/time_s", rows, static_cast<hsize_t>(ranks_));
      for (const StepSeries& series : series_) {
        set_row_count(f, series.path.c_str(), rows, static_cast<hsize_t>(series.columns));
      }
    }
    set_string_attr(f, "status", status);
    set_string_attr(f, "error", error);
  });
}

void ResultWriter::mark_failed(const std::string& error) noexcept {
  if (file_ < 0 || broken_) return;  // a file whose write failed is not touched again (see close)
  try {
    set_status("failed", error);
  } catch (...) {
  }
}

void write_gradient_dump(const std::string& path, const GradientDump& dump) {
  hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file < 0) throw RunError(kExitRuntime, "cannot create the gradient dump " + path + ": " + hdf5_error_reason());
  for (const auto& [key, value] : dump.attributes.items()) set_json_attr(file, key, value);
  write_vector(file, "/losses", dump.losses, H5T_NATIVE_DOUBLE, "1", {});
  write_vector(file, "/grad_norms", dump.grad_norms, H5T_NATIVE_DOUBLE, "1", {});
  hid_t grads = ensure_group(file, "/grads");
  for (std::size_t i = 0; i < dump.shapes.size(); ++i) {
    const auto& [name, dims] = dump.shapes[i];
    std::vector<hsize_t> hdims(dims.begin(), dims.end());
    hid_t space = PB_H5(H5Screate_simple(static_cast<int>(hdims.size()), hdims.data(), nullptr));
    hid_t ds = PB_H5(H5Dcreate2(grads, name.c_str(), H5T_NATIVE_FLOAT, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    PB_H5(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dump.grads[i].data()));
    H5Dclose(ds);
    H5Sclose(space);
  }
  H5Gclose(grads);
  PB_H5(H5Fclose(file));
}

}  // namespace pb
