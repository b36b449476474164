#include "common/device_communicators.h"

#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/errors.h"
#include "common/mpi_communicator.h"
#include "common/watchdog.h"
#include "kernels/cuda/cuda_backend.h"

namespace pb {
namespace {

void nccl_check(ncclResult_t status, const char* call, const char* file, int line) {
  if (status == ncclSuccess) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call +
                                   " failed: " + ncclGetErrorString(status));
}
#define PB_NCCL_CHECK(call) nccl_check((call), #call, __FILE__, __LINE__)

ncclDataType_t nccl_type(DType dtype) { return dtype == DType::f32 ? ncclFloat : ncclBfloat16; }

// ---- NCCL ----------------------------------------------------------------------------------------
// What a NCCL communicator shares with its requests and its watchdog: the communicator, its failure,
// and the operations queued but not yet seen complete.
//
// Each operation leaves an event pair in `pending` (start, stop; stop only for a non-blocking call,
// whose time is the host's). Nothing waits for them: the host harvests the completed ones, in order, at
// each later call and when the statistics are read (a blocking collective's time is still its GPU
// time, read from its events, without a host wait per collective). The watchdog (common/watchdog.h)
// looks every 100 ms at the communicator's asynchronous error (ncclCommGetAsyncError), at a NCCL call
// the host has been inside for too long (an enqueue that blocks, as a connection to a dead peer can),
// and at the oldest unfinished operation, against the deadline of --distributed-timeout-minutes. On
// any of them it aborts the communicator (ncclCommAbort: its kernels end and the stream drains) and
// marks the device failed (cuda_fail_async), so the host's next wait, or its next call here, ends the
// run with exit 3. NCCL calls and aborts exclude each other (nccl_calls()): an abort never frees a
// communicator under a call. When the host is stuck inside a call, or the process has not ended within
// kGraceS of a failure, the watchdog's timer ends it with exit 3.
constexpr double kGraceS = 30.0;

double steady_s() {  // the watchdog's clock (MPI_Wtime is for the thread that initialised MPI)
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

[[noreturn]] void end_process(const std::string& why) {
  std::fprintf(stderr, "parabench: %s; ending the process (exit %d)\n", why.c_str(), kExitRuntime);
  std::fflush(stderr);
  std::_Exit(kExitRuntime);
}

// Once a failure is known: the process ends kGraceS later whatever it is doing (an abort or a
// destruction that blocks inside NCCL, a host blocked in MPI); the host normally ends the run first.
void start_grace_timer(const std::string& why) {
  static std::once_flag once;
  std::call_once(once, [&] {
    std::thread([why] {
      std::this_thread::sleep_for(std::chrono::duration<double>(kGraceS));
      end_process(why + "; the run did not end within " + std::to_string(static_cast<int>(kGraceS)) +
                  " s of it");
    }).detach();
  });
}

// NCCL calls of all of the process's communicators (one GPU per process) and their aborts exclude each
// other: NCCL does not take operations on communicators of one device from several threads at once.
std::timed_mutex& nccl_calls() {
  static std::timed_mutex calls;
  return calls;
}

struct NcclState {
  struct Pending {
    cudaEvent_t start;  // null: a non-blocking call (timed on the host)
    cudaEvent_t stop;
    CommOpStats* stats;
    std::string what;
    double enqueued_s;  // steady_s()
  };

  ncclComm_t comm = nullptr;
  int device = 0;
  int size = 0;
  double timeout_s = 600.0;
  std::mutex mutex;         // pending, in_call
  std::deque<Pending> pending;
  std::string in_call;      // the NCCL call the host is inside ("" when none), since in_call_s
  double in_call_s = 0.0;
  std::atomic<bool> aborted{false};
  std::string failure;  // set before aborted

  // This communicator aborted, or the device failed otherwise (another communicator's abort): exit 3.
  void throw_if_aborted() const {
    if (aborted.load()) throw RunError(kExitRuntime, failure);
    if (cuda_failed_async()) throw RunError(kExitRuntime, cuda_async_failure());
  }
  // The host's NCCL calls: `launch` under nccl_calls(), never on an aborted communicator.
  template <typename F>
  void call(const std::string& what, F&& launch) {
    std::lock_guard<std::timed_mutex> guard(nccl_calls());
    throw_if_aborted();
    {
      std::lock_guard<std::mutex> lock(mutex);
      in_call = what;
      in_call_s = steady_s();
    }
    try {
      launch(comm);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      in_call.clear();
      throw;
    }
    std::lock_guard<std::mutex> lock(mutex);
    in_call.clear();
  }
  void push(cudaEvent_t start, cudaEvent_t stop, CommOpStats* stats, std::string what) {
    std::lock_guard<std::mutex> lock(mutex);
    pending.push_back(Pending{start, stop, stats, std::move(what), steady_s()});
  }
  // An operation that failed to launch: its entry (the last) released untimed.
  void drop_last() {
    std::lock_guard<std::mutex> lock(mutex);
    if (pending.empty()) return;
    if (pending.back().start != nullptr) cudaEventDestroy(pending.back().start);
    cudaEventDestroy(pending.back().stop);
    pending.pop_back();
  }
  // Times and releases the completed operations at the front (all of them, waiting, when `all`).
  void harvest(bool all) {
    std::unique_lock<std::mutex> lock(mutex);
    while (!pending.empty()) {
      Pending& p = pending.front();
      cudaError_t status = cudaEventQuery(p.stop);
      if (status == cudaErrorNotReady) {
        if (!all) return;
        lock.unlock();  // the watchdog may abort meanwhile; the wait then ends with the stream
        status = cudaEventSynchronize(p.stop);
        lock.lock();
      }
      throw_if_aborted();
      PB_CUDA_CHECK(status);
      if (p.start != nullptr) {
        float ms = 0.0f;
        PB_CUDA_CHECK(cudaEventElapsedTime(&ms, p.start, p.stop));
        p.stats->time_s += ms * 1e-3;
        cudaEventDestroy(p.start);
      }
      cudaEventDestroy(p.stop);
      pending.pop_front();
    }
  }
  // The watchdog's look (its own thread).
  std::string check() {
    if (aborted.load()) return "";
    cudaSetDevice(device);
    std::lock_guard<std::mutex> lock(mutex);
    const std::string ranks = " on a communicator of " + std::to_string(size) + " ranks";
    ncclResult_t async = ncclSuccess;
    if (comm != nullptr && ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess &&
        async != ncclInProgress) {
      return std::string("NCCL failed") + ranks + ": " + ncclGetErrorString(async) +
             " (ncclCommGetAsyncError; NCCL_DEBUG=WARN tells more)";
    }
    const double now = steady_s();
    if (!in_call.empty()) {
      const std::string late = deadline_message("the host's call of NCCL " + in_call + ranks, in_call_s, now, timeout_s);
      if (!late.empty()) return late;
    }
    for (const Pending& p : pending) {
      const cudaError_t status = cudaEventQuery(p.stop);
      if (status == cudaSuccess) continue;
      if (status != cudaErrorNotReady) return "";  // a device fault: the host's next wait reports it
      return deadline_message("NCCL " + p.what + ranks, p.enqueued_s, now, timeout_s);
    }
    return "";
  }
  void abort(const std::string& why) {
    start_grace_timer(why);  // first: ncclCommAbort itself may block
    // Not under a call of the host's: a host stuck inside one cannot be reached, so the process ends.
    std::unique_lock<std::timed_mutex> guard(nccl_calls(), std::defer_lock);
    if (!guard.try_lock_for(std::chrono::seconds(2))) end_process(why + "; the host is stuck inside a NCCL call");
    {
      std::lock_guard<std::mutex> lock(mutex);
      failure = why + "; the communicator was aborted";
    }
    aborted.store(true);
    std::fprintf(stderr, "parabench: %s\n", failure.c_str());
    std::fflush(stderr);
    cuda_fail_async(failure);  // before the abort, which may block: the host's next wait or call ends the run
    if (comm != nullptr) ncclCommAbort(comm);
    // The host ends the run at its next wait or call (exit 3, the reason in the result file); should it
    // not (blocked elsewhere, in MPI say), the grace timer ends the process.
  }
};

// A non-blocking call on the communication stream; complete once `done` has fired, after which the
// compute stream is made to wait for it.
class NcclRequest final : public CommRequest {
 public:
  NcclRequest(cudaEvent_t done, cudaStream_t compute, CommOpStats* stats, std::shared_ptr<NcclState> state)
      : done_(done), compute_(compute), stats_(stats), state_(std::move(state)) {}
  ~NcclRequest() override {
    if (cuda_failed_async() || std::uncaught_exceptions() > 0) {  // unwinding a failure: no wait
      cudaEventDestroy(done_);
      return;
    }
    try {
      wait();  // a request is never left in flight
    } catch (const std::exception& e) {
      std::fprintf(stderr, "parabench: a NCCL request failed while being released: %s\n", e.what());
    }
    cudaEventDestroy(done_);
  }
  // An aborted communicator ends its kernels, so the wait ends too, and reports the failure.
  void wait() override {
    if (finished_) return;
    const double t0 = MPI_Wtime();
    const cudaError_t status = cudaEventSynchronize(done_);
    state_->throw_if_aborted();
    PB_CUDA_CHECK(status);
    finish(t0);
  }
  bool test() override {
    if (finished_) return true;
    state_->throw_if_aborted();
    const double t0 = MPI_Wtime();
    const cudaError_t status = cudaEventQuery(done_);
    if (status == cudaErrorNotReady) {
      stats_->time_s += MPI_Wtime() - t0;
      return false;
    }
    PB_CUDA_CHECK(status);
    finish(t0);
    return true;
  }

 private:
  void finish(double t0) {
    PB_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    stats_->time_s += MPI_Wtime() - t0;
    finished_ = true;
  }
  cudaEvent_t done_;
  cudaStream_t compute_;
  CommOpStats* stats_;
  std::shared_ptr<NcclState> state_;
  bool finished_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm comm, cudaStream_t compute, double timeout_s)
      : host_(comm), compute_(compute), state_(std::make_shared<NcclState>()) {
    PB_CUDA_CHECK(cudaGetDevice(&state_->device));
    state_->size = host_.size();
    state_->timeout_s = timeout_s;
    PB_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
    std::shared_ptr<NcclState> state = state_;
    // Watched from the start: an initialisation that never returns (a peer that never joins) ends too.
    watchdog_ = std::make_unique<Watchdog>(
        0.1, [state] { return state->check(); }, [state](const std::string& why) { state->abort(why); });
    ncclUniqueId id;
    if (host_.rank() == 0) PB_NCCL_CHECK(ncclGetUniqueId(&id));
    PB_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, host_.handle()));
    state_->call("ncclCommInitRank", [&](ncclComm_t) {
      ncclComm_t comm = nullptr;  // published once whole: the watchdog never sees one being built
      PB_NCCL_CHECK(ncclCommInitRank(&comm, host_.size(), id, host_.rank()));
      std::lock_guard<std::mutex> lock(state_->mutex);
      state_->comm = comm;
    });
  }
  // After a failure anywhere in the process (this or another communicator aborted, a device fault, an
  // exception unwinding the run), queued NCCL work may never finish: the communicator is aborted, not
  // drained. Otherwise its work is drained while the watchdog still watches, and then destroyed.
  ~NcclCommunicator() override {
    bool failing = cuda_failed_async() || std::uncaught_exceptions() > 0;
    if (!failing && !state_->aborted.load()) {
      try {
        PB_CUDA_CHECK(cudaStreamSynchronize(side_));
        state_->harvest(true);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "parabench: %s\n", e.what());
        failing = true;
      }
    }
    watchdog_.reset();  // no abort from it after this point
    if (!state_->aborted.load() && state_->comm != nullptr) {
      if (failing || cuda_failed_async()) {
        start_grace_timer("a NCCL communicator released after a failure");  // its abort may block
        std::lock_guard<std::timed_mutex> guard(nccl_calls());
        ncclCommAbort(state_->comm);
      } else {
        std::lock_guard<std::timed_mutex> guard(nccl_calls());
        ncclCommDestroy(state_->comm);
      }
    }
    for (const NcclState::Pending& p : state_->pending) {  // left by a failure
      if (p.start != nullptr) cudaEventDestroy(p.start);
      cudaEventDestroy(p.stop);
    }
    cudaStreamDestroy(side_);
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  std::string name() const override { return "nccl"; }
  // The blocking collectives' GPU times, once they have completed.
  void settle() const override { state_->harvest(true); }

  // bf16 sums are NCCL's own (ncclBfloat16): bf16 on the wire, each reduction step rounded to bf16.
  void all_reduce(TensorPtr buf, std::size_t count) override {
    const DType t = buf.dtype();
    blocking(CommOp::all_reduce, count, t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclAllReduce(buf.data(), buf.data(), count, nccl_type(t), ncclSum, c, s));
    });
  }
  void all_reduce_max(float* buf, std::size_t count) override {
    blocking(CommOp::all_reduce, count, DType::f32, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclFloat, ncclMax, c, s));
    });
  }
  Request all_reduce_async(TensorPtr buf, std::size_t count) override {
    const DType t = buf.dtype();
    return async(CommOp::all_reduce, count, t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclAllReduce(buf.data(), buf.data(), count, nccl_type(t), ncclSum, c, s));
    });
  }
  void reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    const DType t = common_dtype(send, recv, "reduce_scatter");
    blocking(CommOp::reduce_scatter, recv_count * size(), t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclReduceScatter(send.data(), recv.data(), recv_count, nccl_type(t), ncclSum, c, s));
    });
  }
  Request reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    const DType t = common_dtype(send, recv, "reduce_scatter_async");
    return async(CommOp::reduce_scatter, recv_count * size(), t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclReduceScatter(send.data(), recv.data(), recv_count, nccl_type(t), ncclSum, c, s));
    });
  }
  // In place when send is this rank's block of recv, which is NCCL's in-place convention too.
  void all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    const DType t = common_dtype(send, recv, "all_gather");
    blocking(CommOp::all_gather, send_count * size(), t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclAllGather(send.data(), recv.data(), send_count, nccl_type(t), c, s));
    });
  }
  Request all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    const DType t = common_dtype(send, recv, "all_gather_async");
    return async(CommOp::all_gather, send_count * size(), t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclAllGather(send.data(), recv.data(), send_count, nccl_type(t), c, s));
    });
  }
  void all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) override {
    const DType t = common_dtype(send, recv, "all_to_all");
    blocking(CommOp::all_to_all, count_per_peer * size(), t, [&](ncclComm_t c, cudaStream_t s) {
      const auto block = static_cast<std::ptrdiff_t>(count_per_peer);
      PB_NCCL_CHECK(ncclGroupStart());
      for (int peer = 0; peer < size(); ++peer) {
        PB_NCCL_CHECK(ncclSend((send + peer * block).data(), count_per_peer, nccl_type(t), peer, c, s));
        PB_NCCL_CHECK(ncclRecv((recv + peer * block).data(), count_per_peer, nccl_type(t), peer, c, s));
      }
      PB_NCCL_CHECK(ncclGroupEnd());
    });
  }
  // NCCL matches point-to-point calls by order, not by tag: callers keep the orders of both sides equal.
  void send(ConstTensorPtr buf, std::size_t count, int peer, int /*tag*/) override {
    blocking(CommOp::send, count, buf.dtype(), [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclSend(buf.data(), count, nccl_type(buf.dtype()), peer, c, s));
    });
  }
  void recv(TensorPtr buf, std::size_t count, int peer, int /*tag*/) override {
    blocking(CommOp::recv, count, buf.dtype(), [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclRecv(buf.data(), count, nccl_type(buf.dtype()), peer, c, s));
    });
  }
  Request send_async(ConstTensorPtr buf, std::size_t count, int peer, int /*tag*/) override {
    return async(CommOp::send, count, buf.dtype(), [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclSend(buf.data(), count, nccl_type(buf.dtype()), peer, c, s));
    });
  }
  Request recv_async(TensorPtr buf, std::size_t count, int peer, int /*tag*/) override {
    return async(CommOp::recv, count, buf.dtype(), [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclRecv(buf.data(), count, nccl_type(buf.dtype()), peer, c, s));
    });
  }
  // Grouped: every rank of a ring sends and receives at once (ungrouped, each call would wait for the
  // peer's matching call queued behind that peer's own).
  Request send_recv_async(ConstTensorPtr send, int to, TensorPtr recv, int from, std::size_t count,
                          int /*tag*/) override {
    const DType t = common_dtype(send, recv, "send_recv_async");
    account(CommOp::recv, count, t);  // its time is the send's: one grouped operation
    return async(CommOp::send, count, t, [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclGroupStart());
      PB_NCCL_CHECK(ncclSend(send.data(), count, nccl_type(t), to, c, s));
      PB_NCCL_CHECK(ncclRecv(recv.data(), count, nccl_type(t), from, c, s));
      PB_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void broadcast(TensorPtr buf, std::size_t count, int root) override {
    blocking(CommOp::broadcast, count, buf.dtype(), [&](ncclComm_t c, cudaStream_t s) {
      PB_NCCL_CHECK(ncclBroadcast(buf.data(), buf.data(), count, nccl_type(buf.dtype()), root, c, s));
    });
  }
  void barrier() override {
    PB_CUDA_CHECK(cudaStreamSynchronize(compute_));
    state_->throw_if_aborted();
    host_.barrier();
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub;
    PB_MPI_CHECK(MPI_Comm_split(host_.handle(), color, key, &sub));
    return std::make_unique<NcclCommunicator>(sub, compute_, state_->timeout_s);
  }
  void all_reduce_host(double* values, int count, HostReduce op) override { host_.all_reduce_host(values, count, op); }
  void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) override {
    host_.all_gather_host(send, recv, bytes_per_rank);
  }

 private:
  static std::string describe(CommOp op, std::size_t count, DType dtype) {
    return std::string(comm_op_name(op)) + " of " + std::to_string(count * dtype_bytes(dtype)) + " bytes";
  }
  // On the compute stream, in its order: every later use of the buffers sees the result, and the host
  // does not wait. Its time is the GPU time between events around it, read once it has completed.
  void blocking(CommOp op, std::size_t count, DType dtype,
                const std::function<void(ncclComm_t, cudaStream_t)>& launch) {
    state_->throw_if_aborted();
    state_->harvest(false);
    CommOpStats& s = account(op, count, dtype);
    const std::string what = describe(op, count, dtype);
    cudaEvent_t start = nullptr, stop = nullptr;
    PB_CUDA_CHECK(cudaEventCreate(&start));
    PB_CUDA_CHECK(cudaEventCreate(&stop));
    state_->push(start, stop, &s, what);  // owned by pending from here, released by harvest or the destructor
    try {
      PB_CUDA_CHECK(cudaEventRecord(start, compute_));
      state_->call(what, [&](ncclComm_t c) { launch(c, compute_); });
      PB_CUDA_CHECK(cudaEventRecord(stop, compute_));
    } catch (...) {
      state_->drop_last();  // never recorded: not timed, not watched
      throw;
    }
  }
  Request async(CommOp op, std::size_t count, DType dtype,
                const std::function<void(ncclComm_t, cudaStream_t)>& launch) {
    state_->throw_if_aborted();
    state_->harvest(false);
    CommOpStats& s = account(op, count, dtype);
    const double t0 = MPI_Wtime();
    const std::string what = describe(op, count, dtype);
    cudaEvent_t ready = nullptr, done = nullptr, watched = nullptr;
    PB_CUDA_CHECK(cudaEventCreateWithFlags(&watched, cudaEventDisableTiming));
    state_->push(nullptr, watched, nullptr, what);  // the watchdog's copy of `done`, owned by pending
    PB_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    auto request = std::make_unique<NcclRequest>(done, compute_, &s, state_);  // owns `done` from here
    PB_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    try {
      PB_CUDA_CHECK(cudaEventRecord(ready, compute_));  // after the work that made the buffers
      PB_CUDA_CHECK(cudaStreamWaitEvent(side_, ready, 0));
      PB_CUDA_CHECK(cudaEventDestroy(ready));  // released once recorded work completes
      state_->call(what, [&](ncclComm_t c) { launch(c, side_); });
      PB_CUDA_CHECK(cudaEventRecord(done, side_));
      PB_CUDA_CHECK(cudaEventRecord(watched, side_));
    } catch (...) {
      state_->drop_last();
      throw;
    }
    s.time_s += MPI_Wtime() - t0;
    return request;
  }

  MpiCommunicator host_;  // bootstrap and host-side control values
  cudaStream_t compute_;
  cudaStream_t side_ = nullptr;  // non-blocking calls
  std::shared_ptr<NcclState> state_;
  std::unique_ptr<Watchdog> watchdog_;
};

