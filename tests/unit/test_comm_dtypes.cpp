// The MPI communicator on fp32 and bf16 buffers (common/communicator.h), run under mpiexec with 2 and
// 4 ranks; plain host vectors are backend memory for the CPU backend.
//
// fp32 (float*, as every caller passes it): every call gives bitwise what the plain MPI call with
// MPI_FLOAT and MPI_SUM gives, or the exact values of data movement, and /comm counts 4 bytes per
// element. bf16: data movement (all_gather in and out of place, all_to_all, send/recv, their
// non-blocking forms, send_recv_async, broadcast) moves any 16-bit pattern, NaNs included, bitwise.
// bf16 sums (all_reduce, reduce_scatter and their non-blocking forms) of small integers are exact;
// of random values they are within one bf16 rounding per addition of the exact sum (2 ranks: exactly
// one rounding of the fp32 sum of the pair), the same bits on every rank and on every repetition.
// Send and receive buffers of different dtypes throw std::invalid_argument before anything is sent or
// accounted. /comm counts 2 bytes per bf16 element. The bf16 sum's MPI_Op is created once and freed
// inside MPI_Finalize (checked by wrapping MPI_Op_create, MPI_Op_free and MPI_Finalize through MPI's
// profiling interface).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/mpi_communicator.h"
#include "kernels/cpu/bf16.h"

// ---- the MPI_Op's lifetime, through the profiling interface (PMPI) ---------------------------------
namespace {
int g_op_creates = 0;
int g_op_frees_in_finalize = 0;  // while MPI_Finalize runs and MPI is not yet finalized
int g_op_frees_elsewhere = 0;
bool g_in_finalize = false;
}  // namespace

extern "C" int MPI_Op_create(MPI_User_function* user_fn, int commute, MPI_Op* op) {
  ++g_op_creates;
  return PMPI_Op_create(user_fn, commute, op);
}

extern "C" int MPI_Op_free(MPI_Op* op) {
  int finalized = 1;
  PMPI_Finalized(&finalized);
  if (g_in_finalize && !finalized) ++g_op_frees_in_finalize;
  else ++g_op_frees_elsewhere;
  return PMPI_Op_free(op);
}

extern "C" int MPI_Finalize() {
  g_in_finalize = true;
  const int rc = PMPI_Finalize();
  g_in_finalize = false;
  return rc;
}

