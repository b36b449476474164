#include "common/mpi_communicator.h"

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/errors.h"
#include "kernels/cpu/bf16.h"

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

DType Communicator::common_dtype(ConstTensorPtr send, ConstTensorPtr recv, const char* call) {
  if (!send) return recv.dtype();
  if (!recv) return send.dtype();
  if (send.dtype() != recv.dtype()) {
    throw std::invalid_argument(std::string("Communicator::") + call + ": send buffer is " + dtype_name(send.dtype()) +
                                ", receive buffer is " + dtype_name(recv.dtype()) + " (they must have one dtype)");
  }
  return send.dtype();
}

CommOpStats& Communicator::account(CommOp op, std::size_t count, DType dtype) {
  CommOpStats& s = stats_[static_cast<int>(op)];
  s.calls += 1;
  s.bytes += static_cast<int64_t>(count * dtype_bytes(dtype));
  return s;
}

Request Communicator::send_recv_async(ConstTensorPtr send, int to, TensorPtr recv, int from, std::size_t count,
                                      int tag) {
  common_dtype(send, recv, "send_recv_async");  // before either half is posted
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

MPI_Datatype mpi_type(DType dtype) { return dtype == DType::f32 ? MPI_FLOAT : MPI_UINT16_T; }

// The bf16 sum: inout[i] = bf16(fp32(in[i]) + fp32(inout[i])), rounded to nearest even. Commutative
// (fp32 addition is, and so is rounding its result), not associative: MPI may combine the ranks'
// contributions in any order, and each combination rounds.
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype* /*type: MPI_UINT16_T*/) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  const int n = *len;
  for (int i = 0; i < n; ++i) b[i] = cpu::float_to_bf16(cpu::bf16_to_float(a[i]) + cpu::bf16_to_float(b[i]));
}

// The MPI_Op of bf16_sum, created on first use. Its owner is MPI itself: the op is freed by the delete
// callback of an attribute on MPI_COMM_SELF, which MPI_Finalize runs first, while MPI is still whole
// (MPI standard, "Allowing User Functions at Process Termination"). So it is freed exactly once,
// before MPI_Finalize returns, whatever the order in which communicators are destroyed (a
// function-local static's destructor would run after MPI_Finalize, when MPI_Op_free is erroneous).
// Communication happens on one thread (MPI_THREAD_FUNNELED), so first use needs no lock.
MPI_Op g_bf16_sum = MPI_OP_NULL;

int free_bf16_sum(MPI_Comm /*comm*/, int /*keyval*/, void* /*value*/, void* /*extra*/) {
  if (g_bf16_sum != MPI_OP_NULL) MPI_Op_free(&g_bf16_sum);  // leaves MPI_OP_NULL
  return MPI_SUCCESS;
}

MPI_Op bf16_sum_op() {
  if (g_bf16_sum == MPI_OP_NULL) {
    PB_MPI_CHECK(MPI_Op_create(&bf16_sum, /*commute=*/1, &g_bf16_sum));
    int keyval = MPI_KEYVAL_INVALID;
    PB_MPI_CHECK(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &free_bf16_sum, &keyval, nullptr));
    PB_MPI_CHECK(MPI_Comm_set_attr(MPI_COMM_SELF, keyval, nullptr));
    PB_MPI_CHECK(MPI_Comm_free_keyval(&keyval));  // the attribute set with it lives on
  }
  return g_bf16_sum;
}

MPI_Op sum_op(DType dtype) { return dtype == DType::f32 ? MPI_SUM : bf16_sum_op(); }

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

Request MpiCommunicator::make_request(MPI_Request request, CommOp op, double issue_time) {
  CommOpStats& s = stats_[static_cast<int>(op)];
  s.time_s += MPI_Wtime() - issue_time;
  return std::make_unique<MpiRequest>(request, &s);
}

void MpiCommunicator::all_reduce(TensorPtr buf, std::size_t count) {
  const DType t = buf.dtype();
  ScopedTime timer(account(CommOp::all_reduce, count, t));
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf.data(), as_int_count(count), mpi_type(t), sum_op(t), comm_));
}

void MpiCommunicator::all_reduce_max(float* buf, std::size_t count) {
  ScopedTime timer(account(CommOp::all_reduce, count, DType::f32));
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, as_int_count(count), MPI_FLOAT, MPI_MAX, comm_));
}