// ---- MPI through pinned host memory --------------------------------------------------------------
// Pinned host buffers, reused by size in bytes.
class PinnedPool {
 public:
  ~PinnedPool() {
    for (auto& [bytes, ptr] : free_) cudaFreeHost(ptr);
  }
  void* take(std::size_t bytes) {
    bytes = std::max<std::size_t>(1, bytes);
    auto hit = free_.find(bytes);
    if (hit != free_.end()) {
      void* ptr = hit->second;
      free_.erase(hit);
      return ptr;
    }
    void* ptr = nullptr;
    PB_CUDA_CHECK(cudaMallocHost(&ptr, bytes));
    return ptr;
  }
  void give(void* ptr, std::size_t bytes) { free_.emplace(std::max<std::size_t>(1, bytes), ptr); }

 private:
  std::multimap<std::size_t, void*> free_;
};

// A staged non-blocking call: on completion the host copy goes back to the device (for receiving
// calls) and the pinned buffers return to the pool.
class StagedRequest final : public CommRequest {
 public:
  StagedRequest(Request inner, std::function<void()> finish, CommOpStats* stats)
      : inner_(std::move(inner)), finish_(std::move(finish)), stats_(stats) {}
  ~StagedRequest() override {
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "parabench: a staged MPI request failed while being released: %s\n", e.what());
    }
  }
  void wait() override {
    if (!finish_) return;
    const double t0 = MPI_Wtime();
    inner_->wait();
    complete(t0);
  }
  bool test() override {
    if (!finish_) return true;
    const double t0 = MPI_Wtime();
    if (!inner_->test()) {
      stats_->time_s += MPI_Wtime() - t0;
      return false;
    }
    complete(t0);
    return true;
  }

 private:
  void complete(double t0) {
    finish_();
    finish_ = nullptr;
    stats_->time_s += MPI_Wtime() - t0;
  }
  Request inner_;
  std::function<void()> finish_;
  CommOpStats* stats_;
};

