// The result writer's promises (SPEC section 6) where a run cannot easily reach them: a write that
// fails after step 1 (a file-size limit stands in for a full disk, since the per-step datasets and the
// summary's room were allocated at creation) throws naming the file and the operating system's reason,
// and the steps flushed before stay readable; exclusive creation; the per-step datasets' extent.
#include <gtest/gtest.h>

#include <hdf5.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/results.h"

namespace pb {
namespace {

std::string scratch_path(const char* name) {
  const char* tmp = std::getenv("TMPDIR");
  std::string path = std::string(tmp != nullptr ? tmp : "/tmp") + "/pb_test_results_" + std::to_string(getpid()) + "_" + name;
  std::remove(path.c_str());
  return path;
}

void write_text(const std::string& path, const char* text) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  std::fputs(text, f);
  std::fclose(f);
}

struct Reopened {
  std::string status, error;
  int64_t finished = -1;
  std::vector<double> loss;
};

Reopened reopen(const std::string& path) {
  Reopened r;
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return r;
  auto text = [&](const char* name) {
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    hid_t type = H5Aget_type(a);
    char* value = nullptr;
    H5Aread(a, type, &value);
    std::string out = value != nullptr ? value : "";
    H5free_memory(value);
    H5Tclose(type);
    H5Aclose(a);
    return out;
  };
  r.status = text("status");
  r.error = text("error");
  hid_t g = H5Gopen2(f, "/steps", H5P_DEFAULT);
  hid_t a = H5Aopen(g, "finished", H5P_DEFAULT);
  H5Aread(a, H5T_NATIVE_INT64, &r.finished);
  H5Aclose(a);
  H5Gclose(g);
  hid_t ds = H5Dopen2(f, "/steps/loss", H5P_DEFAULT);
  hid_t space = H5Dget_space(ds);
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space, &n, nullptr);
  r.loss.resize(n);
  if (n > 0) H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, r.loss.data());
  H5Sclose(space);
  H5Dclose(ds);
  H5Fclose(f);
  return r;
}

ResultFileRequest request(const std::string& path, int64_t steps) {
  ResultFileRequest q;
  q.out = path;
  q.app = "test";
  q.cluster = "unit";
  q.ranks = 2;
  q.steps = steps;
  return q;
}

TEST(ResultWriter, PerStepDatasetsSpanEveryStepWhileRunningThenTheFinishedOnes) {
  const std::string path = scratch_path("extent.h5");
  {
    ResultWriter w(request(path, 5));
    w.commit_header();
    Reopened before = reopen(path);
    EXPECT_EQ(before.status, "running");
    EXPECT_EQ(before.finished, 0);
    ASSERT_EQ(before.loss.size(), 5u);  // allocated in full, NaN until written
    EXPECT_TRUE(std::isnan(before.loss[0]));
    w.append_step(2.5, 1.0, {0.1, 0.2});
    w.append_step(2.25, 1.0, {0.1, 0.2});
    Reopened during = reopen(path);
    EXPECT_EQ(during.finished, 2);
    ASSERT_EQ(during.loss.size(), 5u);
    EXPECT_EQ(during.loss[0], 2.5);
    EXPECT_EQ(during.loss[1], 2.25);
    EXPECT_TRUE(std::isnan(during.loss[2]));
    w.set_status("interrupted", "stopped by SIGTERM after step 2 of 5");
    w.close();
  }
  Reopened after = reopen(path);
  EXPECT_EQ(after.status, "interrupted");
  EXPECT_EQ(after.loss, (std::vector<double>{2.5, 2.25}));
  std::remove(path.c_str());
}

TEST(ResultWriter, AnExistingFileIsRefusedAndKept) {
  const std::string path = scratch_path("exists.h5");
  write_text(path, "keep me");
  try {
    ResultWriter w(request(path, 3));
    FAIL() << "an existing file was not refused";
  } catch (const RunError& e) {
    EXPECT_EQ(e.code, kExitConfig);
    EXPECT_NE(std::string(e.what()).find("--overwrite"), std::string::npos) << e.what();
  }
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 7);
  ResultFileRequest replace = request(path, 3);
  replace.overwrite = true;
  {
    ResultWriter w(replace);
    w.commit_header();
    w.publish();
    EXPECT_TRUE(result_file_in_use(path));  // while the writer holds it
  }
  EXPECT_FALSE(result_file_in_use(path));
  EXPECT_EQ(reopen(path).status, "running");
  std::remove(path.c_str());
}

TEST(ResultWriter, AFailedWriteAfterTheStepsNamesTheReasonAndKeepsTheSteps) {
  // A file-size limit just above the file as it stands after two steps: nothing of the steps needs
  // room past it, but a summary of new datasets does. (SIGXFSZ is ignored, as the apps do, so the
  // write fails with EFBIG instead of ending the process.)
  const std::string path = scratch_path("limit.h5");
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved{};
  getrlimit(RLIMIT_FSIZE, &saved);
  {
    ResultWriter w(request(path, 4));
    w.commit_header();
    w.append_step(3.0, 1.0, {0.1, 0.2});
    w.append_step(2.0, 1.0, {0.1, 0.2});
    struct stat st {};
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    rlimit limit = saved;
    limit.rlim_cur = static_cast<rlim_t>(st.st_size) + 64;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
    std::string message;
    try {
      for (int i = 0; i < 64; ++i) {
        w.write_i64("/memory/measured/c" + std::to_string(i), std::vector<int64_t>(4096, i), "bytes");
      }
    } catch (const RunError& e) {
      message = e.what();
      EXPECT_EQ(e.code, kExitRuntime);
    }
    setrlimit(RLIMIT_FSIZE, &saved);
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find("File too large"), std::string::npos) << message;
    EXPECT_TRUE(w.broken());
    w.mark_failed(message);
  }
  // The file is left as its last good flush made it: running, two steps in rows allocated for four.
  Reopened after = reopen(path);
  EXPECT_EQ(after.status, "running");
  EXPECT_EQ(after.finished, 2);
  ASSERT_EQ(after.loss.size(), 4u);
  EXPECT_EQ(after.loss[0], 3.0);
  EXPECT_EQ(after.loss[1], 2.0);
  std::remove(path.c_str());
}

TEST(ResultWriter, OverwriteLeavesTheOldFileUntilPublished) {
  const std::string path = scratch_path("publish.h5");
  write_text(path, "old");
  ResultFileRequest replace = request(path, 3);
  replace.overwrite = true;
  {
    ResultWriter w(replace);
    w.commit_header();
    struct stat st {};
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_size, 3) << "the old file changed before publish()";
    w.discard();  // a run that failed before step 1
  }
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 3);
  {
    ResultWriter w(replace);
    w.commit_header();
    w.publish();
    w.append_step(1.0, 1.0, {0.1, 0.2});
    w.set_status("complete");
    w.close();
  }
  Reopened after = reopen(path);
  EXPECT_EQ(after.status, "complete");
  EXPECT_EQ(after.loss, (std::vector<double>{1.0}));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace pb
