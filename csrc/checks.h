// Host-side argument checks shared by the ops. Every message names the argument at fault;
// ADASKIP_CHECK (TORCH_CHECK_VALUE) surfaces in Python as ValueError.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "common.cuh"

namespace adaskip {

// Error messages are formatted here, numbers with std::to_string, not by iostreams: where a
// toolchain links parts of libstdc++ statically into the extension (seen on a GPU machine's
// image), inserting a number into a stream uses the static copy's facets against the shared
// library's locale and crashes. Strings alone go through the stream safely.
inline void append(std::string& out, const char* v) { out += v; }
inline void append(std::string& out, const std::string& v) { out += v; }
inline void append(std::string& out, char v) { out += v; }
inline void append(std::string& out, bool v) { out += v ? "true" : "false"; }
template <typename I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
inline void append(std::string& out, I v) { out += std::to_string(v); }
inline void append(std::string& out, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  out += buf;
}
inline void append(std::string& out, float v) { append(out, static_cast<double>(v)); }
inline void append(std::string& out, c10::IntArrayRef v) {
  out += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(v[i]);
  }
  out += ']';
}
inline void append(std::string& out, c10::ScalarType v) { out += c10::toString(v); }
inline void append(std::string& out, const c10::Device& v) { out += v.str(); }

template <typename... Args>
inline std::string msg(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

}  // namespace adaskip

// A failed check of an argument: ValueError in Python, with the message of msg(...).
#define ADASKIP_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::adaskip::msg(__VA_ARGS__))

namespace adaskip {

// A [tokens, hidden] or [batch, seq, hidden] activation, as the kernels address it.
struct RowShape {
  int64_t batch, seq, hidden;
  Rows rows;
};

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  ADASKIP_CHECK(t.is_cuda(), "adaskip: '", name, "' must be a CUDA tensor, got ", t.device());
  ADASKIP_CHECK(t.device() == device, "adaskip: '", name, "' is on ", t.device(),
                    " but the other inputs are on ", device);
}

inline RowShape row_shape(const at::Tensor& t, const char* name) {
  ADASKIP_CHECK(t.dim() == 2 || t.dim() == 3, "adaskip: '", name,
                    "' must be [tokens, hidden] or [batch, seq, hidden], got shape ", t.sizes());
  ADASKIP_CHECK(t.size(-1) > 0, "adaskip: '", name, "' has an empty hidden dimension");
  ADASKIP_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "adaskip: '", name,
                    "' must be contiguous in its last (hidden) dimension, got strides ", t.strides());
  RowShape r;
  if (t.dim() == 2) {
    r.batch = 1;
    r.seq = t.size(0);
    r.rows = {0, t.stride(0)};
  } else {
    r.batch = t.size(0);
    r.seq = t.size(1);
    r.rows = {t.stride(0), t.stride(1)};
  }
  r.hidden = t.size(-1);
  return r;
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  ADASKIP_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "adaskip: '", name,
                    "' must be float32, float16 or bfloat16, got ", d);
}

// stats: float32 [num_sublayers, batch, 3] = (sum of cosine, sum of norm ratio, token count).
inline void check_stats(const at::Tensor& stats, int64_t batch, int64_t sublayer,
                        const at::Device& device) {
  check_cuda(stats, "stats", device);
  ADASKIP_CHECK(stats.scalar_type() == at::kFloat, "adaskip: 'stats' must be float32, got ",
                    stats.scalar_type());
  ADASKIP_CHECK(stats.dim() == 3 && stats.size(2) == 3, "adaskip: 'stats' must be ",
                    "[num_sublayers, batch, 3], got shape ", stats.sizes());
  ADASKIP_CHECK(stats.is_contiguous(), "adaskip: 'stats' must be contiguous");
  ADASKIP_CHECK(stats.size(1) == batch, "adaskip: 'stats' holds ", stats.size(1),
                    " sequences but the input has batch ", batch);
  ADASKIP_CHECK(sublayer >= 0 && sublayer < stats.size(0), "adaskip: 'sublayer' ", sublayer,
                    " is out of range for 'stats' with ", stats.size(0), " sublayers");
}

// gates: uint8 [num_sublayers, batch]; scales: float32 [num_sublayers, batch].
inline void check_gates_scales(const at::Tensor& gates, const at::Tensor& scales,
                               const at::Device& device) {
  check_cuda(gates, "gates", device);
  check_cuda(scales, "scales", device);
  ADASKIP_CHECK(gates.scalar_type() == at::kByte, "adaskip: 'gates' must be uint8, got ",
                    gates.scalar_type());
  ADASKIP_CHECK(scales.scalar_type() == at::kFloat, "adaskip: 'scales' must be float32, got ",
                    scales.scalar_type());
  ADASKIP_CHECK(gates.dim() == 2, "adaskip: 'gates' must be [num_sublayers, batch], got shape ",
                    gates.sizes());
  ADASKIP_CHECK(scales.sizes() == gates.sizes(), "adaskip: 'scales' has shape ", scales.sizes(),
                    " but 'gates' has shape ", gates.sizes());
  ADASKIP_CHECK(gates.is_contiguous(), "adaskip: 'gates' must be contiguous");
  ADASKIP_CHECK(scales.is_contiguous(), "adaskip: 'scales' must be contiguous");
}

