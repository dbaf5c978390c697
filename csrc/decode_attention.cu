// Decode attention: one query token per sequence against a static KV cache, split over the KV
// length (flash-decoding), with each sequence's length read from device memory.
//
// Why: at batch 1 a kernel that parallelises over batch x heads alone fills a few dozen of the
// SMs, and a graph-captured decode that attends over the whole static cache under a mask keeps
// SDPA off its fused kernels and reads every slot. Here the grid is (splits, kv_heads, batch):
// the splits are fixed on the host from the cache's capacity (so one captured graph serves every
// step), and each block divides its sequence's current length among them on the device, so only
// the filled part of the cache is read, once.
//
// One block takes one KV head and all G query heads that share it (GQA), so K and V are read
// once per KV head. Lanes form groups of D / 8 lanes; a group holds one key row at a time in
// 16-byte vectors and sums its partial dot products with shuffles. Each group keeps an online
// softmax (running max, sum, and its slice of the output) over the keys it is dealt; the block
// merges its groups through shared memory in a fixed order and writes the split's normalised
// output and log-sum-exp. A second kernel merges the splits, again in a fixed order: the result
// is deterministic. With one split the first kernel writes the output itself.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "checks.h"
#include "common.cuh"
#include "host_choices.h"
#include "launch.h"
#include "ops.h"

