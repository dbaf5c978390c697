"""`make test-vllm`, step 2 (vLLM's own venv, `.venv-vllm`): serve the exported folders with a
real vLLM and check its greedy tokens against adaskip.generate's (vllm_prepare.py), and that
vLLM built no attention, so no KV cache, for the plan's skipped attention layers. Writes
OUT_DIR/vllm.json and exits non-zero on any mismatch.

    python tests/integration/vllm_serve.py OUT_DIR
"""
import json
import os
import sys
import time
from pathlib import Path


def attention_layers(model):
    """Per decoder layer: whether vLLM built an attention module for it (runs in the worker)."""
    layers = model.model.layers
    return [getattr(layer, "self_attn", None) is not None for layer in layers]


def serve(folder: Path, prompts, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", max_model_len=1024, enforce_eager=True,
              seed=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    built = llm.apply_model(attention_layers)[0]
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "attention_built": built,
              "kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size, "engine_start_s": start_s}
    del llm
    return result


def main(out: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine in this process: apply_model then reads the model without pickling a function.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    expected = json.loads((out / "expected.json").read_text())
    plan = serve(out / "plan", expected["prompts"], expected["max_tokens"])
    full = serve(out / "full", expected["prompts"], expected["max_tokens"])
    skipped = set(expected["skipped_attention_layers"])
    report = {"vllm": vllm.__version__, "plan": plan, "full": full, "expected": expected["expected"],
              "expected_full": expected["expected_full"],
              "tokens_equal": plan["tokens"] == expected["expected"],
              "full_tokens_equal": full["tokens"] == expected["expected_full"],
              "no_attention_where_skipped": [i for i, b in enumerate(plan["attention_built"]) if not b] == sorted(skipped),
              "kv_cache_tokens": {"plan": plan["kv_blocks"] * plan["block_size"],
                                  "full": full["kv_blocks"] * full["block_size"]},
              "adaskip_kv_cache_bytes": expected["kv_cache_bytes"]}
    (out / "vllm.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("plan", "full", "expected", "expected_full")},
                     indent=1))
    ok = report["tokens_equal"] and report["full_tokens_equal"] and report["no_attention_where_skipped"]
    if not ok:
        print("vLLM's tokens:", plan["tokens"], "\nadaskip's:", expected["expected"], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