// channel_scales: a float32 per-channel compensation table, contiguous, on `device`:
// [hidden] when num_sublayers < 0 (one skipped sublayer), else [num_sublayers, hidden].
// Mirrored by check_channel_scales in adaskip/ops/reference.py (same messages).
inline void check_channel_scales(const at::Tensor& cs, int64_t num_sublayers, int64_t hidden,
                                 const at::Device& device) {
  check_cuda(cs, "channel_scales", device);
  ADASKIP_CHECK(cs.scalar_type() == at::kFloat, "adaskip: 'channel_scales' must be float32, got ",
                    cs.scalar_type());
  if (num_sublayers < 0) {
    ADASKIP_CHECK(cs.dim() == 1 && cs.size(0) == hidden,
                      "adaskip: 'channel_scales' must be [hidden] = [", hidden, "], got shape ",
                      cs.sizes());
  } else {
    ADASKIP_CHECK(cs.dim() == 2 && cs.size(0) == num_sublayers && cs.size(1) == hidden,
                      "adaskip: 'channel_scales' must be [num_sublayers, hidden] = [", num_sublayers,
                      ", ", hidden, "], got shape ", cs.sizes());
  }
  ADASKIP_CHECK(cs.is_contiguous(), "adaskip: 'channel_scales' must be contiguous");
}

// One KV cache [batch, kv_heads, capacity, head_dim] for the one-token queries q [batch, heads,
// head_dim]: q's device and dtype, contiguous in head_dim. kv_heads < 0: any number of KV heads;
// else the number `kv_heads_of` has.
inline void check_kv_cache(const at::Tensor& c, const char* name, const at::Tensor& q, int64_t kv_heads,
                           const char* kv_heads_of) {
  check_cuda(c, name, q.device());
  ADASKIP_CHECK(c.scalar_type() == q.scalar_type(), "adaskip: '", name, "' has dtype ", c.scalar_type(),
                " but 'q' has ", q.scalar_type());
  ADASKIP_CHECK(c.dim() == 4, "adaskip: '", name, "' must be [batch, kv_heads, capacity, head_dim], got shape ",
                c.sizes());
  ADASKIP_CHECK(c.size(0) == q.size(0), "adaskip: '", name, "' holds ", c.size(0), " sequences but 'q' has ",
                q.size(0));
  if (kv_heads >= 0) {
    ADASKIP_CHECK(c.size(1) == kv_heads, "adaskip: '", name, "' has ", c.size(1), " KV heads but '", kv_heads_of,
                  "' has ", kv_heads);
  }
  ADASKIP_CHECK(c.size(3) == q.size(2), "adaskip: '", name, "' has head_dim ", c.size(3), " but 'q' has ",
                q.size(2));
  ADASKIP_CHECK(c.stride(3) == 1, "adaskip: '", name, "' must be contiguous in head_dim, got strides ",
                c.strides());
}

// The key and value caches of a decode op (decode_attention, rotary_kv_write): each as above, with
// as many KV heads as `kv_heads_of` has (kv_heads < 0: as k_cache has) and the same capacity.
// Mirrored by check_kv_caches in adaskip/ops/reference.py (same messages).
inline void check_kv_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& q,
                            int64_t kv_heads, const char* kv_heads_of) {
  check_kv_cache(k_cache, "k_cache", q, kv_heads, kv_heads_of);
  if (kv_heads < 0) {
    kv_heads = k_cache.size(1);
    kv_heads_of = "k_cache";
  }
  check_kv_cache(v_cache, "v_cache", q, kv_heads, kv_heads_of);
  ADASKIP_CHECK(v_cache.size(2) == k_cache.size(2), "adaskip: 'v_cache' holds ", v_cache.size(2),
                " slots but 'k_cache' holds ", k_cache.size(2));
}

// Valid lengths of right-padded sequences, as int32 on the device (values are clamped to
// [0, seq] on the device: checking them here would need a host sync).
inline std::optional<at::Tensor> prepare_seq_lens(const std::optional<at::Tensor>& seq_lens,
                                                  int64_t batch, const at::Device& device) {
  if (!seq_lens.has_value()) return std::nullopt;
  const at::Tensor& l = *seq_lens;
  check_cuda(l, "seq_lens", device);
  ADASKIP_CHECK(l.scalar_type() == at::kInt || l.scalar_type() == at::kLong,
                    "adaskip: 'seq_lens' must be int32 or int64, got ", l.scalar_type());
  ADASKIP_CHECK(l.dim() == 1 && l.size(0) == batch, "adaskip: 'seq_lens' must be [batch] = [",
                    batch, "], got shape ", l.sizes());
  return l.to(at::kInt).contiguous();
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A per-channel table row read with the row's vector index: VEC floats (16 bytes per VEC of a
// 16-bit dtype: 32) from p + i * VEC, so p must be aligned to VEC floats. Null passes.
inline bool channel_aligned(const float* p, int64_t vec) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (vec * sizeof(float)) == 0;
}

}  // namespace adaskip
