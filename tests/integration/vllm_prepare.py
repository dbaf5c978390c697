"""`make test-vllm`, step 1 (the project's venv): export SmolLM2 with an 8-sublayer plan (and,
for the KV comparison, the full model in the same format), and record what adaskip.generate
answers with the same plan, for vllm_serve.py (vLLM's venv) to compare against.

    python tests/integration/vllm_prepare.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

import adaskip
from adaskip.data import essay_paths
from adaskip.runtime.chat import chat_prompt

PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
           "List three colors.", "def fibonacci(n):"]
MAX_TOKENS = 16


def main(out: Path) -> None:
    model, tokenizer = adaskip.load_model("smollm2", dtype=torch.float32, device="cpu")
    profile = adaskip.calibrate(model, essay_paths()[:4], tokenizer=tokenizer, num_requests=4, prompt_len=512,
                                progress=False)
    plan = adaskip.plan(profile, strategy="adaskip", num_sublayers=8, online=False)
    adaskip.export(model, plan, out / "plan", tokenizer=tokenizer, profile=profile, force=True, source="smollm2")
    adaskip.export(model, adaskip.SkipPlan(30, {}), out / "full", tokenizer=tokenizer, force=True, source="smollm2")
    prompts = [chat_prompt(tokenizer, p) if i % 2 else tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS)]
    expected = adaskip.generate(model, prompts, max_new_tokens=MAX_TOKENS, plan=plan, eos_token_ids=[])
    full = adaskip.generate(model, prompts, max_new_tokens=MAX_TOKENS, eos_token_ids=[])
    from adaskip.benchmarks.common import provenance

    record = {"provenance": provenance(), "calibration": {"essays": 4, "requests": 4, "prompt_len": 512},
              "plan": plan.to_dict(), "skipped_attention_layers": sorted(plan.skipped_attention_layers),
              "skipped_ffn_layers": sorted(plan.skipped_ffn_layers), "prompts": prompts,
              "expected": expected.tokens, "expected_full": full.tokens, "max_tokens": MAX_TOKENS,
              "kv_cache_bytes": {"plan": expected.kv_cache_bytes, "full": full.kv_cache_bytes}}
    (out / "expected.json").write_text(json.dumps(record))
    print(plan.describe())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