Request MpiCommunicator::all_reduce_async(TensorPtr buf, std::size_t count) {
  const DType t = buf.dtype();
  account(CommOp::all_reduce, count, t);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf.data(), as_int_count(count), mpi_type(t), sum_op(t), comm_,
                              &request));
  return make_request(request, CommOp::all_reduce, t0);
}

void MpiCommunicator::reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) {
  const DType t = common_dtype(send, recv, "reduce_scatter");
  ScopedTime timer(account(CommOp::reduce_scatter, recv_count * size_, t));
  PB_MPI_CHECK(MPI_Reduce_scatter_block(send.data(), recv.data(), as_int_count(recv_count), mpi_type(t), sum_op(t),
                                        comm_));
}

Request MpiCommunicator::reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) {
  const DType t = common_dtype(send, recv, "reduce_scatter_async");
  account(CommOp::reduce_scatter, recv_count * size_, t);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Ireduce_scatter_block(send.data(), recv.data(), as_int_count(recv_count), mpi_type(t),
                                         sum_op(t), comm_, &request));
  return make_request(request, CommOp::reduce_scatter, t0);
}

// An all-gather whose send buffer is this rank's block of recv runs in place (MPI_IN_PLACE).
const void* MpiCommunicator::gather_source(ConstTensorPtr send, ConstTensorPtr recv, std::size_t send_count) const {
  if (!recv) return send.data();
  const ConstTensorPtr mine = recv + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(rank_) * send_count);
  return send.data() == mine.data() ? MPI_IN_PLACE : send.data();
}

void MpiCommunicator::all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) {
  const DType t = common_dtype(send, recv, "all_gather");
  ScopedTime timer(account(CommOp::all_gather, send_count * size_, t));
  PB_MPI_CHECK(MPI_Allgather(gather_source(send, recv, send_count), as_int_count(send_count), mpi_type(t),
                             recv.data(), as_int_count(send_count), mpi_type(t), comm_));
}

Request MpiCommunicator::all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) {
  const DType t = common_dtype(send, recv, "all_gather_async");
  account(CommOp::all_gather, send_count * size_, t);
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Iallgather(gather_source(send, recv, send_count), as_int_count(send_count), mpi_type(t),
                              recv.data(), as_int_count(send_count), mpi_type(t), comm_, &request));
  return make_request(request, CommOp::all_gather, t0);
}

void MpiCommunicator::all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) {
  const DType t = common_dtype(send, recv, "all_to_all");
  ScopedTime timer(account(CommOp::all_to_all, count_per_peer * size_, t));
  PB_MPI_CHECK(MPI_Alltoall(send.data(), as_int_count(count_per_peer), mpi_type(t), recv.data(),
                            as_int_count(count_per_peer), mpi_type(t), comm_));
}

void MpiCommunicator::send(ConstTensorPtr buf, std::size_t count, int peer, int tag) {
  ScopedTime timer(account(CommOp::send, count, buf.dtype()));
  PB_MPI_CHECK(MPI_Send(buf.data(), as_int_count(count), mpi_type(buf.dtype()), peer, tag, comm_));
}

void MpiCommunicator::recv(TensorPtr buf, std::size_t count, int peer, int tag) {
  ScopedTime timer(account(CommOp::recv, count, buf.dtype()));
  PB_MPI_CHECK(MPI_Recv(buf.data(), as_int_count(count), mpi_type(buf.dtype()), peer, tag, comm_,
                        MPI_STATUS_IGNORE));
}

Request MpiCommunicator::send_async(ConstTensorPtr buf, std::size_t count, int peer, int tag) {
  account(CommOp::send, count, buf.dtype());
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Isend(buf.data(), as_int_count(count), mpi_type(buf.dtype()), peer, tag, comm_, &request));
  return make_request(request, CommOp::send, t0);
}

Request MpiCommunicator::recv_async(TensorPtr buf, std::size_t count, int peer, int tag) {
  account(CommOp::recv, count, buf.dtype());
  const double t0 = MPI_Wtime();
  MPI_Request request;
  PB_MPI_CHECK(MPI_Irecv(buf.data(), as_int_count(count), mpi_type(buf.dtype()), peer, tag, comm_, &request));
  return make_request(request, CommOp::recv, t0);
}

void MpiCommunicator::broadcast(TensorPtr buf, std::size_t count, int root) {
  ScopedTime timer(account(CommOp::broadcast, count, buf.dtype()));
  PB_MPI_CHECK(MPI_Bcast(buf.data(), as_int_count(count), mpi_type(buf.dtype()), root, comm_));
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
