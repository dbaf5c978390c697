// Host-side choices of the kernels' launches, as pure functions of plain numbers and strings.
//
// No CUDA and no torch here: the .cu files ask the device for what these need (multiprocessor
// count, resident blocks per SM) and pass it in, and module.cpp exposes the same functions to
// Python (adaskip._C, wrapped by adaskip.ops), so that the CPU tests can check every boundary of
// every choice on a machine without a GPU. A choice that went wrong here would not fail a test on
// the GPU either: the kernels give the same results whichever way it goes, only slower.
#pragma once

#include <cctype>
#include <cstdint>
#include <limits>
#include <string>

namespace adaskip {

// ---------------------------------------------------------------------------------------------
// Decode attention: splits of the cache's length per (sequence, KV head).

// Above this many splits the merge kernel's per-split weights would not fit its shared memory
// table (decode_attention.cu sizes that table by it); the schema's num_splits is capped the same.
constexpr int kDecodeMaxSplits = 256;

// The decode kernel's block: kDecodeWarps warps, lanes in groups of head_dim / 8 (one 16-byte
// vector of a 16-bit key row each), every group taking kDecodeKeysPerGroup keys per pipeline
// stage. decode_attention.cu builds its layout from these and checks the tile against it.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeKeysPerGroup = 8;

// Keys one block reads per pipeline stage (head_dim 64: 128 keys; 128: 64 keys): the shortest
// split worth a block.
constexpr int decode_tile_keys(int head_dim) {
  return kDecodeWarps * (32 / (head_dim / 8)) * kDecodeKeysPerGroup;
}

// batch * kv_heads, saturated instead of overflowing, and at least 1 (an empty batch launches
// nothing, but the choice must still not divide by zero).
inline int64_t decode_pairs(int64_t batch, int64_t kv_heads) {
  if (batch < 1 || kv_heads < 1) return 1;
  if (batch > std::numeric_limits<int64_t>::max() / kv_heads) return std::numeric_limits<int64_t>::max();
  return batch * kv_heads;
}

// Splits per (sequence, KV head): as many as fill the resident blocks of the whole GPU in one
// wave (a second, nearly empty wave would double the time), but no split shorter than one tile
// of `tile_keys` keys of the cache's capacity (a split with nothing to read still costs its
// block and a row of the merge), and at most kDecodeMaxSplits. Always in [1, kDecodeMaxSplits].
// The capacity, not the filled length, decides: the length is on the device (one CUDA graph
// serves every step), so the host cannot see it.
inline int choose_splits(int64_t batch, int64_t kv_heads, int64_t capacity, int64_t resident_blocks,
                         int64_t tile_keys) {
  int64_t s = resident_blocks / decode_pairs(batch, kv_heads);  // whole waves only
  const int64_t tile = tile_keys < 1 ? 1 : tile_keys;
  const int64_t tiles = capacity <= 0 ? 1 : capacity / tile + (capacity % tile != 0);
  if (s > tiles) s = tiles;
  if (s > kDecodeMaxSplits) s = kDecodeMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

// ---------------------------------------------------------------------------------------------
// Gated GEMV: the pipelined or the plain one-row kernel.

constexpr const char* kGemvPipelineEnv = "ADASKIP_GEMV_PIPELINE";
constexpr int kWarpLanes = 32;

// What ADASKIP_GEMV_PIPELINE asks for: the benchmarks force either kernel to compare them.
enum class PipelineMode : int { kAuto = -1, kOff = 0, kOn = 1 };

// Parses a value of ADASKIP_GEMV_PIPELINE (nullptr: unset). Letter case and surrounding
// whitespace are ignored (`export ADASKIP_GEMV_PIPELINE="On "` means on); unset, empty and
// "auto" are auto; "on" / "1" and "off" / "0" force. Anything else returns false and leaves
// `mode` alone: a typo must be refused, not read as auto, or a benchmark that meant to force a
// kernel would silently measure the other one. Mirrored by gemv_pipeline_mode in
// adaskip/ops/reference.py (same values, same message).
inline bool parse_pipeline_mode(const char* value, PipelineMode& mode) {
  if (value == nullptr) {
    mode = PipelineMode::kAuto;
    return true;
  }
  std::string v(value);
  const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  size_t begin = 0, end = v.size();
  while (begin < end && space(v[begin])) ++begin;
  while (end > begin && space(v[end - 1])) --end;
  v = v.substr(begin, end - begin);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v.empty() || v == "auto") mode = PipelineMode::kAuto;
  else if (v == "on" || v == "1") mode = PipelineMode::kOn;
  else if (v == "off" || v == "0") mode = PipelineMode::kOff;
  else return false;
  return true;
}

// The refusal of a value parse_pipeline_mode does not take: names the variable and the value.
inline std::string pipeline_mode_error(const char* value) {
  return std::string("adaskip: ") + kGemvPipelineEnv + " must be on, off or auto (or 1 / 0; case and " +
         "surrounding whitespace are ignored), got '" + (value ? value : "") + "'";
}

// The pipelined one-row kernel where all its blocks fit the GPU at once: a matrix with few rows
// per SM, where the plain kernel cannot keep enough bytes in flight. Beyond one wave the plain
// kernel, with twice the resident blocks, has enough of them (it read the lm_head at the copy
// bandwidth); a partial second wave of pipelined blocks would keep fewer in flight. A row too
// short for two groups of `chunks_per_group` chunks per lane has nothing to overlap: only the
// occupancy would be lower. blocks: the launch's grid; chunks: 16-byte chunks of one row;
// piped_blocks_per_sm: the pipelined kernel's resident blocks per SM; sms: the device's SMs.
inline bool use_pipeline(PipelineMode mode, int64_t blocks, int64_t chunks, int64_t chunks_per_group,
                         int64_t piped_blocks_per_sm, int64_t sms) {
  if (mode != PipelineMode::kAuto) return mode == PipelineMode::kOn;
  if (chunks < 2 * kWarpLanes * chunks_per_group) return false;
  return blocks <= piped_blocks_per_sm * sms;
}

}  // namespace adaskip