namespace pb {
namespace {

using cpu::bf16_to_float;
using cpu::float_to_bf16;

uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t key(uint64_t seed, int rank, std::size_t i) {
  return mix(mix(mix(seed) ^ static_cast<uint64_t>(rank)) ^ static_cast<uint64_t>(i));
}
// Element i of rank `rank`'s buffer: fp32 in [-1, 1) with 24 random bits.
float rand_f32(uint64_t seed, int rank, std::size_t i) {
  return static_cast<float>(static_cast<int64_t>(key(seed, rank, i) >> 40) - (1 << 23)) * std::ldexp(1.0f, -23);
}
// Any 16-bit pattern (NaNs, infinities, denormals included): data movement must not care.
uint16_t rand_bits(uint64_t seed, int rank, std::size_t i) { return static_cast<uint16_t>(key(seed, rank, i) >> 48); }
// A small integer in [-4, 4]: every partial sum over ≤ 4 ranks is an integer ≤ 16 in magnitude, exact in bf16.
float small_int(uint64_t seed, int rank, std::size_t i) {
  return static_cast<float>(static_cast<int>(key(seed, rank, i) % 9) - 4);
}

TensorPtr bf16(std::vector<uint16_t>& v, std::size_t at = 0) { return TensorPtr{v.data(), DType::bf16} + at; }
ConstTensorPtr bf16(const std::vector<uint16_t>& v, std::size_t at = 0) {
  return ConstTensorPtr{v.data(), DType::bf16} + at;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const CommOpStats& op_stats(const Communicator& c, CommOp op) { return c.stats()[static_cast<int>(op)]; }

class CommDtypes : public ::testing::Test {
 protected:
  CommDtypes() : comm(MPI_COMM_WORLD), rank(comm.rank()), size(comm.size()) {}
  MpiCommunicator comm;
  const int rank, size;
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
};

// ---- fp32: as before --------------------------------------------------------------------------------
TEST_F(CommDtypes, Fp32SumsAsThePlainMpiCall) {
  for (const std::size_t n : {std::size_t{37}, std::size_t{100003}}) {
    comm.reset_stats();
    std::vector<float> x(n * size);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = rand_f32(1, rank, i);

    std::vector<float> got(x.begin(), x.begin() + n), want = got;
    comm.all_reduce(got.data(), n);
    MPI_Allreduce(MPI_IN_PLACE, want.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    EXPECT_TRUE(same_bits(got, want)) << "all_reduce, n = " << n;

    got.assign(x.begin(), x.begin() + n);
    comm.all_reduce_async(got.data(), n)->wait();
    want.assign(x.begin(), x.begin() + n);
    MPI_Request request;
    MPI_Iallreduce(MPI_IN_PLACE, want.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request);
    MPI_Wait(&request, MPI_STATUS_IGNORE);
    EXPECT_TRUE(same_bits(got, want)) << "all_reduce_async, n = " << n;

    std::vector<float> mx(x.begin(), x.begin() + n), mx_want = mx;
    comm.all_reduce_max(mx.data(), n);
    MPI_Allreduce(MPI_IN_PLACE, mx_want.data(), static_cast<int>(n), MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_TRUE(same_bits(mx, mx_want)) << "all_reduce_max, n = " << n;

    const float* send = x.data();  // const float*, as callers pass it
    got.assign(n, 0.0f);
    comm.reduce_scatter(send, got.data(), n);
    want.assign(n, 0.0f);
    MPI_Reduce_scatter_block(x.data(), want.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    EXPECT_TRUE(same_bits(got, want)) << "reduce_scatter, n = " << n;

    got.assign(n, 0.0f);
    comm.reduce_scatter_async(send, got.data(), n)->wait();
    want.assign(n, 0.0f);
    MPI_Ireduce_scatter_block(x.data(), want.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                              &request);
    MPI_Wait(&request, MPI_STATUS_IGNORE);
    EXPECT_TRUE(same_bits(got, want)) << "reduce_scatter_async, n = " << n;

    const int64_t bytes = static_cast<int64_t>(n * 4);
    EXPECT_EQ(op_stats(comm, CommOp::all_reduce).calls, 3);
    EXPECT_EQ(op_stats(comm, CommOp::all_reduce).bytes, 3 * bytes);
    EXPECT_EQ(op_stats(comm, CommOp::reduce_scatter).calls, 2);
    EXPECT_EQ(op_stats(comm, CommOp::reduce_scatter).bytes, 2 * bytes * size);
  }
}

TEST_F(CommDtypes, Fp32DataMovementIsExact) {
  const std::size_t n = 1001;
  comm.reset_stats();
  std::vector<float> mine(n);
  for (std::size_t i = 0; i < n; ++i) mine[i] = rand_f32(2, rank, i);
  auto value = [](int r, std::size_t i) { return rand_f32(2, r, i); };

  std::vector<float> all(n * size, -7.0f), want(n * size);
  for (int r = 0; r < size; ++r)
    for (std::size_t i = 0; i < n; ++i) want[r * n + i] = value(r, i);
  comm.all_gather(mine.data(), all.data(), n);
  EXPECT_TRUE(same_bits(all, want)) << "all_gather";
  all.assign(n * size, -7.0f);
  std::copy(mine.begin(), mine.end(), all.begin() + rank * n);
  comm.all_gather(all.data() + rank * n, all.data(), n);  // in place
  EXPECT_TRUE(same_bits(all, want)) << "all_gather in place";
  all.assign(n * size, -7.0f);
  comm.all_gather_async(mine.data(), all.data(), n)->wait();
  EXPECT_TRUE(same_bits(all, want)) << "all_gather_async";

  // all_to_all: block j of rank r's send is value(r, j·n + i); rank `rank` receives block `rank` of each.
  std::vector<float> send(n * size), recv(n * size);
  for (std::size_t i = 0; i < send.size(); ++i) send[i] = value(rank, i);
  comm.all_to_all(send.data(), recv.data(), n);
  for (int r = 0; r < size; ++r)
    for (std::size_t i = 0; i < n; ++i) want[r * n + i] = value(r, rank * n + i);
  EXPECT_TRUE(same_bits(recv, want)) << "all_to_all";

  // Point to point around the ring: blocking (even ranks send first), non-blocking, grouped.
  std::vector<float> from_prev(n), want_prev(n);
  for (std::size_t i = 0; i < n; ++i) want_prev[i] = value(prev, i);
  if (size > 1) {
    if (rank % 2 == 0) {
      comm.send(mine.data(), n, next, 5);
      comm.recv(from_prev.data(), n, prev, 5);
    } else {
      comm.recv(from_prev.data(), n, prev, 5);
      comm.send(mine.data(), n, next, 5);
    }
    EXPECT_TRUE(same_bits(from_prev, want_prev)) << "send/recv";
    from_prev.assign(n, 0.0f);
    Request r = comm.recv_async(from_prev.data(), n, prev, 6);
    Request s = comm.send_async(mine.data(), n, next, 6);
    r->wait();
    s->wait();
    EXPECT_TRUE(same_bits(from_prev, want_prev)) << "send_async/recv_async";
    from_prev.assign(n, 0.0f);
    comm.send_recv_async(mine.data(), next, from_prev.data(), prev, n, 7)->wait();
    EXPECT_TRUE(same_bits(from_prev, want_prev)) << "send_recv_async";
  }

  std::vector<float> b = mine;
  comm.broadcast(b.data(), n, size - 1);
  for (std::size_t i = 0; i < n; ++i) want_prev[i] = value(size - 1, i);
  EXPECT_TRUE(same_bits(b, want_prev)) << "broadcast";

  const int64_t bytes = static_cast<int64_t>(n * 4);
  const int p2p = size > 1 ? 3 : 0;
  EXPECT_EQ(op_stats(comm, CommOp::all_gather).bytes, 3 * bytes * size);
  EXPECT_EQ(op_stats(comm, CommOp::all_to_all).bytes, bytes * size);
  EXPECT_EQ(op_stats(comm, CommOp::send).calls, p2p);
  EXPECT_EQ(op_stats(comm, CommOp::send).bytes, p2p * bytes);
  EXPECT_EQ(op_stats(comm, CommOp::recv).calls, p2p);
  EXPECT_EQ(op_stats(comm, CommOp::recv).bytes, p2p * bytes);
  EXPECT_EQ(op_stats(comm, CommOp::broadcast).bytes, bytes);
}

// ---- bf16 data movement: bitwise ----------------------------------------------------------------------
TEST_F(CommDtypes, Bf16DataMovementIsBitwise) {
  const std::size_t n = 1001;
  comm.reset_stats();
  auto value = [](int r, std::size_t i) { return rand_bits(3, r, i); };
  std::vector<uint16_t> mine(n);
  for (std::size_t i = 0; i < n; ++i) mine[i] = value(rank, i);

  std::vector<uint16_t> all(n * size, 0xDEAD), want(n * size);
  for (int r = 0; r < size; ++r)
    for (std::size_t i = 0; i < n; ++i) want[r * n + i] = value(r, i);
  comm.all_gather(bf16(mine), bf16(all), n);
  EXPECT_EQ(all, want) << "all_gather";
  all.assign(n * size, 0xDEAD);
  std::copy(mine.begin(), mine.end(), all.begin() + rank * n);
  comm.all_gather(bf16(all, rank * n), bf16(all), n);  // in place: the element offset counts 2-byte elements
  EXPECT_EQ(all, want) << "all_gather in place";
  all.assign(n * size, 0xDEAD);
  comm.all_gather_async(bf16(mine), bf16(all), n)->wait();
  EXPECT_EQ(all, want) << "all_gather_async";
  all.assign(n * size, 0xDEAD);
  std::copy(mine.begin(), mine.end(), all.begin() + rank * n);
  comm.all_gather_async(bf16(all, rank * n), bf16(all), n)->wait();
  EXPECT_EQ(all, want) << "all_gather_async in place";

  std::vector<uint16_t> send(n * size), recv(n * size, 0xDEAD);
  for (std::size_t i = 0; i < send.size(); ++i) send[i] = value(rank, i);
  comm.all_to_all(bf16(send), bf16(recv), n);
  for (int r = 0; r < size; ++r)
    for (std::size_t i = 0; i < n; ++i) want[r * n + i] = value(r, rank * n + i);
  EXPECT_EQ(recv, want) << "all_to_all";

  std::vector<uint16_t> from_prev(n, 0xDEAD), want_prev(n);
  for (std::size_t i = 0; i < n; ++i) want_prev[i] = value(prev, i);
  if (size > 1) {
    if (rank % 2 == 0) {
      comm.send(bf16(mine), n, next, 5);
      comm.recv(bf16(from_prev), n, prev, 5);
    } else {
      comm.recv(bf16(from_prev), n, prev, 5);
      comm.send(bf16(mine), n, next, 5);
    }
    EXPECT_EQ(from_prev, want_prev) << "send/recv";
    from_prev.assign(n, 0xDEAD);
    Request r = comm.recv_async(bf16(from_prev), n, prev, 6);
    Request s = comm.send_async(bf16(mine), n, next, 6);
    r->wait();
    s->wait();
    EXPECT_EQ(from_prev, want_prev) << "send_async/recv_async";
    from_prev.assign(n, 0xDEAD);
    comm.send_recv_async(bf16(mine), next, bf16(from_prev), prev, n, 7)->wait();
    EXPECT_EQ(from_prev, want_prev) << "send_recv_async";
  }

  std::vector<uint16_t> b = mine;
  comm.broadcast(bf16(b), n, size - 1);
  for (std::size_t i = 0; i < n; ++i) want_prev[i] = value(size - 1, i);
  EXPECT_EQ(b, want_prev) << "broadcast";

  // /comm: count × 2 bytes.
  const int64_t bytes = static_cast<int64_t>(n * 2);
  const int p2p = size > 1 ? 3 : 0;
  EXPECT_EQ(op_stats(comm, CommOp::all_gather).calls, 4);
  EXPECT_EQ(op_stats(comm, CommOp::all_gather).bytes, 4 * bytes * size);
  EXPECT_EQ(op_stats(comm, CommOp::all_to_all).calls, 1);
  EXPECT_EQ(op_stats(comm, CommOp::all_to_all).bytes, bytes * size);
  EXPECT_EQ(op_stats(comm, CommOp::send).calls, p2p);
  EXPECT_EQ(op_stats(comm, CommOp::send).bytes, p2p * bytes);
  EXPECT_EQ(op_stats(comm, CommOp::recv).calls, p2p);
  EXPECT_EQ(op_stats(comm, CommOp::recv).bytes, p2p * bytes);
  EXPECT_EQ(op_stats(comm, CommOp::broadcast).calls, 1);
  EXPECT_EQ(op_stats(comm, CommOp::broadcast).bytes, bytes);
}

// ---- bf16 sums ----------------------------------------------------------------------------------------
// The four sums of `x` (size · n elements of this rank): all_reduce and all_reduce_async of its first n,
// reduce_scatter and reduce_scatter_async of all of it.
struct Sums {
  std::vector<uint16_t> all_reduce, all_reduce_async, reduce_scatter, reduce_scatter_async;
};
Sums bf16_sums(Communicator& comm, const std::vector<uint16_t>& x, std::size_t n) {
  Sums s;
  s.all_reduce.assign(x.begin(), x.begin() + n);
  comm.all_reduce(bf16(s.all_reduce), n);
  s.all_reduce_async.assign(x.begin(), x.begin() + n);
  comm.all_reduce_async(bf16(s.all_reduce_async), n)->wait();
  s.reduce_scatter.assign(n, 0xDEAD);
  comm.reduce_scatter(bf16(x), bf16(s.reduce_scatter), n);
  s.reduce_scatter_async.assign(n, 0xDEAD);
  comm.reduce_scatter_async(bf16(x), bf16(s.reduce_scatter_async), n)->wait();
  return s;
}

TEST_F(CommDtypes, Bf16SumsOfSmallIntegersAreExact) {
  for (const std::size_t n : {std::size_t{37}, std::size_t{100003}}) {
    comm.reset_stats();
    auto value = [](int r, std::size_t i) { return small_int(4, r, i); };
    std::vector<uint16_t> x(n * size);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float_to_bf16(value(rank, i));
    const Sums s = bf16_sums(comm, x, n);
    std::vector<uint16_t> want_ar(n), want_rs(n);
    for (std::size_t i = 0; i < n; ++i) {
      float ar = 0.0f, rs = 0.0f;
      for (int r = 0; r < size; ++r) {
        ar += value(r, i);
        rs += value(r, rank * n + i);
      }
      want_ar[i] = float_to_bf16(ar);
      want_rs[i] = float_to_bf16(rs);
    }
    EXPECT_EQ(s.all_reduce, want_ar) << "all_reduce, n = " << n;
    EXPECT_EQ(s.all_reduce_async, want_ar) << "all_reduce_async, n = " << n;
    EXPECT_EQ(s.reduce_scatter, want_rs) << "reduce_scatter, n = " << n;
    EXPECT_EQ(s.reduce_scatter_async, want_rs) << "reduce_scatter_async, n = " << n;

    const int64_t bytes = static_cast<int64_t>(n * 2);
    EXPECT_EQ(op_stats(comm, CommOp::all_reduce).calls, 2);
    EXPECT_EQ(op_stats(comm, CommOp::all_reduce).bytes, 2 * bytes);
    EXPECT_EQ(op_stats(comm, CommOp::reduce_scatter).calls, 2);
    EXPECT_EQ(op_stats(comm, CommOp::reduce_scatter).bytes, 2 * bytes * size);
  }
}

// Each of the size − 1 additions of an element rounds once to bf16: |error| ≤ 2^-8 of the partial sum,
// which is at most Σ|x| (grown by the earlier roundings, a factor < 1.02 for 4 ranks).
void expect_rounded_sum(const std::vector<uint16_t>& got, const std::vector<std::vector<float>>& terms,
                        const char* what, std::size_t n) {
  const std::size_t ranks = terms.size();
  int bad = 0;
  for (std::size_t i = 0; i < got.size() && bad < 5; ++i) {
    double exact = 0.0, magnitude = 0.0;
    float pair = 0.0f;
    for (std::size_t r = 0; r < ranks; ++r) {
      exact += terms[r][i];
      magnitude += std::fabs(terms[r][i]);
      pair += terms[r][i];
    }
    const double result = bf16_to_float(got[i]);
    if (ranks == 2) {  // one addition: exactly the fp32 sum of the pair, rounded once
      if (got[i] != float_to_bf16(pair)) {
        ++bad;
        ADD_FAILURE() << what << ", n = " << n << ", element " << i << ": " << result << " is not bf16(" << pair << ")";
      }
    }
    const double bound = (static_cast<double>(ranks) - 1) * std::ldexp(1.0, -8) * magnitude * 1.02;
    if (!(std::fabs(result - exact) <= bound)) {
      ++bad;
      ADD_FAILURE() << what << ", n = " << n << ", element " << i << ": " << result << " vs exact " << exact
                    << ", beyond " << bound;
    }
  }
}

TEST_F(CommDtypes, Bf16SumsOfRandomValuesRoundOncePerAddition) {
  for (const std::size_t n : {std::size_t{37}, std::size_t{100003}}) {
    comm.reset_stats();
    auto value = [](int r, std::size_t i) { return bf16_to_float(float_to_bf16(rand_f32(5, r, i))); };
    std::vector<uint16_t> x(n * size);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float_to_bf16(value(rank, i));
    const Sums s = bf16_sums(comm, x, n);

    std::vector<std::vector<float>> ar_terms(size, std::vector<float>(n)), rs_terms = ar_terms;
    for (int r = 0; r < size; ++r)
      for (std::size_t i = 0; i < n; ++i) {
        ar_terms[r][i] = value(r, i);
        rs_terms[r][i] = value(r, rank * n + i);
      }
    expect_rounded_sum(s.all_reduce, ar_terms, "all_reduce", n);
    expect_rounded_sum(s.all_reduce_async, ar_terms, "all_reduce_async", n);
    expect_rounded_sum(s.reduce_scatter, rs_terms, "reduce_scatter", n);
    expect_rounded_sum(s.reduce_scatter_async, rs_terms, "reduce_scatter_async", n);

    // Every rank holds the same bits of an all_reduce (replicas stay replicas).
    for (const auto* result : {&s.all_reduce, &s.all_reduce_async}) {
      std::vector<uint16_t> everyone(n * size);
      MPI_Allgather(result->data(), static_cast<int>(n), MPI_UINT16_T, everyone.data(), static_cast<int>(n),
                    MPI_UINT16_T, MPI_COMM_WORLD);
      for (int r = 0; r < size; ++r) {
        EXPECT_TRUE(std::equal(result->begin(), result->end(), everyone.begin() + r * n))
            << "rank " << r << "'s all_reduce differs from rank " << rank << "'s, n = " << n;
      }
    }
    // The same call again gives the same bits.
    const Sums again = bf16_sums(comm, x, n);
    EXPECT_EQ(again.all_reduce, s.all_reduce);
    EXPECT_EQ(again.all_reduce_async, s.all_reduce_async);
    EXPECT_EQ(again.reduce_scatter, s.reduce_scatter);
    EXPECT_EQ(again.reduce_scatter_async, s.reduce_scatter_async);

    EXPECT_EQ(op_stats(comm, CommOp::all_reduce).bytes, 4 * static_cast<int64_t>(n * 2));
    EXPECT_EQ(op_stats(comm, CommOp::reduce_scatter).bytes, 4 * static_cast<int64_t>(n * 2) * size);
  }
}

// The op serves every communicator: sub-communicators of split too.
TEST_F(CommDtypes, Bf16SumOnASplitCommunicator) {
  std::unique_ptr<Communicator> half = comm.split(rank % 2, rank);
  const std::size_t n = 513;
  std::vector<uint16_t> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = float_to_bf16(small_int(6, rank, i));
  half->all_reduce(bf16(x), n);
  std::vector<uint16_t> want(n);
  for (std::size_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int r = rank % 2; r < size; r += 2) sum += small_int(6, r, i);
    want[i] = float_to_bf16(sum);
  }
  EXPECT_EQ(x, want);
  EXPECT_EQ(op_stats(*half, CommOp::all_reduce).bytes, static_cast<int64_t>(n * 2));
  EXPECT_EQ(op_stats(comm, CommOp::all_reduce).calls, 0);
}

// ---- mismatched dtypes --------------------------------------------------------------------------------
TEST_F(CommDtypes, MismatchedDtypesThrowBeforeAnythingHappens) {
  const std::size_t n = 8;
  std::vector<float> f(n * size, 1.0f);
  std::vector<uint16_t> h(n * size, float_to_bf16(1.0f));
  comm.reset_stats();
  // Both ways round: fp32 send with bf16 recv, and bf16 send with fp32 recv.
  EXPECT_THROW(comm.reduce_scatter(f.data(), bf16(h), n), std::invalid_argument);
  EXPECT_THROW(comm.reduce_scatter(bf16(h), f.data(), n), std::invalid_argument);
  EXPECT_THROW(comm.reduce_scatter_async(f.data(), bf16(h), n), std::invalid_argument);
  EXPECT_THROW(comm.reduce_scatter_async(bf16(h), f.data(), n), std::invalid_argument);
  EXPECT_THROW(comm.all_gather(f.data(), bf16(h), n), std::invalid_argument);
  EXPECT_THROW(comm.all_gather(bf16(h), f.data(), n), std::invalid_argument);
  EXPECT_THROW(comm.all_gather_async(f.data(), bf16(h), n), std::invalid_argument);
  EXPECT_THROW(comm.all_gather_async(bf16(h), f.data(), n), std::invalid_argument);
  EXPECT_THROW(comm.all_to_all(f.data(), bf16(h), n), std::invalid_argument);
  EXPECT_THROW(comm.all_to_all(bf16(h), f.data(), n), std::invalid_argument);
  EXPECT_THROW(comm.send_recv_async(f.data(), next, bf16(h), prev, n, 9), std::invalid_argument);
  EXPECT_THROW(comm.send_recv_async(bf16(h), next, f.data(), prev, n, 9), std::invalid_argument);
  for (int op = 0; op < kNumCommOps; ++op) {
    EXPECT_EQ(comm.stats()[op].calls, 0) << comm_op_name(static_cast<CommOp>(op));
    EXPECT_EQ(comm.stats()[op].bytes, 0) << comm_op_name(static_cast<CommOp>(op));
  }
  // Nothing was posted: the next exchange on the same tag receives what is sent now.
  std::vector<uint16_t> got(n, 0), mine(n, static_cast<uint16_t>(rank));
  comm.send_recv_async(bf16(mine), next, bf16(got), prev, n, 9)->wait();
  EXPECT_EQ(got, std::vector<uint16_t>(n, static_cast<uint16_t>(prev)));
  comm.barrier();
}

// Rank 0 prints as GoogleTest does; the other ranks print only their failures, under their rank.
class RankFailurePrinter final : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.summary());
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace pb

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new pb::RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();

  // The bf16 sum's op: created at most once, however many communicators and calls used it, and freed
  // exactly once, inside MPI_Finalize while MPI was still initialised.
  if (g_op_creates > 1 || g_op_frees_in_finalize != g_op_creates || g_op_frees_elsewhere != 0) {
    std::fprintf(stderr, "[rank %d] MPI_Op lifetime: %d created, %d freed inside MPI_Finalize, %d freed elsewhere\n",
                 rank, g_op_creates, g_op_frees_in_finalize, g_op_frees_elsewhere);
    failed = 1;
  } else if (rank == 0) {
    std::printf("MPI_Op of the bf16 sum: %d created, freed inside MPI_Finalize\n", g_op_creates);
  }
  return failed;
}
