// A small emulation of CUDA's execution model on the CPU, enough to run kernels/cuda/kernels.cuh:
// a block's threads are OS threads; __syncthreads and __syncwarp are barriers (a thread that returns
// drops out of them, as an exited thread does on the GPU); shuffles exchange values through a slot per
// lane between two warp barriers; __shared__ variables are static (blocks run one after another);
// dynamic shared memory is a per-block buffer. It checks indexing, synchronisation and arithmetic, not
// speed, and only kernels whose shuffles and barriers are reached by every thread they name, which is
// what CUDA requires anyway. Include it before the kernels.
#pragma once

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace pb::emu {

struct Block {
  explicit Block(unsigned threads, std::size_t shared_bytes)
      : all(threads), lanes(threads), shared(shared_bytes / sizeof(float) + 1) {
    for (unsigned w = 0; w * 32 < threads; ++w) warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> lanes;  // shuffle slots, one per thread (float and double fit exactly)
  std::vector<float> shared;  // dynamic shared memory
};

inline thread_local dim3 thread_index, block_index;
inline thread_local Block* current = nullptr;
inline dim3 block_dim, grid_dim;

inline std::barrier<>& my_warp() { return *current->warps[thread_index.x / 32]; }

// Runs kernel<<<grid, block, shared_bytes>>>(args...): the blocks one after another, the threads of a
// block concurrently (x only: the kernels use one-dimensional blocks).
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, void (*kernel)(Params...), Args... args) {
  grid_dim = grid;
  block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(block.x, shared_bytes);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            thread_index = dim3(t);
            block_index = dim3(x, y, z);
            current = &b;
            kernel(static_cast<Params>(args)...);
            my_warp().arrive_and_drop();  // an exited thread no longer holds back the others
            b.all.arrive_and_drop();
          });
        }
        for (std::thread& th : threads) th.join();
      }
    }
  }
}

}  // namespace pb::emu

#define threadIdx (::pb::emu::thread_index)
#define blockIdx (::pb::emu::block_index)
#define blockDim (::pb::emu::block_dim)
#define gridDim (::pb::emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define PB_DYNAMIC_SHARED(name) float* name = ::pb::emu::current->shared.data()

inline void __syncthreads() { ::pb::emu::current->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::pb::emu::my_warp().arrive_and_wait(); }

template <typename T>
T __shfl_sync(unsigned, T value, int src_lane) {
  auto& b = *::pb::emu::current;
  const unsigned t = threadIdx.x, base = t / 32 * 32;
  b.lanes[t] = static_cast<double>(value);
  __syncwarp();
  const T result = static_cast<T>(b.lanes[base + (static_cast<unsigned>(src_lane) & 31u)]);
  __syncwarp();  // every lane has read before the slots are written again
  return result;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return __shfl_sync(mask, value, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}

namespace pb::kernels {
using std::max;
using std::min;
}  // namespace pb::kernels
