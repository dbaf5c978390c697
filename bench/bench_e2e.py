#!/usr/bin/env python3
"""End-to-end speed of the adaskip runtime against HF transformers, side by side in one run.

Same random weights (the two models share the tensors), same dtype, SDPA attention in both.
For each context length: prefill of the whole prompt (time to the first logits) and decode time
per output token at that context, medians over repeats after a warm-up, measurements of the
two implementations interleaved. Speed does not depend on weight values, so random weights
stand in for the real checkpoint of that geometry; never use them for quality.

    python bench/bench_e2e.py [--config llama-3.1-8b] [--contexts 8192,32768] [--out FILE]

On a CPU machine the defaults shrink to a tiny config (a smoke run, not a performance figure).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from adaskip.config import ModelArgs  # noqa: E402
from adaskip.loading import build_model  # noqa: E402
from common import default_result_path, device_info, git_commit, now_iso, write_json  # noqa: E402

CONFIGS = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5),
}


def random_pair(name: str, dtype, device):
    """(ours, hf) sharing one set of random weights."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(**CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for key, p in hf.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02
        weights[key] = (w + 1.0 if key.endswith("norm.weight") else w).to(dtype)
    ours = build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                       dict(weights))
    hf.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    with torch.device(device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers were created on meta
    return ours, hf.eval(), cfg


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


@torch.inference_mode()
def run_ours(model, ids, decode_tokens, device, plan=None):
    length = ids.shape[1]
    last = torch.tensor([length - 1], device=device)
    prefill_plan = plan.phase("prefill") if plan is not None else None
    decode_plan = plan.phase("decode") if plan is not None else None
    with Clock(device) as prefill:
        logits = model(ids, 0, kv_len=length, logits_index=last, plan=prefill_plan)
        token = logits.argmax(-1)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    with Clock(device) as decode:
        for i in range(decode_tokens):
            token = model(token[:, None], length + i, kv_len=length + i + 1, logits_index=zero,
                          plan=decode_plan).argmax(-1)
    return prefill.seconds, decode.seconds / decode_tokens


def graph_decode_s(model, ids, decode_tokens, plan=None) -> float:
    """Per-token decode time with the CUDA-graph decode step (capture time excluded); median of
    3 generations (each also prefills)."""
    from adaskip.generate import generate

    prompt = ids[0].tolist()
    times = [generate(model, [prompt], max_new_tokens=decode_tokens + 1, eos_token_ids=[], plan=plan,
                      cuda_graph=True).time_per_output_token_s for _ in range(3)]
    return statistics.median(times)


def skip_rows(ours, cfg, length, budgets, args, device, full_times, full_graph):
    """Measured speed of AdaSkip plans against the full model and against the ideal (the full
    time minus the measured cost of the skipped sublayers)."""
    from adaskip.calibrate import calibrate
    from adaskip.costs import measure_sublayer_costs
    from adaskip.policy import plan as make_plan

    g = torch.Generator().manual_seed(7)
    requests = [torch.randint(0, cfg.vocab_size, (1024,), generator=g).tolist() for _ in range(2)]
    # Random weights: the ranking means nothing for quality, only which sublayers are skipped.
    profile = calibrate(ours, requests, num_requests=2, prompt_len=1024, progress=False)
    costs = {m: measure_sublayer_costs(ours, length, m) for m in ("prefill", "decode")}
    ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
    rows = []
    for k in budgets:
        p = make_plan(profile, num_sublayers=k, mode="e2e", online=False)
        ours.setup_caches(1, length + args.decode_tokens, p.attention_layers)
        times = [run_ours(ours, ids, args.decode_tokens, device, p) for _ in range(args.repeats + 1)][1:]
        pre, dec = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        graph = graph_decode_s(ours, ids, args.decode_tokens, p) if full_graph else None
        skipped = list(p.skip_scales)
        ideal = {m: full_times[i] - sum(costs[m].per_sublayer[s] for s in skipped)
                 for i, m in enumerate(("prefill", "decode"))}
        rows.append({"context": length, "num_sublayers": k, "skipped_attention": len(p.skipped_attention_layers),
                     "skipped_ffn": len(p.skipped_ffn_layers), "paper_predicted_speedup": round(p.predicted_speedup, 4),
                     "prefill_ms": round(pre * 1e3, 3), "decode_ms_per_token": round(dec * 1e3, 3),
                     "prefill_speedup": round(full_times[0] / pre, 4), "decode_speedup": round(full_times[1] / dec, 4),
                     "prefill_ideal_speedup": round(full_times[0] / ideal["prefill"], 4),
                     "decode_ideal_speedup": round(full_times[1] / ideal["decode"], 4),
                     "kv_cache_bytes": ours.kv_cache_bytes(),
                     **({"decode_ms_per_token_graph": round(graph * 1e3, 3),
                         "decode_speedup_graph": round(full_graph / graph, 4)} if graph else {})})
    return rows


@torch.inference_mode()
def run_hf(hf, cfg, ids, decode_tokens, device):
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    with Clock(device) as prefill:
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
    with Clock(device) as decode:
        for _ in range(decode_tokens):
            out = hf(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1)
    return prefill.seconds, decode.seconds / decode_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--config", choices=list(CONFIGS), default="llama-3.1-8b" if on_gpu else "tiny")
    p.add_argument("--contexts", default="8192,32768" if on_gpu else "64,256")
    p.add_argument("--decode-tokens", type=int, default=32 if on_gpu else 8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budgets", help="AdaSkip plans (skipped sublayers) timed against the full model; "
                   "default 8,16 (2 for configs of fewer than 16 layers); empty: none")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]

    info = device_info()
    ours, hf, cfg = random_pair(args.config, dtype, device)
    print(f"adaskip e2e benchmark: {info['device']} | {args.config}, {str(dtype)[6:]}, random weights | "
          f"torch {info['torch']}" + ("" if on_gpu else " | CPU smoke run, not a performance figure"))
    # Same function first: the two must agree before their speeds are compared.
    with torch.inference_mode():
        probe = torch.randint(0, cfg.vocab_size, (1, 64), device=device)
        a, b = ours(probe).float(), hf(input_ids=probe).logits.float()
        parity = ((a - b).norm() / b.norm()).item()
    print(f"logits parity on 64 tokens: |ours - hf| / |hf| = {parity:.2e}")
    if parity > (3e-2 if dtype == torch.bfloat16 else 1e-4):
        sys.exit("adaskip: the runtime does not match transformers on these weights; not timing it")
    rows, plan_rows = [], []
    for length in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        ours.setup_caches(1, length + args.decode_tokens)
        samples = {"ours": [], "hf": []}
        for rep in range(args.repeats + 1):  # the first round is the warm-up
            o = run_ours(ours, ids, args.decode_tokens, device)
            h = run_hf(hf, cfg, ids, args.decode_tokens, device)
            if rep:
                samples["ours"].append(o)
                samples["hf"].append(h)
        med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}
        full_times = med["ours"]
        full_kv = ours.kv_cache_bytes()
        full_graph = graph_decode_s(ours, ids, args.decode_tokens) if on_gpu else None
        budget_spec = args.budgets if args.budgets is not None else ("8,16" if cfg.num_hidden_layers >= 16 else "2")
        budgets = [int(b) for b in budget_spec.split(",") if b]
        plan_rows += skip_rows(ours, cfg, length, budgets, args, device, full_times, full_graph) if budgets else []
        rows.append({"context": length, "decode_tokens": args.decode_tokens,
                     "prefill_ms": {k: round(v[0] * 1e3, 3) for k, v in med.items()},
                     "decode_ms_per_token": {k: round(v[1] * 1e3, 3) for k, v in med.items()},
                     "prefill_ratio_ours_over_hf": round(med["ours"][0] / med["hf"][0], 4),
                     "decode_ratio_ours_over_hf": round(med["ours"][1] / med["hf"][1], 4),
                     "kv_cache_bytes_ours": full_kv,
                     **({"decode_ms_per_token_ours_graph": round(full_graph * 1e3, 3),
                         "decode_ratio_ours_graph_over_hf": round(full_graph / med["hf"][1], 4)} if full_graph else {})})
        del ids
        if on_gpu:
            torch.cuda.empty_cache()

    print(f"{'context':>8}{'prefill ours ms':>17}{'prefill HF ms':>15}{'ratio':>7}"
          f"{'decode ours ms':>16}{'decode HF ms':>14}{'ratio':>7}")
    for r in rows:
        print(f"{r['context']:>8}{r['prefill_ms']['ours']:>17.2f}{r['prefill_ms']['hf']:>15.2f}"
              f"{r['prefill_ratio_ours_over_hf']:>7.3f}{r['decode_ms_per_token']['ours']:>16.3f}"
              f"{r['decode_ms_per_token']['hf']:>14.3f}{r['decode_ratio_ours_over_hf']:>7.3f}")
    for r in rows:
        if "decode_ms_per_token_ours_graph" in r:
            print(f"{r['context']:>8} decode with the CUDA-graph step: {r['decode_ms_per_token_ours_graph']:.3f} ms/token "
                  f"({r['decode_ratio_ours_graph_over_hf']:.3f} of HF's)")
    if plan_rows:
        print(f"\n{'context':>8}{'skipped':>8}{'attn/ffn':>9}{'prefill x':>10}{'ideal':>7}{'decode x':>10}"
              f"{'ideal':>7}{'paper':>7}")
        for r in plan_rows:
            print(f"{r['context']:>8}{r['num_sublayers']:>8}{r['skipped_attention']:>5}/{r['skipped_ffn']:<3}"
                  f"{r['prefill_speedup']:>10.3f}{r['prefill_ideal_speedup']:>7.3f}{r['decode_speedup']:>10.3f}"
                  f"{r['decode_ideal_speedup']:>7.3f}{r['paper_predicted_speedup']:>7.3f}"
                  + (f"  graph decode x {r['decode_speedup_graph']:.3f}" if "decode_speedup_graph" in r else ""))
    import transformers
    result = {"benchmark": "adaskip e2e vs transformers", "config": args.config, "dtype": str(dtype)[6:],
              "weights": "random", "date": now_iso(), "git_commit": git_commit(), **info,
              "transformers": transformers.__version__, "repeats": args.repeats, "statistic": "median",
              "smoke_run": not on_gpu, "logits_parity_rel_err": parity, "rows": rows,
              "plans": plan_rows}
    out = args.out or (default_result_path(f"e2e-{args.config}", info["device"]) if on_gpu else None)
    if out is not None:
        write_json(out, result)


if __name__ == "__main__":
    main()
