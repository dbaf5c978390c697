"""`make test-vllm`, step 1 (the project's venv): export SmolLM2 with 8-sublayer plans (and, for
the KV and throughput comparisons, the full model in the same format), and record what
adaskip.generate answers with each plan, for vllm_serve.py (vLLM's venv) to compare against.

One calibration of 4 essay requests of 512 tokens gives every plan: the `adaskip` plan (scalar
compensation, exported as DeciLM: vLLM's own nemotron_nas serves it) and, from a short greedy kl
search on 1 of those requests with linear stand-ins scored, the `greedy-kl` plans with linear and
with channel stand-ins (exported in the adaskip format: the adaskip_vllm plugin serves them).
The search is the one `adaskip calibrate --search kl --search-stand-in linear` runs, shortened
to what CI affords (1 request, the 4 most similar candidates per step, text only: the retrieval
probes need longer prompts); its settings and wall time go into expected.json. Every plan is static (no online learning), so the
runtime's tokens are the exported model's.

    python tests/integration/vllm_prepare.py OUT_DIR
"""
import json
import sys
import time
from pathlib import Path

import torch

import adaskip
from adaskip.data import essay_paths
from adaskip.runtime.chat import chat_prompt

PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
           "List three colors.", "def fibonacci(n):"]
MAX_TOKENS = 16
CALIBRATION = dict(num_requests=4, prompt_len=512)
SEARCH = dict(search="kl", search_stand_in="linear", search_max_sublayers=8, search_requests=1,
              search_candidates=4, search_retrieval_weight=0.0)
# The throughput run: 16 requests of 1024 prompt tokens each (essays the calibration did not read).
THROUGHPUT = dict(requests=16, prompt_len=1024, max_tokens=32)
# folder -> (strategy, stand-in kind or None, export format)
EXPORTS = {"plan": ("adaskip", None, "decilm"), "linear": ("greedy-kl", "linear", "adaskip"),
           "channel": ("greedy-kl", "channel", "adaskip")}


def throughput_prompts(tokenizer, skip: int) -> list:
    """THROUGHPUT["requests"] windows of prompt_len tokens from the essays after the first `skip`."""
    n, length = THROUGHPUT["requests"], THROUGHPUT["prompt_len"]
    ids = []
    for path in essay_paths()[skip:]:
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
        if len(ids) >= n * length:
            return [ids[i * length:(i + 1) * length] for i in range(n)]
    raise SystemExit(f"the essays hold fewer than {n} x {length} tokens after the first {skip}")


def main(out: Path) -> None:
    model, tokenizer = adaskip.load_model("smollm2", dtype=torch.float32, device="cpu")
    start = time.perf_counter()
    profile = adaskip.calibrate(model, essay_paths()[:4], tokenizer=tokenizer, progress=False, **CALIBRATION,
                                **SEARCH)
    calibration_s = time.perf_counter() - start
    prompts = [chat_prompt(tokenizer, p) if i % 2 else tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS)]
    plans, expected = {}, {}
    for folder, (strategy, stand_in, fmt) in EXPORTS.items():
        plan = adaskip.plan(profile, strategy=strategy, num_sublayers=8, online=False, stand_in=stand_in)
        assert stand_in is None or {v.kind for v in plan.stand_ins.values()} == {stand_in}, plan.describe()
        adaskip.export(model, plan, out / folder, tokenizer=tokenizer, profile=profile, format=fmt, force=True,
                       source="smollm2")
        result = adaskip.generate(model, prompts, max_new_tokens=MAX_TOKENS, plan=plan, eos_token_ids=[])
        plans[folder] = {"plan": plan.to_dict(), "format": fmt, "describe": plan.describe(),
                         "skipped_attention_layers": sorted(plan.skipped_attention_layers),
                         "skipped_ffn_layers": sorted(plan.skipped_ffn_layers), "expected": result.tokens,
                         "kv_cache_bytes": result.kv_cache_bytes}
        print(f"{folder} ({fmt}):\n{plan.describe()}")
    adaskip.export(model, adaskip.SkipPlan(30, {}), out / "full", tokenizer=tokenizer, force=True, source="smollm2")
    full = adaskip.generate(model, prompts, max_new_tokens=MAX_TOKENS, eos_token_ids=[])
    from adaskip.benchmarks.common import provenance

    search = profile.search_result("kl")
    record = {"provenance": provenance(),
              "calibration": {"essays": 4, **CALIBRATION, **SEARCH, "wall_s": round(calibration_s, 1),
                              "search_wall_s": round(search.wall_s, 1), "search_order": search.order},
              "plans": plans, "prompts": prompts, "max_tokens": MAX_TOKENS,
              "expected_full": full.tokens, "kv_cache_bytes_full": full.kv_cache_bytes,
              "throughput": {**THROUGHPUT, "prompts": throughput_prompts(tokenizer, skip=4)}}
    (out / "expected.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
