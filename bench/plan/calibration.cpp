// Reading a parabench-micro result file (HDF5 C API) and the nearest-row lookups of the calibrated
// step time. The file's layout is SPEC 6's /micro (bench/micro/report.cpp writes it): /micro/gemm and
// /micro/kernels, one 1-D dataset per column; /micro/collectives/<op>, attributes and one row per
// (size, variant).
#include "bench/plan/calibration.h"

#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <set>

#include "common/errors.h"

namespace pb::plan {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A handle closed at scope exit.
class Handle {
 public:
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// The file being read, for messages: "--calibration PATH: ..."
class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& what) const { throw ConfigError("--calibration " + path_ + ": " + what); }

  bool exists(hid_t loc, const std::string& name) const {
    // H5Lexists on each step of the path: a missing parent is "no", not an error.
    std::size_t start = name.front() == '/' ? 1 : 0;
    std::string prefix = start ? "/" : "";
    while (start < name.size()) {
      const std::size_t end = std::min(name.find('/', start), name.size());
      prefix += name.substr(start, end - start);
      if (H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
      prefix += "/";
      start = end + 1;
    }
    return true;
  }

  std::string string_attribute(hid_t obj, const char* name, const std::string& where) const {
    if (H5Aexists(obj, name) <= 0) fail(where + " has no attribute " + name);
    Handle attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
    Handle type(H5Aget_type(attr.get()), H5Tclose);
    if (!attr.ok() || !type.ok() || H5Tget_class(type.get()) != H5T_STRING) {
      fail(where + " attribute " + name + " is not a string");
    }
    if (H5Tis_variable_str(type.get()) > 0) {
      Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
      H5Tset_size(mem.get(), H5T_VARIABLE);
      H5Tset_cset(mem.get(), H5Tget_cset(type.get()));
      char* data = nullptr;
      if (H5Aread(attr.get(), mem.get(), &data) < 0) fail("cannot read " + where + " attribute " + name);
      std::string value = data ? data : "";
      H5free_memory(data);
      return value;
    }
    const std::size_t size = H5Tget_size(type.get());
    std::string value(size, '\0');
    Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), size);
    if (H5Aread(attr.get(), mem.get(), value.data()) < 0) fail("cannot read " + where + " attribute " + name);
    value.resize(std::min(value.find('\0'), value.size()));
    return value;
  }

  double number_attribute(hid_t obj, const char* name, const std::string& where) const {
    if (H5Aexists(obj, name) <= 0) fail(where + " has no attribute " + name);
    Handle attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
    Handle type(H5Aget_type(attr.get()), H5Tclose);
    const H5T_class_t cls = type.ok() ? H5Tget_class(type.get()) : H5T_NO_CLASS;
    if (cls != H5T_INTEGER && cls != H5T_FLOAT) fail(where + " attribute " + name + " is not a number");
    double value = kNaN;
    if (H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &value) < 0) fail("cannot read " + where + " attribute " + name);
    return value;
  }

  // A 1-D dataset `group/column` of `rows` elements (rows < 0: any length, set on return); the caller
  // closes it.
  hid_t open_column(hid_t group, const std::string& where, const char* column, int64_t* rows) const {
    if (H5Lexists(group, column, H5P_DEFAULT) <= 0) fail(where + " has no column " + column);
    const hid_t ds = H5Dopen2(group, column, H5P_DEFAULT);
    if (ds < 0) fail("cannot open " + where + "/" + column);
    Handle space(H5Dget_space(ds), H5Sclose);
    hsize_t n = 0;
    const bool one_dimensional = space.ok() && H5Sget_simple_extent_ndims(space.get()) == 1;
    if (one_dimensional) H5Sget_simple_extent_dims(space.get(), &n, nullptr);
    if (!one_dimensional || (*rows >= 0 && static_cast<int64_t>(n) != *rows)) {
      H5Dclose(ds);
      if (!one_dimensional) fail(where + "/" + column + " is not a 1-D dataset");
      fail(where + "/" + column + " has " + std::to_string(n) + " rows, the table's other columns " +
           std::to_string(*rows));
    }
    *rows = static_cast<int64_t>(n);
    return ds;
  }

  std::vector<double> numbers(hid_t group, const std::string& where, const char* column, int64_t* rows) const {
    Handle ds(open_column(group, where, column, rows), H5Dclose);
    Handle type(H5Dget_type(ds.get()), H5Tclose);
    const H5T_class_t cls = type.ok() ? H5Tget_class(type.get()) : H5T_NO_CLASS;
    if (cls != H5T_INTEGER && cls != H5T_FLOAT) fail(where + "/" + column + " is not numeric");
    std::vector<double> values(static_cast<std::size_t>(*rows));
    if (!values.empty() && H5Dread(ds.get(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) < 0) {
      fail("cannot read " + where + "/" + column);
    }
    return values;
  }

  std::vector<std::string> strings(hid_t group, const std::string& where, const char* column, int64_t* rows) const {
    Handle ds(open_column(group, where, column, rows), H5Dclose);
    Handle type(H5Dget_type(ds.get()), H5Tclose);
    if (!type.ok() || H5Tget_class(type.get()) != H5T_STRING) fail(where + "/" + column + " is not a string column");
    std::vector<std::string> values(static_cast<std::size_t>(*rows));
    if (values.empty()) return values;
    if (H5Tis_variable_str(type.get()) > 0) {
      Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
      H5Tset_size(mem.get(), H5T_VARIABLE);
      H5Tset_cset(mem.get(), H5Tget_cset(type.get()));
      std::vector<char*> data(values.size(), nullptr);
      if (H5Dread(ds.get(), mem.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) < 0) {
        fail("cannot read " + where + "/" + column);
      }
      for (std::size_t i = 0; i < data.size(); ++i) {
        values[i] = data[i] ? data[i] : "";
        H5free_memory(data[i]);
      }
      return values;
    }
    const std::size_t size = H5Tget_size(type.get());
    std::vector<char> buffer(size * values.size());
    Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), size);
    if (H5Dread(ds.get(), mem.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer.data()) < 0) {
      fail("cannot read " + where + "/" + column);
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      const char* text = buffer.data() + i * size;
      values[i] = std::string(text, ::strnlen(text, size));
    }
    return values;
  }

 private:
  std::string path_;
};

