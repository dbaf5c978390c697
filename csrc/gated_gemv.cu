// Gated GEMV for the decode FFN: y[b] = W x[b] for 1..8 tokens, skipped on the device.
//
// Every block first reads this sublayer's gate of each sequence; when all of them say SKIP the
// block returns before touching the weights, so a gated-off FFN costs one tiny read per block
// and no host ever looks at the gate. Outputs of skipped sequences are left unwritten: the
// fused add + norm that follows (with the same gates) replaces the sublayer by its scale.
//
// One warp per output row (several rows from 3 tokens on): each lane streams 16-byte chunks of
// the rows, keeps a partial dot product per row and token, and the warp sums them with shuffles
// (a fixed order: deterministic). The weights are read exactly once; the tokens' inputs are
// re-read from L1/L2 by every warp.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>

#include "checks.h"
#include "common.cuh"
#include "host_choices.h"
#include "launch.h"
#include "ops.h"

namespace adaskip {
namespace {

// At 1-2 tokens, 8 warps per block and two SwiGLU rows per warp keep the grid small: a gated-off
// FFN is two nodes of blocks that only read the gate and exit, and each block costs launch time.
// From 3 tokens on, each warp holds more per-token state and 4 warps per block run faster
// (timings of both shapes: bench/results/README.md).
template <int NT>
constexpr int warps_per_block() {
  return NT <= 2 ? 8 : 4;
}
constexpr int kMaxTokens = 8;

// Rows per warp: from 3 tokens on, the tokens' inputs (re-read from L1 for every row, NT loads
// per weight load) rather than the weights limit a one-row warp, so a warp takes several rows
// and reuses each input chunk across them. SwiGLU takes two rows at any size (its wide up
// projection still has enough warps to cover the SMs); the down projection has fewer rows, and
// one per warp keeps enough warps in flight there at 1-2 tokens.
template <int NT, bool SWIGLU>
constexpr int rows_per_warp() {
  return SWIGLU ? 2 : (NT <= 2 ? 1 : 4);
}

// Pipelined one-row warps (PIPE): each lane loads the next kPipeChunks chunks of its row while
// it uses the current ones. How many weight bytes are in flight decides the bandwidth a GEMV
// reaches (Little's law); the compiler keeps about two loads of a plain one-row warp in flight,
// too few where a matrix has few rows per SM (a decode token's projections, a GQA k or v most of
// all). The price is registers (twice the plain kernel's), so fewer blocks fit an SM:
// launch_gemv chooses per launch.
constexpr int kPipeChunks = 4;

template <int NT, bool SWIGLU, bool PIPE>
constexpr int chunks_in_flight() {
  return PIPE && !SWIGLU && rows_per_warp<NT, SWIGLU>() == 1 ? kPipeChunks : 1;
}

// True when every one of the NT sequences is gated off for this sublayer.
template <int NT>
__device__ __forceinline__ bool all_skipped(const uint8_t* __restrict__ gates) {
  bool all = true;
#pragma unroll
  for (int t = 0; t < NT; ++t) all &= gates[t] == GATE_SKIP;
  return all;
}

template <int R, int NT>
__device__ __forceinline__ void warp_sum(float (&acc)[R][NT]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], off);
    }
  }
}

