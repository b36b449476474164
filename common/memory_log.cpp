#include "common/memory_log.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace pb {

MemoryLog::MemoryLog(const std::string& dir, int rank, int world_size, const std::string& header) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw std::runtime_error("--memory-log " + dir + ": cannot create the directory: " + ec.message());
  path_ = (std::filesystem::path(dir) / ("rank" + std::to_string(rank) + ".tsv")).string();
  file_ = std::fopen(path_.c_str(), "w");
  if (file_ == nullptr) throw std::runtime_error("--memory-log: cannot write " + path_ + ": " + std::strerror(errno));
  std::fprintf(file_, "# parabench memory log, rank %d of %d\n# %s\n", rank, world_size, header.c_str());
}

MemoryLog::~MemoryLog() {
  if (observed_ != nullptr) observed_->set_observer(nullptr);
  if (file_ != nullptr) std::fclose(file_);
}

void MemoryLog::observe(MemoryTracker& tracker) {
  tracker.set_observer(this);
  observed_ = &tracker;
}

void MemoryLog::on_alloc(const void* ptr, MemCategory c, std::size_t bytes) {
  std::fprintf(file_, "alloc\t%p\t%s\t%zu\n", ptr, mem_category_name(c), bytes);
}

void MemoryLog::on_free(const void* ptr, MemCategory c, std::size_t bytes) {
  std::fprintf(file_, "free\t%p\t%s\t%zu\n", ptr, mem_category_name(c), bytes);
}

void MemoryLog::on_mark(MemoryMark mark) {
  std::fprintf(file_, "mark\t%s\n", memory_mark_name(mark));
  // Whole steps reach the file, so that a run killed later leaves a readable history.
  if (mark == MemoryMark::step_end) std::fflush(file_);
}

void MemoryLog::on_use(const void* ptr, std::size_t bytes, CommOp op, const char* role) {
  if (ptr == nullptr) return;
  std::fprintf(file_, "use\t%p\t%s:%s\t%zu\n", ptr, comm_op_name(op), role, bytes);
}

namespace {

class LoggingCommunicator final : public Communicator {
 public:
  LoggingCommunicator(Communicator& inner, std::unique_ptr<Communicator> owned, MemoryLog& log)
      : inner_(inner), owned_(std::move(owned)), log_(log) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return inner_.name(); }

  void all_reduce(TensorPtr buf, std::size_t count) override {
    use(buf, count, CommOp::all_reduce, "buf");
    inner_.all_reduce(buf, count);
  }
  void all_reduce_max(float* buf, std::size_t count) override {
    log_.on_use(buf, count * sizeof(float), CommOp::all_reduce, "buf");
    inner_.all_reduce_max(buf, count);
  }
  Request all_reduce_async(TensorPtr buf, std::size_t count) override {
    use(buf, count, CommOp::all_reduce, "buf");
    return inner_.all_reduce_async(buf, count);
  }
  void reduce_scatter(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    use(send, recv_count * size(), CommOp::reduce_scatter, "send");
    use(recv, recv_count, CommOp::reduce_scatter, "recv");
    inner_.reduce_scatter(send, recv, recv_count);
  }
  Request reduce_scatter_async(ConstTensorPtr send, TensorPtr recv, std::size_t recv_count) override {
    use(send, recv_count * size(), CommOp::reduce_scatter, "send");
    use(recv, recv_count, CommOp::reduce_scatter, "recv");
    return inner_.reduce_scatter_async(send, recv, recv_count);
  }
  void all_gather(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    use(send, send_count, CommOp::all_gather, "send");
    use(recv, send_count * size(), CommOp::all_gather, "recv");
    inner_.all_gather(send, recv, send_count);
  }
  Request all_gather_async(ConstTensorPtr send, TensorPtr recv, std::size_t send_count) override {
    use(send, send_count, CommOp::all_gather, "send");
    use(recv, send_count * size(), CommOp::all_gather, "recv");
    return inner_.all_gather_async(send, recv, send_count);
  }
  void all_to_all(ConstTensorPtr send, TensorPtr recv, std::size_t count_per_peer) override {
    use(send, count_per_peer * size(), CommOp::all_to_all, "send");
    use(recv, count_per_peer * size(), CommOp::all_to_all, "recv");
    inner_.all_to_all(send, recv, count_per_peer);
  }
  void send(ConstTensorPtr buf, std::size_t count, int peer, int tag) override {
    use(buf, count, CommOp::send, "send");
    inner_.send(buf, count, peer, tag);
  }
  void recv(TensorPtr buf, std::size_t count, int peer, int tag) override {
    use(buf, count, CommOp::recv, "recv");
    inner_.recv(buf, count, peer, tag);
  }
  Request send_async(ConstTensorPtr buf, std::size_t count, int peer, int tag) override {
    use(buf, count, CommOp::send, "send");
    return inner_.send_async(buf, count, peer, tag);
  }
  Request recv_async(TensorPtr buf, std::size_t count, int peer, int tag) override {
    use(buf, count, CommOp::recv, "recv");
    return inner_.recv_async(buf, count, peer, tag);
  }
  Request send_recv_async(ConstTensorPtr send, int to, TensorPtr recv, int from, std::size_t count,
                          int tag) override {
    use(send, count, CommOp::send, "send");
    use(recv, count, CommOp::recv, "recv");
    return inner_.send_recv_async(send, to, recv, from, count, tag);
  }
  void broadcast(TensorPtr buf, std::size_t count, int root) override {
    use(buf, count, CommOp::broadcast, "buf");
    inner_.broadcast(buf, count, root);
  }
  void barrier() override { inner_.barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    std::unique_ptr<Communicator> child = inner_.split(color, key);
    Communicator& ref = *child;
    return std::make_unique<LoggingCommunicator>(ref, std::move(child), log_);
  }
  void all_reduce_host(double* values, int count, HostReduce op) override { inner_.all_reduce_host(values, count, op); }
  void all_gather_host(const void* send, void* recv, std::size_t bytes_per_rank) override {
    inner_.all_gather_host(send, recv, bytes_per_rank);
  }
  void settle() const override { stats_ = inner_.stats(); }

 private:
  void use(ConstTensorPtr t, std::size_t count, CommOp op, const char* role) {
    log_.on_use(t.data(), count * dtype_bytes(t.dtype()), op, role);
  }

  Communicator& inner_;
  std::unique_ptr<Communicator> owned_;  // inner_ where this one made it by split
  MemoryLog& log_;
};

}  // namespace

std::unique_ptr<Communicator> logging_communicator(Communicator& inner, MemoryLog& log) {
  return std::make_unique<LoggingCommunicator>(inner, nullptr, log);
}

}  // namespace pb