namespace adaskip {
namespace {

constexpr int kWarps = kDecodeWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kVec = 8;                 // 16-bit elements per 16-byte load
constexpr int kMaxGroup = 8;            // query heads per KV head the kernels take
constexpr int kMaxSplits = kDecodeMaxSplits;  // the merge kernel's table of split weights
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Layout {
  static constexpr int kLanesPerKey = D / kVec;                     // 8 (D 64) or 16 (D 128)
  static constexpr int kGroupsPerWarp = 32 / kLanesPerKey;          // 4 or 2
  static constexpr int kGroups = kWarps * kGroupsPerWarp;           // key groups per block
};

// Keys of one group per pipeline stage, and stages: each thread streams its own rows of K and V
// into shared memory with asynchronous copies, kStages - 1 tiles ahead of the one it computes, so
// the memory system always has the next tiles in flight while the current one is computed, and
// no register holds a load in waiting.
constexpr int kKeysPerGroup = kDecodeKeysPerGroup;
constexpr int kStages = 3;
// Bytes of one stage: K and V, kKeysPerGroup 16-byte chunks per thread each.
constexpr int kStageBytes = 2 * kKeysPerGroup * kThreads * 16;
constexpr int kSmemBytes = kStages * kStageBytes;  // 96 KiB: fits sm_80, sm_89 and sm_90 blocks

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ void to_float(const Vec<T, kVec>& v, float (&f)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) f[e] = static_cast<float>(v.v[e]);
}

// Sums v over the `lanes` consecutive lanes of a group (a power of two dividing 32); every lane
// of the group gets the sum. Fixed order: deterministic.
template <int LANES>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = LANES / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct CacheView {
  const void* k;
  const void* v;
  int64_t k_batch, k_head, k_pos;  // strides in elements
  int64_t v_batch, v_head, v_pos;
  int64_t capacity;                // slots per sequence
};

struct Lens {
  const void* p;
  bool is64;
  __device__ __forceinline__ int64_t operator[](int64_t b) const {
    return is64 ? static_cast<const int64_t*>(p)[b] : static_cast<const int32_t*>(p)[b];
  }
};

// The keys sequence b attends to, [first, end): its length clamped to the cache, the last
// `window` of them when window > 0.
__device__ __forceinline__ void key_range(const Lens& lens, int64_t b, int64_t capacity, int64_t window,
                                          int64_t& first, int64_t& end) {
  end = lens[b];
  end = end < 0 ? 0 : (end > capacity ? capacity : end);
  first = window > 0 && end > window ? end - window : 0;
}

// Grid (splits, kv_heads, batch). Writes, per (sequence, query head, split), the split's
// softmax-weighted value sum divided by its softmax sum (part_o, float32 [B, H, S, D]) and its
// log2-sum-exp2 of the scaled scores (part_lse, float32 [B, H, S]; -inf for a split without
// keys). With one split (part_o null) writes the output instead.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
split_kv_kernel(const T* __restrict__ q, int64_t q_batch, int64_t q_head, CacheView cache, Lens lens,
                int64_t window, int group, float scale_log2, float* __restrict__ part_o,
                float* __restrict__ part_lse, T* __restrict__ out, int64_t out_batch, int64_t out_head) {
  using L = Layout<D>;
  constexpr int kLanes = L::kLanesPerKey;
  constexpr int kGroups = L::kGroups;
  constexpr int kTileKeys = kGroups * kKeysPerGroup;  // keys of one stage, over the block
  extern __shared__ __align__(16) unsigned char smem[];

  const int split = blockIdx.x, num_splits = gridDim.x;
  const int kv_head = blockIdx.y, kv_heads = gridDim.y;
  const int64_t b = blockIdx.z;
  const int key_group = threadIdx.x / kLanes;  // 0 .. kGroups-1
  const int slice = threadIdx.x % kLanes;      // which 8 elements of a row this thread holds
  const int heads = kv_heads * group;

  // Wait for the kernels that wrote q and the cache (programmatic dependent launch).
  wait_for_primary_grid();

  int64_t first, end;
  key_range(lens, b, cache.capacity, window, first, end);
  const int64_t n = end - first;
  // Each split gets whole tiles: only the last tile of the last busy split is short.
  const int64_t per_split = ((n + num_splits - 1) / num_splits + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t lo = first + split * per_split;
  const int64_t hi = end < lo + per_split ? end : lo + per_split;
  const int tiles = hi > lo ? static_cast<int>((hi - lo + kTileKeys - 1) / kTileKeys) : 0;

  const T* kp = static_cast<const T*>(cache.k) + b * cache.k_batch + kv_head * cache.k_head + slice * kVec;
  const T* vp = static_cast<const T*>(cache.v) + b * cache.v_batch + kv_head * cache.v_head + slice * kVec;
  // This thread's chunks of a stage: key t of its group at [stage][K or V][t][thread].
  auto chunk = [&](int stage, int kind, int t) {
    return smem + (((stage * 2 + kind) * kKeysPerGroup + t) * kThreads + threadIdx.x) * 16;
  };
  auto issue = [&](int tile) {
    if (tile < tiles) {
      const int stage = tile % kStages;
#pragma unroll
      for (int t = 0; t < kKeysPerGroup; ++t) {
        const int64_t key = lo + static_cast<int64_t>(tile) * kTileKeys + t * kGroups + key_group;
        const bool valid = key < hi;
        const int64_t row = valid ? key : lo;  // a readable address even when nothing is read
        cp_async16(chunk(stage, 0, t), kp + row * cache.k_pos, valid);
        cp_async16(chunk(stage, 1, t), vp + row * cache.v_pos, valid);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the count uniform
  };
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) issue(tile);

  float qf[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int h = kv_head * group + g;
    if (g < group) {
      const Vec<T, kVec> qv = load_vec<T, kVec>(q + b * q_batch + h * q_head + slice * kVec);
      to_float(qv, qf[g]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) qf[g][e] *= scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) qf[g][e] = 0.f;
    }
  }

  float m[G], l[G], acc[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  for (int tile = 0; tile < tiles; ++tile) {
    issue(tile + kStages - 1);
    cp_async_wait<kStages - 1>();  // this thread's copies of `tile` have landed
    const int stage = tile % kStages;
    const int64_t base = lo + static_cast<int64_t>(tile) * kTileKeys + key_group;
    float s[kKeysPerGroup][G];
#pragma unroll
    for (int t = 0; t < kKeysPerGroup; ++t) {
      float kf[kVec];
      to_float(*reinterpret_cast<const Vec<T, kVec>*>(chunk(stage, 0, t)), kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) d += qf[g][e] * kf[e];
        s[t][g] = group_sum<kLanes>(d);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int t = 0; t < kKeysPerGroup; ++t) {
        if (base + t * kGroups < hi) tile_max = fmaxf(tile_max, s[t][g]);
      }
      const float m_new = fmaxf(m[g], tile_max);
      if (m_new == -INFINITY) continue;  // no key of this group yet
      const float corr = exp2f(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= corr;
      m[g] = m_new;
    }
#pragma unroll
    for (int t = 0; t < kKeysPerGroup; ++t) {
      if (base + t * kGroups >= hi) continue;  // zero-filled: its score must not count
      float vf[kVec];
      to_float(*reinterpret_cast<const Vec<T, kVec>*>(chunk(stage, 1, t)), vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = exp2f(s[t][g] - m[g]);
        l[g] += p;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] += p * vf[e];
      }
    }
  }
  cp_async_wait<0>();
  allow_dependent_launch();

  // Merge the groups of the block in a fixed order, in the (now idle) stage memory.
  __syncthreads();
  float* sm_m = reinterpret_cast<float*>(smem);  // [kGroups][G]
  float* sm_l = sm_m + kGroups * G;               // [kGroups][G]
  float* sm_acc = sm_l + kGroups * G;             // [kGroups][G][D]
  if (slice == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      sm_m[key_group * G + g] = m[g];
      sm_l[key_group * G + g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) sm_acc[(key_group * G + g) * D + slice * kVec + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    if (g >= group) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int kg = 0; kg < kGroups; ++kg) mx = fmaxf(mx, sm_m[kg * G + g]);
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int kg = 0; kg < kGroups; ++kg) {
        const float w = exp2f(sm_m[kg * G + g] - mx);  // 0 for a group without keys
        sum += w * sm_l[kg * G + g];
        o += w * sm_acc[(kg * G + g) * D + d];
      }
      o /= sum;
    }
    const int h = kv_head * group + g;
    if (part_o == nullptr) {
      out[b * out_batch + h * out_head + d] = static_cast<T>(o);
    } else {
      const int64_t row = (b * heads + h) * num_splits + split;
      part_o[row * D + d] = o;
      if (d == 0) part_lse[row] = mx == -INFINITY ? -INFINITY : mx + log2f(sum);
    }
  }
}