// Every staged buffer holds count × dtype_bytes elements of the call's dtype, and the host call gets
// the same dtype (the MPI communicator's bf16 sum for bf16 reductions).
class HostStagedCommunicator final : public Communicator {
 public:
  HostStagedCommunicator(std::unique_ptr<Communicator> host, cudaStream_t compute)
      : host_(std::move(host)), compute_(compute), pool_(std::make_shared<PinnedPool>()) {}

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string name() const override { return "mpi"; }

  void all_reduce(TensorPtr buf, std::size_t count) override {
    in_place(CommOp::all_reduce, buf, count, [&](TensorPtr host) { host_->all_reduce(host, count); });
  }
  void all_reduce_max(float* buf, std::size_t count) override {
    in_place(CommOp::all_reduce, buf, count, [&](TensorPtr host) { host_->all_reduce_max(host.as<float>(), count); });
  }
  Request all_reduce_async(TensorPtr buf, std::size_t count) override {
    const DType t = buf.dtype();
    CommOpStats& s = account(CommOp::all_reduce, count, t);
    const double t0 = MPI_Wtime();
    TensorPtr h = take(count, t);
    to_host(h, buf, count);
    return staged_request(s, t0, host_->all_reduce_async(h, count), {{h.data(), bytes(count, t)}}, buf, h, count);
  }
  void reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    const DType t = common_dtype(send, recv, "reduce_scatter");
    const std::size_t full = recv_count * size();
    Timed timer(account(CommOp::reduce_scatter, full, t));
    Staged hs(*this, full, t), hr(*this, recv_count, t);
    to_host(hs.ptr, send, full);
    host_->reduce_scatter(hs.ptr, hr.ptr, recv_count);
    to_device(recv, hr.ptr, recv_count);
  }
  Request reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    const DType t = common_dtype(send, recv, "reduce_scatter_async");
    const std::size_t full = recv_count * size();
    CommOpStats& s = account(CommOp::reduce_scatter, full, t);
    const double t0 = MPI_Wtime();
    TensorPtr hs = take(full, t);
    TensorPtr hr = take(recv_count, t);
    to_host(hs, send, full);
    return staged_request(s, t0, host_->reduce_scatter_async(hs, hr, recv_count),
                          {{hs.data(), bytes(full, t)}, {hr.data(), bytes(recv_count, t)}}, recv, hr, recv_count);
  }
  // Staged in place: this rank's block is copied into its place of the host buffer first.
  void all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    const DType t = common_dtype(send, recv, "all_gather");
    const std::size_t full = send_count * size();
    Timed timer(account(CommOp::all_gather, full, t));
    Staged h(*this, full, t);
    TensorPtr mine = h.ptr + block_offset(rank(), send_count);
    to_host(mine, send, send_count);
    host_->all_gather(mine, h.ptr, send_count);
    to_device(recv, h.ptr, full);
  }
  Request all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    const DType t = common_dtype(send, recv, "all_gather_async");
    const std::size_t full = send_count * size();
    CommOpStats& s = account(CommOp::all_gather, full, t);
    const double t0 = MPI_Wtime();
    TensorPtr h = take(full, t);
    TensorPtr mine = h + block_offset(rank(), send_count);
    to_host(mine, send, send_count);
    return staged_request(s, t0, host_->all_gather_async(mine, h, send_count), {{h.data(), bytes(full, t)}}, recv,
                          h, full);
  }
  void all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) override {
    const DType t = common_dtype(send, recv, "all_to_all");
    const std::size_t full = count_per_peer * size();
    Timed timer(account(CommOp::all_to_all, full, t));
    Staged hs(*this, full, t), hr(*this, full, t);
    to_host(hs.ptr, send, full);
    host_->all_to_all(hs.ptr, hr.ptr, count_per_peer);
    to_device(recv, hr.ptr, full);
  }
  void send(ConstTensorPtr buf, std::size_t count, int peer, int tag) override {
    Timed timer(account(CommOp::send, count, buf.dtype()));
    Staged h(*this, count, buf.dtype());
    to_host(h.ptr, buf, count);
    host_->send(h.ptr, count, peer, tag);
  }
  void recv(TensorPtr buf, std::size_t count, int peer, int tag) override {
    Timed timer(account(CommOp::recv, count, buf.dtype()));
    Staged h(*this, count, buf.dtype());
    host_->recv(h.ptr, count, peer, tag);
    to_device(buf, h.ptr, count);
  }
  Request send_async(ConstTensorPtr buf, std::size_t count, int peer, int tag) override {
    const DType t = buf.dtype();
    CommOpStats& s = account(CommOp::send, count, t);
    const double t0 = MPI_Wtime();
    TensorPtr h = take(count, t);
    to_host(h, buf, count);
    return staged_request(s, t0, host_->send_async(h, count, peer, tag), {{h.data(), bytes(count, t)}}, nullptr,
                          nullptr, 0);
  }
  Request recv_async(TensorPtr buf, std::size_t count, int peer, int tag) override {
    const DType t = buf.dtype();
    CommOpStats& s = account(CommOp::recv, count, t);
    const double t0 = MPI_Wtime();
    TensorPtr h = take(count, t);
    return staged_request(s, t0, host_->recv_async(h, count, peer, tag), {{h.data(), bytes(count, t)}}, buf, h,
                          count);
  }
  void broadcast(TensorPtr buf, std::size_t count, int root) override {
    Timed timer(account(CommOp::broadcast, count, buf.dtype()));
    Staged h(*this, count, buf.dtype());
    if (rank() == root) to_host(h.ptr, buf, count);
    host_->broadcast(h.ptr, count, root);
    if (rank() != root) to_device(buf, h.ptr, count);
  }
  void barrier() override {
    PB_CUDA_CHECK(cudaStreamSynchronize(compute_));
    host_->barrier();
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    return std::make_unique<HostStagedCommunicator>(host_->split(color, key), compute_);
  }
  void all_reduce_host(double* values, int count, HostReduce op) override { host_->all_reduce_host(values, count, op); }
  void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) override {
    host_->all_gather_host(send, recv, bytes_per_rank);
  }

 private:
  class Timed {
   public:
    explicit Timed(CommOpStats& s) : s_(s), t0_(MPI_Wtime()) {}
    ~Timed() { s_.time_s += MPI_Wtime() - t0_; }

   private:
    CommOpStats& s_;
    double t0_;
  };
  // A pinned buffer of `count` elements of `dtype` for the duration of a blocking call.
  struct Staged {
    Staged(HostStagedCommunicator& c, std::size_t count, DType dtype)
        : pool(*c.pool_), size(HostStagedCommunicator::bytes(count, dtype)), ptr(pool.take(size), dtype) {}
    ~Staged() { pool.give(ptr.data(), size); }
    PinnedPool& pool;
    std::size_t size;  // bytes
    TensorPtr ptr;
  };

  static std::size_t bytes(std::size_t count, DType dtype) { return count * dtype_bytes(dtype); }
  static std::ptrdiff_t block_offset(int block, std::size_t count) {
    return static_cast<std::ptrdiff_t>(static_cast<std::size_t>(block) * count);
  }
  TensorPtr take(std::size_t count, DType dtype) { return {pool_->take(bytes(count, dtype)), dtype}; }

  // A blocking in-place call on a host copy of `buf`: down, the call, up.
  template <typename Call>
  void in_place(CommOp op, TensorPtr buf, std::size_t count, Call call) {
    Timed timer(account(op, count, buf.dtype()));
    Staged h(*this, count, buf.dtype());
    to_host(h.ptr, buf, count);
    call(h.ptr);
    to_device(buf, h.ptr, count);
  }

  // `count` elements of dst's dtype (the same as src's), after the compute stream's queued work (which
  // produced `src`).
  void to_host(TensorPtr dst, ConstTensorPtr src, std::size_t count) {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes(count, dst.dtype()), cudaMemcpyDeviceToHost, compute_));
    PB_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }
  void to_device(TensorPtr dst, ConstTensorPtr src, std::size_t count) {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes(count, dst.dtype()), cudaMemcpyHostToDevice, compute_));
    PB_CUDA_CHECK(cudaStreamSynchronize(compute_));  // the pinned buffer is reused at once
  }

  // `buffers`: the pinned buffers (pointer, bytes) to give back; device_dst (count elements) receives
  // host_src on completion where it is not null.
  Request staged_request(CommOpStats& s, double t0, Request inner, std::vector<std::pair<void*, std::size_t>> buffers,
                         TensorPtr device_dst, ConstTensorPtr host_src, std::size_t count) {
    std::shared_ptr<PinnedPool> pool = pool_;
    auto finish = [this, pool, buffers, device_dst, host_src, count] {
      if (device_dst) to_device(device_dst, host_src, count);
      for (const auto& [ptr, n] : buffers) pool->give(ptr, n);
    };
    s.time_s += MPI_Wtime() - t0;
    return std::make_unique<StagedRequest>(std::move(inner), std::move(finish), &s);
  }

  std::unique_ptr<Communicator> host_;
  cudaStream_t compute_;
  std::shared_ptr<PinnedPool> pool_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, cudaStream_t compute, double timeout_s) {
  return std::make_unique<NcclCommunicator>(comm, compute, timeout_s);
}

std::unique_ptr<Communicator> make_host_staged_communicator(std::unique_ptr<Communicator> host,
                                                            cudaStream_t compute) {
  return std::make_unique<HostStagedCommunicator>(std::move(host), compute);
}

}  // namespace pb
