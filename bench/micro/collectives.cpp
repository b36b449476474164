// The Communicator's collectives timed as nccl-tests times them (all_reduce_perf, all_gather_perf, ...):
// message sizes doubling from the smallest, nccl-tests' "size" (the full buffer) and bus bandwidth, every element
// of a call's result checked against the value it must have.
//
// Each benchmark allocates its buffers from the backend, fills them with small integers whose result is
// known exactly, runs the op once untimed and checks every element of the result on every rank; the
// ranks agree on the verdict before anything else happens. Then each iteration is one call, from the
// end of a barrier to the end of Backend::synchronize, and the time Google Benchmark gets is the
// slowest rank's. Not here: nccl-tests' averaging over a batch of calls without barriers (what a
// training step sees when collectives follow each other); bandwidth under concurrent compute.
#include "bench/micro/collectives.h"

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <memory>
#include <set>
#include <stdexcept>
#include <vector>

#include "bench/micro/registry.h"
#include "bench/micro/tensors.h"
#include "common/model.h"
#include "common/timer.h"
#include "kernels/cpu/bf16.h"

namespace pb {
namespace {

enum class Op { all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send_recv };

Op parse_op(const std::string& name) {
  if (name == "all_reduce") return Op::all_reduce;
  if (name == "all_gather") return Op::all_gather;
  if (name == "reduce_scatter") return Op::reduce_scatter;
  if (name == "all_to_all") return Op::all_to_all;
  if (name == "broadcast") return Op::broadcast;
  if (name == "send_recv") return Op::send_recv;
  throw std::invalid_argument("register_collective_benchmarks: no collective " + name);
}

// Ops whose buffer is split in n blocks: nccl-tests rounds their element count down to a multiple of n.
bool splits_buffer(Op op) { return op == Op::all_gather || op == Op::reduce_scatter || op == Op::all_to_all; }

constexpr int kBroadcastRoot = 0;
constexpr int kSendRecvTag = 71;
constexpr std::size_t kHostNameBytes = 256;
constexpr std::size_t kChunkElements = std::size_t{1} << 22;  // per upload or download: bounds host memory

// ---- the data -----------------------------------------------------------------------------------
// Small integers, exact in fp32 and in bf16 (bf16 holds every integer up to 256), so that every
// result is known exactly (nccl-tests' rule). Receive buffers start at 0, which no result holds: an
// element nothing wrote is wrong.
//
// Moved data (gathered, exchanged, broadcast) says where it comes from: element i of rank r's data is
// 1 + (31·r + i) mod 251, so a block from another rank, or shifted by an element, differs (251 is prime).
float moved_value(int rank, std::size_t i) {
  return static_cast<float>(1 + (31 * static_cast<std::size_t>(rank) + i) % 251);
}

// Summed data. Every partial sum of a reduction must be exact in the buffer's dtype, in whatever order
// the library adds (all values are positive integers, so exact sums up to 2^24 in fp32 and 256 in
// bf16 suffice), and every element's sum must say which element it is, so that a sum delivered at the
// wrong offset or to the wrong rank's block is wrong: rank 0's element i is 1 + (i + i / block) mod
// cycle (block: the elements per rank of reduce_scatter, the whole buffer for all_reduce; the i / block
// term shifts each block's pattern, so blocks differ even where block is a multiple of the cycle); every
// other rank r sends 1 + r mod 3 everywhere, so that a rank's data left out or counted twice changes
// the sum. fp32: cycle 251 (prime). bf16: at most 64 ranks contribute (the others send 0) and the cycle
// shrinks so that the whole sum stays ≤ 256.
constexpr int kBf16ExactSum = 256;
constexpr int kBf16ContributingRanks = 64;
constexpr int kSumCycle = 251;

struct Summands {
  int cycle = kSumCycle;
  int contributing_ranks = 1;  // the first ranks; the others send 0
  std::size_t block = 1;
  Summands(int group_size, DType dtype, std::size_t block_elements)
      : contributing_ranks(group_size), block(std::max<std::size_t>(block_elements, 1)) {
    if (dtype == DType::bf16) {
      contributing_ranks = std::min(group_size, kBf16ContributingRanks);
      cycle = std::min(kSumCycle, kBf16ExactSum - others_max());
    }
  }
  // The most the ranks other than 0 add to one element.
  int others_max() const { return 3 * (contributing_ranks - 1); }
  float value(int rank, std::size_t i) const {
    if (rank >= contributing_ranks) return 0.0f;
    if (rank == 0) return static_cast<float>(1 + (i + i / block) % cycle);
    return static_cast<float>(1 + rank % 3);
  }
  // Σ over the group of value(rank, i).
  float sum(std::size_t i) const {
    float others = 0;
    for (int rank = 1; rank < contributing_ranks; ++rank) others += value(rank, i);
    return value(0, i) + others;
  }
};

// dst (count) = value(i), rounded to dst's dtype, uploaded a chunk at a time.
template <typename Value>
void fill(Backend& backend, TensorPtr dst, std::size_t count, Value value) {
  std::vector<float> values;
  std::vector<uint16_t> bits;
  for (std::size_t first = 0; first < count; first += kChunkElements) {
    const std::size_t len = std::min(kChunkElements, count - first);
    values.resize(len);
    for (std::size_t k = 0; k < len; ++k) values[k] = value(first + k);
    if (dst.dtype() == DType::f32) {
      backend.upload((dst + first).data(), values.data(), len * sizeof(float));
      continue;
    }
    bits.resize(len);
    for (std::size_t k = 0; k < len; ++k) bits[k] = cpu::float_to_bf16(values[k]);
    backend.upload((dst + first).data(), bits.data(), len * sizeof(uint16_t));
  }
}

// The wrong elements of one rank's result, and the first of them.
struct CheckResult {
  int64_t checked = 0;
  int64_t wrong = 0;
  int64_t first = -1;
  float got = 0, expected = 0;
};

// Compares every element of result (count) with expected(i), exactly (NaN is wrong).
template <typename Expected>
CheckResult check(Backend& backend, ConstTensorPtr result, std::size_t count, Expected expected) {
  CheckResult r;
  r.checked = static_cast<int64_t>(count);
  for (std::size_t first = 0; first < count; first += kChunkElements) {
    const std::size_t len = std::min(kChunkElements, count - first);
    const std::vector<float> got = download_fp32(backend, result + first, len);
    for (std::size_t k = 0; k < len; ++k) {
      const float want = expected(first + k);
      if (got[k] == want) continue;
      if (r.wrong++ == 0) {
        r.first = static_cast<int64_t>(first + k);
        r.got = got[k];
        r.expected = want;
      }
    }
  }
  return r;
}

// Every rank's check, gathered: every rank gets the same verdict, so that all of them skip, or none
// (a rank that skipped alone would leave the others waiting in the next collective).
struct Verdict {
  int64_t wrong = 0;    // over all ranks
  std::string message;  // empty when no element is wrong
};

Verdict agree_on_check(Communicator& control, const CheckResult& mine) {
  constexpr int kFields = 5;  // wrong, first, got, expected, checked
  const double fields[kFields] = {double(mine.wrong), double(mine.first), mine.got, mine.expected,
                                  double(mine.checked)};
  std::vector<double> all(static_cast<std::size_t>(control.size()) * kFields);
  control.all_gather_host(fields, all.data(), sizeof(fields));
  Verdict verdict;
  int first_rank = -1;
  for (int r = 0; r < control.size(); ++r) {
    const int64_t wrong = static_cast<int64_t>(all[r * kFields]);
    verdict.wrong += wrong;
    if (wrong > 0 && first_rank < 0) first_rank = r;
  }
  if (verdict.wrong == 0) return verdict;
  const double* f = &all[static_cast<std::size_t>(first_rank) * kFields];
  char message[256];
  std::snprintf(message, sizeof(message),
                "%lld wrong elements over all ranks; the first on rank %d, element %lld of %lld: %.9g, expected %.9g",
                static_cast<long long>(verdict.wrong), first_rank, static_cast<long long>(f[1]),
                static_cast<long long>(f[4]), f[2], f[3]);
  verdict.message = message;
  return verdict;
}

// ---- one benchmark --------------------------------------------------------------------------------

struct CollectiveCase {
  Op op;
  std::string table_op;  // the op's name in the table: collective_op_names(), send_recv_intra/_inter
  bool in_place = false;
  std::size_t count = 0;  // elements of the full buffer (nccl-tests' size / dtype bytes)
  DType dtype = DType::f32;
  int pair[2] = {-1, -1};  // send_recv: the two ranks that exchange
};

// A case's buffers on one rank, filled; run() is one call of the op; check_result() compares its result.
class Collective {
 public:
  Collective(Communicator& world, Backend& backend, const CollectiveCase& c)
      : world_(world), backend_(backend), c_(c), rank_(world.rank()), n_(world.size()),
        block_(splits_buffer(c.op) ? c.count / n_ : c.count), summands_(n_, c.dtype, splits_buffer(c.op) ? c.count / n_ : c.count) {
    switch (c_.op) {
      case Op::all_reduce:  // in place: buf (count)
        recv_ = make(c_.count);
        fill(backend_, recv_->get(), c_.count, [&](std::size_t i) { return summands_.value(rank_, i); });
        break;
      case Op::all_gather:  // recv (n · block) = every rank's block, in rank order
        recv_ = make(c_.count);
        if (c_.in_place) {
          fill(backend_, recv_->get(), c_.count,
               [&](std::size_t i) { return i / block_ == std::size_t(rank_) ? moved_value(rank_, i) : 0.0f; });
        } else {
          send_ = make(block_);
          fill(backend_, send_->get(), block_, [&](std::size_t j) { return moved_value(rank_, rank_ * block_ + j); });
          fill(backend_, recv_->get(), c_.count, [](std::size_t) { return 0.0f; });
        }
        break;
      case Op::reduce_scatter:  // send (n · block) summed, block r of the sum to rank r
        send_ = make(c_.count);
        recv_ = make(block_);
        fill(backend_, send_->get(), c_.count, [&](std::size_t i) { return summands_.value(rank_, i); });
        fill(backend_, recv_->get(), block_, [](std::size_t) { return 0.0f; });
        break;
      case Op::all_to_all:  // block j of send to rank j, into block rank of its recv
        send_ = make(c_.count);
        recv_ = make(c_.count);
        fill(backend_, send_->get(), c_.count, [&](std::size_t i) { return moved_value(rank_, i); });
        fill(backend_, recv_->get(), c_.count, [](std::size_t) { return 0.0f; });
        break;
      case Op::broadcast:  // in place, from the root
        recv_ = make(c_.count);
        fill(backend_, recv_->get(), c_.count,
             [&](std::size_t i) { return rank_ == kBroadcastRoot ? moved_value(rank_, i) : 0.0f; });
        break;
      case Op::send_recv:  // the pair swaps buffers; the other ranks hold none
        if (peer() < 0) break;
        send_ = make(c_.count);
        recv_ = make(c_.count);
        fill(backend_, send_->get(), c_.count, [&](std::size_t i) { return moved_value(rank_, i); });
        fill(backend_, recv_->get(), c_.count, [](std::size_t) { return 0.0f; });
        break;
    }
    backend_.synchronize();
  }

