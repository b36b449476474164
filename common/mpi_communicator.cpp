#include "common/mpi_communicator.h"

#include <climits>

#include "common/errors.h"

namespace pb {

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::all_reduce: return "all_reduce";
    case CommOp::reduce_scatter: return "reduce_scatter";
    case CommOp::all_gather: return "all_gather";
    case CommOp::all_to_all: return "all_to_all";
    case CommOp::send: return "send";
    case CommOp::recv: return "recv";
    case CommOp::broadcast: return "broadcast";
  }
  return "unknown";
}

namespace {

// Two requests that complete together.
class PairRequest final : public CommRequest {
 public:
  PairRequest(Request first, Request second) : first_(std::move(first)), second_(std::move(second)) {}
  void wait() override {
    first_->wait();
    second_->wait();
  }
  bool test() override {
    const bool a = first_->test();  // both driven, whatever the first says
    const bool b = second_->test();
    return a && b;
  }

 private:
  Request first_, second_;
};

}  // namespace

Request Communicator::send_recv_async(const float* send, int to, float* recv, int from, std::size_t count, int tag) {
  Request r = recv_async(recv, count, from, tag);
  Request s = send_async(send, count, to, tag);
  return std::make_unique<PairRequest>(std::move(r), std::move(s));
}

namespace {

int as_int_count(std::size_t count) {
  if (count > static_cast<std::size_t>(INT_MAX)) {
    abort_job(kExitRuntime, __FILE__, __LINE__, "MPI count", "message of " + std::to_string(count) +
              " elements exceeds the MPI int count limit");
  }
  return static_cast<int>(count);
}

// A non-blocking MPI call; the time spent waiting is added to its operation's account.
class MpiRequest final : public CommRequest {
 public:
  MpiRequest(MPI_Request request, CommOpStats* stats) : request_(request), stats_(stats) {}
  ~MpiRequest() override {
    if (!done_) wait();
  }
  void wait() override {
    if (done_) return;
    const double t0 = MPI_Wtime();
    PB_MPI_CHECK(MPI_Wait(&request_, MPI_STATUS_IGNORE));
    stats_->time_s += MPI_Wtime() - t0;
    done_ = true;
  }
  bool test() override {
    if (done_) return true;
    const double t0 = MPI_Wtime();
    int flag = 0;
    PB_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    stats_->time_s += MPI_Wtime() - t0;
    done_ = flag != 0;
    return done_;
  }

 private:
  MPI_Request request_;
  CommOpStats* stats_;
  bool done_ = false;
};

// Adds the elapsed time of a blocking call to its account when it goes out of scope.
class ScopedTime {
 public:
  explicit ScopedTime(CommOpStats& stats) : stats_(stats), t0_(MPI_Wtime()) {}
  ~ScopedTime() { stats_.time_s += MPI_Wtime() - t0_; }

 private:
  CommOpStats& stats_;
  double t0_;
};

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  PB_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  PB_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

CommOpStats& MpiCommunicator::account(CommOp op, std::size_t count) {
  CommOpStats& s = stats_[static_cast<int>(op)];
  s.calls += 1;
  s.bytes += static_cast<int64_t>(count * sizeof(float));
  return s;
}

Request MpiCommunicator::make_request(MPI_Request request, CommOp op, double issue_time) {
  CommOpStats& s = stats_[static_cast<int>(op)];
  s.time_s += MPI_Wtime() - issue_time;
  return std::make_unique<MpiRequest>(request, &s);
}

void MpiCommunicator::all_reduce(float* buf, std::size_t count) {
  ScopedTime t(account(CommOp::all_reduce, count));
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, as_int_count(count), MPI_FLOAT, MPI_SUM, comm_));
}

void MpiCommunicator::all_reduce_max(float* buf, std::size_t count) {
  ScopedTime t(account(CommOp::all_reduce, count));
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, as_int_count(count), MPI_FLOAT, MPI_MAX, comm_));
}

Request MpiCommunicator::all_reduce_async(float* buf, std::size_t count) {
  account(CommOp::all_reduce, count);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, as_int_count(count), MPI_FLOAT, MPI_SUM, comm_, &request));
  return make_request(request, CommOp::all_reduce, t0);
}