// Grid (heads, batch), D threads: out[b, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max).
// A sequence without keys gets zeros. The splits' log-sum-exps are read by all threads at once
// and their weights kept in shared memory; each thread then sums its element of the splits'
// outputs in split order, kMergeUnroll independent loads in flight at a time: a loop that read one
// split after the other would wait on the memory once per split.
constexpr int kMergeUnroll = 8;

template <typename T, int D>
__global__ void __launch_bounds__(D)
merge_splits_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse, int num_splits,
                    T* __restrict__ out, int64_t out_batch, int64_t out_head) {
  __shared__ float weight[kMaxSplits];
  __shared__ float warp_max[D / 32];
  wait_for_primary_grid();
  const int h = blockIdx.x, heads = gridDim.x;
  const int64_t b = blockIdx.y;
  const int d = threadIdx.x;
  const int64_t row0 = (b * heads + h) * num_splits;
  const float* lse = part_lse + row0;

  float mx = -INFINITY;
  for (int s = d; s < num_splits; s += D) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (d % 32 == 0) warp_max[d / 32] = mx;
  __syncthreads();
  mx = warp_max[0];
#pragma unroll
  for (int w = 1; w < D / 32; ++w) mx = fmaxf(mx, warp_max[w]);  // a max: the order does not matter
  for (int s = d; s < num_splits; s += D) weight[s] = mx == -INFINITY ? 0.f : exp2f(lse[s] - mx);
  __syncthreads();

  float sum = 0.f, o = 0.f;
  if (mx != -INFINITY) {
    const float* po = part_o + row0 * D + d;
    for (int s0 = 0; s0 < num_splits; s0 += kMergeUnroll) {
      float v[kMergeUnroll];
#pragma unroll
      for (int j = 0; j < kMergeUnroll; ++j) v[j] = s0 + j < num_splits ? po[static_cast<int64_t>(s0 + j) * D] : 0.f;
#pragma unroll
      for (int j = 0; j < kMergeUnroll; ++j) {
        if (s0 + j < num_splits) {
          sum += weight[s0 + j];
          o += weight[s0 + j] * v[j];
        }
      }
    }
    o /= sum;
  }
  out[b * out_batch + h * out_head + d] = static_cast<T>(o);
}