  void run() {
    switch (c_.op) {
      case Op::all_reduce: world_.all_reduce(recv_->get(), c_.count); break;
      case Op::all_gather:
        world_.all_gather(c_.in_place ? recv_->get() + std::ptrdiff_t(rank_ * block_) : send_->get(), recv_->get(),
                          block_);
        break;
      case Op::reduce_scatter: world_.reduce_scatter(send_->get(), recv_->get(), block_); break;
      case Op::all_to_all: world_.all_to_all(send_->get(), recv_->get(), block_); break;
      case Op::broadcast: world_.broadcast(recv_->get(), c_.count, kBroadcastRoot); break;
      case Op::send_recv:
        if (peer() < 0) break;  // not in the pair: nothing to do, but the same loop as the pair
        world_.send_recv_async(send_->get(), peer(), recv_->get(), peer(), c_.count, kSendRecvTag)->wait();
        break;
    }
  }

  // This rank's result against what it must hold.
  CheckResult check_result() {
    switch (c_.op) {
      case Op::all_reduce:
      case Op::reduce_scatter: {
        const std::size_t offset = c_.op == Op::reduce_scatter ? rank_ * block_ : 0;  // this rank's block
        const float others = summands_.sum(0) - summands_.value(0, 0);  // the same at every element
        return check(backend_, recv_->get(), block_,
                     [&](std::size_t j) { return summands_.value(0, offset + j) + others; });
      }
      case Op::all_gather:
        return check(backend_, recv_->get(), c_.count, [&](std::size_t i) { return moved_value(int(i / block_), i); });
      case Op::all_to_all:  // block q came from rank q, which sent its block `rank` here
        return check(backend_, recv_->get(), c_.count, [&](std::size_t i) {
          return moved_value(int(i / block_), rank_ * block_ + i % block_);
        });
      case Op::broadcast:
        return check(backend_, recv_->get(), c_.count, [](std::size_t i) { return moved_value(kBroadcastRoot, i); });
      case Op::send_recv:
        if (peer() < 0) return {};
        return check(backend_, recv_->get(), c_.count, [&](std::size_t i) { return moved_value(peer(), i); });
    }
    return {};
  }

