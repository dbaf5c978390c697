// The decode step's rotary embedding and KV-cache write in one launch.
//
// Why: unfused, a decode step's rotary embedding of q and k and the two indexed cache writes are
// about a dozen tiny kernels per layer (slices, a concatenation, products, sums, index
// arithmetic). Inside a CUDA graph each still costs a node's launch and drain, which at batch 1
// adds up to a sizeable share of a step that should be bound by reading the weights.
//
// Grid (heads + kv_heads, batch), head_dim / 2 threads: thread d rotates the pair (d, d + half)
// of one head. Query heads are rotated in place; key heads are rotated into the cache slot of the
// sequence's position, and the same block copies that head's value row into the value cache.
// The rounding follows torch's eager `x * cos + rotate_half(x) * sin` in the tensors' dtype
// (each product and the sum rounded), so the result is bit-identical to the unfused path.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "common.cuh"
#include "ops.h"

namespace adaskip {
namespace {

struct HeadRows {  // a [batch, heads, head_dim] view: strides in elements
  int64_t batch, head;
};

struct CacheRows {  // a [batch, kv_heads, capacity, head_dim] cache
  int64_t batch, head, pos;
};

// Explicitly rounded products and sum (__fmul_rn / __fadd_rn): in float32 the compiler would
// otherwise contract them into one fused multiply-add, which rounds once where torch rounds twice.
template <typename T>
__device__ __forceinline__ T rope(T x, T partner_signed, T c, T s) {
  const T a = static_cast<T>(__fmul_rn(static_cast<float>(x), static_cast<float>(c)));
  const T b = static_cast<T>(__fmul_rn(static_cast<float>(partner_signed), static_cast<float>(s)));
  return static_cast<T>(__fadd_rn(static_cast<float>(a), static_cast<float>(b)));
}

template <typename T>
__global__ void rotary_kv_write_kernel(T* __restrict__ q, HeadRows qs, const T* __restrict__ k, HeadRows ks,
                                       const T* __restrict__ v, HeadRows vs, const T* __restrict__ cos,
                                       const T* __restrict__ sin, int64_t cs_batch, int64_t sn_batch,
                                       T* __restrict__ k_cache, CacheRows kc, T* __restrict__ v_cache,
                                       CacheRows vc, const int64_t* __restrict__ positions, int heads,
                                       int64_t capacity, int half) {
  const int head = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int d = threadIdx.x;  // 0 .. half-1
  const T c0 = cos[b * cs_batch + d], c1 = cos[b * cs_batch + d + half];
  const T s0 = sin[b * sn_batch + d], s1 = sin[b * sn_batch + d + half];
  if (head < heads) {
    T* row = q + b * qs.batch + head * qs.head;
    const T x0 = row[d], x1 = row[d + half];
    row[d] = rope(x0, static_cast<T>(-static_cast<float>(x1)), c0, s0);
    row[d + half] = rope(x1, x0, c1, s1);
    return;
  }
  const int kv = head - heads;
  const int64_t pos = positions[b];
  if (pos < 0 || pos >= capacity) return;  // the host bounds every position by the cache
  const T* krow = k + b * ks.batch + kv * ks.head;
  const T x0 = krow[d], x1 = krow[d + half];
  T* kdst = k_cache + b * kc.batch + kv * kc.head + pos * kc.pos;
  kdst[d] = rope(x0, static_cast<T>(-static_cast<float>(x1)), c0, s0);
  kdst[d + half] = rope(x1, x0, c1, s1);
  const T* vrow = v + b * vs.batch + kv * vs.head;
  T* vdst = v_cache + b * vc.batch + kv * vc.head + pos * vc.pos;
  vdst[d] = vrow[d];
  vdst[d + half] = vrow[d + half];
}

void check_rows3(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t heads) {
  check_cuda(t, name, q.device());
  ADASKIP_CHECK(t.scalar_type() == q.scalar_type(), "adaskip: '", name, "' has dtype ", t.scalar_type(),
                    " but 'q' has ", q.scalar_type());
  ADASKIP_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(2) == q.size(2), "adaskip: '", name,
                    "' must be [batch, heads, head_dim] with the batch and head_dim of 'q', got shape ", t.sizes());
  if (heads >= 0) {
    ADASKIP_CHECK(t.size(1) == heads, "adaskip: '", name, "' has ", t.size(1), " heads but 'k' has ", heads);
  }
  ADASKIP_CHECK(t.stride(2) == 1, "adaskip: '", name, "' must be contiguous in head_dim, got strides ",
                    t.strides());
}

void check_table(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_cuda(t, name, q.device());
  ADASKIP_CHECK(t.scalar_type() == q.scalar_type(), "adaskip: '", name, "' has dtype ", t.scalar_type(),
                    " but 'q' has ", q.scalar_type());
  ADASKIP_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(2), "adaskip: '", name,
                    "' must be [batch, head_dim] = [", q.size(0), ", ", q.size(2), "], got shape ", t.sizes());
  ADASKIP_CHECK(t.stride(1) == 1, "adaskip: '", name, "' must be contiguous in head_dim");
}

}  // namespace

void rotary_kv_write(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions) {
  const at::Device device = q.device();
  check_cuda(q, "q", device);
  check_float_dtype(q, "q");
  ADASKIP_CHECK(q.dim() == 3, "adaskip: 'q' must be [batch, heads, head_dim] (one token per sequence), got "
                    "shape ", q.sizes());
  ADASKIP_CHECK(q.stride(2) == 1, "adaskip: 'q' must be contiguous in head_dim, got strides ", q.strides());
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  ADASKIP_CHECK(dim % 2 == 0 && dim > 0 && dim <= 1024, "adaskip: head_dim must be even and at most 1024, got ",
                    dim);
  check_rows3(k, "k", q, -1);
  check_rows3(v, "v", q, k.size(1));
  check_table(cos, "cos", q);
  check_table(sin, "sin", q);
  check_kv_caches(k_cache, v_cache, q, k.size(1), "k");
  check_cuda(positions, "positions", device);
  ADASKIP_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == batch,
                    "adaskip: 'positions' must be int64 [batch] = [", batch, "], got ", positions.scalar_type(), " ",
                    positions.sizes());
  ADASKIP_CHECK(positions.is_contiguous(), "adaskip: 'positions' must be contiguous");
  const int64_t kv_heads = k.size(1);
  if (batch == 0 || heads + kv_heads == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(heads + kv_heads), static_cast<unsigned>(batch));
  const dim3 block(static_cast<unsigned>(dim / 2));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    rotary_kv_write_kernel<T><<<grid, block, 0, stream>>>(
        reinterpret_cast<T*>(q.data_ptr()), HeadRows{q.stride(0), q.stride(1)},
        reinterpret_cast<const T*>(k.data_ptr()), HeadRows{k.stride(0), k.stride(1)},
        reinterpret_cast<const T*>(v.data_ptr()), HeadRows{v.stride(0), v.stride(1)},
        reinterpret_cast<const T*>(cos.data_ptr()), reinterpret_cast<const T*>(sin.data_ptr()), cos.stride(0),
        sin.stride(0), reinterpret_cast<T*>(k_cache.data_ptr()),
        CacheRows{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)}, reinterpret_cast<T*>(v_cache.data_ptr()),
        CacheRows{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)}, positions.data_ptr<int64_t>(),
        static_cast<int>(heads), k_cache.size(2), static_cast<int>(dim / 2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto dt = q.scalar_type();
  if (dt == at::kFloat) go(float{});
  else if (dt == at::kHalf) go(c10::Half{});
  else go(c10::BFloat16{});
}

}  // namespace adaskip