// The split choice is choose_splits (host_choices.h), a pure function the CPU tests check; its
// tile is what one block reads per stage.
static_assert(decode_tile_keys(64) == Layout<64>::kGroups * kKeysPerGroup, "host_choices.h: decode tile");
static_assert(decode_tile_keys(128) == Layout<128>::kGroups * kKeysPerGroup, "host_choices.h: decode tile");

// Opts the kernel into its dynamic shared memory (above the 48 KiB default) and returns how many
// of its blocks an SM holds; once per kernel and device.
template <typename T, int D, int G>
int prepare(int device) {
  // One table per instantiation: kernels of one signature (same T) are still different kernels.
  static std::atomic<int> resident[kCachedDevices] = {};
  return once_per_device(resident, device, [] {
    const auto kernel = split_kv_kernel<T, D, G>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kSmemBytes));
    return std::max(blocks, 1);
  });
}

template <typename T, int D, int G>
void launch(const at::Tensor& q, const CacheView& cache, const Lens& lens, int64_t window, int group,
            float scale_log2, at::Tensor& out, int sms, int splits) {
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = heads / group;
  const int device = q.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const auto kernel = split_kv_kernel<T, D, G>;
  const int per_sm = prepare<T, D, G>(device);
  const int num_splits = splits > 0 ? splits
                                    : choose_splits(batch, kv_heads, cache.capacity,
                                                    static_cast<int64_t>(per_sm) * sms, decode_tile_keys(D));
  const dim3 grid(num_splits, kv_heads, batch);
  if (num_splits == 1) {
    launch_dependent(kernel, device, grid, dim3(kThreads), kSmemBytes, stream, qp, q.stride(0), q.stride(1), cache,
                     lens, window, group, scale_log2, static_cast<float*>(nullptr), static_cast<float*>(nullptr), op,
                     out.stride(0), out.stride(1));
    return;
  }
  // Workspace from torch's caching allocator on the current stream (a graph's own pool when
  // captured), so nothing is allocated outside torch's view.
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({batch, heads, num_splits, D}, f32);
  at::Tensor part_lse = at::empty({batch, heads, num_splits}, f32);
  launch_dependent(kernel, device, grid, dim3(kThreads), kSmemBytes, stream, qp, q.stride(0), q.stride(1), cache,
                   lens, window, group, scale_log2, part_o.data_ptr<float>(), part_lse.data_ptr<float>(), op,
                   out.stride(0), out.stride(1));
  launch_dependent(merge_splits_kernel<T, D>, device, dim3(heads, batch), dim3(D), 0, stream,
                   static_cast<const float*>(part_o.data_ptr<float>()),
                   static_cast<const float*>(part_lse.data_ptr<float>()), num_splits, op, out.stride(0),
                   out.stride(1));
}

template <typename T, int D>
void launch_group(const at::Tensor& q, const CacheView& cache, const Lens& lens, int64_t window, int group,
                  float scale_log2, at::Tensor& out, int sms, int splits) {
  if (group == 1) launch<T, D, 1>(q, cache, lens, window, group, scale_log2, out, sms, splits);
  else if (group == 2) launch<T, D, 2>(q, cache, lens, window, group, scale_log2, out, sms, splits);
  else if (group <= 4) launch<T, D, 4>(q, cache, lens, window, group, scale_log2, out, sms, splits);
  else launch<T, D, 8>(q, cache, lens, window, group, scale_log2, out, sms, splits);
}

// The vector loads read 8 elements (16 bytes) at a time from every row of the cache.
void check_cache_aligned(const at::Tensor& c, const char* name) {
  ADASKIP_CHECK(c.stride(0) % kVec == 0 && c.stride(1) % kVec == 0 && c.stride(2) % kVec == 0 &&
                    aligned16(c.data_ptr()),
                "adaskip: '", name, "' must be 16-byte aligned with strides that are multiples of 8, got "
                "strides ", c.strides());
}

}  // namespace

