// Shared device helpers: vector loads, a deterministic block reduction, row addressing.
#pragma once

#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace adaskip {

// Gate states, one byte per (sublayer, sequence). Mirrored in adaskip/ops/reference.py.
constexpr uint8_t GATE_UNDECIDED = 0;  // sublayer runs; its decision is still open
constexpr uint8_t GATE_SKIP = 1;       // sublayer skipped: residual *= compensation scale
constexpr uint8_t GATE_RUN = 2;        // sublayer runs; decided (or never a candidate)

// Norms below this count as zero when forming cosine similarity and norm ratio.
constexpr float kNormFloor = 1e-12f;

// VEC elements moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// A [batch, seq, hidden] view whose last dimension is contiguous; strides in elements.
struct Rows {
  int64_t stride_batch;
  int64_t stride_seq;
};

__device__ __forceinline__ int64_t row_offset(const Rows& r, int64_t b, int64_t s) {
  return b * r.stride_batch + s * r.stride_seq;
}

// Sums N values over the block; every thread gets the totals. The tree has a fixed shape for a
// given blockDim, so the result is bit-identical from run to run. blockDim.x % 32 == 0.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float partial[N][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float x = lane < num_warps ? partial[k][lane] : 0.f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
      if (lane == 0) partial[k][0] = x;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = partial[k][0];
  // A second call in the same kernel must not overwrite partial[] before all threads read it.
  __syncthreads();
}

// Programmatic dependent launch (sm_90+): a kernel launched with launch_dependent() may start
// while the kernel before it finishes; it must call wait_for_primary_grid() before reading
// that kernel's results. Both are no-ops on older architectures, where launches serialize.
__device__ __forceinline__ void wait_for_primary_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

}  // namespace adaskip