// /micro/gemm or /micro/kernels: the rows that ran (error empty, a finite positive time).
std::vector<MeasuredKernel> read_kernel_table(const Reader& reader, hid_t file, const std::string& table) {
  const std::string where = "/micro/" + table;
  Handle group(H5Gopen2(file, where.c_str(), H5P_DEFAULT), H5Gclose);
  if (!group.ok()) reader.fail(where + " is not a group");
  const bool gemm = table == "gemm";
  int64_t rows = -1;
  const auto name = reader.strings(group.get(), where, "name", &rows);
  const auto backend = reader.strings(group.get(), where, "backend", &rows);
  const auto dtype = reader.strings(group.get(), where, "dtype", &rows);
  const auto shape = reader.strings(group.get(), where, "shape", &rows);
  const auto time_s = reader.numbers(group.get(), where, "time_s", &rows);
  const auto flop = reader.numbers(group.get(), where, "flop", &rows);
  const auto peak_fraction = reader.numbers(group.get(), where, "peak_fraction", &rows);
  const auto error = reader.strings(group.get(), where, "error", &rows);
  std::vector<double> N, C, OC, bytes;
  std::vector<std::string> kernel, dims, operands;
  if (gemm) {
    // "cached" or "cold" (parabench-micro's flushed variant); files before it have cached rows only
    if (reader.exists(file, where + "/operands")) operands = reader.strings(group.get(), where, "operands", &rows);
    N = reader.numbers(group.get(), where, "N", &rows);
    C = reader.numbers(group.get(), where, "C", &rows);
    OC = reader.numbers(group.get(), where, "OC", &rows);
  } else {
    kernel = reader.strings(group.get(), where, "kernel", &rows);
    dims = reader.strings(group.get(), where, "dims", &rows);
    bytes = reader.numbers(group.get(), where, "bytes", &rows);
  }
  std::vector<MeasuredKernel> out;
  for (int64_t i = 0; i < rows; ++i) {
    MeasuredKernel k;
    k.name = name[i];
    k.backend = backend[i];
    k.dtype = dtype[i];
    k.shape = shape[i];
    k.time_s = time_s[i];
    k.flop = flop[i];
    k.peak_fraction = peak_fraction[i];
    if (gemm) {
      k.kernel = "matmul";
      k.cold = !operands.empty() && operands[i] == "cold";
      k.N = static_cast<int64_t>(N[i]);
      k.C = static_cast<int64_t>(C[i]);
      k.OC = static_cast<int64_t>(OC[i]);
      k.flop = k.flop > 0 ? k.flop : 2.0 * k.N * k.C * k.OC;
      k.dims = "N" + std::to_string(k.N) + "_C" + std::to_string(k.C) + "_OC" + std::to_string(k.OC);
    } else {
      k.kernel = kernel[i];
      k.dims = dims[i];
      k.bytes = bytes[i];
    }
    const bool ran = error[i].empty() && std::isfinite(k.time_s) && k.time_s > 0 && k.work() > 0;
    if (ran) out.push_back(k);
  }
  return out;
}

