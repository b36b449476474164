#include "common/results.h"

#include <hdf5.h>
#include <sys/stat.h>

#include <cctype>
#include <cerrno>
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
namespace {

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

hid_t ensure_group(hid_t file, const std::string& path) {
  // Creates every missing group along path ("/a/b/c").
  hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  hid_t g;
  if (H5Lexists(file, path.c_str(), H5P_DEFAULT) > 0) {
    g = H5Gopen2(file, path.c_str(), H5P_DEFAULT);
  } else {
    g = H5Gcreate2(file, path.c_str(), lcpl, H5P_DEFAULT, H5P_DEFAULT);
  }
  H5Pclose(lcpl);
  if (g < 0) throw RunError(kExitRuntime, "HDF5: cannot create group " + path);
  return g;
}

void set_string_attr(hid_t obj, const char* name, const std::string& value) {
  if (H5Aexists(obj, name) > 0) PB_HDF5_CHECK(H5Adelete(obj, name));
  hid_t type = PB_HDF5_CHECK(H5Tcopy(H5T_C_S1));
  PB_HDF5_CHECK(H5Tset_size(type, H5T_VARIABLE));
  PB_HDF5_CHECK(H5Tset_cset(type, H5T_CSET_UTF8));
  hid_t space = PB_HDF5_CHECK(H5Screate(H5S_SCALAR));
  hid_t attr = PB_HDF5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
  const char* data = value.c_str();
  PB_HDF5_CHECK(H5Awrite(attr, type, &data));
  H5Aclose(attr);
  H5Sclose(space);
  H5Tclose(type);
}

template <typename T>
void set_scalar_attr(hid_t obj, const char* name, hid_t type, T value) {
  if (H5Aexists(obj, name) > 0) PB_HDF5_CHECK(H5Adelete(obj, name));
  hid_t space = PB_HDF5_CHECK(H5Screate(H5S_SCALAR));
  hid_t attr = PB_HDF5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
  PB_HDF5_CHECK(H5Awrite(attr, type, &value));
  H5Aclose(attr);
  H5Sclose(space);
}

void set_json_attr(hid_t obj, const std::string& name, const nlohmann::ordered_json& v) {
  if (v.is_string()) set_string_attr(obj, name.c_str(), v.get<std::string>());
  else if (v.is_boolean()) set_scalar_attr<int64_t>(obj, name.c_str(), H5T_NATIVE_INT64, v.get<bool>() ? 1 : 0);
  else if (v.is_number_integer()) set_scalar_attr<int64_t>(obj, name.c_str(), H5T_NATIVE_INT64, v.get<int64_t>());
  else if (v.is_number()) set_scalar_attr<double>(obj, name.c_str(), H5T_NATIVE_DOUBLE, v.get<double>());
  else set_string_attr(obj, name.c_str(), v.dump());
}

void write_strings(hid_t parent, const char* name, const std::vector<std::string>& values) {
  hid_t type = PB_HDF5_CHECK(H5Tcopy(H5T_C_S1));
  PB_HDF5_CHECK(H5Tset_size(type, H5T_VARIABLE));
  PB_HDF5_CHECK(H5Tset_cset(type, H5T_CSET_UTF8));
  hsize_t dims[1] = {values.size()};
  hid_t space = PB_HDF5_CHECK(H5Screate_simple(1, dims, nullptr));
  hid_t ds = PB_HDF5_CHECK(H5Dcreate2(parent, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  std::vector<const char*> ptrs;
  for (const auto& s : values) ptrs.push_back(s.c_str());
  if (!values.empty()) PB_HDF5_CHECK(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()));
  set_string_attr(ds, "units", "1");
  H5Dclose(ds);
  H5Sclose(space);
  H5Tclose(type);
}

// An extensible dataset [0, cols...] growing along its first axis.
void create_extensible(hid_t parent, const char* name, int rank, hsize_t cols, const char* units) {
  hsize_t dims[2] = {0, cols};
  hsize_t maxdims[2] = {H5S_UNLIMITED, cols};
  hsize_t chunk[2] = {64, cols};
  hid_t space = PB_HDF5_CHECK(H5Screate_simple(rank, dims, maxdims));
  hid_t dcpl = PB_HDF5_CHECK(H5Pcreate(H5P_DATASET_CREATE));
  PB_HDF5_CHECK(H5Pset_chunk(dcpl, rank, chunk));
  hid_t ds = PB_HDF5_CHECK(H5Dcreate2(parent, name, H5T_NATIVE_DOUBLE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT));
  set_string_attr(ds, "units", units);
  H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(space);
}

void append_row(hid_t file, const char* path, int64_t row, const double* values, hsize_t cols, int rank) {
  hid_t ds = PB_HDF5_CHECK(H5Dopen2(file, path, H5P_DEFAULT));
  hsize_t new_dims[2] = {static_cast<hsize_t>(row + 1), cols};
  PB_HDF5_CHECK(H5Dset_extent(ds, new_dims));
  hid_t fspace = PB_HDF5_CHECK(H5Dget_space(ds));
  hsize_t start[2] = {static_cast<hsize_t>(row), 0};
  hsize_t count[2] = {1, cols};
  PB_HDF5_CHECK(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr));
  hid_t mspace = PB_HDF5_CHECK(H5Screate_simple(rank, count, nullptr));
  PB_HDF5_CHECK(H5Dwrite(ds, H5T_NATIVE_DOUBLE, mspace, fspace, H5P_DEFAULT, values));
  H5Sclose(mspace);
  H5Sclose(fspace);
  H5Dclose(ds);
}

template <typename T>
void write_vector(hid_t file, const std::string& path, const std::vector<T>& values, hid_t type, const char* units) {
  const std::size_t slash = path.rfind('/');
  hid_t parent = slash == 0 ? H5Gopen2(file, "/", H5P_DEFAULT) : ensure_group(file, path.substr(0, slash));
  const std::string name = path.substr(slash + 1);
  if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) > 0) PB_HDF5_CHECK(H5Ldelete(parent, name.c_str(), H5P_DEFAULT));
  hsize_t dims[1] = {values.size()};
  hid_t space = PB_HDF5_CHECK(H5Screate_simple(1, dims, nullptr));
  hid_t ds = PB_HDF5_CHECK(H5Dcreate2(parent, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  PB_HDF5_CHECK(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()));
  set_string_attr(ds, "units", units);
  H5Dclose(ds);
  H5Sclose(space);
  H5Gclose(parent);
}

}  // namespace

