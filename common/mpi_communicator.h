// The Communicator over an MPI communicator, for buffers the host can address (the CPU backend).
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

  void all_reduce(float* buf, std::size_t count) override;
  Request all_reduce_async(float* buf, std::size_t count) override;
  void all_reduce_max(float* buf, std::size_t count) override;
  void reduce_scatter(const float* send, float* recv, std::size_t recv_count) override;
  Request reduce_scatter_async(const float* send, float* recv, std::size_t recv_count) override;
  void all_gather(const float* send, float* recv, std::size_t send_count) override;
  Request all_gather_async(const float* send, float* recv, std::size_t send_count) override;
  void all_to_all(const float* send, float* recv, std::size_t count_per_peer) override;
  void send(const float* buf, std::size_t count, int peer, int tag) override;
  void recv(float* buf, std::size_t count, int peer, int tag) override;
  Request send_async(const float* buf, std::size_t count, int peer, int tag) override;
  Request recv_async(float* buf, std::size_t count, int peer, int tag) override;
  void broadcast(float* buf, std::size_t count, int root) override;
  void barrier() override;
  std::unique_ptr<Communicator> split(int color, int key) override;
  void all_reduce_host(double* values, int count, HostReduce op) override;
  void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) override;

 private:
  Request make_request(MPI_Request request, CommOp op, double issue_time);
  CommOpStats& account(CommOp op, std::size_t count);
  const void* gather_source(const float* send, const float* recv, std::size_t send_count) const;

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace pb