MeasuredCollective read_collective(const Reader& reader, hid_t file, const std::string& op, bool in_place_first) {
  const std::string where = "/micro/collectives/" + op;
  Handle group(H5Gopen2(file, where.c_str(), H5P_DEFAULT), H5Gclose);
  if (!group.ok()) reader.fail(where + " is not a group");
  MeasuredCollective t;
  t.op = op;
  t.in_place = in_place_first;
  t.comm = reader.string_attribute(group.get(), "comm", where);
  t.dtype = reader.string_attribute(group.get(), "dtype", where);
  t.ranks = static_cast<int>(reader.number_attribute(group.get(), "ranks", where));
  t.nodes = static_cast<int>(reader.number_attribute(group.get(), "nodes", where));
  t.busbw_factor = reader.number_attribute(group.get(), "busbw_factor", where);
  int64_t rows = -1;
  const auto bytes = reader.numbers(group.get(), where, "bytes", &rows);
  const auto in_place = reader.numbers(group.get(), where, "in_place", &rows);
  const auto time_s = reader.numbers(group.get(), where, "time_s", &rows);
  const auto busbw = reader.numbers(group.get(), where, "busbw", &rows);
  const auto errors = reader.numbers(group.get(), where, "errors", &rows);
  // Per size, the preferred variant where both ran (the apps' all-reduces and most gathers run in place;
  // fsdp's FULL_SHARD gathers into a buffer of their own), else the one that ran.
  std::map<int64_t, std::pair<double, double>> by_size;  // bytes -> (time, busbw)
  std::map<int64_t, bool> from_preferred;
  for (int64_t i = 0; i < rows; ++i) {
    const bool ok = errors[i] == 0 && std::isfinite(time_s[i]) && time_s[i] > 0 && std::isfinite(busbw[i]) &&
                    busbw[i] > 0 && bytes[i] > 0;
    if (!ok) continue;
    const auto size = static_cast<int64_t>(bytes[i]);
    const bool preferred = (in_place[i] != 0) == in_place_first;
    if (by_size.count(size) && from_preferred[size] && !preferred) continue;
    by_size[size] = {time_s[i], busbw[i]};
    from_preferred[size] = preferred;
  }
  for (const auto& [size, row] : by_size) {
    t.bytes.push_back(size);
    t.time_s.push_back(row.first);
    t.busbw.push_back(row.second);
  }
  return t;
}

// log-scale distance between two positive quantities.
double log_distance(double a, double b) { return std::fabs(std::log(a / b)); }

}  // namespace