ResultWriter::ResultWriter(const std::string& out, const std::string& app, const std::string& cluster, int ranks)
    : ranks_(ranks) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors are reported by PB_HDF5_CHECK
  std::string base;
  if (ends_with(out, ".h5")) {
    path_ = out;
    const std::size_t slash = out.rfind('/');
    if (slash != std::string::npos) make_directories(out.substr(0, slash));
  } else {
    make_directories(out);
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
    const std::string job = env_or("SLURM_JOB_ID", "local");
    base = (ends_with(out, "/") ? out : out + "/") + app + "_" + sanitize(cluster) + "_" + stamp + "_" + sanitize(job);
    path_ = base + ".h5";
  }
  // A directory gets a fresh name (never overwrite another run); an explicit .h5 path is replaced.
  const unsigned flags = base.empty() ? H5F_ACC_TRUNC : H5F_ACC_EXCL;
  file_ = H5Fcreate(path_.c_str(), flags, H5P_DEFAULT, H5P_DEFAULT);
  for (int attempt = 1; file_ < 0 && !base.empty() && attempt < 100; ++attempt) {
    path_ = base + "-" + std::to_string(attempt) + ".h5";
    file_ = H5Fcreate(path_.c_str(), flags, H5P_DEFAULT, H5P_DEFAULT);
  }
  if (file_ < 0) throw RunError(kExitRuntime, "cannot create the result file " + path_);

  hid_t root = static_cast<hid_t>(file_);
  set_string_attr(root, "schema", "parabench");
  set_scalar_attr<int64_t>(root, "schema_version", H5T_NATIVE_INT64, kSchemaVersion);
  set_string_attr(root, "software_version", PB_VERSION);
  set_string_attr(root, "git_commit", PB_GIT_COMMIT);
  set_string_attr(root, "created", utc_now_iso8601());
  set_string_attr(root, "status", "running");
  set_string_attr(root, "error", "");

  hid_t steps = ensure_group(root, "/steps");
  create_extensible(steps, "loss", 1, 1, "1");
  create_extensible(steps, "grad_norm", 1, 1, "1");
  create_extensible(steps, "time_s", 2, static_cast<hsize_t>(ranks_), "s");
  H5Gclose(steps);
  flush();
}

