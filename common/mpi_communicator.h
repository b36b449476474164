// The Communicator over an MPI communicator, for buffers the host can address (the CPU backend).
//
// fp32 goes as MPI_FLOAT and sums with MPI_SUM. bf16 goes as MPI_UINT16_T (its bits), and sums with a
// user-defined commutative MPI_Op that adds each pair in fp32 and rounds the result to bf16 (nearest
// even): bf16 on the wire, as NCCL reduces bf16. Each pairwise addition rounds, in the order MPI's
// algorithm combines the ranks' contributions, so a bf16 sum is not the fp32 sum rounded once; with
// MPICH it is deterministic for a fixed number of ranks (and message size), and every rank of an
// all_reduce gets the same bits. The op is created on first use and freed inside MPI_Finalize (an
// attribute of MPI_COMM_SELF, whose deletion is the first thing MPI_Finalize does), so it outlives
// every MpiCommunicator that may still use it and is never freed after MPI_Finalize.
#pragma once

#include <mpi.h>

#include "common/communicator.h"

namespace pb {

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` unless it is MPI_COMM_WORLD.
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  MPI_Comm handle() const { return comm_; }

  void all_reduce(TensorPtr buf, std::size_t count) override;
  Request all_reduce_async(TensorPtr buf, std::size_t count) override;
  void all_reduce_max(float* buf, std::size_t count) override;
  void reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override;
  Request reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override;
  void all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override;
  Request all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override;
  void all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) override;
  void send(ConstTensorPtr buf, std::size_t count, int peer, int tag) override;
  void recv(TensorPtr buf, std::size_t count, int peer, int tag) override;
  Request send_async(ConstTensorPtr buf, std::size_t count, int peer, int tag) override;
  Request recv_async(TensorPtr buf, std::size_t count, int peer, int tag) override;
  void broadcast(TensorPtr buf, std::size_t count, int root) override;
  void barrier() override;
  std::unique_ptr<Communicator> split(int color, int key) override;
  void all_reduce_host(double* values, int count, HostReduce op) override;
  void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) override;

 private:
  Request make_request(MPI_Request request, CommOp op, double issue_time);
  const void* gather_source(ConstTensorPtr send, ConstTensorPtr recv, std::size_t send_count) const;

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace pb