std::vector<std::string> Calibration::measured_precisions() const {
  std::set<std::string> seen;
  for (const MeasuredKernel& k : gemm) seen.insert(k.backend + "/" + k.dtype);
  return {seen.begin(), seen.end()};
}

Calibration read_calibration(const std::string& path) {
  const Reader reader(path);
  // HDF5 prints its error stack on every failed call; a bad file is reported here, once.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) reader.fail("cannot be read (no such file, or no permission)");
  if (is_hdf5 == 0) reader.fail("is not an HDF5 file (a parabench-micro result file is)");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.ok()) reader.fail("cannot be opened as HDF5");

  Calibration cal;
  cal.path = path;
  if (!reader.exists(file.get(), "/config")) reader.fail("has no /config: not a parabench result file");
  {
    Handle config(H5Gopen2(file.get(), "/config", H5P_DEFAULT), H5Gclose);
    const std::string app = reader.string_attribute(config.get(), "app", "/config");
    if (app != "micro") {
      reader.fail("is a parabench-" + app + " result (/config app \"" + app +
                  "\"), not parabench-micro's: calibrate with parabench-micro --out FILE.h5");
    }
    cal.world_size = static_cast<int>(reader.number_attribute(config.get(), "world_size", "/config"));
    cal.threads = static_cast<int>(reader.number_attribute(config.get(), "threads", "/config"));
    cal.comm = reader.string_attribute(config.get(), "comm", "/config");
  }
  const std::string status = reader.string_attribute(file.get(), "status", "the file's root");
  if (status != "complete") {
    reader.fail("parabench-micro's run did not complete (status \"" + status + "\"): calibrate from a complete run");
  }
  if (reader.exists(file.get(), "/system")) {
    Handle system(H5Gopen2(file.get(), "/system", H5P_DEFAULT), H5Gclose);
    if (H5Aexists(system.get(), "cluster") > 0) cal.cluster = reader.string_attribute(system.get(), "cluster", "/system");
    if (H5Aexists(system.get(), "cpu_model") > 0) {
      cal.cpu_model = reader.string_attribute(system.get(), "cpu_model", "/system");
    }
    if (H5Aexists(system.get(), "gpu_model") > 0) {
      cal.gpu_model = reader.string_attribute(system.get(), "gpu_model", "/system");
    }
  }
  if (!reader.exists(file.get(), "/micro")) reader.fail("has no /micro: not a parabench-micro result");
  if (reader.exists(file.get(), "/micro/gemm")) cal.gemm = read_kernel_table(reader, file.get(), "gemm");
  if (reader.exists(file.get(), "/micro/kernels")) {
    cal.kernels = read_kernel_table(reader, file.get(), "kernels");
  }
  if (reader.exists(file.get(), "/micro/collectives")) {
    Handle group(H5Gopen2(file.get(), "/micro/collectives", H5P_DEFAULT), H5Gclose);
    hsize_t count = 0;
    H5Gget_num_objs(group.get(), &count);
    for (hsize_t i = 0; i < count; ++i) {
      char name[256] = {};
      H5Gget_objname_by_idx(group.get(), i, name, sizeof(name));
      MeasuredCollective t = read_collective(reader, file.get(), name, /*in_place_first=*/true);
      if (!t.bytes.empty()) cal.collectives[name] = std::move(t);
      MeasuredCollective separate = read_collective(reader, file.get(), name, /*in_place_first=*/false);
      if (!separate.bytes.empty()) cal.out_of_place[name] = std::move(separate);
    }
  }
  return cal;
}

