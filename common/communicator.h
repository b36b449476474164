// The Communicator: the collectives and point-to-point calls every strategy uses, on backend
// buffers, with calls, bytes and time accounted per operation (SPEC section 6, /comm).
//
// Bytes are this rank's buffer size per call (the nccl-tests "size" convention, not bus bandwidth):
// all_reduce and broadcast count the buffer, reduce_scatter and all_gather the full (unsharded)
// buffer, all_to_all the send buffer, send and recv the message. Time is what the calling rank spent
// inside the call, plus, for a non-blocking call, the time spent waiting on its request.
// Host-side control values (loss, flags, metadata) go through the *_host calls, which are not
// accounted: /comm describes the strategy's data movement only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pb {

enum class CommOp : int { all_reduce = 0, reduce_scatter, all_gather, all_to_all, send, recv, broadcast };
inline constexpr int kNumCommOps = 7;
const char* comm_op_name(CommOp op);

struct CommOpStats {
  int64_t calls = 0;
  int64_t bytes = 0;
  double time_s = 0.0;
};
using CommStats = std::array<CommOpStats, kNumCommOps>;

class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;  // blocks until complete; idempotent
  virtual bool test() = 0;  // drives progress; true once complete
};
using Request = std::unique_ptr<CommRequest>;

enum class HostReduce { sum, max };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "nccl"

  // In-place sum over the group.
  virtual void all_reduce(float* buf, std::size_t count) = 0;
  // In-place maximum over the group (vocabulary-parallel softmax).
  virtual void all_reduce_max(float* buf, std::size_t count) = 0;
  virtual Request all_reduce_async(float* buf, std::size_t count) = 0;
  // recv (recv_count) = this rank's block of Σ send (size · recv_count).
  virtual void reduce_scatter(const float* send, float* recv, std::size_t recv_count) = 0;
  virtual Request reduce_scatter_async(const float* send, float* recv, std::size_t recv_count) = 0;
  // recv (size · send_count) = every rank's send, in rank order. In place when send is this rank's
  // block of recv.
  virtual void all_gather(const float* send, float* recv, std::size_t send_count) = 0;
  virtual Request all_gather_async(const float* send, float* recv, std::size_t send_count) = 0;
  // Block j of send (count_per_peer each) goes to rank j; block i of recv comes from rank i.
  virtual void all_to_all(const float* send, float* recv, std::size_t count_per_peer) = 0;
  virtual void send(const float* buf, std::size_t count, int peer, int tag) = 0;
  virtual void recv(float* buf, std::size_t count, int peer, int tag) = 0;
  virtual Request send_async(const float* buf, std::size_t count, int peer, int tag) = 0;
  virtual Request recv_async(float* buf, std::size_t count, int peer, int tag) = 0;
  // One hop of a ring: sends `send` (count) to rank `to` and receives `recv` (count) from rank `from`,
  // as one request; accounted as a send and a recv. The default posts both non-blocking calls; NCCL
  // groups them, since two ungrouped NCCL calls on one stream wait for each other around a ring.
  virtual Request send_recv_async(const float* send, int to, float* recv, int from, std::size_t count, int tag);
  virtual void broadcast(float* buf, std::size_t count, int root) = 0;
  virtual void barrier() = 0;

  // A sub-communicator of the ranks with the same color, ordered by key (MPI_Comm_split).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Control values on the host, not accounted.
  virtual void all_reduce_host(double* values, int count, HostReduce op) = 0;
  virtual void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) = 0;

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats{}; }

 protected:
  CommStats stats_{};
};

}  // namespace pb