// SWIGLU: out[t, r] = silu(Wg[r] . x[t]) * (Wu[r] . x[t]); otherwise out[t, r] = W[r] . x[t].
// Each warp computes R consecutive rows; each lane streams 16-byte chunks of them with the
// matching chunks of the NT inputs, and the warp sums its partials with shuffles (a fixed
// order: deterministic, and the same sums whatever R is).
template <typename T, int VEC, int NT, bool SWIGLU, bool PIPE>
__global__ void __launch_bounds__(warps_per_block<NT>() * 32)
gated_gemv_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
                  const T* __restrict__ w_up, int rows, int k, const uint8_t* __restrict__ gates,
                  T* __restrict__ out, int64_t out_stride) {
  constexpr int R = rows_per_warp<NT, SWIGLU>();
  if (gates != nullptr && all_skipped<NT>(gates)) return;
  const int first = (blockIdx.x * warps_per_block<NT>() + (threadIdx.x >> 5)) * R;
  if (first >= rows) return;
  const int lane = threadIdx.x & 31;
  // Rows past the end (the last warp only) re-read the last row and are not stored.
  const T* w_rows[R];
  const T* u_rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = min(first + r, rows - 1);
    w_rows[r] = w + row * k;
    u_rows[r] = SWIGLU ? w_up + row * k : nullptr;
  }
  float acc[R][NT] = {};
  float acc_up[R][NT] = {};
  const int chunks = k / VEC;
  int c = lane;
  // U chunks of the row at a time, and the next U loaded before the current ones are used (double
  // buffering in registers): the sums still take the chunks in order, so the result is the same
  // as one chunk at a time.
  constexpr int U = chunks_in_flight<NT, SWIGLU, PIPE>();
  static_assert(U == 1 || (R == 1 && !SWIGLU), "several chunks in flight are for one-row, plain warps");
  if constexpr (U > 1) {
    if (c + 32 * (U - 1) < chunks) {
      Vec<T, VEC> wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) wv[u] = load_vec<T, VEC>(w_rows[0] + (c + 32 * u) * VEC);
      while (true) {
        const int next = c + 32 * U;
        const bool more = next + 32 * (U - 1) < chunks;
        Vec<T, VEC> wn[U];
        if (more) {
#pragma unroll
          for (int u = 0; u < U; ++u) wn[u] = load_vec<T, VEC>(w_rows[0] + (next + 32 * u) * VEC);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const Vec<T, VEC> xv = load_vec<T, VEC>(x + t * x_stride + (c + 32 * u) * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              acc[0][t] += static_cast<float>(wv[u].v[j]) * static_cast<float>(xv.v[j]);
            }
          }
        }
        c = next;
        if (!more) break;
#pragma unroll
        for (int u = 0; u < U; ++u) wv[u] = wn[u];
      }
    }
  }
  for (; c < chunks; c += 32) {
    Vec<T, VEC> xv[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) xv[t] = load_vec<T, VEC>(x + t * x_stride + c * VEC);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const Vec<T, VEC> wv = load_vec<T, VEC>(w_rows[r] + c * VEC);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[r][t] += static_cast<float>(wv.v[j]) * static_cast<float>(xv[t].v[j]);
      }
      if constexpr (SWIGLU) {
        const Vec<T, VEC> uv = load_vec<T, VEC>(u_rows[r] + c * VEC);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc_up[r][t] += static_cast<float>(uv.v[j]) * static_cast<float>(xv[t].v[j]);
        }
      }
    }
  }
  warp_sum<R, NT>(acc);
  if constexpr (SWIGLU) warp_sum<R, NT>(acc_up);
  // Every lane holds every sum now: lane r * NT + t stores out[t, first + r].
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (lane != (r * NT + t) % 32 || first + r >= rows) continue;
      float y = acc[r][t];
      if constexpr (SWIGLU) {
        // Rounded like torch: silu(g) and u are each rounded to T before their product.
        const float g = static_cast<float>(static_cast<T>(y));
        const float silu = static_cast<float>(static_cast<T>(g / (1.f + __expf(-g))));
        y = silu * static_cast<float>(static_cast<T>(acc_up[r][t]));
      }
      out[t * out_stride + first + r] = static_cast<T>(y);
    }
  }
}

// Blocks of `Kernel` (with `threads` threads) one SM holds; once per kernel and device (one table
// per kernel: the template parameter is the kernel itself, not its type, which kernels share).
template <auto Kernel>
int resident_blocks(int threads, int device) {
  static std::atomic<int> cached[kCachedDevices] = {};
  return once_per_device(cached, device, [threads] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, 0));
    return std::max(blocks, 1);
  });
}

