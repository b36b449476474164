// The Communicator: the collectives and point-to-point calls every strategy uses, on backend
// buffers, with calls, bytes and time accounted per operation (SPEC section 6, /comm).
//
// Buffers are TensorPtr / ConstTensorPtr: backend memory with its dtype (kernels/dtype.h), fp32 or
// bf16; a float* converts implicitly to an fp32 one. Counts are in elements of that dtype. The send
// and receive buffers of one call have the same dtype (std::invalid_argument otherwise, before
// anything is sent or accounted); a null buffer takes the other's dtype. bf16 data movement
// (all_gather, all_to_all, send, recv, broadcast) is bitwise. A bf16 sum (all_reduce, reduce_scatter)
// is carried out in bf16 on the wire, as NCCL does: each pairwise addition is done in fp32 and rounded
// to bf16 (nearest even), in the reduction order the library chooses, so it is not the fp32 sum
// rounded once (MPI: MpiCommunicator's user-defined op; NCCL: ncclBfloat16).
//
// Bytes are this rank's buffer size per call (the nccl-tests "size" convention, not bus bandwidth),
// count × dtype_bytes(dtype), which is also what goes on the wire: all_reduce and broadcast count the
// buffer, reduce_scatter and all_gather the full (unsharded) buffer, all_to_all the send buffer, send
// and recv the message. Time is what the calling rank spent inside the call, plus, for a non-blocking
// call, the time spent waiting on its request.
// Host-side control values (loss, flags, metadata) go through the *_host calls, which are not
// accounted: /comm describes the strategy's data movement only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/dtype.h"

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
  virtual void all_reduce(TensorPtr buf, std::size_t count) = 0;
  // In-place maximum over the group (vocabulary-parallel softmax statistics: fp32 only).
  virtual void all_reduce_max(float* buf, std::size_t count) = 0;
  virtual Request all_reduce_async(TensorPtr buf, std::size_t count) = 0;
  // recv (recv_count) = this rank's block of Σ send (size · recv_count).
  virtual void reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) = 0;
  virtual Request reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) = 0;
  // recv (size · send_count) = every rank's send, in rank order. In place when send is this rank's
  // block of recv.
  virtual void all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) = 0;
  virtual Request all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) = 0;
  // Block j of send (count_per_peer each) goes to rank j; block i of recv comes from rank i.
  virtual void all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) = 0;
  virtual void send(ConstTensorPtr buf, std::size_t count, int peer, int tag) = 0;
  virtual void recv(TensorPtr buf, std::size_t count, int peer, int tag) = 0;
  virtual Request send_async(ConstTensorPtr buf, std::size_t count, int peer, int tag) = 0;
  virtual Request recv_async(TensorPtr buf, std::size_t count, int peer, int tag) = 0;
  // One hop of a ring: sends `send` (count) to rank `to` and receives `recv` (count) from rank `from`,
  // as one request; accounted as a send and a recv. The default posts both non-blocking calls; NCCL
  // groups them, since two ungrouped NCCL calls on one stream wait for each other around a ring.
  virtual Request send_recv_async(ConstTensorPtr send, int to, TensorPtr recv, int from, std::size_t count,
                                  int tag);
  virtual void broadcast(TensorPtr buf, std::size_t count, int root) = 0;
  virtual void barrier() = 0;

  // A sub-communicator of the ranks with the same color, ordered by key (MPI_Comm_split).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Control values on the host, not accounted.
  virtual void all_reduce_host(double* values, int count, HostReduce op) = 0;
  virtual void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) = 0;

  // Completes the accounting of calls timed on the device after they return (NCCL's blocking
  // collectives read their events once complete, so the host does not wait for each); stats() calls it.
  virtual void settle() const {}
  const CommStats& stats() const {
    settle();
    return stats_;
  }
  void reset_stats() {
    settle();  // what was timed before the reset stays before it
    stats_ = CommStats{};
  }

 protected:
  // The dtype of a call's send and receive buffers: std::invalid_argument where they differ. A null
  // buffer (nothing to send or receive) takes the other's dtype.
  static DType common_dtype(ConstTensorPtr send, ConstTensorPtr recv, const char* call);
  // Adds one call of `count` elements of `dtype` to op's account and returns it.
  CommOpStats& account(CommOp op, std::size_t count, DType dtype);

  mutable CommStats stats_{};  // mutable: a decorator's settle() copies its inner communicator's
};

}  // namespace pb
