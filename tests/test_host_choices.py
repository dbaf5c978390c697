"""The kernels' host-side launch choices (csrc/host_choices.h) on the CPU: the decode attention's
split count, the gated GEMV's pipelined-or-plain choice, and ADASKIP_GEMV_PIPELINE's parsing
(the kernels' parser through adaskip._C, and the reference's mirror, which the CPU path uses).

The choices change speed, never results, so no GPU test would notice one going wrong: their
boundaries are checked here. Tests of the compiled functions skip without the extension (CI
builds it, with CUDA, on a machine without a GPU, so they run there)."""
import pytest
import torch

from adaskip import ops
from adaskip.ops import reference as ref

needs_extension = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="the choices are compiled into adaskip._C")

ENV = "ADASKIP_GEMV_PIPELINE"

# H100 SXM: 132 SMs. Resident blocks per SM are the kernels' occupancy there; the numbers below are
# examples of the arithmetic, not measurements.
H100_SMS = 132


# ---------------------------------------------------------------------------------------------
# Decode attention: splits per (sequence, KV head)

def _splits_by_search(batch, kv_heads, capacity, resident, tile):
    """The definition, by search: the most splits s <= 256 with s * pairs blocks in one wave of
    `resident` and no split shorter than a tile of the capacity; 1 when none fits."""
    pairs = max(batch * kv_heads, 1)
    tiles = max(-(-capacity // tile), 1)
    fitting = [s for s in range(1, 257) if s * pairs <= resident and s <= tiles]
    return max(fitting, default=1)


@needs_extension
def test_decode_tile_keys_follow_the_head_dim():
    # head_dim 64: 8 lanes per key row, 4 groups per warp, 4 warps, 8 keys per group
    assert ops.decode_tile_keys(64) == 128
    assert ops.decode_tile_keys(128) == 64
    with pytest.raises(ValueError, match="head_dim 64 or 128, got 96"):
        ops.decode_tile_keys(96)


@needs_extension
def test_splits_fill_one_wave_of_resident_blocks():
    # LLaMA-3.1-8B at batch 1: 8 KV heads; 2 blocks per SM on 132 SMs = 264 resident blocks
    assert ops.decode_splits(1, 8, 32768, 2 * H100_SMS, 64) == 33  # 264 // 8
    assert ops.decode_splits(4, 8, 32768, 2 * H100_SMS, 64) == 8  # 264 // 32: whole waves only


@needs_extension
@pytest.mark.parametrize("pairs", [1, 8, 30, 240])
def test_splits_at_the_boundary_of_batch_times_heads_and_resident_blocks(pairs):
    resident, capacity, tile = 240, 1 << 20, 64  # under the cap of 256 splits, far under the capacity
    batch, kv_heads = (pairs, 1) if pairs % 8 else (pairs // 8, 8)
    s = resident // pairs
    # exactly s waves' worth fits; one block fewer and the last split would start a second wave
    assert ops.decode_splits(batch, kv_heads, capacity, s * pairs, tile) == s
    assert ops.decode_splits(batch, kv_heads, capacity, s * pairs - 1, tile) == max(s - 1, 1)
    assert ops.decode_splits(batch, kv_heads, capacity, (s + 1) * pairs - 1, tile) == s


@needs_extension
def test_more_pairs_than_resident_blocks_still_get_one_split():
    assert ops.decode_splits(64, 8, 32768, 264, 64) == 1  # 512 pairs > 264 blocks
    assert ops.decode_splits(1, 8, 32768, 7, 64) == 1
    assert ops.decode_splits(1, 8, 32768, 0, 64) == 1


@needs_extension
@pytest.mark.parametrize("tile", [64, 128])
def test_no_split_is_shorter_than_one_tile_of_the_capacity(tile):
    resident = 100_000  # the wave allows far more: the capacity decides
    for tiles in (1, 2, 3, 17, 255):
        assert ops.decode_splits(1, 1, tiles * tile, resident, tile) == tiles
        assert ops.decode_splits(1, 1, tiles * tile + 1, resident, tile) == tiles + 1  # a partial tile counts
        assert ops.decode_splits(1, 1, tiles * tile - 1, resident, tile) == tiles  # ceil, not floor
    assert ops.decode_splits(1, 1, tile - 1, resident, tile) == 1
    assert ops.decode_splits(1, 1, 1, resident, tile) == 1
    assert ops.decode_splits(1, 1, 0, resident, tile) == 1  # an empty cache still gets one block


@needs_extension
def test_splits_are_capped_at_the_merge_kernels_table():
    assert ops.decode_splits(1, 1, 1 << 30, 1 << 30, 64) == ref.DECODE_MAX_SPLITS == 256
    assert ops.decode_splits(1, 1, 257 * 64, 1 << 30, 64) == 256
    assert ops.decode_splits(1, 1, 256 * 64, 1 << 30, 64) == 256
    assert ops.decode_splits(1, 1, 255 * 64, 1 << 30, 64) == 255


@needs_extension
def test_degenerate_inputs_give_one_split_without_dividing_by_zero():
    # an empty batch (or no KV heads) launches nothing, but the choice must not divide by zero:
    # it counts as one pair, so the capacity decides (8192 / 64 = 128 tiles)
    assert ops.decode_splits(0, 8, 8192, 264, 64) == 128
    assert ops.decode_splits(1, 0, 8192, 264, 64) == 128
    assert ops.decode_splits(1, 1, 8192, 264, 0) == 256  # a tile of 0 keys counts as 1
    assert ops.decode_splits(2**40, 2**40, 8192, 264, 64) == 1  # batch * heads saturates, no overflow
    assert ops.decode_splits(-1, 8, -5, -7, -64) == 1


@needs_extension
def test_splits_match_their_definition_over_a_grid():
    for batch in (1, 2, 3, 4, 8):
        for kv_heads in (1, 2, 4, 8, 32):
            for resident in (1, 7, 64, 132, 264, 528, 1056, 100_000):
                for tile in (64, 128):
                    for capacity in (1, 63, 64, 65, 1000, 2048, 8192, 32768, 131072):
                        want = _splits_by_search(batch, kv_heads, capacity, resident, tile)
                        got = ops.decode_splits(batch, kv_heads, capacity, resident, tile)
                        assert got == want, (batch, kv_heads, capacity, resident, tile)


# ---------------------------------------------------------------------------------------------
# Gated GEMV: pipelined or plain one-row kernel

@needs_extension
def test_the_pipeline_needs_two_groups_of_chunks_per_lane():
    # 4 chunks per group, 32 lanes: a row of at least 2 * 32 * 4 = 256 chunks (4096 bf16 values)
    assert ops.gemv_uses_pipeline("auto", 10, 256, 4, 4, H100_SMS)
    assert not ops.gemv_uses_pipeline("auto", 10, 255, 4, 4, H100_SMS)
    assert ops.gemv_uses_pipeline("auto", 10, 128, 2, 4, H100_SMS)
    assert not ops.gemv_uses_pipeline("auto", 10, 127, 2, 4, H100_SMS)


@needs_extension
def test_the_pipeline_only_where_its_blocks_fit_one_wave():
    wave = 4 * H100_SMS
    assert ops.gemv_uses_pipeline("auto", wave, 512, 4, 4, H100_SMS)
    assert not ops.gemv_uses_pipeline("auto", wave + 1, 512, 4, 4, H100_SMS)
    assert ops.gemv_uses_pipeline("auto", 1, 512, 4, 4, H100_SMS)
    # LLaMA-3.1-8B decode, one token, 8 one-row warps per block: the k projection (1024 rows) is 128
    # blocks and takes the pipeline; the lm_head (128256 rows, 16032 blocks) stays plain
    assert ops.gemv_uses_pipeline("auto", 1024 // 8, 4096 // 8, 4, 4, H100_SMS)
    assert not ops.gemv_uses_pipeline("auto", 128256 // 8, 4096 // 8, 4, 4, H100_SMS)


@needs_extension
def test_a_forced_mode_wins_over_every_threshold():
    for blocks, chunks in ((1, 512), (10**6, 512), (1, 1), (10**6, 1)):
        assert ops.gemv_uses_pipeline("on", blocks, chunks, 4, 4, H100_SMS)
        assert not ops.gemv_uses_pipeline("off", blocks, chunks, 4, 4, H100_SMS)


@needs_extension
def test_the_pipeline_choice_refuses_a_mode_it_does_not_know():
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.gemv_uses_pipeline("ON", 1, 512, 4, 4, H100_SMS)  # modes are parsed values; parse first
    from adaskip import _C

    with pytest.raises(ValueError, match=r"-1 \(auto\), 0 \(off\) or 1 \(on\), got 2"):
        _C.use_pipeline(2, 1, 512, 4, 4, H100_SMS)


# ---------------------------------------------------------------------------------------------
# ADASKIP_GEMV_PIPELINE

PARSED = [
    (None, "auto"), ("", "auto"), ("auto", "auto"), ("AUTO", "auto"), ("   ", "auto"), ("\tAuto\n", "auto"),
    ("on", "on"), ("ON", "on"), ("On ", "on"), (" 1", "on"),
    ("off", "off"), ("OFF", "off"), ("\toff\r\n", "off"), ("0", "off"),
]
REFUSED = ["sideways", "yes", "true", "no", "2", "-1", "01", "o n", "on off", "offf", "aut", "\xa0on", "ön"]


@pytest.mark.parametrize("value,want", PARSED, ids=repr)
def test_reference_parses_the_variable(value, want):
    assert ref.gemv_pipeline_mode(value) == want


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_reference_refuses_anything_else_naming_the_variable_and_the_value(value):
    with pytest.raises(ValueError) as e:
        ref.gemv_pipeline_mode(value)
    assert f"{ENV} must be on, off or auto" in str(e.value)
    assert f"got '{value}'" in str(e.value)


@needs_extension
@pytest.mark.parametrize("value,want", PARSED, ids=repr)
def test_the_kernels_parser_agrees_with_the_reference(value, want):
    assert ops.gemv_pipeline_mode(value) == want


@needs_extension
@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_the_kernels_parser_refuses_the_same_values_with_the_same_message(value):
    with pytest.raises(ValueError) as want:
        ref.gemv_pipeline_mode(value)
    with pytest.raises(ValueError) as got:
        ops.gemv_pipeline_mode(value)
    assert str(got.value) == str(want.value)


def _gemv_args(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    wu = torch.randn(48, 64, generator=g).to(dtype)
    return x, w, wu


@pytest.mark.parametrize("op", ["gated_linear", "gated_swiglu_up"])
@pytest.mark.parametrize("gated_off", [False, True])
def test_the_cpu_path_refuses_a_bad_value_too(op, gated_off, monkeypatch):
    x, w, wu = _gemv_args()
    out = torch.zeros(2, 48, dtype=x.dtype)
    # all gated off: the kernel still launches (the gates are read on the device), so the value is
    # refused whatever the gates say
    gates = ops.new_gates(1, 2, state=ops.GATE_SKIP if gated_off else ops.GATE_RUN)
    weights = (w,) if op == "gated_linear" else (w, wu)
    monkeypatch.setenv(ENV, "sideways")
    with pytest.raises(ValueError, match=f"{ENV} must be on, off or auto .*got 'sideways'"):
        getattr(ops, op)(x, *weights, gates, 0, out)


@pytest.mark.parametrize("value", ["on", " OFF", "Auto", ""])
def test_the_cpu_path_runs_with_any_accepted_value_and_the_same_result(value, monkeypatch):
    x, w, _ = _gemv_args()
    monkeypatch.delenv(ENV, raising=False)
    want = ops.gated_linear(x, w, None, 0, torch.zeros(2, 48, dtype=x.dtype))
    monkeypatch.setenv(ENV, value)
    got = ops.gated_linear(x, w, None, 0, torch.zeros(2, 48, dtype=x.dtype))
    assert torch.equal(got, want)