void MpiCommunicator::reduce_scatter(const float* send, float* recv, std::size_t recv_count) {
  ScopedTime t(account(CommOp::reduce_scatter, recv_count * size_));
  PB_MPI_CHECK(MPI_Reduce_scatter_block(send, recv, as_int_count(recv_count), MPI_FLOAT, MPI_SUM, comm_));
}

Request MpiCommunicator::reduce_scatter_async(const float* send, float* recv, std::size_t recv_count) {
  account(CommOp::reduce_scatter, recv_count * size_);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, as_int_count(recv_count), MPI_FLOAT, MPI_SUM, comm_,
                                         &request));
  return make_request(request, CommOp::reduce_scatter, t0);
}

// An all-gather whose send buffer is this rank's block of recv runs in place (MPI_IN_PLACE).
const void* MpiCommunicator::gather_source(const float* send, const float* recv, std::size_t send_count) const {
  return send == recv + static_cast<std::size_t>(rank_) * send_count ? MPI_IN_PLACE : send;
}

void MpiCommunicator::all_gather(const float* send, float* recv, std::size_t send_count) {
  ScopedTime t(account(CommOp::all_gather, send_count * size_));
  PB_MPI_CHECK(MPI_Allgather(gather_source(send, recv, send_count), as_int_count(send_count), MPI_FLOAT, recv,
                             as_int_count(send_count), MPI_FLOAT, comm_));
}

Request MpiCommunicator::all_gather_async(const float* send, float* recv, std::size_t send_count) {
  account(CommOp::all_gather, send_count * size_);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Iallgather(gather_source(send, recv, send_count), as_int_count(send_count), MPI_FLOAT, recv,
                              as_int_count(send_count), MPI_FLOAT, comm_, &request));
  return make_request(request, CommOp::all_gather, t0);
}

void MpiCommunicator::all_to_all(const float* send, float* recv, std::size_t count_per_peer) {
  ScopedTime t(account(CommOp::all_to_all, count_per_peer * size_));
  PB_MPI_CHECK(MPI_Alltoall(send, as_int_count(count_per_peer), MPI_FLOAT, recv, as_int_count(count_per_peer),
                            MPI_FLOAT, comm_));
}

void MpiCommunicator::send(const float* buf, std::size_t count, int peer, int tag) {
  ScopedTime t(account(CommOp::send, count));
  PB_MPI_CHECK(MPI_Send(buf, as_int_count(count), MPI_FLOAT, peer, tag, comm_));
}

void MpiCommunicator::recv(float* buf, std::size_t count, int peer, int tag) {
  ScopedTime t(account(CommOp::recv, count));
  PB_MPI_CHECK(MPI_Recv(buf, as_int_count(count), MPI_FLOAT, peer, tag, comm_, MPI_STATUS_IGNORE));
}

Request MpiCommunicator::send_async(const float* buf, std::size_t count, int peer, int tag) {
  account(CommOp::send, count);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Isend(buf, as_int_count(count), MPI_FLOAT, peer, tag, comm_, &request));
  return make_request(request, CommOp::send, t0);
}

Request MpiCommunicator::recv_async(float* buf, std::size_t count, int peer, int tag) {
  account(CommOp::recv, count);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Irecv(buf, as_int_count(count), MPI_FLOAT, peer, tag, comm_, &request));
  return make_request(request, CommOp::recv, t0);
}

void MpiCommunicator::broadcast(float* buf, std::size_t count, int root) {
  ScopedTime t(account(CommOp::broadcast, count));
  PB_MPI_CHECK(MPI_Bcast(buf, as_int_count(count), MPI_FLOAT, root, comm_));
}

void MpiCommunicator::barrier() { PB_MPI_CHECK(MPI_Barrier(comm_)); }

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MPI_Comm sub;
  PB_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  return std::make_unique<MpiCommunicator>(sub);
}

void MpiCommunicator::all_reduce_host(double* values, int count, HostReduce op) {
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, op == HostReduce::sum ? MPI_SUM : MPI_MAX,
                             comm_));
}

void MpiCommunicator::all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) {
  PB_MPI_CHECK(MPI_Allgather(send, as_int_count(bytes_per_rank), MPI_BYTE, recv, as_int_count(bytes_per_rank),
                             MPI_BYTE, comm_));
}

}  // namespace pb