void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& kv_lens, double scale, int64_t window, at::Tensor& out,
                      int64_t num_splits) {
  const at::Device device = q.device();
  check_cuda(q, "q", device);
  check_cuda(out, "out", device);
  check_cuda(kv_lens, "kv_lens", device);
  const auto dt = q.scalar_type();
  ADASKIP_CHECK(dt == at::kHalf || dt == at::kBFloat16, "adaskip: 'q' must be float16 or bfloat16 ",
                    "(the decode attention kernel), got ", dt);
  ADASKIP_CHECK(q.dim() == 3, "adaskip: 'q' must be [batch, heads, head_dim] (one token per sequence), ",
                    "got shape ", q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  ADASKIP_CHECK(dim == 64 || dim == 128, "adaskip: the decode attention kernel takes head_dim 64 or 128, got ",
                    dim);
  ADASKIP_CHECK(q.stride(2) == 1 && q.stride(0) % kVec == 0 && q.stride(1) % kVec == 0 && aligned16(q.data_ptr()),
                    "adaskip: 'q' must be contiguous in head_dim and 16-byte aligned, got strides ", q.strides());
  check_kv_caches(k_cache, v_cache, q, -1, "k_cache");
  check_cache_aligned(k_cache, "k_cache");
  check_cache_aligned(v_cache, "v_cache");
  const int64_t kv_heads = k_cache.size(1);
  ADASKIP_CHECK(kv_heads > 0 && heads % kv_heads == 0, "adaskip: 'q' has ", heads,
                    " heads, not a multiple of the cache's ", kv_heads, " KV heads");
  const int64_t group = heads / kv_heads;
  ADASKIP_CHECK(group <= kMaxGroup, "adaskip: the decode attention kernel takes at most ", kMaxGroup,
                    " query heads per KV head, got ", group);
  ADASKIP_CHECK(kv_lens.scalar_type() == at::kInt || kv_lens.scalar_type() == at::kLong,
                    "adaskip: 'kv_lens' must be int32 or int64, got ", kv_lens.scalar_type());
  ADASKIP_CHECK(kv_lens.dim() == 1 && kv_lens.size(0) == batch, "adaskip: 'kv_lens' must be [batch] = [",
                    batch, "], got shape ", kv_lens.sizes());
  ADASKIP_CHECK(kv_lens.is_contiguous(), "adaskip: 'kv_lens' must be contiguous");
  ADASKIP_CHECK(window >= 0, "adaskip: 'window' must be >= 0 (0: no sliding window), got ", window);
  ADASKIP_CHECK(std::isfinite(scale) && scale > 0, "adaskip: 'scale' must be a positive finite number, got ",
                    scale);
  ADASKIP_CHECK(out.scalar_type() == dt && out.sizes() == q.sizes(), "adaskip: 'out' must be ", dt, " ",
                    q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());
  ADASKIP_CHECK(out.stride(2) == 1, "adaskip: 'out' must be contiguous in head_dim");
  ADASKIP_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "adaskip: 'num_splits' must be in [0, ",
                kMaxSplits, "] (0: as many as fill the GPU once), got ", num_splits);
  if (batch == 0 || heads == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const int sms = multiprocessor_count(device.index());
  const int64_t capacity = k_cache.size(2);
  const CacheView cache{k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), capacity};
  const Lens lens{kv_lens.data_ptr(), kv_lens.scalar_type() == at::kLong};
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const int g = static_cast<int>(group);
  const int splits = static_cast<int>(num_splits);
  if (dt == at::kHalf) {
    if (dim == 64) launch_group<c10::Half, 64>(q, cache, lens, window, g, scale_log2, out, sms, splits);
    else launch_group<c10::Half, 128>(q, cache, lens, window, g, scale_log2, out, sms, splits);
  } else {
    if (dim == 64) launch_group<c10::BFloat16, 64>(q, cache, lens, window, g, scale_log2, out, sms, splits);
    else launch_group<c10::BFloat16, 128>(q, cache, lens, window, g, scale_log2, out, sms, splits);
  }
}

}  // namespace adaskip