  // In-place all_reduce sums into its own buffer: zeros keep the timed calls from growing the values
  // to infinity (the sum's cost does not depend on them).
  void prepare_timing() {
    if (c_.op == Op::all_reduce) backend_.zero(recv_->get().data(), c_.count * dtype_bytes(c_.dtype));
    backend_.synchronize();
  }

 private:
  std::unique_ptr<BackendTensor> make(std::size_t count) {
    return std::make_unique<BackendTensor>(backend_, count, c_.dtype);
  }
  // send_recv: the other rank of the pair, or -1 when this rank is not in it.
  int peer() const { return rank_ == c_.pair[0] ? c_.pair[1] : rank_ == c_.pair[1] ? c_.pair[0] : -1; }

  Communicator& world_;
  Backend& backend_;
  const CollectiveCase c_;
  const int rank_, n_;
  const std::size_t block_;  // elements per rank of a split buffer; else the whole buffer
  const Summands summands_;
  std::unique_ptr<BackendTensor> send_, recv_;
};

void collective_benchmark(benchmark::State& state, const std::string& name, Communicator& world,
                          Communicator& control, Backend& backend, const CollectiveCase& c, double bytes,
                          double factor, int* failed_checks) {
  // Set-up may fail on one rank only (out of memory): the ranks agree before going on.
  std::unique_ptr<Collective> collective;
  std::string error;
  try {
    collective = std::make_unique<Collective>(world, backend, c);
  } catch (const std::exception& e) {
    error = e.what();
  }
  double failed = error.empty() ? 0.0 : 1.0;
  control.all_reduce_host(&failed, 1, HostReduce::max);
  if (failed > 0) {
    ++*failed_checks;
    state.SkipWithError(error.empty() ? "set-up failed on another rank" : error.c_str());
    return;
  }

  collective->run();  // untimed: connections and buffers set up, then every element checked
  backend.synchronize();
  const Verdict verdict = agree_on_check(control, collective->check_result());
  if (verdict.wrong > 0) {
    set_micro_wrong_elements(name, verdict.wrong);
    ++*failed_checks;
    state.SkipWithError(verdict.message.c_str());
    return;
  }
  collective->prepare_timing();

  // Every rank reports the slowest rank's time of each call. Google Benchmark picks the number of
  // iterations (and of further runs) from the reported times alone (manual time), so it makes the same
  // choices on every rank and the ranks make the same calls in the same order. Nothing here may depend
  // on a rank's own clock.
  for (auto _ : state) {
    control.barrier();
    const double start = wall_time_s();
    collective->run();
    backend.synchronize();
    double elapsed = wall_time_s() - start;
    control.all_reduce_host(&elapsed, 1, HostReduce::max);
    state.SetIterationTime(elapsed);
  }
  state.counters["algbw"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["busbw"] = benchmark::Counter(bytes * 1e-9 * factor, benchmark::Counter::kIsIterationInvariantRate);
}

// Every rank's host name, in rank order (collective over `control`).
std::vector<std::string> rank_hosts(Communicator& control) {
  char host[kHostNameBytes] = {};
  gethostname(host, kHostNameBytes - 1);
  std::vector<char> all(kHostNameBytes * control.size());
  control.all_gather_host(host, all.data(), kHostNameBytes);
  std::vector<std::string> hosts;
  for (int r = 0; r < control.size(); ++r) hosts.emplace_back(&all[kHostNameBytes * r]);
  return hosts;
}

// The pairs of send_recv: rank 0 with the next rank on its node (send_recv_intra) and with the first
// rank on another node (send_recv_inter). A pair that does not exist is left out, the intra-node one
// with a line on stderr (`lead`: the rank that prints it).
std::vector<CollectiveCase> send_recv_pairs(const std::vector<std::string>& hosts, bool lead) {
  int intra = -1, inter = -1;
  for (int r = 1; r < int(hosts.size()); ++r) {
    if (hosts[r] == hosts[0]) {
      if (intra < 0) intra = r;
    } else if (inter < 0) {
      inter = r;
    }
  }
  std::vector<CollectiveCase> pairs;
  if (intra > 0) {
    pairs.push_back({Op::send_recv, "send_recv_intra", false, 0, DType::f32, {0, intra}});
  } else if (lead) {
    std::fprintf(stderr, "parabench-micro: send_recv_intra left out: rank 0 is alone on its node (%s)\n",
                 hosts[0].c_str());
  }
  if (inter > 0) pairs.push_back({Op::send_recv, "send_recv_inter", false, 0, DType::f32, {0, inter}});
  return pairs;
}

}  // namespace

const std::vector<std::string>& collective_op_names() {
  static const std::vector<std::string> ops{"all_reduce", "all_gather", "reduce_scatter",
                                            "all_to_all", "broadcast",  "send_recv"};
  return ops;
}

void register_collective_benchmarks(Communicator& world, Communicator& control, Backend& backend,
                                    const CollectiveRequest& request, int* failed_checks) {
  if (request.min_bytes < 1 || request.max_bytes < request.min_bytes) {
    throw std::invalid_argument("register_collective_benchmarks: sizes from " + std::to_string(request.min_bytes) +
                                " to " + std::to_string(request.max_bytes) + " bytes");
  }
  const int n = world.size();
  const std::string dtype = dtype_name(request.dtype);
  const std::vector<std::string> hosts = rank_hosts(control);
  const int world_nodes = static_cast<int>(std::set<std::string>(hosts.begin(), hosts.end()).size());
  for (const std::string& op_name : request.ops) {
    const Op op = parse_op(op_name);
    // The cases of one size: the op's variants, or send_recv's pairs.
    std::vector<CollectiveCase> variants;
    switch (op) {
      case Op::all_reduce:
      case Op::broadcast: variants.push_back({op, op_name, true}); break;
      case Op::all_gather:
        variants.push_back({op, op_name, false});
        variants.push_back({op, op_name, true});
        break;
      case Op::reduce_scatter:
      case Op::all_to_all: variants.push_back({op, op_name, false}); break;
      case Op::send_recv: variants = send_recv_pairs(hosts, world.rank() == 0); break;
    }
    for (int64_t size = request.min_bytes; size <= request.max_bytes; size *= 2) {
      std::size_t count = static_cast<std::size_t>(size) / dtype_bytes(request.dtype);
      if (splits_buffer(op)) count -= count % n;
      if (count == 0) continue;  // as nccl-tests: no call with an empty buffer
      const int64_t bytes = static_cast<int64_t>(count * dtype_bytes(request.dtype));
      for (CollectiveCase c : variants) {
        c.count = count;
        c.dtype = request.dtype;
        const bool pair = op == Op::send_recv;
        const int group_size = pair ? 2 : n;
        const double factor = busbw_factor(op_name, group_size);
        const std::string name = "coll/" + world.name() + "/" + c.table_op + "/" +
                                 (c.in_place ? "in_place/" : "out_of_place/") + std::to_string(bytes);
        MicroEntry entry;
        entry.table = "collectives/" + c.table_op;
        entry.backend = world.name();
        entry.dtype = dtype;
        entry.kernel = c.table_op;
        entry.bytes = double(bytes);
        entry.count = static_cast<int64_t>(count);
        entry.in_place = c.in_place;
        entry.ranks = group_size;
        entry.nodes = pair ? (hosts[c.pair[0]] == hosts[c.pair[1]] ? 1 : 2) : world_nodes;
        entry.busbw_factor = factor;
        add_micro_entry(name, entry);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [name, &world, &control, &backend, c, bytes, factor,
                                      failed_checks](benchmark::State& state) {
                                       collective_benchmark(state, name, world, control, backend, c,
                                                            double(bytes), factor, failed_checks);
                                     })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
}

}  // namespace pb