double gemm_seconds(const Calibration& cal, const std::string& backend, const std::string& dtype, int64_t N,
                    int64_t C, int64_t OC, RateSource* source) {
  const double flop = 2.0 * N * C * OC;
  // The cold rows where the calibration has some (a step meets its operands out of cache), else the cached.
  const bool cold = std::any_of(cal.gemm.begin(), cal.gemm.end(), [&](const MeasuredKernel& k) {
    return k.backend == backend && k.dtype == dtype && k.cold;
  });
  const MeasuredKernel* best = nullptr;
  double best_flop = 0, best_shape = 0;
  for (const MeasuredKernel& k : cal.gemm) {
    if (k.backend != backend || k.dtype != dtype || k.cold != cold) continue;
    if (k.N == N && k.C == C && k.OC == OC) {
      best = &k;
      break;
    }
    // Nearest in FLOPs; among equal FLOPs, the nearest shape (a product's rate depends on its aspect).
    const double d_flop = log_distance(k.flop, flop);
    const double d_shape = log_distance(k.N, N) + log_distance(k.C, C) + log_distance(k.OC, OC);
    if (!best || d_flop < best_flop - 1e-12 || (std::fabs(d_flop - best_flop) <= 1e-12 && d_shape < best_shape)) {
      best = &k;
      best_flop = d_flop;
      best_shape = d_shape;
    }
  }
  if (!best) {
    std::string measured;
    for (const std::string& p : cal.measured_precisions()) measured += (measured.empty() ? "" : ", ") + p;
    throw ConfigError("--calibration " + cal.path + " has no matrix product (/micro/gemm) measured on " + backend + "/" +
                      dtype + " (it measured " + (measured.empty() ? "none" : measured) +
                      "): plan with the --backend and --dtype it measured, or calibrate on this one");
  }
  source->row = best->name;
  source->exact = best->N == N && best->C == C && best->OC == OC;
  source->cold = best->cold;
  return flop * best->time_s / best->flop;
}

double kernel_seconds(const Calibration& cal, const std::string& backend, const std::string& dtype,
                      const std::string& kernel, double work, RateSource* source) {
  const MeasuredKernel* best = nullptr;
  double best_distance = 0;
  for (const MeasuredKernel& k : cal.kernels) {
    if (k.backend != backend || k.dtype != dtype || k.kernel != kernel) continue;
    const double d = log_distance(k.work(), work);
    if (!best || d < best_distance) {
      best = &k;
      best_distance = d;
    }
  }
  if (!best) return -1.0;
  source->row = best->name;
  source->exact = best_distance < 1e-9;
  return work * best->time_s / best->work();
}

double median_kernel_bandwidth(const Calibration& cal, const std::string& backend, const std::string& dtype) {
  std::vector<double> rates;
  for (const MeasuredKernel& k : cal.kernels) {
    if (k.backend == backend && k.dtype == dtype && k.flop <= 0 && k.bytes > 0) rates.push_back(k.bytes / k.time_s);
  }
  if (rates.empty()) return kNaN;
  std::sort(rates.begin(), rates.end());
  const std::size_t n = rates.size();
  return n % 2 ? rates[n / 2] : 0.5 * (rates[n / 2 - 1] + rates[n / 2]);
}

double interpolate_busbw(const MeasuredCollective& t, double bytes) {
  if (bytes <= static_cast<double>(t.bytes.front())) {
    // Latency-bound: the smallest message's time, whatever the size below it.
    return t.busbw.front() * bytes / static_cast<double>(t.bytes.front());
  }
  if (bytes >= static_cast<double>(t.bytes.back())) return t.busbw.back();
  std::size_t hi = 1;
  while (static_cast<double>(t.bytes[hi]) < bytes) ++hi;
  const double x0 = std::log(static_cast<double>(t.bytes[hi - 1])), x1 = std::log(static_cast<double>(t.bytes[hi]));
  const double y0 = std::log(t.busbw[hi - 1]), y1 = std::log(t.busbw[hi]);
  const double x = std::log(bytes);
  return std::exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0));
}

double calibrated_peak_flop_per_s(const Calibration& cal, const std::string& backend, const std::string& dtype) {
  for (const MeasuredKernel& k : cal.gemm) {
    if (k.backend == backend && k.dtype == dtype && std::isfinite(k.peak_fraction) && k.peak_fraction > 0) {
      return k.flop / k.time_s / k.peak_fraction;
    }
  }
  return kNaN;
}

}  // namespace pb::plan
