// The energy counters' arithmetic (common/energy.h): a powercap counter's wrap-around, the zones a node's
// energy is summed over, and the /summary figures from per-step rows. The apps' reading of the counters
// is tested against a fake powercap tree in tests/app/test_energy.py.
#include "common/energy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace pb {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(RaplDelta, WrapsAtTheCountersRange) {
  EXPECT_EQ(rapl_delta_uj(100, 350, 1000), 250u);
  EXPECT_EQ(rapl_delta_uj(900, 50, 1000), 150u);   // 900 → 1000, then 0 → 50
  EXPECT_EQ(rapl_delta_uj(1000, 0, 1000), 0u);
  EXPECT_EQ(rapl_delta_uj(7, 7, 1000), 0u);
}

// A fake powercap tree: zones with name, max_energy_range_uj and energy_uj files.
class FakePowercap : public ::testing::Test {
 protected:
  void zone(const std::string& dir, const std::string& name, uint64_t energy, uint64_t range = 1000000) {
    std::filesystem::create_directories(root_ + "/" + dir);
    std::ofstream(root_ + "/" + dir + "/name") << name << "\n";
    std::ofstream(root_ + "/" + dir + "/max_energy_range_uj") << range << "\n";
    set(dir, energy);
  }
  void set(const std::string& dir, uint64_t energy) { std::ofstream(root_ + "/" + dir + "/energy_uj") << energy << "\n"; }
  void SetUp() override {
    root_ = ::testing::TempDir() + "powercap_" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ + "/intel-rapl");
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  std::string root_;
};

TEST_F(FakePowercap, PackagesAndTheirDramOnce) {
  zone("intel-rapl:0", "package-0", 1000);
  zone("intel-rapl:0:0", "core", 1);
  zone("intel-rapl:0:1", "dram", 2000);
  zone("intel-rapl:1", "package-1", 999000);
  zone("intel-rapl:2", "psys", 5);
  zone("intel-rapl-mmio:0", "package-0", 5);  // the MMIO interface's view of package-0: not counted again
  RaplCounters rapl(root_);
  ASSERT_TRUE(rapl.available()) << rapl.why_not();
  EXPECT_EQ(rapl.domain_names(), (std::vector<std::string>{"package-0", "package-0/dram", "package-1"}));
  std::vector<uint64_t> a, b;
  ASSERT_TRUE(rapl.read(&a));
  set("intel-rapl:0", 3000);
  set("intel-rapl:0:0", 999);  // not counted
  set("intel-rapl:0:1", 2500);
  set("intel-rapl:1", 500);     // wrapped: 1000 + 500
  set("intel-rapl:2", 99999);   // not counted
  set("intel-rapl-mmio:0", 7777);  // not counted
  ASSERT_TRUE(rapl.read(&b));
  EXPECT_DOUBLE_EQ(rapl.joules_between(a, b), (2000 + 500 + 1500 + 0) * 1e-6);
}

TEST_F(FakePowercap, UnreadableOrMissing) {
  zone("intel-rapl:0", "package-0", 1000);
  std::filesystem::remove(root_ + "/intel-rapl:0/energy_uj");
  RaplCounters missing(root_);
  EXPECT_FALSE(missing.available());
  EXPECT_NE(missing.why_not().find("intel-rapl:0/energy_uj: No such file or directory"), std::string::npos)
      << missing.why_not();
  std::ofstream(root_ + "/intel-rapl:0/energy_uj") << "garbage\n";
  EXPECT_NE(RaplCounters(root_).why_not().find("not a number"), std::string::npos);
  EXPECT_EQ(RaplCounters(root_ + "/absent").why_not(), "no " + root_ + "/absent");
  std::filesystem::remove_all(root_ + "/intel-rapl:0");
  zone("intel-rapl:0", "psys", 5);
  EXPECT_NE(RaplCounters(root_).why_not().find("no package or dram zone"), std::string::npos);
}

TEST_F(FakePowercap, AReadThatFailsLaterLeavesTheValuesAlone) {
  zone("intel-rapl:0", "package-0", 1000);
  RaplCounters rapl(root_);
  std::vector<uint64_t> v{42};
  std::filesystem::remove(root_ + "/intel-rapl:0/energy_uj");
  EXPECT_FALSE(rapl.read(&v));
  EXPECT_EQ(v, std::vector<uint64_t>{42});
}

// Two sources: nvml on 3 ranks (rank 2's GPU read by rank 1: no reader), rapl on 1 node; step 0 is the
// warm-up, step 2 lost a GPU read (NaN): nvml counts steps 1 and 3, rapl steps 1, 2 and 3.
TEST(EnergySummary, MeasuredStepsSourcesAndDevices) {
  EnergySource nvml, rapl, none;
  nvml.name = "nvml";
  nvml.available = true;
  nvml.read_by = {0, 1, -1};
  rapl.name = "rapl";
  rapl.available = true;
  rapl.read_by = {0};
  none.name = "other";
  const std::vector<std::vector<std::vector<double>>> rows = {
      {{9, 9, kNaN}, {100, 200, kNaN}, {kNaN, 210, kNaN}, {120, 220, kNaN}},  // nvml [step][rank]
      {{9}, {30}, {40}, {50}},                                                 // rapl [step][node]
      {{kNaN}, {kNaN}, {kNaN}, {kNaN}}};
  const std::vector<std::vector<double>> times = {{1, 1, 1}, {0.5, 0.4, 0.1}, {0.5, 0.5, 0.5}, {0.5, 0.6, 0.2}};
  const auto s = energy_summary({nvml, rapl, none}, rows, times, {1, 2, 3}, 1000.0);
  EXPECT_EQ(s["energy_sources"], "nvml rapl");
  EXPECT_DOUBLE_EQ(s["energy_nvml_j_per_step"].get<double>(), (300.0 + 340.0) / 2);
  EXPECT_EQ(s["nvml_devices"], 2);
  EXPECT_DOUBLE_EQ(s["power_nvml_w_per_device"].get<double>(), (220.0 / 1.0 + 420.0 / 1.0) / 2);
  EXPECT_DOUBLE_EQ(s["energy_rapl_j_per_step"].get<double>(), 40.0);
  EXPECT_DOUBLE_EQ(s["power_rapl_w_per_device"].get<double>(), 120.0 / 1.5);
  EXPECT_DOUBLE_EQ(s["energy_j_per_step"].get<double>(), 360.0);
  EXPECT_DOUBLE_EQ(s["joules_per_token"].get<double>(), 0.36);
  EXPECT_DOUBLE_EQ(s["tokens_per_joule"].get<double>(), 1000.0 / 360.0);
  EXPECT_FALSE(s.contains("energy_other_j_per_step"));

  const auto nothing = energy_summary({none}, {rows[2]}, times, {1, 2, 3}, 1000.0);
  EXPECT_EQ(nothing["energy_sources"], "");
  EXPECT_TRUE(std::isnan(nothing["energy_j_per_step"].get<double>()));
  EXPECT_TRUE(std::isnan(nothing["tokens_per_joule"].get<double>()));
}

}  // namespace
}  // namespace pb