// ADASKIP_GEMV_PIPELINE=on / off forces the pipelined or the plain one-row kernel (benchmarks
// compare them); unset or auto, launch_gemv chooses. A value parse_pipeline_mode does not take is
// refused (ValueError), naming the variable and the value.
PipelineMode forced_pipeline() {
  const char* v = std::getenv(kGemvPipelineEnv);
  PipelineMode mode = PipelineMode::kAuto;
  ADASKIP_CHECK(parse_pipeline_mode(v, mode), pipeline_mode_error(v));
  return mode;
}

// use_pipeline (host_choices.h) with this device's numbers: its SMs and how many blocks of the
// pipelined kernel one SM holds (both read once per device, so asking costs nothing afterwards).
template <auto Pipelined>
bool pipeline_here(PipelineMode mode, int threads, int blocks, int chunks, int chunks_per_group, int device) {
  return use_pipeline(mode, blocks, chunks, chunks_per_group, resident_blocks<Pipelined>(threads, device),
                      multiprocessor_count(device));
}

template <typename T, int VEC, bool SWIGLU>
void launch_gemv(int tokens, const T* x, int64_t xs, const T* w, const T* w_up, int rows, int k,
                 const uint8_t* gates, T* out, int64_t os, cudaStream_t stream, int device) {
  const PipelineMode forced = forced_pipeline();  // read on every launch: a bad value is refused whatever the shape
  switch (tokens) {
#define ADASKIP_GEMV_CASE(N)                                                                           \
  case N: {                                                                                            \
    constexpr int rows_per_block = warps_per_block<N>() * rows_per_warp<N, SWIGLU>();                  \
    const dim3 block(warps_per_block<N>() * 32);                                                       \
    const dim3 grid((rows + rows_per_block - 1) / rows_per_block);                                     \
    constexpr auto plain = gated_gemv_kernel<T, VEC, N, SWIGLU, false>;                                \
    if constexpr (chunks_in_flight<N, SWIGLU, true>() > 1) {                                           \
      constexpr auto piped = gated_gemv_kernel<T, VEC, N, SWIGLU, true>;                               \
      const bool pipe = pipeline_here<piped>(forced, static_cast<int>(block.x), static_cast<int>(grid.x),\
                                             k / VEC, chunks_in_flight<N, SWIGLU, true>(), device);    \
      (pipe ? piped : plain)<<<grid, block, 0, stream>>>(x, xs, w, w_up, rows, k, gates, out, os);     \
    } else {                                                                                           \
      plain<<<grid, block, 0, stream>>>(x, xs, w, w_up, rows, k, gates, out, os);                      \
    }                                                                                                  \
    break;                                                                                             \
  }
    ADASKIP_GEMV_CASE(1)
    ADASKIP_GEMV_CASE(2)
    ADASKIP_GEMV_CASE(3)
    ADASKIP_GEMV_CASE(4)
    ADASKIP_GEMV_CASE(5)
    ADASKIP_GEMV_CASE(6)
    ADASKIP_GEMV_CASE(7)
    ADASKIP_GEMV_CASE(8)
#undef ADASKIP_GEMV_CASE
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor* w_up,
              const std::optional<at::Tensor>& gates, int64_t sublayer, at::Tensor& out,
              const char* w_name) {
  const at::Device device = x.device();
  check_cuda(x, "x", device);
  check_cuda(w, w_name, device);
  check_cuda(out, "out", device);
  const auto dt = x.scalar_type();
  ADASKIP_CHECK(dt == at::kHalf || dt == at::kBFloat16, "adaskip: 'x' must be float16 or bfloat16 ",
                    "(the gated decode GEMV), got ", dt);
  ADASKIP_CHECK(x.dim() == 2, "adaskip: 'x' must be [tokens, in_features], got shape ", x.sizes());
  const int64_t tokens = x.size(0), k = x.size(1);
  ADASKIP_CHECK(tokens >= 1 && tokens <= kMaxTokens, "adaskip: the gated GEMV takes 1 to ", kMaxTokens,
                    " tokens, got ", tokens);
  ADASKIP_CHECK(x.stride(1) == 1, "adaskip: 'x' must be contiguous in its last dimension");
  for (const at::Tensor* m : {&w, w_up}) {
    if (m == nullptr) continue;
    const char* name = m == &w ? w_name : "w_up";
    check_cuda(*m, name, device);
    ADASKIP_CHECK(m->scalar_type() == dt, "adaskip: '", name, "' has dtype ", m->scalar_type(),
                      " but 'x' has ", dt);
    ADASKIP_CHECK(m->dim() == 2 && m->size(1) == k, "adaskip: '", name, "' must be [out_features, ", k,
                      "], got shape ", m->sizes());
    ADASKIP_CHECK(m->is_contiguous(), "adaskip: '", name, "' must be contiguous");
  }
  const int64_t rows = w.size(0);
  if (w_up != nullptr) {
    ADASKIP_CHECK(w_up->size(0) == rows, "adaskip: 'w_up' has ", w_up->size(0), " rows but '", w_name,
                      "' has ", rows);
  }
  ADASKIP_CHECK(out.scalar_type() == dt && out.dim() == 2 && out.size(0) == tokens && out.size(1) == rows,
                    "adaskip: 'out' must be ", dt, " [", tokens, ", ", rows, "], got ", out.scalar_type(), " ",
                    out.sizes());
  ADASKIP_CHECK(out.stride(1) == 1, "adaskip: 'out' must be contiguous in its last dimension");
  const uint8_t* g = nullptr;
  if (gates.has_value()) {
    check_cuda(*gates, "gates", device);
    ADASKIP_CHECK(gates->scalar_type() == at::kByte && gates->dim() == 2 && gates->is_contiguous(),
                      "adaskip: 'gates' must be contiguous uint8 [num_sublayers, batch]");
    ADASKIP_CHECK(gates->size(1) == tokens, "adaskip: 'gates' holds ", gates->size(1),
                      " sequences but 'x' has ", tokens, " tokens (one per sequence)");
    ADASKIP_CHECK(sublayer >= 0 && sublayer < gates->size(0), "adaskip: 'sublayer' ", sublayer,
                      " is out of range for 'gates' with ", gates->size(0), " sublayers");
    g = gates->data_ptr<uint8_t>() + sublayer * tokens;
  }
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int dev = device.index();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = k % kVec == 0 && x.stride(0) % kVec == 0 && aligned16(x.data_ptr()) &&
                     aligned16(w.data_ptr()) && (w_up == nullptr || aligned16(w_up->data_ptr()));
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const T* up = w_up != nullptr ? reinterpret_cast<const T*>(w_up->data_ptr()) : nullptr;
    T* op = reinterpret_cast<T*>(out.data_ptr());
    const int r = static_cast<int>(rows), kk = static_cast<int>(k), nt = static_cast<int>(tokens);
    if (w_up != nullptr) {
      if (vec) launch_gemv<T, kVec, true>(nt, xp, x.stride(0), wp, up, r, kk, g, op, out.stride(0), stream, dev);
      else launch_gemv<T, 1, true>(nt, xp, x.stride(0), wp, up, r, kk, g, op, out.stride(0), stream, dev);
    } else {
      if (vec) launch_gemv<T, kVec, false>(nt, xp, x.stride(0), wp, up, r, kk, g, op, out.stride(0), stream, dev);
      else launch_gemv<T, 1, false>(nt, xp, x.stride(0), wp, up, r, kk, g, op, out.stride(0), stream, dev);
    }
  };
  if (dt == at::kHalf) go(c10::Half{});
  else go(c10::BFloat16{});
}

}  // namespace

void gated_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& gates,
                  int64_t sublayer, at::Tensor& out) {
  run_gemv(x, weight, nullptr, gates, sublayer, out, "weight");
}

void gated_swiglu_up(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                     const std::optional<at::Tensor>& gates, int64_t sublayer, at::Tensor& out) {
  run_gemv(x, w_gate, &w_up, gates, sublayer, out, "w_gate");
}

}  // namespace adaskip