ResultWriter::~ResultWriter() {
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
}

void ResultWriter::write_config(const nlohmann::ordered_json& config, const std::vector<std::string>& argv) {
  hid_t g = ensure_group(static_cast<hid_t>(file_), "/config");
  for (const auto& [key, value] : config.items()) set_json_attr(g, key, value);
  write_strings(g, "argv", argv);
  H5Gclose(g);
}

void ResultWriter::write_system(const SystemInfo& s) {
  hid_t g = ensure_group(static_cast<hid_t>(file_), "/system");
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
  for (const auto& [key, value] : a.items()) set_json_attr(g, key, value);
  write_strings(g, "hostnames", s.hostnames);
  write_strings(g, "environment", s.environment);
  H5Gclose(g);
}

void ResultWriter::append_step(double loss, double grad_norm, const std::vector<double>& rank_times_s) {
  hid_t f = static_cast<hid_t>(file_);
  append_row(f, "/steps/loss", steps_, &loss, 1, 1);
  append_row(f, "/steps/grad_norm", steps_, &grad_norm, 1, 1);
  append_row(f, "/steps/time_s", steps_, rank_times_s.data(), static_cast<hsize_t>(ranks_), 2);
  ++steps_;
  flush();
}

void ResultWriter::write_attributes(const std::string& group, const nlohmann::ordered_json& attrs) {
  hid_t g = ensure_group(static_cast<hid_t>(file_), group);
  for (const auto& [key, value] : attrs.items()) set_json_attr(g, key, value);
  H5Gclose(g);
}

void ResultWriter::write_i64(const std::string& path, const std::vector<int64_t>& values, const char* units) {
  write_vector(static_cast<hid_t>(file_), path, values, H5T_NATIVE_INT64, units);
}

void ResultWriter::write_f64(const std::string& path, const std::vector<double>& values, const char* units) {
  write_vector(static_cast<hid_t>(file_), path, values, H5T_NATIVE_DOUBLE, units);
}

void ResultWriter::set_dataset_attribute(const std::string& path, const std::string& name, double value) {
  hid_t ds = PB_HDF5_CHECK(H5Dopen2(static_cast<hid_t>(file_), path.c_str(), H5P_DEFAULT));
  set_scalar_attr<double>(ds, name.c_str(), H5T_NATIVE_DOUBLE, value);
  H5Dclose(ds);
}

void ResultWriter::set_status(const std::string& status, const std::string& error) {
  hid_t root = static_cast<hid_t>(file_);
  set_string_attr(root, "status", status);
  set_string_attr(root, "error", error);
  flush();
}

void write_gradient_dump(const std::string& path, const GradientDump& dump) {
  hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file < 0) throw RunError(kExitRuntime, "cannot create the gradient dump " + path);
  for (const auto& [key, value] : dump.attributes.items()) set_json_attr(file, key, value);
  write_vector(file, "/losses", dump.losses, H5T_NATIVE_DOUBLE, "1");
  write_vector(file, "/grad_norms", dump.grad_norms, H5T_NATIVE_DOUBLE, "1");
  hid_t grads = ensure_group(file, "/grads");
  for (std::size_t i = 0; i < dump.shapes.size(); ++i) {
    const auto& [name, dims] = dump.shapes[i];
    std::vector<hsize_t> hdims(dims.begin(), dims.end());
    hid_t space = PB_HDF5_CHECK(H5Screate_simple(static_cast<int>(hdims.size()), hdims.data(), nullptr));
    hid_t ds = PB_HDF5_CHECK(H5Dcreate2(grads, name.c_str(), H5T_NATIVE_FLOAT, space, H5P_DEFAULT, H5P_DEFAULT,
                                        H5P_DEFAULT));
    PB_HDF5_CHECK(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dump.grads[i].data()));
    H5Dclose(ds);
    H5Sclose(space);
  }
  H5Gclose(grads);
  H5Fclose(file);
}

void ResultWriter::flush() { PB_HDF5_CHECK(H5Fflush(static_cast<hid_t>(file_), H5F_SCOPE_GLOBAL)); }

}  // namespace pb
